"""Stage 2 of VL-LTR: train the language-guided recognition (LGR) head on the checkpoint from anchor selection.

L_rec = CE(P_I, y) + CE(P_T, y) on Mixup / CutMix targets with label smoothing, square-root sampling, the vision
tower frozen (reference ImageNet-LT / Places-LT; --train_vision_tower for iNaturalist). `--peft lora` adapts the
tower with LoRA instead (`training/adapters.py`); `--logit_adjustment 1` trains P_I with the logit-adjusted loss.

    python -m training.run_lgr --model_name_or_path OUT2 --train_file train.txt --image_root ROOT --output_dir OUT3

After `training.add_classes` and a few images of the new class (and `run_select_anchors --classes`), train only its
row of the image branch, every other weight unchanged:

    python -m training.run_lgr --model_name_or_path OUT6 --train_classes "purple star" --train_file train_plus_new.txt \
        --image_root ROOT --num_train_epochs 5 --output_dir OUT7

The reference ImageNet-LT ViT-B/16 recipe on one node of 8 GPUs:

    torchrun --nproc_per_node 8 -m training.run_lgr training/configs/imagenet_lt_vit_b16_stage2.json \
        --model_name_or_path outputs/in_lt_anchors --train_file data/imagenet/ImageNet_LT_train.txt \
        --image_root data/imagenet --output_dir outputs/in_lt_stage2
"""

from pathlib import Path

from transformers import AutoTokenizer

from modeling_vlltr import VLLTRForImageClassification

from .adapters import ADAPTER_DIR, AdapterArguments, adapter_settings, add_lora, save_adapter
from .arguments import AugmentationArguments, DataArguments, ModelArguments
from .cli import (
    UsageError,
    load_checked,
    parse_args,
    prepare_output_dir,
    record_run,
    require_anchors,
    run_main,
    setup_logging,
)
from .data import training_datasets
from .io_utils import TOKENIZER_FILES, DataError, save_pretrained_to, writing
from .lgr_config import LGRConfig
from .lgr_trainer import LGRTrainer
from .metrics import LongTailMetrics
from .model_card import history_entry, schedule_settings
from .splits import checkpoint_class_names, load_training_splits


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, aug_args, adapter_args, args = parse_args(
        (ModelArguments, DataArguments, AugmentationArguments, AdapterArguments, LGRConfig), argv
    )
    setup_logging(args)
    resume = prepare_output_dir(args, "run_lgr")
    push_to_hub, args.push_to_hub = args.push_to_hub, False  # the finished folder is pushed once, with its card
    hub = model_args.hub_kwargs

    # ---- The checkpoint from anchor selection -------------------------------------------------------------------------
    model = load_checked(
        "--model_name_or_path",
        VLLTRForImageClassification.from_pretrained,
        model_args.model_name_or_path,
        then=lambda loaded: require_anchors(loaded, model_args.model_name_or_path),
        **hub,
    )

    if adapter_args.peft == "lora":
        if args.train_vision_tower:
            raise UsageError("--peft lora adapts the frozen vision tower; drop --train_vision_tower.")
        add_lora(model, adapter_args, towers=("vision",), seed=args.seed)

    # ---- Data ---------------------------------------------------------------------------------------------------------
    train, evaluation = load_training_splits(data_args, checkpoint_class_names(model.config))
    if train.num_classes != model.config.num_labels:
        raise DataError(
            f"--model_name_or_path {model_args.model_name_or_path} classifies {model.config.num_labels} classes but "
            f"the training data has {train.num_classes}; use the anchor-selection output for this dataset."
        )
    image_size = model.config.clip_config.vision_config.image_size
    train_dataset, eval_dataset, image_processor = training_datasets(train, evaluation, aug_args, image_size)

    # ---- Train: the trainer builds the Mixup / CutMix collator from the LGRConfig settings -----------------------------
    try:
        trainer = LGRTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=image_processor,
            compute_metrics=LongTailMetrics(train.class_counts),
        )
    except ValueError as e:  # a setting that does not fit this checkpoint (e.g. an unknown --train_classes name)
        raise UsageError(str(e)) from None
    train_result = trainer.train(resume_from_checkpoint=resume)
    results = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        results.update(trainer.evaluate())

    if model.config.head_type == "lgr" and model.config.text_only_classes:
        # classes added from text whose image-branch rows were trained now are fused like every other class
        trained = trainer.train_class_ids or {int(c) for c in set(train.labels.tolist())}
        kept = [c for c in model.config.text_only_classes if c not in trained]
        model.config.text_only_classes = kept or None

    # ---- Save (adapters merged) ---------------------------------------------------------------------------------------
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        if adapter_args.save_adapter:
            with writing(f"{args.output_dir}/{ADAPTER_DIR}"):
                save_adapter(model, f"{args.output_dir}/{ADAPTER_DIR}", model_args.model_name_or_path)
        # The classifier needs no tokenizer; it is copied along when the input has one (adding classes later needs
        # it). A local folder without tokenizer files would load as an empty tokenizer: nothing is copied then.
        source = Path(str(model_args.model_name_or_path))
        if not source.is_dir() or any((source / name).is_file() for name in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **hub)
            except (OSError, ValueError):
                tokenizer = None
            if tokenizer is not None:
                save_pretrained_to(tokenizer, args.output_dir)
        settings = {
            "train_file": train.description,
            "num_classes": train.num_classes,
            "num_train_images": len(train_dataset),
            "attention_learning_rate": args.attention_learning_rate,
            "train_vision_tower": args.train_vision_tower,
            "mixup_alpha": args.mixup_alpha,
            "cutmix_alpha": args.cutmix_alpha,
            "label_smoothing": args.label_smoothing,
            "train_classes": args.train_classes,
            "logit_adjustment": args.logit_adjustment,
            **adapter_settings(adapter_args, model),
            **schedule_settings(args),
        }
        entry = history_entry("run_lgr", "lgr", settings, results)
        record_run(
            args.output_dir, model_args.model_name_or_path, entry, model.config, args, push_to_hub,
            "VL-LTR stage 2 (language-guided recognition)",
        )  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "run_lgr")
