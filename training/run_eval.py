"""Evaluate a VL-LTR classifier: top-1 / top-5 of the fused prediction and of each branch, and many / medium /
few-shot accuracy by the number of training images of each class. Writes `metrics.json` and a plot of per-class
accuracy against training-set size, and records the results in the checkpoint's model card.

    python -m training.run_eval --model_name_or_path OUT3 --test_file test.txt --train_file train.txt \
        --image_root ROOT --output_dir OUT4

The paper's KNN head (ablation row 6) from a stage-1 checkpoint: `--knn K` classifies each test image by a majority
vote of its K nearest training images (`--train_file`, embedded by the stage-1 image tower), cosine similarity; a tie
in votes goes to the tied class whose nearest member is the more similar (see `training/knn.py`):

    python -m training.run_eval --model_name_or_path OUT1 --knn 5 --test_file test.txt --train_file train.txt \
        --image_root ROOT --output_dir OUT_KNN

`predictions.npz` holds the labels, the scores and the predicted class of every test image, so every number in
`metrics.json` can be recomputed.

`--tta {flip,five_crop,ten_crop}` averages the (fused) probability over several views of each test image (see
`training/tta.py`: flips, or torchvision's five / ten crops of the resized image); `--tta lift_five_crop` is LIFT's
test-time ensemble (five crops of the image resized to size + 24, logits averaged); `--tta none` is the plain
evaluation.

Shot groups follow the standard convention (> 100, 20-100, < 20 training images); `--shot_thresholds official`
uses the reference code's (>= 100, 21-99, <= 20) and `--shot_logits sum` its summed-logit prediction for them.
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, TrainingArguments

from modeling_vlltr import VLLTRForImageClassification, VLLTRModel

from .arguments import DataArguments, ModelArguments
from .cli import (
    UsageError,
    load_checked,
    parse_args,
    prepare_output_dir,
    push_folder,
    record_run,
    require_anchors,
    run_main,
    setup_logging,
    shot_thresholds,
)
from .data import ProcessorTransform, eval_image_processor
from .embedding import embed_images, predict_logits
from .explain import explain_examples, explanation_figure, explanation_report, pick_examples
from .io_utils import atomic_write_json, atomic_write_npz, atomic_write_text
from .knn import knn_scores
from .metrics import ShotThresholds, long_tail_metrics, plot_per_class_accuracy, write_metrics_json
from .model_card import history_entry
from .splits import checkpoint_class_names, load_labelled_split
from .tta import TTA_MODES, VIEW_AVERAGE, MultiViewTransform, predict_logits_tta


@dataclass
class EvalArguments:
    test_file: str | None = field(default=None, metadata={"help": "The split to evaluate (list file or JSON)."})
    test_split: str | None = field(default=None, metadata={"help": "The same, as a 🤗 dataset split name."})
    shot_thresholds: str = field(
        default="standard",
        metadata={
            "help": "'standard' (>100 / 20-100 / <20) or 'official' (>=100 / 21-99 / <=20).",
            "choices": ["standard", "official"],
        },
    )
    many_shot_threshold: int | None = field(default=None, metadata={"help": "Override the many-shot boundary."})
    few_shot_threshold: int | None = field(default=None, metadata={"help": "Override the few-shot boundary."})
    shot_logits: str = field(
        default="fused",
        metadata={
            "help": "Prediction used for the shot groups: 'fused' or 'sum' (P_I + P_T, the reference code's).",
            "choices": ["fused", "sum"],
        },
    )
    tta: str = field(
        default="none",
        metadata={
            "help": "Test-time augmentation: average the fused probability over 'flip' (2 views), 'five_crop' or "
            "'ten_crop' (torchvision FiveCrop / TenCrop of the resized image, before the centre crop); "
            "'lift_five_crop': LIFT's test-time ensemble (five crops of the image resized to size + 24, logits "
            "averaged); 'none' = the single centre-crop view.",
            "choices": list(TTA_MODES),
        },
    )
    update_model_card: bool = field(
        default=True, metadata={"help": "Record the results in the checkpoint folder's history and model card."}
    )
    method_name: str = field(default="VL-LTR", metadata={"help": "Name of the method in the plot legend."})
    dataset_tag: str | None = field(
        default=None, metadata={"help": "Dataset name for the model card metadata (e.g. imagenet-lt)."}
    )
    knn: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate the KNN head instead of a classifier: --model_name_or_path is a stage-1 checkpoint, "
            "and each test image takes the majority class of its K nearest --train_file images (stage-1 image "
            "embeddings, cosine; a tie goes to the tied class with the more similar nearest member). This is the "
            "paper's KNN row with the training images as memory; the official stage-1 `knn_5` (run_cvlp "
            "--eval_file) instead votes over the 5 nearest corpus sentences (docs/method.md §1.7)."
        },
    )
    explain: int = field(
        default=0,
        metadata={
            "help": "Explain N test images (up to half of them wrong predictions): explanations.md / .json / .png "
            "with the anchor sentences each image attended to (LGR head only)."
        },
    )
    explain_top_k: int = field(default=5, metadata={"help": "Anchor sentences listed per explained image."})


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, eval_args, args = parse_args(
        (ModelArguments, DataArguments, EvalArguments, TrainingArguments), argv
    )
    setup_logging(args)
    prepare_output_dir(args, "run_eval")
    hub = model_args.hub_kwargs
    if args.push_to_hub and not Path(str(model_args.model_name_or_path)).is_dir():
        raise UsageError("--push_to_hub publishes the evaluated checkpoint folder: give a local --model_name_or_path.")
    if eval_args.knn is not None and eval_args.knn < 1:
        raise UsageError(f"--knn must be a number of neighbours >= 1, got {eval_args.knn}.")
    thresholds = shot_thresholds(
        ShotThresholds.from_name(eval_args.shot_thresholds),
        eval_args.many_shot_threshold,
        eval_args.few_shot_threshold,
    )
    model_class = VLLTRModel if eval_args.knn is not None else VLLTRForImageClassification
    anchors = None
    if eval_args.knn is None:
        anchors = partial(
            require_anchors, path=model_args.model_name_or_path, alternative=", or evaluate it with --knn 5"
        )
    model = load_checked(
        "--model_name_or_path", model_class.from_pretrained, model_args.model_name_or_path, then=anchors, **hub
    )
    if eval_args.explain and (eval_args.knn is not None or model.config.head_type != "lgr"):
        raise UsageError(
            "--explain needs a checkpoint with the LGR head: the FC and KNN heads have no anchor sentences."
        )

    # ---- Data: the test split, and the training split's class counts for the shot groups -----------------------------
    usage = "Give --test_file (the split to evaluate) and --train_file (for the shot groups)."
    test = load_labelled_split(
        data_args, eval_args.test_file, eval_args.test_split, "test split",
        checkpoint_names=checkpoint_class_names(model.config),
    )  # fmt: skip
    if test is None:
        raise UsageError(usage)
    train = load_labelled_split(
        data_args, data_args.train_file, data_args.train_split, "training split", class_names=test.class_names,
        training=True,
    )  # fmt: skip
    if train is None:
        raise UsageError(usage)
    counts = train.class_counts
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub)
    except (OSError, ValueError):
        image_processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    if eval_args.tta == "none" or eval_args.knn is not None:
        transform = ProcessorTransform(image_processor)
    else:
        try:
            transform = MultiViewTransform(image_processor, eval_args.tta)
        except ValueError as e:
            raise UsageError(str(e)) from None
    dataset = test.dataset(transform)

    # ---- Predict and score --------------------------------------------------------------------------------------------
    model = model.to(args.device).eval()
    if eval_args.knn is not None:  # the KNN head: the training images' stage-1 embeddings are the memory
        memory = train.dataset(ProcessorTransform(image_processor))
        batch, workers = args.per_device_eval_batch_size, args.dataloader_num_workers
        memory_embeds = embed_images(model, memory, batch, workers, desc="KNN memory (training images)")
        test_embeds = embed_images(model, dataset, batch, workers, desc="Evaluating")
        scores = knn_scores(test_embeds, memory_embeds, torch.as_tensor(train.labels), len(counts), eval_args.knn)
        out = {"logits": scores, "image_logits": None, "text_logits": None}
    else:
        batch, workers = args.per_device_eval_batch_size, args.dataloader_num_workers
        if eval_args.tta == "none":
            out = predict_logits(model, dataset, batch, workers, desc="Evaluating")
        else:
            out = predict_logits_tta(model, dataset, batch, workers, "Evaluating", VIEW_AVERAGE[eval_args.tta])
    shot_logits = None
    if eval_args.shot_logits == "sum" and out["text_logits"] is not None:
        shot_logits = out["image_logits"] + out["text_logits"]
    metrics = long_tail_metrics(
        out["logits"], test.labels, counts, thresholds, out["image_logits"], out["text_logits"], shot_logits
    )
    per_class = metrics.pop("per_class_top1", None)
    report = {
        "model": model_args.model_name_or_path,
        "test_file": test.description,
        "num_test_images": len(dataset),
        "thresholds": {"many": thresholds.many, "few": thresholds.few, "inclusive": thresholds.inclusive},
        "shot_logits": eval_args.shot_logits,
        "head": f"knn (K={eval_args.knn}, training images)" if eval_args.knn is not None else model.config.head_type,
        "tta": eval_args.tta,
        **metrics,
        "per_class": {
            "train_count": counts.tolist(),
            "test_count": test.class_counts.tolist(),
            "top1": per_class,
        },
    }
    out_dir = Path(args.output_dir)
    write_metrics_json(out_dir / "metrics.json", report)
    logits = np.asarray(out["logits"], dtype=np.float64)  # (N, C)
    arrays = {"labels": np.asarray(test.labels), "logits": logits, "predictions": logits.argmax(axis=1)}
    arrays.update({key: np.asarray(out[key]) for key in ("image_logits", "text_logits") if out[key] is not None})
    atomic_write_npz(out_dir / "predictions.npz", arrays)
    if per_class is not None:
        plot_per_class_accuracy(
            {eval_args.method_name: np.asarray(per_class, dtype=float)},
            counts,
            out_dir / "per_class_accuracy.png",
            thresholds,
            title=f"Per-class top-1 against training images ({Path(str(model_args.model_name_or_path)).name})",
        )

    if eval_args.explain > 0:
        chosen = pick_examples(out["logits"].argmax(-1).numpy(), test.labels, eval_args.explain)
        items = explain_examples(model, dataset, chosen, eval_args.explain_top_k, args.per_device_eval_batch_size)
        atomic_write_json(out_dir / "explanations.json", items)
        atomic_write_text(
            out_dir / "explanations.md", explanation_report(items, test.class_names, f"({report['test_file']})")
        )
        explanation_figure(items, dataset, out_dir / "explanations.png")

    # ---- Record in the checkpoint's card -------------------------------------------------------------------------------
    checkpoint = Path(str(model_args.model_name_or_path))
    # a KNN evaluation leaves the stage-1 checkpoint's card alone: that checkpoint is not an image classifier
    if eval_args.update_model_card and checkpoint.is_dir() and eval_args.knn is None:
        settings = {
            "test_file": report["test_file"],
            "num_test_images": len(dataset),
            **report["thresholds"],
            "shot_logits": eval_args.shot_logits,
            "tta": eval_args.tta,
            "dataset_tag": eval_args.dataset_tag,
            "head": report["head"],
        }
        entry = history_entry("run_eval", "eval", settings, metrics)
        record_run(checkpoint, checkpoint, entry, model.config, args)
    if args.push_to_hub:
        push_folder(checkpoint, args, f"VL-LTR evaluated: top-1 {metrics['top1']:.4f}")
    return report


if __name__ == "__main__":
    run_main(main, "run_eval")
