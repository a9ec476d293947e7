"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) on VL-LTR, next to CLIP as a control.

The mixins are not in the transformers wheel: they come from the installed version's source distribution on the
package registry, fetched once with pip and cached under `~/.cache/vlltr-tests/` (`VLLTR_TESTS_CACHE` overrides it).
Only `tests/test_modeling_common.py` and `tests/test_configuration_common.py` are in that sdist; the three modules
they import that it lacks are stubbed to the names they import (see `_STUBS`). If the sdist cannot be fetched, every
test here is skipped with that reason.

The harness is modelled on transformers' `tests/models/clip/test_modeling_clip.py`: CLIPModel and
CLIPForImageClassification run it as controls with the skips CLIP's own test file makes; each VL-LTR class runs it
with the same skips plus its own, each naming its reason. No common test may fail on VL-LTR that passes on CLIP.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import transformers
from transformers import CLIPConfig, CLIPForImageClassification, CLIPModel

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification, VLLTRModel

VERSION = transformers.__version__
CACHE = Path(os.environ.get("VLLTR_TESTS_CACHE", Path.home() / ".cache" / "vlltr-tests"))
PACKAGE = "hf_common_tests"
_STUBS = {
    # ModelTesterMixin's base class; its export tests live in tests/exporters/, not in the sdist (export of the
    # classifier is tested in test_modeling_vlltr.py)
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # only an `issubclass` check needs it; VL-LTR does not generate
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # read by ConfigTester.check_config_arguments_init, which returns before using it for composite configs (CLIP's
    # and VL-LTR's)
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


def _load_common_tests():
    """Imports the sdist's common test modules; returns (modeling, configuration) or raises `RuntimeError` why not."""
    root = CACHE / f"transformers-{VERSION}"
    package = root / PACKAGE
    wanted = ("test_modeling_common.py", "test_configuration_common.py")
    if not all((package / name).exists() for name in wanted):
        sdist = CACHE / f"transformers-{VERSION}.tar.gz"
        if not sdist.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
                 f"transformers=={VERSION}", "-d", str(CACHE)],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if proc.returncode != 0 or not sdist.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"could not fetch the transformers {VERSION} sdist with pip: {tail[0]}")
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch, tarfile.open(sdist) as archive:
            for name in wanted:
                archive.extract(f"transformers-{VERSION}/tests/{name}", scratch, filter="data")
            staging = Path(scratch) / PACKAGE
            staging.mkdir()
            for name in wanted:
                (Path(scratch) / f"transformers-{VERSION}" / "tests" / name).rename(staging / name)
            for relative, text in {"__init__.py": "", **_STUBS}.items():
                path = staging / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                (path.parent / "__init__.py").touch()
                path.write_text(text)
            root.mkdir(parents=True, exist_ok=True)
            if not package.exists():
                staging.rename(package)
    sys.path.insert(0, str(root))
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )


try:
    common, config_common = _load_common_tests()
except Exception as error:  # noqa: BLE001 - no registry, no sdist, or an incompatible one: skip, do not fail
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

ModelTesterMixin, ConfigTester = common.ModelTesterMixin, config_common.ConfigTester
floats_tensor, ids_tensor, random_attention_mask = (
    common.floats_tensor,
    common.ids_tensor,
    common.random_attention_mask,
)

BATCH, SEQ, IMAGE, NUM_LABELS, NUM_ANCHORS = 4, 7, 16, 3, 2


def clip_config() -> CLIPConfig:
    """Tiny CLIP, sizes as in transformers' CLIP tests (smaller image)."""
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, dropout=0.1)
    tower.update(attention_dropout=0.1, initializer_range=0.02)
    return CLIPConfig(
        text_config=dict(vocab_size=99, max_position_embeddings=512, projection_dim=32, **tower),
        vision_config=dict(image_size=IMAGE, patch_size=4, num_channels=3, projection_dim=32, **tower),
        projection_dim=32,
    )


def vlltr_config(head_type: str = "lgr") -> VLLTRConfig:
    return VLLTRConfig(
        clip_config=clip_config(),
        id2label={i: f"class_{i}" for i in range(NUM_LABELS)},
        num_anchor_sentences=NUM_ANCHORS,
        head_type=head_type,
    )


class VLLTRForImageClassificationWithAnchors(VLLTRForImageClassification):
    """A classifier whose anchors have been selected (here: random), as every usable LGR checkpoint has: without
    anchors its forward refuses to run, by design."""

    def __init__(self, config):
        super().__init__(config)
        if config.head_type == "lgr" and not self.anchor_text_embeds.is_meta:  # on meta, from_pretrained loads them
            generator = torch.Generator().manual_seed(0)
            anchors = torch.randn(
                config.num_labels, config.num_anchor_sentences, config.projection_dim, generator=generator
            )
            self.set_anchor_embeddings(anchors.to(self.anchor_text_embeds))


class Tester:
    """The ModelTester of the common tests: config and inputs (`text` for the image-text models)."""

    def __init__(self, parent, make_config, text: bool):
        self.parent, self.make_config, self.text = parent, make_config, text
        self.batch_size, self.seq_length, self.is_training = BATCH, SEQ, True
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.image_size, self.num_channels = IMAGE, 3

    def get_config(self):
        return self.make_config()

    def prepare_config_and_inputs_for_common(self):
        inputs = {"pixel_values": floats_tensor([BATCH, 3, IMAGE, IMAGE])}
        if self.text:
            inputs.update(input_ids=ids_tensor([BATCH, SEQ], 99), attention_mask=random_attention_mask([BATCH, SEQ]))
            inputs["return_loss"] = True
        return self.get_config(), inputs

    def prepare_config_and_inputs(self):
        config, inputs = self.prepare_config_and_inputs_for_common()
        return config, *inputs.values()


# CLIP's own test file makes these skips for CLIPModel and CLIPForImageClassification.
CLIP_SKIPS = {
    "test_hidden_states_output": "hidden states are tested in the tower models' tests (CLIP's own skip)",
    "test_inputs_embeds": "inputs_embeds are tested in the tower models' tests (CLIP's own skip)",
    "test_retain_grad_hidden_states_attentions": "tested in the tower models' tests (CLIP's own skip)",
    "test_model_get_set_embeddings": "a composite model has no single input/output embedding (CLIP's own skip)",
}


def _skip(reason: str):
    def test(self):
        self.skipTest(reason)

    return test


def common_case(name: str, model_class, make_config, text: bool, skips: dict[str, str], only: set[str] | None = None):
    """A `unittest.TestCase` running ModelTesterMixin and ConfigTester on one model class (`only`: just those tests;
    unittest collects no attribute that is not callable)."""

    def setUp(self):
        self.model_tester = Tester(self, make_config, text)
        self.config_tester = ConfigTester(self, config_class=type(make_config()), has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = ModelTesterMixin._prepare_for_class(self, inputs_dict, model_class, return_labels)
        if return_labels and not text:  # what CLIP's mapping entry gives it; VL-LTR is registered at import only
            inputs["labels"] = torch.zeros(BATCH, dtype=torch.long)
        return inputs

    attrs = {
        "all_model_classes": (model_class,),
        "additional_model_inputs": ["pixel_values"] if text else [],
        "test_resize_embeddings": False,
        "test_attention_outputs": False,
        "_is_composite": True,
        "setUp": setUp,
        "test_config": test_config,
        "_prepare_for_class": _prepare_for_class,
        **{test: _skip(reason) for test, reason in {**CLIP_SKIPS, **skips}.items()},
    }
    if only is not None:
        attrs.update({test: None for test in dir(ModelTesterMixin) + ["test_config"] if test.startswith("test_")})
        attrs.update({test: getattr(ModelTesterMixin, test) for test in only})
    case = type(name, (ModelTesterMixin, unittest.TestCase), attrs)
    if model_class not in (CLIPModel, CLIPForImageClassification):
        for test in KNOWN_FAILURES:
            setattr(case, test, unittest.expectedFailure(getattr(ModelTesterMixin, test)))
    return case


VLLTR_SKIPS: dict[str, str] = {}
_FIRST_LAYER = (
    "the test watches the model's first checkpointing layer, a CLIP text-tower layer the classifier keeps (frozen) "
    "but never runs; test_stock_clients checks checkpointing on the vision tower"
)
CLASSIFIER_SKIPS = {
    **VLLTR_SKIPS,
    "test_training_gradient_checkpointing": _FIRST_LAYER,
    "test_training_gradient_checkpointing_use_reentrant_false": _FIRST_LAYER,
    "test_training_gradient_checkpointing_use_reentrant_true": _FIRST_LAYER,
}
# These compare a build without anchors (meta device / `_init_weights`) with one from `__init__`: this harness's LGR
# class sets anchors after init (as anchor selection does), so they run on the plain class instead (LGRInitCommonTest).
_INIT_TESTS = {"test_init_weights_can_init_buffers", "test_can_init_all_missing_weights"}
_BOOL_BUFFER = (
    "a bug in the test (transformers 5.24): its branch for bool tensors calls `state_dict()` on a dict (TypeError), "
    "for any model with a persistent bool buffer, here `anchor_mask`; CLIP has none"
)
_ON_PLAIN = "run on the LGR class without anchors (VLLTRForImageClassificationLGRInitCommonTest)"
LGR_SKIPS = {
    **CLASSIFIER_SKIPS,
    **{test: _ON_PLAIN for test in _INIT_TESTS},
    "test_torch_save_load": _BOOL_BUFFER,
    "test_all_tensors_are_parameter_or_buffer": "it runs a forward after a meta-device build, whose anchors are "
    "zero: an LGR head without anchors refuses to run until anchor selection gives them (by design)",
}
# Fails on VL-LTR, passes on CLIP, not explained yet: none. Such a test would run here as an expected failure, so a
# fix shows.
KNOWN_FAILURES: dict[str, str] = {}

CLIPModelCommonTest = common_case("CLIPModelCommonTest", CLIPModel, clip_config, True, {})
_CLIP_FAILS = "fails on CLIPForImageClassification itself: its unused post_layernorm gets no gradient (control)"
CLIPForImageClassificationCommonTest = common_case(
    "CLIPForImageClassificationCommonTest",
    CLIPForImageClassification,
    clip_config,
    False,
    {
        "test_training_gradient_checkpointing": _CLIP_FAILS,
        "test_training_gradient_checkpointing_use_reentrant_false": _CLIP_FAILS,
        "test_training_gradient_checkpointing_use_reentrant_true": _CLIP_FAILS,
    },
)
VLLTRModelCommonTest = common_case("VLLTRModelCommonTest", VLLTRModel, vlltr_config, True, VLLTR_SKIPS)
VLLTRForImageClassificationLGRCommonTest = common_case(
    "VLLTRForImageClassificationLGRCommonTest",
    VLLTRForImageClassificationWithAnchors,
    lambda: vlltr_config("lgr"),
    False,
    LGR_SKIPS,
)
VLLTRForImageClassificationLGRInitCommonTest = common_case(
    "VLLTRForImageClassificationLGRInitCommonTest",
    VLLTRForImageClassification,
    lambda: vlltr_config("lgr"),
    False,
    {},
    only=_INIT_TESTS,
)
VLLTRForImageClassificationFCCommonTest = common_case(
    "VLLTRForImageClassificationFCCommonTest",
    VLLTRForImageClassification,
    lambda: vlltr_config("fc"),
    False,
    CLASSIFIER_SKIPS,
)
