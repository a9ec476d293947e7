"""Convert the official VL-LTR checkpoints (GitHub ChangyaoTian/VL-LTR) into this package's checkpoints.

A stage-2 checkpoint (the official `LGR` model: visual tower, anchors, attention, image-branch MLP) becomes a
`VLLTRForImageClassification`; a stage-1 checkpoint (the official `CVLP` model, a full CLIP in OpenAI's layout) becomes
a `VLLTRModel`. Both are written with config, `model.safetensors`, remote code, tokenizer, image processor and a
model card, and load with the Auto classes and the pipeline like any other checkpoint of this package.

    # ImageNet-LT, ViT-B/16 (the release zip or the checkpoint.pth inside it)
    python -m training.convert_official --checkpoint imageNet-LT_vit16.zip --clip openai/clip-vit-base-patch16 \
        --class_names data/imagenet/classes.txt --verify --output_dir vlltr-imagenet-lt-vit-b16

    # with the official stage-1 checkpoint, whose trained text tower then replaces CLIP's
    python -m training.convert_official --checkpoint finetune_vit16/checkpoint.pth \
        --stage1_checkpoint pretrain_vit16/checkpoint.pth --clip openai/clip-vit-base-patch16 \
        --class_names data/imagenet/classes.txt --verify --output_dir vlltr-imagenet-lt-vit-b16

    # a stage-1 checkpoint alone
    python -m training.convert_official --checkpoint pretrain_vit16/checkpoint.pth --verify --output_dir cvlp-vit-b16

What is mapped (OpenAI layout -> transformers' CLIP layout, official head -> this package's head):

    visual.conv1 / class_embedding / positional_embedding   vision_model.embeddings.{patch,class,position}_embedding
    visual.ln_pre, visual.ln_post                            vision_model.pre_layrnorm, vision_model.post_layernorm
    *.transformer.resblocks.i.attn.in_proj_{weight,bias}     *.encoder.layers.i.self_attn.{q,k,v}_proj (split in 3)
    *.attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj        self_attn.out_proj, layer_norm1, layer_norm2, mlp.fc1/fc2
    visual.proj (W, D), text_projection (W, D)               visual_projection.weight, text_projection.weight (D, W)
    token_embedding, positional_embedding, ln_final          text_model.embeddings.*, text_model.final_layer_norm
    logit_scale                                              clip.logit_scale (the stage-1 value, frozen in stage 2)
    text_embeddings (C, M, D)                                anchor_text_embeds; anchor_mask from the sentence counts
    text_block.attn.norm1q / wq, norm1k / wk                 text_branch.query_norm / query_proj, key_norm / key_proj
    text_block.visual_fc.0, .2                               image_branch.fc1, image_branch.fc2
    v_detach (model name in the saved args)                  config.detach_anchor_norm

The architecture is read from the tensor shapes (width, layers, patch, resolution, embedding size, classes, anchors);
attention heads are width // 64, as in OpenAI CLIP and the official `VisionTransformer` (override with
--vision_heads / --text_heads). The official anchor padding mask is not saved: it comes from the per-class sentence
counts (--sentence_counts) when they are known; otherwise from the anchors, since the official code zero-pads classes
with fewer than M sentences (`pad_sequence`) exactly where it masks them (`build_key_padding_mask`). Only ViT checkpoints convert: transformers' CLIP has no ResNet tower.

The `.pth` files are pickles. They are read with `torch.load(weights_only=True)` and an allow-list of what the
official checkpoints hold (`argparse.Namespace` for the saved arguments); anything else is refused.
`--verify` runs the official forward (`training.official_reference`) and the converted model on the same random
images (and, for a text tower, sentences) in float64 before anything is written, prints the largest differences and
stops if one exceeds --verify_tolerance. It holds the anchors several times in float64: for iNaturalist 2018
(8142 classes × 64 anchors × 512) that is about 10 GB of memory.
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection
from transformers.utils import logging

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification, VLLTRModel
from modeling_vlltr.configuration_vlltr import DEFAULT_FUSION_ALPHA

from . import official_reference as reference
from .cli import UsageError, load_checked, parse_args, prepare_output_dir, print_summary, record_run, run_main
from .data import eval_image_processor
from .io_utils import DataError, save_pretrained_to
from .model_card import history_entry
from .splits import read_class_names

logger = logging.get_logger(__name__)

OFFICIAL_REPO = "ChangyaoTian/VL-LTR"
OFFICIAL_COMMIT = "e5391f5"  # the official code the mapping was read from (HEAD, 2022-08-19)
RELEASE_URL = f"https://github.com/{OFFICIAL_REPO}/releases/download/checkpoints/"
RELEASE_ASSETS = {  # official README, "Results": the ViT-B/16 release assets
    "imageNet-LT_vit16.zip": "imagenet-lt",
    "places_vit16.zip": "places-lt",
    "inat_finetune_vit16.zip": "inaturalist-2018",
}
DATASETS = ("imagenet-lt", "places-lt", "inaturalist-2018")
OFFICIAL_DATA_SET = {"IMNET_LT": "imagenet-lt", "PLACES_LT": "places-lt", "INAT": "inaturalist-2018"}
NUM_CLASSES = {1000: "imagenet-lt", 365: "places-lt", 8142: "inaturalist-2018"}
# Test-time fusion weight α of the official `evaluate_LT` (engine.py L235: 0.7 if 'INAT' in data_set else 0.2).
FUSION_ALPHA = {"imagenet-lt": DEFAULT_FUSION_ALPHA, "places-lt": DEFAULT_FUSION_ALPHA, "inaturalist-2018": 0.7}
# Top-1 % reported by the paper (Tian et al., ECCV 2022) and the official README for CLIP ViT-B/16 at 224 px:
# quoted in the model card as reported, never as measured.
REPORTED_VIT_B16 = {
    "imagenet-lt": {"split": "test", "overall": 77.2, "many": 84.5, "medium": 74.6, "few": 59.3},
    "places-lt": {"split": "test", "overall": 50.1, "many": 54.2, "medium": 48.5, "few": 42.0},
    "inaturalist-2018": {"split": "val2018", "overall": 76.8},
}
# Top-level entries of an official checkpoint (main.py L460-467) that are not part of the model.
TRAINING_STATE = ("optimizer", "lr_scheduler", "epoch", "scaler", "args")
# What the official checkpoints hold besides tensors and plain containers: the run's argparse arguments.
SAFE_GLOBALS = [argparse.Namespace]


class ConversionError(UsageError):
    """An official checkpoint that cannot be converted (or a converted model that does not match it)."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading an official checkpoint safely
# ----------------------------------------------------------------------------------------------------------------------


def _is_torch_archive(names: list[str]) -> bool:
    """torch.save's own format is a zip too (`<name>/data.pkl`, `<name>/data/0`, ...)."""
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and not any(
        n.endswith(".pth") for n in names
    )


def _safe_torch_load(path: str | os.PathLike, shown: str):
    with open(path, "rb") as f:
        head = f.read(64)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a pickle (protocol >= 2)
        raise ConversionError(
            f"{shown}: not a PyTorch checkpoint (it starts with {head[:24]!r}): is it an error page or a text file "
            f"saved under the checkpoint's name? Download it again."
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global ['\"`]?([\w.]+)", str(e))
        what = f"`{found.group(1)}`" if found else "an object"
        allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
        raise ConversionError(
            f"{shown}: refused to unpickle {what}: the file holds something other than tensors, plain containers and "
            f"the allow-listed {allowed} that official VL-LTR checkpoints hold, so it is not loaded."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{shown}: not a readable PyTorch checkpoint ({first}).") from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, struct.error) as e:
        # A damaged pickle (cut short, or garbage after a valid start) fails anywhere in the unpickler.
        raise ConversionError(
            f"{shown}: not a readable PyTorch checkpoint (the unpickler failed on it with {type(e).__name__}): the "
            f"file is damaged or cut short; download it again."
        ) from None


def load_official_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Reads an official checkpoint: a release zip (the `.pth` inside is used) or the `.pth` itself.

    Returns `(state_dict, info)`: the model's tensors and `info` with the saved `args` (a dict, or None), the
    `epoch`, the top-level entries dropped, the file actually read and its SHA-256."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path}: is a folder: pass the release zip or the checkpoint.pth in it.")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty (an interrupted download?): download it again.")
    digest = hashlib.sha256()  # of the file given (the release zip as downloaded), to identify it in the model card
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    shown, name = str(path), path.name
    with tempfile.TemporaryDirectory(prefix="vlltr-convert-") as tmp:
        target = path
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if not _is_torch_archive(names):
                    candidates = [n for n in names if n.endswith(".pth") and not n.endswith("/")]
                    preferred = [n for n in candidates if Path(n).name == "checkpoint.pth"]
                    chosen = preferred if len(preferred) == 1 else candidates
                    if len(chosen) != 1:
                        listed = ", ".join(candidates[:6]) or "none"
                        raise ConversionError(
                            f"{path}: expected one checkpoint.pth in the archive, found {listed}; extract "
                            f"the one to convert and pass it instead."
                        )
                    shown, name = f"{path}:{chosen[0]}", f"{path.name}:{chosen[0]}"
                    logger.info(f"Extracting {shown}")
                    target = Path(archive.extract(chosen[0], tmp))
        loaded = _safe_torch_load(target, shown)
    if not isinstance(loaded, dict):
        raise ConversionError(f"{shown}: expected a dict (the official `{{'model': state_dict, ...}}`), got "
                              f"{type(loaded).__name__}.")  # fmt: skip
    if "model" in loaded:
        unknown = sorted(set(loaded) - {"model", *TRAINING_STATE})
        if unknown:
            raise ConversionError(f"{shown}: unknown top-level entries {unknown}; an official checkpoint holds "
                                  f"'model' and {list(TRAINING_STATE)}.")  # fmt: skip
        state, dropped = loaded["model"], [k for k in TRAINING_STATE if k in loaded]
    else:  # a bare state dict
        state, dropped = loaded, []
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        bad = next((k for k, v in state.items() if not torch.is_tensor(v)), None) if isinstance(state, dict) else None
        raise ConversionError(f"{shown}: the model entry is not a state dict of tensors (entry {bad!r}).")
    if state and all(k.startswith("module.") for k in state):  # saved from the DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    args = loaded.get("args") if "model" in loaded else None
    info = {
        "args": vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None,
        "epoch": loaded.get("epoch") if "model" in loaded else None,
        "dropped": dropped,
        "file": shown,
        "name": name,
        "sha256": digest.hexdigest(),
    }
    return dict(state), info


# ----------------------------------------------------------------------------------------------------------------------
# The mapping: OpenAI CLIP layout -> transformers' CLIP layout
# ----------------------------------------------------------------------------------------------------------------------


class _Tensors:
    """The official state dict, handed out key by key, so that whatever is never taken can be named at the end."""

    def __init__(self, state: dict, source: str):
        self.state, self.source, self.taken = state, source, set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def peek(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"{self.source}: no tensor {key!r}; this is not an official VL-LTR ViT checkpoint.")
        return self.state[key]

    def take(self, key: str) -> torch.Tensor:
        tensor = self.peek(key)
        self.taken.add(key)
        return tensor

    def count(self, prefix: str) -> int:
        indices = {k[len(prefix) :].split(".")[0] for k in self.state if k.startswith(prefix)}
        if not all(i.isdigit() for i in indices) or sorted(map(int, indices)) != list(range(len(indices))):
            raise ConversionError(f"{self.source}: the blocks under {prefix!r} are not numbered 0..N-1: {indices}.")
        return len(indices)

    def untaken(self) -> list[str]:
        return sorted(set(self.state) - self.taken)


def _heads(width: int, override: int | None, tower: str) -> int:
    heads = override or width // 64  # OpenAI CLIP and the official VisionTransformer: width // 64
    if heads < 1 or width % heads:
        raise ConversionError(
            f"The {tower} tower has width {width}: {heads} attention heads do not divide it; pass --{tower}_heads."
        )
    return heads


def _convert_blocks(tensors: _Tensors, official: str, hf: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        src, dst = f"{official}{i}.", f"{hf}{i}."
        q, k, v = tensors.take(src + "attn.in_proj_weight").chunk(3, dim=0)  # (3W, W) -> 3 x (W, W)
        qb, kb, vb = tensors.take(src + "attn.in_proj_bias").chunk(3, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.q_proj.bias": qb, dst + "self_attn.k_proj.bias": kb, dst + "self_attn.v_proj.bias": vb,
        })  # fmt: skip
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = tensors.take(f"{src}{a}.{p}")
    return out


def vision_config_from_shapes(tensors: _Tensors, heads: int | None = None) -> dict:
    """`CLIPVisionConfig` fields of the official `visual.*` ViT, read from its tensor shapes."""
    if "visual.attnpool.c_proj.weight" in tensors or "visual.layer1.0.conv1.weight" in tensors:
        raise ConversionError(
            f"{tensors.source} holds a ResNet-50 visual tower (visual.layer1.*, visual.attnpool.*): transformers' "
            f"CLIPModel has only ViT towers, so only the ViT-B/16 checkpoints can be converted."
        )
    width, _, patch, _ = tensors.peek("visual.conv1.weight").shape  # (W, 3, p, p)
    positions = tensors.peek("visual.positional_embedding").shape[0]  # g² + 1
    grid = math.isqrt(positions - 1)
    if grid * grid + 1 != positions:
        raise ConversionError(f"{tensors.source}: visual.positional_embedding has {positions} rows, not g² + 1.")
    layers = tensors.count("visual.transformer.resblocks.")
    return dict(
        hidden_size=width,
        intermediate_size=tensors.peek("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, heads, "vision"),
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=tensors.peek("visual.proj").shape[1],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def convert_vision(tensors: _Tensors, layers: int) -> dict:
    """transformers' `CLIPModel` vision keys (without the `clip.` prefix) from the official `visual.*` ViT."""
    e = "vision_model.embeddings."
    out = {
        e + "patch_embedding.weight": tensors.take("visual.conv1.weight"),
        e + "class_embedding": tensors.take("visual.class_embedding"),
        e + "position_embedding.weight": tensors.take("visual.positional_embedding"),
        "visual_projection.weight": tensors.take("visual.proj").T.contiguous(),  # x @ proj == Linear with proj.T
    }
    for official, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"vision_model.{hf}.{p}"] = tensors.take(f"visual.{official}.{p}")
    out.update(_convert_blocks(tensors, "visual.transformer.resblocks.", "vision_model.encoder.layers.", layers))
    return out


def text_config_from_shapes(tensors: _Tensors, base: CLIPTextConfig, heads: int | None = None) -> dict:
    """`CLIPTextConfig` fields of the official text tower, read from its shapes; the token ids come from `base` (the
    --clip tokenizer's text config)."""
    vocab, width = tensors.peek("token_embedding.weight").shape
    fields = base.to_dict()
    fields.update(
        hidden_size=width,
        intermediate_size=tensors.peek("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        num_hidden_layers=tensors.count("transformer.resblocks."),
        num_attention_heads=_heads(width, heads, "text"),
        vocab_size=vocab,
        max_position_embeddings=tensors.peek("positional_embedding").shape[0],
        projection_dim=tensors.peek("text_projection").shape[1],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return _text_fields(fields)


def _text_fields(fields: dict) -> dict:
    allowed = set(CLIPTextConfig().to_dict()) - {"model_type", "transformers_version", "architectures"}
    return {k: v for k, v in fields.items() if k in allowed}


def convert_text(tensors: _Tensors, layers: int) -> dict:
    """transformers' `CLIPModel` text keys (without the `clip.` prefix) from the official CVLP text tower."""
    out = {
        "text_model.embeddings.token_embedding.weight": tensors.take("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": tensors.take("positional_embedding"),
        "text_model.final_layer_norm.weight": tensors.take("ln_final.weight"),
        "text_model.final_layer_norm.bias": tensors.take("ln_final.bias"),
        "text_projection.weight": tensors.take("text_projection").T.contiguous(),  # (D, W)
    }
    out.update(_convert_blocks(tensors, "transformer.resblocks.", "text_model.encoder.layers.", layers))
    return out


def official_anchor_mask(text_embeddings: torch.Tensor, sentence_counts: list[int] | None = None) -> torch.Tensor:
    """(C, M) bool, True for the anchors the official model attends to (the complement of its key padding mask).

    The official `build_key_padding_mask` masks slot m of class c when m >= n_c, the number of sentences of class c
    in its corpus (`end_idxs`). Those counts are not saved in the checkpoint; when they are not given, the mask is read
    from the anchors themselves: `_load_text_embeddings` zero-pads a class with fewer than M sentences
    (`pad_sequence`) in exactly the slots the counts mask, and a real sentence embedding is never exactly zero."""
    num_classes, num_anchors = text_embeddings.shape[:2]
    if sentence_counts is None:
        return text_embeddings.ne(0).any(dim=-1)
    counts = torch.as_tensor(sentence_counts)
    return torch.arange(num_anchors)[None] < counts[:, None]


def read_sentence_counts(path: str, num_classes: int) -> list[int]:
    """One integer per line (line i = class i), or a JSON list: the sentences of each class in the official corpus."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--sentence_counts {path}: {e.strerror or e}.") from None
    try:
        counts = json.loads(text) if text.lstrip().startswith("[") else [int(line) for line in text.split()]
    except ValueError as e:
        raise UsageError(f"--sentence_counts {path}: not a list of integers ({e}).") from None
    if len(counts) != num_classes or not all(isinstance(n, int) and n >= 1 for n in counts):
        raise UsageError(
            f"--sentence_counts {path}: expected {num_classes} integers >= 1 (one per class), got {len(counts)} values."
        )
    return counts


def convert_lgr_head(tensors: _Tensors, sentence_counts: list[int] | None = None) -> dict:
    """This package's head keys from the official `text_embeddings` and `text_block.*` (op_type 'two_branch')."""
    anchors = tensors.take("text_embeddings")  # (C, M, D)
    a, m = "text_block.attn.", "text_block.visual_fc."
    out = {
        "anchor_text_embeds": anchors,
        "anchor_mask": official_anchor_mask(anchors, sentence_counts),
        "text_branch.query_proj.weight": tensors.take(a + "wq.weight"),
        "text_branch.key_proj.weight": tensors.take(a + "wk.weight"),
        "image_branch.fc1.weight": tensors.take(m + "0.weight"),
        "image_branch.fc1.bias": tensors.take(m + "0.bias"),
        "image_branch.fc2.weight": tensors.take(m + "2.weight"),
        "image_branch.fc2.bias": tensors.take(m + "2.bias"),
    }
    for official, ours in (("norm1q", "query_norm"), ("norm1k", "key_norm")):
        for p in ("weight", "bias"):
            out[f"text_branch.{ours}.{p}"] = tensors.take(f"{a}{official}.{p}")
    return out


def _refuse_unknown(tensors: _Tensors, ignore: tuple[str, ...] = ()) -> None:
    unknown = [k for k in tensors.untaken() if not k.startswith(ignore)]
    if unknown:
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise ConversionError(
            f"{tensors.source}: unknown tensor(s) {unknown[:8]}{more}: not part of the official ViT LGR / CVLP "
            f"models, so the conversion stops rather than drop them."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Building the converted models
# ----------------------------------------------------------------------------------------------------------------------


def stage_of(state: dict) -> int:
    if "text_embeddings" in state:
        return 2
    if "token_embedding.weight" in state:
        return 1
    raise ConversionError(
        "The checkpoint has neither `text_embeddings` (an official stage-2 LGR model) nor `token_embedding.weight` "
        "(an official stage-1 CVLP model)."
    )


def _clip_text_tower(clip: str) -> tuple[CLIPTextConfig, dict]:
    """The text config and the text-tower tensors (`text_model.*`, `text_projection.weight`) of --clip."""
    previous = logging.get_verbosity()
    logging.set_verbosity_error()  # the vision weights of a full CLIP checkpoint are expected to be unused
    try:
        text_model, info = CLIPTextModelWithProjection.from_pretrained(clip, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--clip {clip}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    finally:
        logging.set_verbosity(previous)
    if info["missing_keys"]:
        raise ConversionError(f"--clip {clip}: no text-tower weights {sorted(info['missing_keys'])[:4]}.")
    return text_model.config, text_model.state_dict()


def _clip_text_config(clip: str) -> CLIPTextConfig:
    try:
        return CLIPTextConfig.from_pretrained(clip)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--clip {clip}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def build_classifier(
    state: dict,
    source: str,
    id2label: dict[int, str],
    clip: str,
    stage1_state: dict | None = None,
    stage1_source: str = "",
    fusion_alpha: float = DEFAULT_FUSION_ALPHA,
    detach_anchor_norm: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    sentence_counts: list[int] | None = None,
) -> tuple[VLLTRForImageClassification, list[str]]:
    """`VLLTRForImageClassification` from an official stage-2 state dict. The text tower (not in stage 2) comes from
    the stage-1 state dict when given, else from --clip. Returns the model and a note on what was dropped."""
    tensors = _Tensors(state, source)
    vision = vision_config_from_shapes(tensors, vision_heads)
    dim = vision["projection_dim"]
    anchors = tensors.peek("text_embeddings")
    num_classes, num_anchors, anchor_dim = anchors.shape
    hidden = tensors.peek("text_block.visual_fc.0.weight").shape[0]
    if anchor_dim != dim or hidden % dim or tensors.peek("text_block.visual_fc.2.weight").shape[0] != num_classes:
        raise ConversionError(
            f"{source}: text_embeddings {tuple(anchors.shape)}, visual_fc {hidden} hidden units and visual.proj "
            f"(…, {dim}) do not fit one LGR head."
        )
    if len(id2label) != num_classes:
        raise ConversionError(f"--class_names has {len(id2label)} classes, the checkpoint {num_classes}.")

    weights = {"clip." + k: v for k, v in convert_vision(tensors, vision["num_hidden_layers"]).items()}
    weights["clip.logit_scale"] = tensors.take("logit_scale").reshape(())
    weights.update(convert_lgr_head(tensors, sentence_counts))
    _refuse_unknown(tensors)
    dropped = []
    if stage1_state is not None:
        stage1 = _Tensors(stage1_state, stage1_source)
        text = text_config_from_shapes(stage1, _clip_text_config(clip), text_heads)
        weights.update({"clip." + k: v for k, v in convert_text(stage1, text["num_hidden_layers"]).items()})
        _refuse_unknown(stage1, ignore=("visual.", "logit_scale"))
        dropped.append(f"{stage1_source}: visual.* and logit_scale (the stage-2 checkpoint's are used)")
        # the official LGR copies logit_scale from its stage-1 checkpoint and freezes it (finetune.py L339-343)
        if "logit_scale" in stage1 and not torch.equal(stage1.peek("logit_scale"), state["logit_scale"]):
            logger.warning(
                f"{stage1_source} has logit_scale {float(stage1.peek('logit_scale')):.6g}, {source} "
                f"{float(state['logit_scale']):.6g}: the official stage 2 copies it from its stage-1 checkpoint, so "
                f"these two checkpoints may not belong together."
            )
    else:
        text_config, text_weights = _clip_text_tower(clip)
        text = _text_fields(text_config.to_dict())
        weights.update({"clip." + k: v for k, v in text_weights.items()})
    if text["projection_dim"] != dim:
        raise ConversionError(
            f"The text tower projects to {text['projection_dim']}, the checkpoint's image embedding is {dim}: "
            f"use the CLIP the official model started from (--clip)."
        )
    config = VLLTRConfig(
        clip_config=CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        num_anchor_sentences=num_anchors,
        mlp_ratio=hidden // dim,
        fusion_alpha=fusion_alpha,
        detach_anchor_norm=detach_anchor_norm,
        head_type="lgr",
    )
    model = VLLTRForImageClassification(config)
    _load_exactly(model, weights, source)
    model.check_anchors(source=source)
    return model.eval(), dropped


def build_stage1_model(
    state: dict,
    source: str,
    clip: str,
    id2label: dict[int, str] | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> VLLTRModel:
    """`VLLTRModel` from an official stage-1 (CVLP) state dict; the token ids of the text config come from --clip."""
    tensors = _Tensors(state, source)
    vision = vision_config_from_shapes(tensors, vision_heads)
    text = text_config_from_shapes(tensors, _clip_text_config(clip), text_heads)
    if text["projection_dim"] != vision["projection_dim"]:
        raise ConversionError(f"{source}: text_projection and visual.proj project to different sizes.")
    weights = {"clip." + k: v for k, v in convert_vision(tensors, vision["num_hidden_layers"]).items()}
    weights.update({"clip." + k: v for k, v in convert_text(tensors, text["num_hidden_layers"]).items()})
    weights["clip.logit_scale"] = tensors.take("logit_scale").reshape(())
    _refuse_unknown(tensors)
    labels = {} if id2label is None else {"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    config = VLLTRConfig(
        clip_config=CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"]),
        **labels,
    )
    model = VLLTRModel(config)
    _load_exactly(model, weights, source)
    return model.eval()


def _load_exactly(model, weights: dict, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ConversionError(f"{source}: the conversion left {missing[:5]} unset.")
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConversionError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}."
            )
    model.load_state_dict(weights, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# Verification against the official forward
# ----------------------------------------------------------------------------------------------------------------------


def _float64(state: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def official_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The official tokenizer pads with 0 where transformers' pads with the end token; the official pooling finds
    the end token by argmax over the ids."""
    return input_ids * attention_mask


def _random_pixels(config: VLLTRConfig, num_images: int, seed: int) -> torch.Tensor:
    size = config.clip_config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, size, size, generator=generator, dtype=torch.float64)


def _text_differences(clip_model, state: dict, tokenizer, sentences: list[str], heads: int) -> dict:
    context = state["positional_embedding"].shape[0]
    batch = tokenizer(sentences, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
    ours = clip_model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ref = reference.encode_text(state, official_tokens(batch["input_ids"], batch["attention_mask"]), heads)
    return {"text embeddings": _max_diff(ours.pooler_output, ref)}


@torch.no_grad()
def compare_classifier(
    model: VLLTRForImageClassification,
    state: dict,
    num_images: int = 4,
    seed: int = 0,
    stage1_state: dict | None = None,
    tokenizer=None,
    sentence_counts: list[int] | None = None,
) -> dict:
    """Largest absolute differences between the converted classifier and the official forward
    (`training.official_reference`) on random images, in float64: image-branch logits P_I, text-branch logits P_T,
    fused probabilities, and, with a stage-1 text tower, its sentence embeddings."""
    config = model.config
    ref_state = _float64(state)
    pixels = _random_pixels(config, num_images, seed)
    vision_heads = config.clip_config.vision_config.num_attention_heads
    padding = ~official_anchor_mask(state["text_embeddings"], sentence_counts)  # the official key padding mask
    ref_image, ref_text = reference.lgr_forward(ref_state, pixels, vision_heads, padding)
    ref_fused = reference.fused_probabilities(ref_image, ref_text, config.fusion_alpha)
    model.double()
    try:
        out = model(pixel_values=pixels)
        diffs = {
            "image logits": _max_diff(out.image_logits, ref_image),
            "text logits": _max_diff(out.text_logits, ref_text),
            "fused probabilities": _max_diff(out.logits.softmax(-1), ref_fused),
        }
        if stage1_state is not None and tokenizer is not None:
            sentences = [f"a photo of a {name}." for name in list(config.id2label.values())[:4]]
            text_heads = config.clip_config.text_config.num_attention_heads
            diffs.update(_text_differences(model.clip, _float64(stage1_state), tokenizer, sentences, text_heads))
    finally:
        model.float()
    return diffs


@torch.no_grad()
def compare_stage1(model: VLLTRModel, state: dict, tokenizer, num_images: int = 4, seed: int = 0) -> dict:
    """Largest absolute differences between the converted stage-1 model and the official `CVLP` towers, in float64:
    image embeddings and sentence embeddings (official token layout), and the similarity logits."""
    config = model.config
    ref_state = _float64(state)
    pixels = _random_pixels(config, num_images, seed)
    clip = config.clip_config
    ref_image = reference.encode_image(ref_state, pixels, clip.vision_config.num_attention_heads)
    names = list(config.id2label.values())[:4]
    sentences = [f"a photo of a {name}." for name in names] + ["a long-tailed sentence " * 40]
    model.double()
    try:
        diffs = {"image embeddings": _max_diff(model.get_image_features(pixels).pooler_output, ref_image)}
        diffs.update(
            _text_differences(model.clip, ref_state, tokenizer, sentences, clip.text_config.num_attention_heads)
        )
        scale = float(ref_state["logit_scale"].exp())
        diffs["logit scale"] = abs(float(model.clip.logit_scale.exp()) - scale)
    finally:
        model.float()
    return diffs


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertArguments:
    """The official checkpoint to convert and where the converted model goes."""

    checkpoint: str = field(
        metadata={"help": "The official checkpoint: a release zip (its checkpoint.pth is used) or a .pth file."}
    )
    output_dir: str = field(metadata={"help": "Where the converted checkpoint is written."})
    clip: str = field(
        default="openai/clip-vit-base-patch16",
        metadata={
            "help": "transformers CLIP (Hub name or folder) for the tokenizer, the text config's token ids and, for a "
            "stage-2 checkpoint without --stage1_checkpoint, the text tower. OpenAI's .pt archives are refused."
        },
    )
    stage1_checkpoint: str | None = field(
        default=None, metadata={"help": "The official stage-1 checkpoint: its trained text tower replaces CLIP's."}
    )
    class_names: str | None = field(default=None, metadata={"help": "One class name per line, line i = label i."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Which paper row the checkpoint is (default: from the saved args or the class count); sets the "
            "default --fusion_alpha and the reported numbers quoted in the model card.",
            "choices": list(DATASETS),
        },
    )
    fusion_alpha: float | None = field(
        default=None, metadata={"help": "Test-time fusion α (default 0.2, or 0.7 for iNaturalist 2018)."}
    )
    detach_anchor_norm: bool | None = field(
        default=None,
        metadata={"help": "The official v_detach (default: from the saved model name, else True for iNaturalist)."},
    )
    sentence_counts: str | None = field(
        default=None,
        metadata={
            "help": "Sentences per class in the official corpus (its `end_idxs`; one integer per line or a JSON list): "
            "the anchor mask. Default: read from the zero-padded anchors."
        },
    )
    vision_heads: int | None = field(default=None, metadata={"help": "Attention heads of the ViT (default width/64)."})
    text_heads: int | None = field(default=None, metadata={"help": "Attention heads of the text tower (width/64)."})
    verify: bool = field(
        default=False, metadata={"help": "Compare with the official forward before writing; print the differences."}
    )
    verify_tolerance: float = field(default=1e-5, metadata={"help": "Largest difference --verify accepts."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into a folder that is not empty."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the converted folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "The Hub repository, org/name."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository as private."})


def _infer_dataset(args: ConvertArguments, saved: dict | None, num_classes: int | None) -> str | None:
    if args.dataset:
        return args.dataset
    data_set = (saved or {}).get("data_set")
    if data_set in OFFICIAL_DATA_SET:
        return OFFICIAL_DATA_SET[data_set]
    if Path(args.checkpoint).name in RELEASE_ASSETS:
        return RELEASE_ASSETS[Path(args.checkpoint).name]
    return NUM_CLASSES.get(num_classes)


def _class_names(args: ConvertArguments, num_classes: int | None) -> dict[int, str] | None:
    if args.class_names:
        try:
            names = read_class_names(args.class_names)
        except DataError as e:
            raise UsageError(str(e)) from None
        return dict(enumerate(names))
    if num_classes is None:
        return None
    logger.warning(f"No --class_names: the {num_classes} classes are named class_0 ... class_{num_classes - 1}.")
    return {i: f"class_{i}" for i in range(num_classes)}


def _dropped_line(info: dict) -> str:
    if not info["dropped"]:
        return ""
    return f"{info['file']}: {', '.join(info['dropped'])} (training state, not part of the model)"


def _is_vit_b16_224(config: VLLTRConfig) -> bool:
    vision = config.clip_config.vision_config
    return (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (768, 12, 16, 224)


def _print_differences(diffs: dict, tolerance: float) -> None:
    parts = ", ".join(f"{name} {value:.2e}" for name, value in diffs.items())
    print(f"Largest difference to the official forward (float64): {parts} (tolerance {tolerance:g}).")
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= tolerance:  # also catches NaN
        raise ConversionError(
            f"verification failed: the {worst} differ from the official forward by {diffs[worst]:.3g} > "
            f"{tolerance:g}; nothing was written."
        )


def convert_checkpoints(args: ConvertArguments, tokenizer) -> tuple:
    """Reads --checkpoint (and --stage1_checkpoint) and builds the converted model. Returns the model, the
    conversion's record (for the model card) and the inputs `verify` needs."""
    state, info = load_official_checkpoint(args.checkpoint)
    stage, saved = stage_of(state), info["args"] or {}
    dropped = [_dropped_line(info)]
    stage1_state, stage1_info, counts = None, None, None
    if args.stage1_checkpoint:
        if stage != 2:
            raise UsageError("--stage1_checkpoint goes with a stage-2 --checkpoint (the official LGR model).")
        stage1_state, stage1_info = load_official_checkpoint(args.stage1_checkpoint)
        if stage_of(stage1_state) != 1:
            raise UsageError(f"--stage1_checkpoint {args.stage1_checkpoint}: not a stage-1 (CVLP) checkpoint.")
        dropped.append(_dropped_line(stage1_info))

    if stage == 2:
        num_classes = state["text_embeddings"].shape[0]
        counts = read_sentence_counts(args.sentence_counts, num_classes) if args.sentence_counts else None
        dataset = _infer_dataset(args, saved, num_classes)
        alpha = args.fusion_alpha if args.fusion_alpha is not None else FUSION_ALPHA.get(dataset, DEFAULT_FUSION_ALPHA)
        detach = args.detach_anchor_norm
        if detach is None:  # the official iNaturalist models are the `*_v_detach_img_grad` ones
            model_name = saved.get("model")
            detach = "v_detach" in model_name if isinstance(model_name, str) else dataset == "inaturalist-2018"
        model, stage1_dropped = build_classifier(
            state, info["file"], _class_names(args, num_classes), args.clip, stage1_state,
            stage1_info["file"] if stage1_info else "", alpha, detach, args.vision_heads, args.text_heads, counts,
        )  # fmt: skip
        dropped += stage1_dropped
    else:
        num_classes = saved.get("nb_classes") if isinstance(saved.get("nb_classes"), int) else None
        dataset = _infer_dataset(args, saved, num_classes)
        names = _class_names(args, num_classes)
        model = build_stage1_model(state, info["file"], args.clip, names, args.vision_heads, args.text_heads)
    print(f"Converted {info['file']} (official stage-{stage} model) into {type(model).__name__}.")
    print("Dropped: " + ("; ".join(d for d in dropped if d) or "nothing"))

    release = Path(args.checkpoint).name
    record = {
        "checkpoint": info["name"],
        "checkpoint_sha256": info["sha256"],
        # matched by file name only: checkpoint_sha256 is what identifies the file
        "release_asset": f"{RELEASE_URL}{release} (by file name)" if release in RELEASE_ASSETS else None,
        "official_code": f"github.com/{OFFICIAL_REPO} at {OFFICIAL_COMMIT}",
        "official_model": saved.get("model"),
        "epoch": info["epoch"],
        "stage1_checkpoint": stage1_info["name"] if stage1_info else None,
        "stage1_checkpoint_sha256": stage1_info["sha256"] if stage1_info else None,
        "text_tower": (stage1_info["name"] if stage1_info else args.clip) if stage == 2 else info["name"],
        "clip": args.clip,
        "dataset": dataset,
        "architecture": type(model).__name__,
        "fusion_alpha": model.config.fusion_alpha if stage == 2 else None,
        "detach_anchor_norm": model.config.detach_anchor_norm if stage == 2 else None,
        "verified": bool(args.verify),
    }
    return model, record, (state, stage1_state, counts)


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((ConvertArguments,), argv)
    if args.clip.endswith((".pt", ".pth")) and not Path(args.clip).is_dir():
        raise UsageError(
            f"--clip {args.clip}: OpenAI's .pt archives are TorchScript programs without a tokenizer and are not "
            f"loaded here; pass the transformers CLIP instead (openai/clip-vit-base-patch16 or a local folder)."
        )
    if args.fusion_alpha is not None and not 0 <= args.fusion_alpha <= 1:
        raise UsageError(f"--fusion_alpha must lie in [0, 1], got {args.fusion_alpha}.")
    prepare_output_dir(args, "convert_official")
    tokenizer = load_checked("--clip", AutoTokenizer.from_pretrained, args.clip)

    # ---- Convert, then verify before anything is written -----------------------------------------------------------
    model, record, (state, stage1_state, counts) = convert_checkpoints(args, tokenizer)
    results = {}
    if args.verify:
        if isinstance(model, VLLTRForImageClassification):
            diffs = compare_classifier(model, state, stage1_state=stage1_state, tokenizer=tokenizer,
                                       sentence_counts=counts)  # fmt: skip
        else:
            diffs = compare_stage1(model, state, tokenizer)
        _print_differences(diffs, args.verify_tolerance)
        results = {f"max_abs_diff_{k.replace(' ', '_')}": v for k, v in diffs.items()}

    # ---- Write: weights, remote code, tokenizer, image processor, history and model card -----------------------------
    out = args.output_dir
    save_pretrained_to(model, out)
    save_pretrained_to(tokenizer, out)
    save_pretrained_to(eval_image_processor(model.config.clip_config.vision_config.image_size), out)
    entry = history_entry("convert_official", "convert", record, results)
    dataset = record["dataset"]
    if (
        isinstance(model, VLLTRForImageClassification)
        and dataset in REPORTED_VIT_B16
        and _is_vit_b16_224(model.config)
    ):
        entry["reported"] = {"dataset": dataset, **REPORTED_VIT_B16[dataset]}
    record_run(out, args.clip, entry, model.config, args, args.push_to_hub, "Convert an official VL-LTR checkpoint")
    verified = (
        "verified against the official forward: largest difference "
        + ", ".join(f"{name} {value:.2e}" for name, value in diffs.items())
        if args.verify
        else "not verified (--verify True compares it with the official forward first)"
    )
    print_summary(
        f"convert_official: {record['architecture']} ({dataset or 'dataset unknown'}) from {args.checkpoint}",
        [verified],
        out,
    )
    return {"architecture": record["architecture"], "dataset": dataset, **results}


if __name__ == "__main__":
    run_main(main, "convert_official")
