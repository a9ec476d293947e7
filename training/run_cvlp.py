"""Stage 1 of VL-LTR: class-wise visual-linguistic pre-training (CVLP) of a CLIP on a long-tailed image set.

Each training image is paired with one sentence of its class; the loss is (1 − β)·L_ccl + β·L_dis over the whole
batch, gathered from every process, with the starting CLIP as a frozen teacher.

A run on one machine:

    python -m training.run_cvlp --model_name_or_path openai/clip-vit-base-patch16 --train_file train.txt \
        --image_root ROOT --class_names classes.txt --text_corpus corpus.json --output_dir OUT1

`--peft lora` freezes both towers (and their projections and τ) and trains LoRA adapters in them instead
(`training/adapters.py`).

The reference ImageNet-LT ViT-B/16 recipe on one node of 8 GPUs (global batch 128 × 8 × 1 = 1024):

    torchrun --nproc_per_node 8 -m training.run_cvlp training/configs/imagenet_lt_vit_b16_stage1.json \
        --train_file data/imagenet/ImageNet_LT_train.txt --image_root data/imagenet \
        --class_names data/imagenet/classes.txt --text_corpus data/imagenet/wiki --output_dir outputs/in_lt_stage1
"""

import torch
from transformers import AutoTokenizer

from modeling_vlltr import VLLTRConfig, VLLTRModel

from .adapters import ADAPTER_DIR, AdapterArguments, adapter_settings, add_lora, save_adapter
from .arguments import AugmentationArguments, CorpusArguments, DataArguments, ModelArguments
from .cli import (
    UsageError,
    evaluation_lines,
    load_checked,
    parse_args,
    prepare_output_dir,
    print_summary,
    record_run,
    run_main,
    setup_logging,
    training_lines,
)
from .corpus import load_corpus
from .cvlp_config import CVLPConfig
from .data import training_datasets
from .io_utils import save_pretrained_to
from .model_card import history_entry, schedule_settings
from .resolution import resize_image_size
from .splits import checkpoint_class_names, load_training_splits


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, corpus_args, aug_args, adapter_args, args = parse_args(
        (ModelArguments, DataArguments, CorpusArguments, AugmentationArguments, AdapterArguments, CVLPConfig), argv
    )
    setup_logging(args)
    resume = prepare_output_dir(args, "run_cvlp")
    push_to_hub, args.push_to_hub = args.push_to_hub, False  # the finished folder is pushed once, with its card
    hub = model_args.hub_kwargs

    # ---- Data -------------------------------------------------------------------------------------------------------
    config = load_checked(
        "--model_name_or_path", VLLTRConfig.from_pretrained, model_args.model_name_or_path, tokenizer=True, **hub
    )
    train, evaluation = load_training_splits(data_args, checkpoint_class_names(config))
    class_names = train.class_names
    tokenizer = load_checked(
        "--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub
    )
    corpus, tokens = load_corpus(corpus_args, class_names, tokenizer, config.clip_config.text_config)

    image_size = args.image_size or config.clip_config.vision_config.image_size
    patch_size = config.clip_config.vision_config.patch_size
    if image_size % patch_size:
        raise UsageError(f"--image_size {image_size} must be a multiple of the patch size ({patch_size}).")
    train_dataset, eval_dataset, image_processor = training_datasets(train, evaluation, aug_args, image_size)

    # ---- Models: the student and the frozen teacher (the CLIP the run starts from) ------------------------------------
    id2label = dict(enumerate(class_names))
    model = load_checked(
        "--model_name_or_path",
        VLLTRModel.from_pretrained,
        model_args.model_name_or_path,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        **hub,
    )
    if adapter_args.peft == "lora":
        add_lora(model, adapter_args, towers=("vision", "text"), seed=args.seed)
        model.clip.logit_scale.requires_grad_(False)  # only the adapters train, so the adapter folder is the whole run
    teacher = None
    if args.distillation_beta > 0:
        teacher = VLLTRModel.from_pretrained(model_args.model_name_or_path, **hub)
    for clip in (model, teacher) if teacher is not None else (model,):  # both see the same image size
        resize_image_size(clip, image_size)

    # ---- Train --------------------------------------------------------------------------------------------------------
    from .cvlp_trainer import CVLPTrainer  # here: the Trainer (and 🤗 datasets) loads after --help

    trainer = CVLPTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        teacher_model=teacher,
        corpus_tokens=tokens,
        sentence_labels=torch.as_tensor(corpus.labels),
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    results = {"train_loss": train_result.training_loss}
    if eval_dataset is not None:
        results.update(trainer.evaluate())

    # ---- Save: weights, remote code, tokenizer, image processor, history, card -------------------------------------------
    trainer.save_model(args.output_dir)  # adapters merged
    if trainer.is_world_process_zero():
        save_pretrained_to(tokenizer, args.output_dir)
        if adapter_args.save_adapter:
            save_adapter(model, f"{args.output_dir}/{ADAPTER_DIR}", model_args.model_name_or_path)
        settings = {
            "model_name_or_path": model_args.model_name_or_path,
            "train_file": train.description,
            "num_classes": len(class_names),
            "num_train_images": len(train_dataset),
            "num_sentences": len(corpus.sentences),
            "templates": corpus_args.use_templates,
            "drop_duplicate_sentences": corpus_args.drop_duplicate_sentences,
            "text_corpus": corpus_args.text_corpus,
            "distillation_beta": args.distillation_beta,
            "distillation_form": args.distillation_form,
            "image_size": image_size,
            "label_smoothing": args.label_smoothing,
            **adapter_settings(adapter_args, model),
            **schedule_settings(args),
        }
        entry = history_entry("run_cvlp", "cvlp", settings, results)
        record_run(
            args.output_dir, model_args.model_name_or_path, entry, model.config, args, push_to_hub,
            "VL-LTR stage 1 (class-wise visual-linguistic pre-training)",
        )  # fmt: skip
        trained = f"{len(train_dataset)} images of {len(class_names)} classes, {len(corpus.sentences)} sentences"
        print_summary(
            f"run_cvlp: stage 1 (CVLP) of {model_args.model_name_or_path} on {trained}",
            training_lines(train_result, trainer.state.log_history) + evaluation_lines(results),
            args.output_dir,
        )
    return results


if __name__ == "__main__":
    run_main(main, "run_cvlp")
