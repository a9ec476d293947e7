"""Adapters in the CLIP towers: LoRA (Hu et al., ICLR 2022) through `peft`, for both stages and the LIFT peer, and the
bottleneck rule of LIFT's AdaptFormer adapters (which live in the model itself, `VLLTRConfig.adaptformer_dim`).

The adapters are injected in place (`peft.inject_adapter_in_model`), so the model stays a `VLLTRModel` /
`VLLTRForImageClassification`: the Trainers, their parameter groups and `compute_loss` are unchanged, and the
adapted layers only gain `base_layer` / `lora_A` / `lora_B` in their parameter names. Every checkpoint is written
with the adapters merged (W + (α/r)·B·A under the plain layer names), so `from_pretrained` needs no `peft`; a
checkpoint the Trainer writes for resuming also gets the adapter itself in `adapter/` (peft's format), which
`load_adapter_for_resume` reads back. The frozen base weights are not stored twice: on resume they are the ones of
`--model_name_or_path`, checked against merged − B·A.
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

PEFT_METHODS = ("none", "lora")
ADAPTER_DIR = "adapter"  # sub-folder of a checkpoint / output folder holding the peft adapter
ADAPTER_NAME = "default"
TOWERS = {"vision": "clip.vision_model", "text": "clip.text_model"}
PROJECTIONS = {"vision": "clip.visual_projection", "text": "clip.text_projection"}


def adaptformer_bottleneck(num_classes: int, num_layers: int) -> int:
    """LIFT's default AdaptFormer width r = 2^max(0, ⌊log2(C / (2·L))⌋) for C classes and L adapted layers
    (shijxcs/LIFT `models/peft_vit.py`, `ViT_Tuner`): about C / (2L), rounded down to a power of two, at least 1, so
    the adapters hold about as many parameters as the classifier (2·H·r per layer). ImageNet-LT on ViT-B/16: 32."""
    return 2 ** max(0, int(math.log2(num_classes / (num_layers * 2))))


class AdapterError(ValueError):
    """A user mistake with adapters (a target layer that does not exist, a checkpoint that does not fit)."""


@dataclass
class AdapterArguments:
    """Parameter-efficient training of the CLIP towers (`peft`)."""

    peft: str = field(
        default="none",
        metadata={
            "help": "'lora': freeze the CLIP tower(s) and train LoRA adapters in them (stage 1: image and text "
            "towers; stage 2 and run_lift: the image tower); 'none': the stage's usual training.",
            "choices": list(PEFT_METHODS),
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA α: the update is scaled by α / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated names of the linear layers to adapt inside each adapted tower."},
    )
    save_adapter: bool = field(
        default=False,
        metadata={
            "help": f"Also write the adapter alone (plus the trained head) to OUTPUT_DIR/{ADAPTER_DIR}, a few MB that "
            f"`peft.PeftModel.from_pretrained(base, folder)` loads on the input checkpoint."
        },
    )

    def __post_init__(self):
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft must be one of {PEFT_METHODS}, got {self.peft!r}.")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}.")
        if not self.target_modules:
            raise ValueError(f"--lora_target_modules names no layer: {self.lora_target_modules!r}.")
        if self.save_adapter and self.peft == "none":
            raise ValueError("--save_adapter needs --peft lora (there is no adapter to save).")

    @property
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The adapted layers of `model`, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def _is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name


def add_lora(model: nn.Module, args: AdapterArguments, towers: tuple[str, ...], seed: int | None = None) -> LoraConfig:
    """Injects LoRA into the `args.target_modules` linear layers of the given CLIP towers ("vision", "text") and
    freezes those towers and their projections; every other parameter keeps its `requires_grad`. Raises a `ValueError` naming a target
    that matches no linear layer of the towers. With `seed`, the adapters' random initialisation (A ~ Kaiming, B = 0)
    is a function of it alone and the global random state is left as it was."""
    prefixes = [TOWERS[tower] for tower in towers]
    names = args.target_modules
    for name in names:
        matches = [
            module
            for full_name, module in model.named_modules()
            if full_name.startswith(tuple(p + "." for p in prefixes)) and full_name.rsplit(".", 1)[-1] == name
        ]
        if not matches:
            raise AdapterError(
                f"--lora_target_modules: {name!r} matches no layer of the {' and '.join(towers)} tower(s) "
                f"(e.g. q_proj, k_proj, v_proj, out_proj, fc1, fc2)."
            )
        if not all(isinstance(module, nn.Linear) for module in matches):
            raise AdapterError(f"--lora_target_modules: {name!r} is not a linear layer ({type(matches[0]).__name__}).")
    tower_pattern = "|".join(re.escape(p) for p in prefixes)
    name_pattern = "|".join(re.escape(n) for n in names)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=rf"({tower_pattern})\..*\.({name_pattern})",  # full-match on the module name
        bias="none",
    )
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft freezes everything but the adapters; freeze only the adapted towers, restore the rest (heads, ...)
    frozen = tuple(p + "." for p in prefixes + [PROJECTIONS[tower] for tower in towers])
    for name, param in model.named_parameters():
        if _is_adapter_parameter(name):
            param.requires_grad_(True)
        elif name.startswith(frozen):
            param.requires_grad_(False)
        else:
            param.requires_grad_(requires_grad.get(name, False))
    return config


def unfreeze_adapters(model: nn.Module) -> None:
    """Makes the LoRA weights trainable again after a Trainer froze the tower that holds them."""
    for name, param in model.named_parameters():
        if _is_adapter_parameter(name):
            param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; the frozen base weight of an adapted layer is counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def adapter_settings(args: AdapterArguments, model: nn.Module) -> dict:
    """What a run records about its adapters (for the training history and the model card)."""
    trainable, total = count_parameters(model)
    adaptformer_dim = getattr(model.config, "adaptformer_dim", None)
    if adaptformer_dim is not None:
        return {
            "adapter": "adaptformer",
            "adaptformer_dim": adaptformer_dim,
            "trainable_parameters": trainable,
            "trainable_fraction": round(trainable / total, 6),
        }
    if args.peft == "none":
        return {"peft": "none"}
    return {
        "peft": args.peft,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_target_modules": args.lora_target_modules,
        "trainable_parameters": trainable,
        "trainable_fraction": round(trainable / total, 6),
    }


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every adapter merged: `layer.weight = W + (α/r)·B·A` under the plain layer name,
    no `base_layer` / `lora_*` keys: the state dict of the model without `peft`."""
    state = model.state_dict()
    for name, layer in lora_layers(model).items():
        base = f"{name}.base_layer."
        for key in [k for k in state if k.startswith(base)]:
            state[f"{name}.{key[len(base) :]}"] = state.pop(key)
        delta = layer.get_delta_weight(ADAPTER_NAME)  # (α/r)·B·A, (out, in)
        state[f"{name}.weight"] = state[f"{name}.weight"] + delta.to(state[f"{name}.weight"].dtype)
    return {k: v for k, v in state.items() if not _is_adapter_parameter(k)}


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules outside the CLIP towers with trainable weights (the stage-2 head): they travel with the
    adapter as peft `modules_to_save`."""
    heads = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n})
    return [h for h in heads if h != "clip"]


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None) -> None:
    """Writes the adapter in peft's format (`adapter_config.json`, `adapter_model.safetensors`) so that
    `PeftModel.from_pretrained(<the input checkpoint's model>, folder)` rebuilds the trained model. The trained head
    (`head_modules`) is stored as `modules_to_save`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(**{**model.peft_config[ADAPTER_NAME].to_dict()})
    config.base_model_name_or_path = base_model_name_or_path
    heads = head_modules(model)
    config.modules_to_save = heads or None
    config.save_pretrained(str(folder))
    # PeftModel.save_pretrained's key layout: "base_model.model." + the model's own names, no adapter name
    state = {
        f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()
    }
    for head in heads:
        for key, value in getattr(model, head).state_dict().items():
            state[f"base_model.model.{head}.{key}"] = value
    safetensors.torch.save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def load_adapter_for_resume(model: nn.Module, checkpoint: str | Path) -> None:
    """Loads a checkpoint written with merged adapters back into a model with the same adapters injected: the
    adapter from `checkpoint/adapter/`, every other weight from `model.safetensors`, and the frozen base weights of
    the adapted layers kept as they are (they never train), after checking that merged − B·A gives them back."""
    checkpoint = Path(checkpoint)
    adapter_file = checkpoint / ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise AdapterError(
            f"{checkpoint} has no {ADAPTER_DIR}/adapter_model.safetensors: it was not written by a --peft lora run, "
            f"so it cannot resume one."
        )
    adapter = safetensors.torch.load_file(str(adapter_file))
    adapter = {k.removeprefix("base_model.model."): v for k, v in adapter.items() if ".lora_" in k}
    result = set_peft_model_state_dict(model, adapter, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if _is_adapter_parameter(k)]
    if missing or len(adapter) == 0:
        raise AdapterError(f"{adapter_file} does not fit this run's adapters (e.g. missing {missing[:2]}).")
    merged = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    layers = lora_layers(model)
    state = {}
    for key, value in merged.items():
        owner = key.rsplit(".", 1)[0]
        if owner in layers:
            base = layers[owner].get_base_layer()
            current = getattr(base, key.rsplit(".", 1)[1])
            if key.endswith(".weight"):
                value = value - layers[owner].get_delta_weight(ADAPTER_NAME).to(value.dtype).cpu()
            scale = current.detach().abs().max().clamp_min(1e-6).item()
            if not torch.allclose(value.float(), current.detach().float().cpu(), rtol=0, atol=1e-4 * scale):
                raise AdapterError(
                    f"{checkpoint}: {key} minus its adapter differs from the base weights of --model_name_or_path; "
                    f"resume with the --model_name_or_path the run started from."
                )
            continue  # keep the exact frozen base weight
        state[key] = value
    incompatible = model.load_state_dict(state, strict=False)
    unexpected = list(incompatible.unexpected_keys)
    if unexpected:
        raise AdapterError(f"{checkpoint}/model.safetensors holds weights this model lacks, e.g. {unexpected[:3]}.")


__all__ = [
    "ADAPTER_DIR",
    "AdapterArguments",
    "AdapterError",
    "adapter_settings",
    "adaptformer_bottleneck",
    "add_lora",
    "count_parameters",
    "has_adapters",
    "head_modules",
    "load_adapter_for_resume",
    "lora_layers",
    "merged_state_dict",
    "save_adapter",
    "unfreeze_adapters",
]
