"""Shared tiny fixtures: a random CLIP folder laid out like `openai/clip-vit-base-patch16`, and small VL-LTR models.

Everything is offline. HF_HOME and the vlltr cache point at a scratch folder so the tests never touch the user's.
"""

import os
import subprocess
import sys
import tempfile
import textwrap

_SCRATCH = tempfile.mkdtemp(prefix="vlltr-tests-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HOME=os.path.join(_SCRATCH, "hf"),
    VLLTR_CACHE=os.path.join(_SCRATCH, "vlltr"),
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, CLIPModel  # noqa: E402

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification  # noqa: E402
from training.standin_clip import build_char_tokenizer, save_clip_folder, small_clip_config  # noqa: E402

torch.set_num_threads(1)

IMAGE_SIZE = 32
PROJECTION_DIM = 16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Python run first in a fresh interpreter that must not see this package (a user who never installed it).
_WITHOUT_THE_PACKAGE = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("modeling_vlltr", "training"):
            raise ImportError("package not installed: " + name)
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", {REPO_ROOT!r})]
for name in ("modeling_vlltr", "training"):
    try:
        __import__(name)
        raise SystemExit(name + " is importable; the test would prove nothing")
    except ImportError:
        pass
import torch
torch.set_num_threads(1)
"""


def run_without_the_package(body: str, cwd, **env: str) -> subprocess.CompletedProcess:
    """Runs `body` (Python source, dedented here) in a fresh interpreter where neither `modeling_vlltr` nor
    `training` can be imported, with `env` added to the environment (PYTHONPATH removed)."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_PACKAGE + textwrap.dedent(body)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tiny_clip_config():
    return small_clip_config(
        image_size=IMAGE_SIZE, patch_size=8, width=32, layers=2, heads=4, projection_dim=PROJECTION_DIM
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP checkpoint folder (weights, tokenizer, image processor), loaded by path like a Hub name."""
    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    save_clip_folder(CLIPModel(tiny_clip_config()), build_char_tokenizer(), path)
    return str(path)


def make_classifier(num_labels: int = 5, num_anchors: int = 4, seed: int = 0, **config_kwargs):
    """A tiny VLLTRForImageClassification with random head weights and random anchors (some classes padded)."""
    torch.manual_seed(seed)
    config = VLLTRConfig(
        clip_config=tiny_clip_config(),
        id2label={i: f"class_{i}" for i in range(num_labels)},
        num_anchor_sentences=num_anchors,
        **config_kwargs,
    )
    model = VLLTRForImageClassification(config)
    if config.head_type == "lgr":
        mask = torch.ones(num_labels, num_anchors, dtype=torch.bool)
        mask[0, num_anchors // 2 :] = False  # class 0 has fewer than M sentences
        mask[-1, 1:] = False  # the last class has a single anchor
        model.set_anchor_embeddings(torch.randn(num_labels, num_anchors, PROJECTION_DIM), mask)
        with torch.no_grad():  # move the attention away from the identity so the test sees real projections
            model.text_branch.query_proj.weight.add_(0.3 * torch.randn(PROJECTION_DIM, PROJECTION_DIM))
            model.text_branch.key_proj.weight.add_(0.3 * torch.randn(PROJECTION_DIM, PROJECTION_DIM))
            model.text_branch.key_norm.weight.add_(0.2 * torch.randn(PROJECTION_DIM))
            model.text_branch.key_norm.bias.add_(0.2 * torch.randn(PROJECTION_DIM))
            model.text_branch.query_norm.bias.add_(0.2 * torch.randn(PROJECTION_DIM))
    return model


@pytest.fixture(scope="session")
def tokenizer(tiny_clip_dir):
    """The tiny CLIP folder's tokenizer, loaded like a Hub one."""
    return AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture
def tiny_classifier():
    return make_classifier()


def random_pixels(batch_size: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


CLASS_NAMES = ["red square", "green bar", "blue ring", "yellow dot"]
TRAIN_COUNTS = [12, 6, 3, 2]  # a long tail


def _pattern(label: int, rng):
    from PIL import Image, ImageDraw

    image = Image.fromarray(rng.integers(0, 60, size=(40, 40, 3), dtype="uint8"))
    draw = ImageDraw.Draw(image)
    colour = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)][label]
    offset = int(rng.integers(0, 8))
    if label == 0:
        draw.rectangle([8 + offset, 8, 28 + offset, 28], fill=colour)
    elif label == 1:
        draw.rectangle([4, 14 + offset, 36, 22 + offset], fill=colour)
    elif label == 2:
        draw.ellipse([6 + offset, 6, 30 + offset, 30], outline=colour, width=4)
    else:
        draw.ellipse([14 + offset, 14, 22 + offset, 22], fill=colour)
    return image


def write_lt_dataset(root, train_counts=TRAIN_COUNTS, eval_per_class: int = 3, seed: int = 0) -> dict:
    """A small long-tailed image set in the ImageNet-LT layout: images/, train/val/test list files, class names and a
    JSON corpus. Returns the paths."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    splits = {
        "train": train_counts,
        "val": [eval_per_class] * len(train_counts),
        "test": [eval_per_class] * len(train_counts),
    }
    paths = {}
    for split, counts in splits.items():
        lines = []
        for label, count in enumerate(counts):
            for i in range(count):
                rel = f"images/{split}_{label}_{i}.png"
                _pattern(label, rng).save(os.path.join(root, rel))
                lines.append(f"{rel} {label}")
        paths[split] = os.path.join(root, f"{split}.txt")
        with open(paths[split], "w") as f:
            f.write("\n".join(lines) + "\n")
    paths["classes"] = os.path.join(root, "classes.txt")
    with open(paths["classes"], "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    corpus = {
        name: [
            f"A {name} on a dark noisy background.",
            f"The {name} is drawn in one colour.",
            f"Nothing but a {name}.",
        ]
        for name in CLASS_NAMES
    }
    paths["corpus"] = os.path.join(root, "corpus.json")
    with open(paths["corpus"], "w") as f:
        json.dump(corpus, f)
    paths["root"] = root
    return paths


@pytest.fixture(scope="session")
def lt_dataset(tmp_path_factory):
    return write_lt_dataset(tmp_path_factory.mktemp("lt_data"))
