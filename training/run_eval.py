"""Evaluate a VL-LTR classifier: top-1 / top-5 of the fused prediction and of each branch, and many / medium /
few-shot accuracy by the number of training images of each class. Writes `metrics.json` and a plot of per-class
accuracy against training-set size, and records the results in the checkpoint's model card.

    python -m training.run_eval --model_name_or_path OUT3 --test_file test.txt --train_file train.txt \
        --image_root ROOT --output_dir OUT4

`--tta {flip,five_crop,ten_crop}` averages the (fused) probability over several views of each test image (see
`training/tta.py`: flips, or torchvision's five / ten crops of the resized image); `--tta none` is the plain
evaluation.

Shot groups follow the standard convention (> 100, 20-100, < 20 training images); `--shot_thresholds official`
uses the reference code's (>= 100, 21-99, <= 20) and `--shot_logits sum` its summed-logit prediction for them.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, TrainingArguments

from modeling_vlltr import VLLTRForImageClassification

from .arguments import (
    DataArguments,
    ModelArguments,
    build_dataset,
    check_labels,
    checkpoint_class_names,
    load_split,
    resolve_class_names,
)
from .cli import (
    UsageError,
    history_entry,
    load_checked,
    parse_args,
    prepare_output_dir,
    push_folder,
    record_run,
    run_main,
    setup_logging,
)
from .data import ProcessorTransform, class_counts, eval_image_processor
from .embedding import predict_logits
from .metrics import ShotThresholds, long_tail_metrics, plot_per_class_accuracy, write_metrics_json
from .tta import TTA_MODES, MultiViewTransform, predict_logits_tta


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
            "'ten_crop' (torchvision FiveCrop / TenCrop of the resized image, before the centre crop); 'none' = the "
            "single centre-crop view.",
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


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, eval_args, args = parse_args(
        (ModelArguments, DataArguments, EvalArguments, TrainingArguments), argv
    )
    setup_logging(args)
    prepare_output_dir(args, "run_eval")
    hub = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir)
    if args.push_to_hub and not Path(str(model_args.model_name_or_path)).is_dir():
        raise UsageError("--push_to_hub publishes the evaluated checkpoint folder: give a local --model_name_or_path.")
    model = load_checked(
        "--model_name_or_path", VLLTRForImageClassification.from_pretrained, model_args.model_name_or_path, **hub
    )

    # ---- Data: the test split, and the training split's class counts for the shot groups -----------------------------
    test_source, split_names = load_split(data_args, eval_args.test_file, eval_args.test_split, None)
    train_source, _ = load_split(data_args, data_args.train_file, data_args.train_split, None)
    if test_source is None or train_source is None:
        raise UsageError("Give --test_file (the split to evaluate) and --train_file (for the shot groups).")
    class_names = resolve_class_names(data_args, split_names, checkpoint_class_names(model.config))
    num_classes = len(class_names)
    test_labels = check_labels(test_source, num_classes, data_args, "test split")
    counts = class_counts(check_labels(train_source, num_classes, data_args, "training split"), num_classes)
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub)
    except (OSError, ValueError):
        image_processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    if eval_args.tta == "none":
        transform = ProcessorTransform(image_processor)
    else:
        try:
            transform = MultiViewTransform(image_processor, eval_args.tta)
        except ValueError as e:
            raise UsageError(str(e)) from None
    dataset = build_dataset(data_args, test_source, transform, "test split")

    # ---- Predict and score --------------------------------------------------------------------------------------------
    model = model.to(args.device).eval()
    predict = predict_logits if eval_args.tta == "none" else predict_logits_tta
    out = predict(model, dataset, args.per_device_eval_batch_size, args.dataloader_num_workers, desc="Evaluating")
    base = ShotThresholds.from_name(eval_args.shot_thresholds)
    thresholds = ShotThresholds(
        many=eval_args.many_shot_threshold if eval_args.many_shot_threshold is not None else base.many,
        few=eval_args.few_shot_threshold if eval_args.few_shot_threshold is not None else base.few,
        inclusive=base.inclusive,
    )
    shot_logits = None
    if eval_args.shot_logits == "sum" and out["text_logits"] is not None:
        shot_logits = out["image_logits"] + out["text_logits"]
    metrics = long_tail_metrics(
        out["logits"], test_labels, counts, thresholds, out["image_logits"], out["text_logits"], shot_logits
    )
    per_class = metrics.pop("per_class_top1", None)
    report = {
        "model": model_args.model_name_or_path,
        "test_file": eval_args.test_file or f"{data_args.dataset_name}[{eval_args.test_split}]",
        "num_test_images": len(dataset),
        "thresholds": {"many": thresholds.many, "few": thresholds.few, "inclusive": thresholds.inclusive},
        "shot_logits": eval_args.shot_logits,
        "tta": eval_args.tta,
        **metrics,
        "per_class": {
            "train_count": counts.tolist(),
            "test_count": np.bincount(test_labels, minlength=num_classes).tolist(),
            "top1": per_class,
        },
    }
    out_dir = Path(args.output_dir)
    write_metrics_json(out_dir / "metrics.json", report)
    if per_class is not None:
        plot_per_class_accuracy(
            {eval_args.method_name: np.asarray(per_class, dtype=float)},
            counts,
            out_dir / "per_class_accuracy.png",
            thresholds,
            title=f"Per-class top-1 against training images ({Path(str(model_args.model_name_or_path)).name})",
        )

    # ---- Record in the checkpoint's card -------------------------------------------------------------------------------
    checkpoint = Path(str(model_args.model_name_or_path))
    if eval_args.update_model_card and checkpoint.is_dir():
        settings = {
            "test_file": report["test_file"],
            "num_test_images": len(dataset),
            **report["thresholds"],
            "shot_logits": eval_args.shot_logits,
            "tta": eval_args.tta,
            "dataset_tag": eval_args.dataset_tag,
        }
        entry = history_entry("run_eval", "eval", settings, metrics)
        record_run(checkpoint, checkpoint, entry, model.config, args)
    if args.push_to_hub:
        push_folder(checkpoint, args, f"VL-LTR evaluated: top-1 {metrics['top1']:.4f}")
    return report


if __name__ == "__main__":
    run_main(main, "run_eval")
