"""The LIFT peer (Shi et al., "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts", ICML 2024) as its
authors run it (shijxcs/LIFT `scripts/run_tab1to4_main_results.sh`), trained by this package from the same CLIP: the
frozen CLIP image tower with one AdaptFormer adapter per layer, a cosine classifier (s = 25) on the tower's feature
before the projection, initialised from the class prompts' text embeddings, the logit-adjusted cross entropy, SGD
(lr 0.01, momentum 0.9, weight decay 5e-4), batch 128, 10 epochs; at test time LIFT's five-crop ensemble. It writes a
standard `AutoModelForImageClassification` checkpoint (`VLLTRForImageClassification`, `head_type="cosine"`, the
adapters in `model.safetensors`), evaluated by `run_eval` like VL-LTR (docs/lift.md):

    python -m training.run_lift --model_name_or_path openai/clip-vit-base-patch16 --train_file train.txt \
        --image_root ROOT --class_names classes.txt --output_dir OUT_LIFT
    python -m training.run_eval --model_name_or_path OUT_LIFT --test_file test.txt --train_file train.txt \
        --image_root ROOT --output_dir OUT_LIFT/eval --tta lift_five_crop

The ImageNet-LT ViT-B/16 recipe on one GPU:

    python -m training.run_lift training/configs/imagenet_lt_vit_b16_lift.json \
        --train_file data/imagenet/ImageNet_LT_train.txt --image_root data/imagenet \
        --class_names data/imagenet/classes.txt --output_dir outputs/in_lt_lift

`--adapter lora` (the earlier `--peft lora`) adapts the tower with peft LoRA instead, `--adapter none` freezes it;
`--prompt_mode classname|default|ensemble|descriptor --descriptors FILE.json` picks the head's initial text.
"""

from transformers import AutoTokenizer, set_seed

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification

from .adapters import ADAPTER_DIR, adapter_settings, adaptformer_bottleneck, add_lora, save_adapter
from .arguments import DataArguments, ModelArguments
from .cli import load_checked, parse_args, prepare_output_dir, record_run, run_main, setup_logging
from .corpus import lift_prompts
from .data import training_datasets
from .embedding import class_text_embeddings, cosine_head_weights
from .io_utils import save_pretrained_to
from .lift_config import LIFTArguments, LIFTAugmentationArguments, LIFTConfig
from .lift_trainer import LIFTTrainer
from .metrics import LongTailMetrics
from .model_card import history_entry, schedule_settings
from .splits import checkpoint_class_names, load_training_splits


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, aug_args, lift_args, args = parse_args(
        (ModelArguments, DataArguments, LIFTAugmentationArguments, LIFTArguments, LIFTConfig), argv
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
    vision = config.clip_config.vision_config
    train_dataset, eval_dataset, image_processor = training_datasets(train, evaluation, aug_args, vision.image_size)
    prompts = lift_prompts(lift_args.prompt_mode, class_names, lift_args.templates, lift_args.descriptors)

    # ---- The model: CLIP with AdaptFormer adapters and a cosine head on the tower's feature ---------------------------
    adaptformer_dim = None
    if lift_args.adapter == "adaptformer":
        adaptformer_dim = lift_args.adapter_dim or adaptformer_bottleneck(len(class_names), vision.num_hidden_layers)
    id2label = dict(enumerate(class_names))
    set_seed(args.seed)  # the adapters' random initialisation (W_down) is a function of --seed
    model = load_checked(
        "--model_name_or_path",
        VLLTRForImageClassification.from_pretrained,
        model_args.model_name_or_path,
        head_type="cosine",
        cosine_scale=lift_args.cosine_scale,
        classifier_feature=lift_args.classifier_feature,
        adaptformer_dim=adaptformer_dim,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        **hub,
    )
    tokenizer = load_checked(
        "--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub
    )
    # w_c from the class prompts (LIFT `init_head_text_feat`), before any adapter changes the tower
    text = class_text_embeddings(model, tokenizer, prompts)  # t_c (C, D)
    model.classifier.weight.data.copy_(cosine_head_weights(model, text))  # w_c (C, H) or (C, D)
    if lift_args.adapter == "lora":
        add_lora(model, lift_args, towers=("vision",), seed=args.seed)

    # ---- Train (the head's logits, logit-adjusted in the loss; LIFT's decay and per-epoch cosine) ---------------------
    trainer = LIFTTrainer(
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

    # ---- Save (AdaptFormer in model.safetensors; LoRA merged) ---------------------------------------------------------
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
            "adapter": lift_args.adapter,
            "prompt_mode": lift_args.prompt_mode if lift_args.prompt_templates is None else "templates",
            "prompts_per_class": round(sum(map(len, prompts)) / len(prompts), 2),
            "classifier_feature": lift_args.classifier_feature,
            "cosine_scale": lift_args.cosine_scale,
            "logit_adjustment": args.logit_adjustment,
            "train_vision_tower": args.train_vision_tower,
            **adapter_settings(lift_args, model),
            **schedule_settings(args),
        }
        entry = history_entry("run_lift", "lift", settings, results)
        tower = {"adaptformer": "AdaptFormer", "lora": "LoRA", "none": "frozen"}[lift_args.adapter]
        record_run(
            args.output_dir, model_args.model_name_or_path, entry, model.config, args, push_to_hub,
            f"LIFT peer ({tower} image tower, cosine head from text, logit-adjusted loss)",
        )  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "run_lift")
