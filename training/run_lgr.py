"""Stage 2 of VL-LTR: train the language-guided recognition (LGR) head on the checkpoint from anchor selection.

L_rec = CE(P_I, y) + CE(P_T, y) on Mixup / CutMix targets with label smoothing, square-root sampling, the vision
tower frozen (reference ImageNet-LT / Places-LT; --train_vision_tower for iNaturalist). `--peft lora` adapts the
tower with LoRA instead (`training/adapters.py`); `--logit_adjustment 1` trains P_I with the logit-adjusted loss.

    python -m training.run_lgr --model_name_or_path OUT2 --train_file train.txt --image_root ROOT --output_dir OUT3

The reference ImageNet-LT ViT-B/16 recipe on one node of 8 GPUs:

    torchrun --nproc_per_node 8 -m training.run_lgr training/configs/imagenet_lt_vit_b16_stage2.json \
        --model_name_or_path outputs/in_lt_anchors --train_file data/imagenet/ImageNet_LT_train.txt \
        --image_root data/imagenet --output_dir outputs/in_lt_stage2
"""

from transformers import AutoTokenizer

from modeling_vlltr import VLLTRForImageClassification

from .adapters import ADAPTER_DIR, AdapterArguments, adapter_settings, add_lora, save_adapter
from .arguments import (
    AugmentationArguments,
    DataArguments,
    ModelArguments,
    build_training_datasets,
    checkpoint_class_names,
    read_training_split,
)
from .cli import (
    UsageError,
    history_entry,
    load_checked,
    parse_args,
    prepare_output_dir,
    record_run,
    run_main,
    schedule_settings,
    setup_logging,
)
from .data import (
    MixupCutmixCollator,
    class_counts,
)
from .lgr_config import LGRConfig
from .lgr_trainer import LGRTrainer
from .metrics import LongTailMetrics


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, aug_args, adapter_args, args = parse_args(
        (ModelArguments, DataArguments, AugmentationArguments, AdapterArguments, LGRConfig), argv
    )
    setup_logging(args)
    resume = prepare_output_dir(args, "run_lgr")
    push_to_hub, args.push_to_hub = args.push_to_hub, False  # the finished folder is pushed once, with its card
    hub = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir)

    # ---- The checkpoint from anchor selection -------------------------------------------------------------------------
    model = load_checked(
        "--model_name_or_path", VLLTRForImageClassification.from_pretrained, model_args.model_name_or_path, **hub
    )
    if model.config.head_type == "lgr" and not bool(model.anchor_mask.any()):
        raise UsageError(
            f"--model_name_or_path {model_args.model_name_or_path} has no anchor sentences: run "
            f"python -m training.run_select_anchors on the stage-1 output first."
        )

    if adapter_args.peft == "lora":
        if args.train_vision_tower:
            raise UsageError("--peft lora adapts the frozen vision tower; drop --train_vision_tower.")
        add_lora(model, adapter_args, towers=("vision",), seed=args.seed)

    # ---- Data ---------------------------------------------------------------------------------------------------------
    train_source, class_names, train_labels = read_training_split(data_args, checkpoint_class_names(model.config))
    num_classes = len(class_names)
    train_dataset, eval_dataset, image_processor = build_training_datasets(
        data_args, aug_args, train_source, num_classes, model.config.clip_config.vision_config.image_size
    )

    # ---- Train --------------------------------------------------------------------------------------------------------
    collator = MixupCutmixCollator(
        num_classes, args.mixup_alpha, args.cutmix_alpha, args.mixup_prob, args.mixup_switch_prob, args.label_smoothing
    )
    trainer = LGRTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=image_processor,
        compute_metrics=LongTailMetrics(class_counts(train_labels, num_classes)),
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    results = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        results.update(trainer.evaluate())

    # ---- Save (adapters merged) ----------------------------------------------------------------------------------------
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        if adapter_args.save_adapter:
            save_adapter(model, f"{args.output_dir}/{ADAPTER_DIR}", model_args.model_name_or_path)
        try:
            AutoTokenizer.from_pretrained(model_args.model_name_or_path, **hub).save_pretrained(args.output_dir)
        except (OSError, ValueError):
            pass  # the classifier needs no tokenizer; it is copied along when the input folder has one
        settings = {
            "train_file": data_args.train_file or data_args.dataset_name,
            "num_classes": num_classes,
            "num_train_images": len(train_dataset),
            "attention_learning_rate": args.attention_learning_rate,
            "train_vision_tower": args.train_vision_tower,
            "mixup_alpha": args.mixup_alpha,
            "cutmix_alpha": args.cutmix_alpha,
            "label_smoothing": args.label_smoothing,
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
