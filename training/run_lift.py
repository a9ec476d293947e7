"""A LIFT-style peer (Shi et al., ICML 2024), trained by this package from the same CLIP: the CLIP image tower with
LoRA adapters, a cosine classifier initialised from the class-name prompt embeddings, the logit-adjusted cross
entropy, 10% of VL-LTR's epochs. It writes a standard `AutoModelForImageClassification` checkpoint
(`VLLTRForImageClassification` with `head_type="cosine"`), evaluated by `run_eval` like VL-LTR:

    python -m training.run_lift --model_name_or_path openai/clip-vit-base-patch16 --train_file train.txt \
        --image_root ROOT --class_names classes.txt --output_dir OUT_LIFT
    python -m training.run_eval --model_name_or_path OUT_LIFT --test_file test.txt --train_file train.txt \
        --image_root ROOT --output_dir OUT_LIFT/eval --tta ten_crop

The ImageNet-LT ViT-B/16 recipe on one GPU:

    python -m training.run_lift training/configs/imagenet_lt_vit_b16_lift.json \
        --train_file data/imagenet/ImageNet_LT_train.txt --image_root data/imagenet \
        --class_names data/imagenet/classes.txt --output_dir outputs/in_lt_lift
"""

from transformers import AutoTokenizer

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification

from .adapters import ADAPTER_DIR, adapter_settings, add_lora, save_adapter
from .arguments import AugmentationArguments, DataArguments, ModelArguments
from .cli import load_checked, parse_args, prepare_output_dir, record_run, run_main, setup_logging
from .corpus import IMAGENET_TEMPLATES
from .data import training_datasets
from .embedding import prompt_embeddings
from .io_utils import save_pretrained_to
from .lgr_trainer import LGRTrainer
from .lift_config import LIFTArguments, LIFTConfig
from .metrics import LongTailMetrics
from .model_card import history_entry, schedule_settings
from .splits import checkpoint_class_names, load_training_splits


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, aug_args, lift_args, args = parse_args(
        (ModelArguments, DataArguments, AugmentationArguments, LIFTArguments, LIFTConfig), argv
    )
    setup_logging(args)
    resume = prepare_output_dir(args, "run_lift")
    push_to_hub, args.push_to_hub = args.push_to_hub, False  # the finished folder is pushed once, with its card
    hub = model_args.hub_kwargs

    # ---- Data ---------------------------------------------------------------------------------------------------------
    config = load_checked(
        "--model_name_or_path", VLLTRConfig.from_pretrained, model_args.model_name_or_path, tokenizer=True, **hub
    )
    train, evaluation = load_training_splits(data_args, checkpoint_class_names(config))
    class_names = train.class_names
    image_size = config.clip_config.vision_config.image_size
    train_dataset, eval_dataset, image_processor = training_datasets(train, evaluation, aug_args, image_size)

    # ---- The model: CLIP (or a stage-1 VL-LTR) with a cosine head initialised from the class-name prompts -------------
    id2label = dict(enumerate(class_names))
    model = load_checked(
        "--model_name_or_path",
        VLLTRForImageClassification.from_pretrained,
        model_args.model_name_or_path,
        head_type="cosine",
        cosine_scale=lift_args.cosine_scale,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        **hub,
    )
    tokenizer = load_checked(
        "--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub
    )
    templates = IMAGENET_TEMPLATES if lift_args.prompt_templates == "imagenet" else lift_args.templates
    model.classifier.weight.data.copy_(prompt_embeddings(model, tokenizer, class_names, templates))  # w_c (C, D)
    if lift_args.peft == "lora":
        add_lora(model, lift_args, towers=("vision",), seed=args.seed)

    # ---- Train (LGR's trainer: the head's logits are P_I, logit-adjusted in the loss) --------------------------------
    trainer = LGRTrainer(  # the Mixup / CutMix collator comes from the LIFTConfig settings (off by default)
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        compute_metrics=LongTailMetrics(train.class_counts),
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    results = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        results.update(trainer.evaluate())

    # ---- Save (adapters merged) ----------------------------------------------------------------------------------------
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        save_pretrained_to(tokenizer, args.output_dir)
        if lift_args.save_adapter:
            save_adapter(model, f"{args.output_dir}/{ADAPTER_DIR}", model_args.model_name_or_path)
        settings = {
            "model_name_or_path": model_args.model_name_or_path,
            "train_file": train.description,
            "num_classes": train.num_classes,
            "num_train_images": len(train_dataset),
            "prompt_templates": len(templates),
            "cosine_scale": lift_args.cosine_scale,
            "logit_adjustment": args.logit_adjustment,
            "train_vision_tower": args.train_vision_tower,
            **adapter_settings(lift_args, model),
            **schedule_settings(args),
        }
        entry = history_entry("run_lift", "lift", settings, results)
        record_run(
            args.output_dir, model_args.model_name_or_path, entry, model.config, args, push_to_hub,
            "LIFT-style peer (LoRA image tower, cosine head, logit-adjusted loss)",
        )  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "run_lift")
