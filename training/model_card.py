"""Model cards and the run history they come from: each run appends an entry (settings, measured results) to the
checkpoint's `training_history.json`; the card (`README.md`) is generated from that history with huggingface_hub's
`ModelCard` / `ModelCardData` and the template `model_cards/vlltr.md`. No number is typed in."""

import json
import math
import os
import re
import time
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from model_cards import TEMPLATE_PATH

from .io_utils import atomic_write_json, atomic_write_text

logger = logging.get_logger(__name__)

HISTORY_FILE = "training_history.json"

STAGE_TEXT = {
    "convert": (
        "Converted from the official VL-LTR release",
        "The weights are the official ones (github.com/ChangyaoTian/VL-LTR), mapped tensor by tensor into this "
        "package's layout by `training.convert_official`; this package did not train them.",
    ),
    "cvlp": (
        "Stage 1: class-wise visual-linguistic pre-training (CVLP)",
        "Every training image is paired with one sentence drawn from its class; the loss is "
        "(1 − β)·L_ccl + β·L_dis, a multi-positive contrastive loss over the whole batch plus distillation from "
        "the frozen starting CLIP.",
    ),
    "anss": (
        "Anchor sentence selection (AnSS)",
        "Each class sentence is scored by its L_lin against the selection images (softmax over all of them, the "
        "class's own images as positives); the M lowest-scoring sentences of each class are stored as the "
        "anchors of the text branch (`anchor_text_embeds`). The full list is in `anchor_report.md`.",
    ),
    "lgr": (
        "Stage 2: language-guided recognition (LGR)",
        "The image-branch MLP and the anchor attention are trained with L_rec = CE(P_I, y) + CE(P_T, y) on "
        "Mixup / CutMix targets; at test time P = α·softmax(P_I) + (1 − α)·softmax(P_T).",
    ),
    "add_classes": (
        "Classes added from their descriptions",
        "New classes were added without images: their sentences (prompt templates and descriptions) were embedded "
        "by the stage-1 text tower and the M closest to each class's mean embedding became its anchors. The image "
        "branch has never seen them, so their probability is the text branch's softmax(P_T) alone, and the trained "
        "classes share the rest as before: P(c) = (1 − Σ_new softmax(P_T)_new)·[α·softmax(P_I) + (1 − α)·softmax(P_T)]"
        " over the trained classes (`config.text_only_classes`).",
    ),
    "lift": (
        "LIFT fine-tuning (a peer of VL-LTR)",
        "Lightweight adapters (AdaptFormer, LIFT's choice, or LoRA) in the frozen CLIP image tower and a cosine "
        "classifier s·cos(f, w_c) on the tower's feature, initialised from the class prompts' text embeddings, "
        "trained with the logit-adjusted loss CE(z + τ·log π, y) (Shi et al., ICML 2024); the classifier's logits are "
        "the prediction.",
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# The training history: what the model cards are generated from
# ----------------------------------------------------------------------------------------------------------------------


def read_history(folder: str | os.PathLike) -> list[dict]:
    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning(f"Ignoring an unreadable {path}.")
        return []


# Scripts that record their results in a checkpoint's history without changing its weights
READ_ONLY_SCRIPTS = ("run_eval",)


def trained_by(history: list[dict]) -> str | None:
    """The script that wrote the weights of the folder whose history this is (the last entry, evaluations aside)."""
    return next((e.get("script") for e in reversed(history) if e.get("script") not in READ_ONLY_SCRIPTS), None)


def write_history(folder: str | os.PathLike, history: list[dict]) -> None:
    atomic_write_json(Path(folder) / HISTORY_FILE, history)


def history_entry(script: str, stage: str, settings: dict, results: dict | None = None) -> dict:
    return {
        "script": script,
        "stage": stage,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {k: v for k, v in settings.items() if v is not None},
        # timings say nothing about the model and would change the card on every run
        "results": {k: v for k, v in (results or {}).items() if "runtime" not in k and "per_second" not in k},
    }


def schedule_settings(args) -> dict:
    """The optimisation settings both training stages record in their history (and so in the model card)."""
    return {
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "world_size": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "sampling": args.sampling,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
    }


def extend_history(source: str | os.PathLike, entry: dict) -> list[dict]:
    """The history of the input checkpoint (if it is a local folder), plus `entry`."""
    history = read_history(source) if Path(str(source)).is_dir() else []
    if not history:
        history = [{"script": "base", "stage": "base", "settings": {"model_name_or_path": str(source)}}]
    return history + [entry]


# ----------------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repository id rather than a local path."""
    if not name or os.path.exists(name) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return name


def _portable(value, root: str | None = None):
    """A setting as a card may show it: no absolute path of the training machine. An absolute path becomes relative
    to `root` (the run's image root) when it lies under it, else its last component; other values are unchanged."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    if root and os.path.isabs(root):
        relative = os.path.relpath(value, root)
        if not relative.startswith(".."):
            return relative
    return Path(value).name or value


def _portable_settings(settings: dict) -> dict:
    root = settings.get("image_root")
    return {k: _portable(v, root if k != "image_root" else None) for k, v in settings.items()}


def _results(entry: dict) -> dict:
    results, settings = entry["results"], _portable_settings(entry["settings"])
    rows = [("fused (α)" if results.get("text_top1") is not None else "classifier", "")]
    if results.get("image_top1") is not None:
        rows.append(("image branch P_I", "image_"))
    if results.get("text_top1") is not None:
        rows.append(("text branch P_T", "text_"))
    table = []
    for name, prefix in rows:
        table.append(
            {
                "name": name,
                "top1": _pct(results.get(f"{prefix}top1")),
                "top5": _pct(results.get(f"{prefix}top5")),
                "many": _pct(results.get("many_top1")) if not prefix else "",
                "medium": _pct(results.get("medium_top1")) if not prefix else "",
                "few": _pct(results.get("few_top1")) if not prefix else "",
            }
        )
    sign = ("≥", "≤") if settings.get("inclusive") else (">", "<")
    groups = (
        f"many {sign[0]} {settings.get('many')}, few {sign[1]} {settings.get('few')}, medium in between "
        f"({results.get('num_many_classes')} / {results.get('num_medium_classes')} / "
        f"{results.get('num_few_classes')} classes); accuracies in %"
    )
    return {
        "test_file": settings.get("test_file"),
        "num_test_images": settings.get("num_test_images"),
        "groups": groups,
        "rows": table,
    }


def build_model_card(
    history: list[dict], config, hub_model_id: str | None = None, folder_name: str = "vlltr-model"
) -> ModelCard:
    stages = {entry["stage"]: entry for entry in history}
    base_model = history[0]["settings"].get("model_name_or_path") if history else None
    converted = stages.get("convert")
    classifier = "lgr" in stages or "anss" in stages or getattr(config, "head_type", None) in ("fc", "cosine")
    classifier = (
        classifier or (converted or {}).get("settings", {}).get("architecture") == "VLLTRForImageClassification"
    )
    repo = hub_model_id or f"<your-org>/{folder_name}"
    num_classes = config.num_labels
    dataset_tag = stages.get("eval", {}).get("settings", {}).get("dataset_tag")
    model_name = Path(repo).name

    eval_results = []
    if "eval" in stages:
        results = stages["eval"]["results"]
        split = _portable_settings(stages["eval"]["settings"]).get("test_file")
        for key, label in (("top1", "Top-1"), ("top5", "Top-5"), ("many_top1", "Top-1 many-shot"),
                           ("medium_top1", "Top-1 medium-shot"), ("few_top1", "Top-1 few-shot")):  # fmt: skip
            value = results.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                eval_results.append(
                    EvalResult(
                        task_type="image-classification",
                        dataset_type=dataset_tag or "custom",
                        dataset_name=dataset_tag or str(split),
                        dataset_split="test",
                        metric_type="accuracy",
                        metric_name=label,
                        metric_value=round(100 * value, 2),
                    )
                )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification" if classifier else "zero-shot-image-classification",
        base_model=_hub_id(base_model),
        datasets=[dataset_tag] if dataset_tag else None,
        tags=["vl-ltr", "long-tail", "clip", "image-classification"],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    if classifier:
        quick_start = (
            "from transformers import AutoModelForImageClassification, AutoImageProcessor, pipeline\n\n"
            f'model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True)\n'
            f'processor = AutoImageProcessor.from_pretrained("{repo}")\n'
            f'classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)\n'
            'print(classifier("photo.jpg", top_k=5))  # scores: the fused probability α·P_I + (1 − α)·P_T'
        )
        title = f"VL-LTR classifier ({num_classes} classes)"
        summary = f"A VL-LTR image classifier over {num_classes} classes" + (
            ", trained through both stages."
            if "lgr" in stages or converted
            else ": LIFT (Shi et al., ICML 2024): a cosine head on a CLIP image tower with AdaptFormer (or LoRA) adapters."
            if "lift" in stages
            else ", after anchor sentence selection: its image-branch MLP is not trained yet (run `training.run_lgr`)."
        )
    else:
        quick_start = (
            "from transformers import AutoModel, pipeline\n\n"
            f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)  # VLLTRModel, a CLIP\n'
            f'classifier = pipeline("zero-shot-image-classification", model="{repo}", trust_remote_code=True)\n'
            'print(classifier("photo.jpg", candidate_labels=["a photo of a cat", "a photo of a dog"]))'
        )
        title = "VL-LTR stage-1 model (CVLP)"
        summary = (
            f"A CLIP after VL-LTR class-wise visual-linguistic pre-training on {num_classes} classes: the input of "
            "anchor sentence selection (`training.run_select_anchors`). It also works as a CLIP for zero-shot use."
        )
    stage_list = []
    for key in ("convert", "cvlp", "anss", "lgr", "lift", "add_classes"):
        if key in stages:
            heading, description = STAGE_TEXT[key]
            entry = stages[key]
            stage_list.append(
                {
                    "title": heading,
                    "description": description
                    + f" Run with `python -m training.{entry['script']}` on {entry.get('date', '?')}.",
                    "settings": [(k, _fmt(v)) for k, v in _portable_settings(entry["settings"]).items()],
                    "results": [(k, _fmt(v)) for k, v in entry.get("results", {}).items()],
                }
            )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=title,
        summary=summary,
        results=_results(stages["eval"]) if "eval" in stages else None,
        quick_start=quick_start,
        stages=stage_list,
        num_classes=num_classes,
        base_model_text=_hub_id(base_model) or _portable(base_model) or "unknown",
        reported=(converted or {}).get("reported"),
        extra_limitations=_added_classes_limitation(config),
    )


def _added_classes_limitation(config) -> str | None:
    added = getattr(config, "text_only_classes", None)
    if not added:
        return None
    names = ", ".join(str(config.id2label[c]) for c in added[:10]) + (", ..." if len(added) > 10 else "")
    return (
        f"{len(added)} class(es) were added from their descriptions alone ({names}): no image of them was seen, so "
        "they are recognised by the text branch only; measure their accuracy before relying on them."
    )


def write_model_card(folder: str | os.PathLike, history: list[dict], config, hub_model_id: str | None = None) -> None:
    """Writes `folder/README.md` atomically."""
    card = build_model_card(history, config, hub_model_id, folder_name=Path(folder).resolve().name)
    atomic_write_text(Path(folder) / "README.md", str(card))
