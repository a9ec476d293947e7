"""Anchor sentence selection (AnSS): pick each class's M anchor sentences with the stage-1 model and build the
stage-2 checkpoint (`VLLTRForImageClassification` with the anchors and the learned `logit_scale` stored).

Each sentence is scored by its L_lin against a selection image set (softmax over all selection images, its own
class's images as positives); the M lowest per class are kept. The reference scores against the LT validation split
for ImageNet-LT and Places-LT, and against at most 50 training images per class for iNaturalist.

    python -m training.run_select_anchors --model_name_or_path OUT1 --selection_file val.txt --image_root ROOT \
        --class_names classes.txt --text_corpus corpus.json --num_anchor_sentences 64 --output_dir OUT2

Without --selection_file the first --max_images_per_class training images of each class are used (with a warning;
the ImageNet-LT and Places-LT recipes refuse it). For iNaturalist the reference draws them with the square-root
sampler, with replacement, through the training augmentation (--selection_images train, the iNaturalist recipe's
default):

    python -m training.run_select_anchors --model_name_or_path OUT1 --train_file train2018.json --image_root ROOT \
        --text_corpus inat_wiki --max_images_per_class 50 --selection_images train --fusion_alpha 0.7 --output_dir OUT2
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer, TrainingArguments
from transformers.utils import logging

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification, VLLTRModel

from .anchors import STRATEGIES, anchor_report, embed_and_select_anchors
from .arguments import (
    AugmentationArguments,
    CorpusArguments,
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
    load_new_head,
    parse_args,
    prepare_output_dir,
    record_run,
    run_main,
    setup_logging,
)
from .data import ProcessorTransform, build_class_corpus, eval_image_processor, tokenize_corpus, train_transform
from .embedding import embed_images
from .io_utils import atomic_write_json, atomic_write_text
from .selection import SELECTION_IMAGES, TRAINING_IMAGES_WARNING, SampledSelection

logger = logging.get_logger(__name__)


@dataclass
class AnchorArguments:
    selection_file: str | None = field(
        default=None,
        metadata={"help": "Split scored against (reference: the LT validation split for ImageNet-LT / Places-LT)."},
    )
    selection_split: str | None = field(default=None, metadata={"help": "The same, as a 🤗 dataset split name."})
    max_images_per_class: int = field(
        default=50,
        metadata={"help": "Without a selection split: the first N training images of each class (reference 50)."},
    )
    require_selection_file: bool = field(
        default=False,
        metadata={
            "help": "Refuse to run without --selection_file / --selection_split instead of scoring on training images "
            "(the ImageNet-LT and Places-LT recipes set it: their published anchors are scored on the validation split)."
        },
    )
    selection_images: str = field(
        default="eval",
        metadata={
            "help": "How the selection images are scored: 'eval' (each once, evaluation transform; the reference for "
            "ImageNet-LT / Places-LT) or 'train' (one epoch of square-root draws with replacement, each through the "
            "training augmentation; the reference for iNaturalist, official main.py L422-424).",
            "choices": list(SELECTION_IMAGES),
        },
    )
    num_anchor_sentences: int = field(default=64, metadata={"help": "M, anchors kept per class (reference 64)."})
    anchor_selection: str = field(
        default="anss",
        metadata={
            "help": "'anss' (lowest L_lin), 'cutoff' (first M in corpus order) or 'random'.",
            "choices": list(STRATEGIES),
        },
    )
    fusion_alpha: float = field(
        default=0.2, metadata={"help": "Test-time fusion α of the classifier (reference 0.2; iNaturalist 0.7)."}
    )
    detach_anchor_norm: bool = field(
        default=False, metadata={"help": "Detach ‖G‖ in the text branch (reference v_detach, iNaturalist)."}
    )
    report_worst: int = field(default=5, metadata={"help": "Least visual sentences listed per class in the report."})
    text_batch_size: int = field(default=256, metadata={"help": "Sentences embedded per batch."})


def _first_per_class(source, labels: np.ndarray, limit: int):
    keep = np.concatenate([np.flatnonzero(labels == c)[:limit] for c in np.unique(labels)])
    keep.sort()
    if isinstance(source, list):
        return [source[i] for i in keep]
    return source.select(keep.tolist())


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, corpus_args, anchor_args, aug_args, args = parse_args(
        (ModelArguments, DataArguments, CorpusArguments, AnchorArguments, AugmentationArguments, TrainingArguments),
        argv,
    )
    setup_logging(args)
    scored_on_training_images = not (anchor_args.selection_file or anchor_args.selection_split)
    if anchor_args.require_selection_file and scored_on_training_images:
        raise UsageError(
            "This recipe needs --selection_file (the LT validation split, e.g. ImageNet_LT_val.txt or "
            "Places_LT_val.txt): the published anchors are scored on it, not on training images."
        )
    prepare_output_dir(args, "run_select_anchors")
    hub = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir)

    # ---- Class names, corpus and the selection images ----------------------------------------------------------------
    config = load_checked("--model_name_or_path", VLLTRConfig.from_pretrained, model_args.model_name_or_path, **hub)
    selection, split_names = load_split(data_args, anchor_args.selection_file, anchor_args.selection_split, None)
    if selection is None:  # no selection split: the first K training images of each class
        train, split_names = load_split(data_args, data_args.train_file, data_args.train_split, None)
        if train is None:
            raise UsageError("Give the selection images: --selection_file, or --train_file / --dataset_name.")
        names = resolve_class_names(data_args, split_names, checkpoint_class_names(config))
        labels = check_labels(train, len(names), data_args, "training split")
        selection = _first_per_class(train, labels, anchor_args.max_images_per_class)
        if anchor_args.anchor_selection == "anss":
            logger.warning(TRAINING_IMAGES_WARNING.format(limit=anchor_args.max_images_per_class))
    class_names = resolve_class_names(data_args, split_names, checkpoint_class_names(config))
    num_classes = len(class_names)
    selection_labels = check_labels(selection, num_classes, data_args, "selection split")
    missing = sorted(set(range(num_classes)) - set(selection_labels.tolist()))
    if missing and anchor_args.anchor_selection == "anss":
        names = ", ".join(repr(class_names[c]) for c in missing[:5])
        raise UsageError(f"The selection split has no image of {len(missing)} class(es) ({names}); AnSS needs them.")
    corpus = build_class_corpus(
        class_names, corpus_args.text_corpus, corpus_args.use_templates, corpus_args.drop_duplicate_sentences
    )
    tokenizer = load_checked(
        "--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub
    )
    max_length = min(77, config.clip_config.text_config.max_position_embeddings)
    tokens = tokenize_corpus(corpus, tokenizer, max_length, corpus_args.token_cache_dir)
    image_size = config.clip_config.vision_config.image_size
    image_processor = eval_image_processor(image_size)
    if anchor_args.selection_images == "train":  # the reference iNaturalist selection: sampled, augmented draws
        augment = train_transform(
            image_size,
            (aug_args.crop_scale_min, 1.0),
            aug_args.hflip,
            aug_args.rand_augment,
            aug_args.random_erasing,
            aug_args.augmentation,
        )
        dataset = SampledSelection(build_dataset(data_args, selection, augment, "selection split"), args.seed)
        selection_labels = dataset.labels
        undrawn = sorted(set(range(num_classes)) - set(selection_labels.tolist()))
        if undrawn and anchor_args.anchor_selection == "anss":
            names = ", ".join(repr(class_names[c]) for c in undrawn[:5])
            raise UsageError(
                f"The square-root draws (--seed {args.seed}) picked no image of {len(undrawn)} class(es) ({names}); "
                f"AnSS needs them: use another --seed or --selection_images eval."
            )
    else:
        dataset = build_dataset(data_args, selection, ProcessorTransform(image_processor), "selection split")

    # ---- Score every sentence with the stage-1 model, keep M per class ------------------------------------------------
    stage1 = load_checked("--model_name_or_path", VLLTRModel.from_pretrained, model_args.model_name_or_path, **hub)
    stage1 = stage1.to(args.device).eval()
    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        image_embeds = embed_images(
            stage1, dataset, args.per_device_eval_batch_size, args.dataloader_num_workers, "Selection images"
        )
        indices, mask, scores, anchors = embed_and_select_anchors(
            stage1,
            tokens,
            torch.as_tensor(corpus.labels),
            image_embeds,
            torch.as_tensor(selection_labels),
            num_classes,
            anchor_args.num_anchor_sentences,
            anchor_args.anchor_selection,
            seed=args.seed,
            batch_size=anchor_args.text_batch_size,
        )

    # ---- The stage-2 checkpoint: stage-1 CLIP (with its learned logit_scale) + anchors --------------------------------
    id2label = dict(enumerate(class_names))
    classifier_config = VLLTRConfig.from_pretrained(
        model_args.model_name_or_path,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        num_anchor_sentences=anchor_args.num_anchor_sentences,
        fusion_alpha=anchor_args.fusion_alpha,
        detach_anchor_norm=anchor_args.detach_anchor_norm,
        head_type="lgr",
        **hub,
    )
    classifier = load_new_head(
        VLLTRForImageClassification.from_pretrained, model_args.model_name_or_path, config=classifier_config, **hub
    )
    classifier.set_anchor_embeddings(anchors, mask)
    classifier.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    image_processor.save_pretrained(args.output_dir)

    score_list = scores.tolist() if scores is not None else None
    atomic_write_json(
        f"{args.output_dir}/anchors.json",
        {
            "strategy": anchor_args.anchor_selection,
            "num_anchor_sentences": anchor_args.num_anchor_sentences,
            "classes": [
                {
                    "label": c,
                    "name": class_names[c],
                    "anchors": [
                        {
                            "index": i,
                            "sentence": corpus.sentences[i],
                            "score": None if score_list is None else score_list[i],
                        }
                        for i in indices[c][mask[c]].tolist()
                    ],
                }
                for c in range(num_classes)
            ],
        },
    )
    report = anchor_report(
        class_names, corpus.sentences, corpus.labels, scores, indices, mask, num_worst=anchor_args.report_worst
    )
    atomic_write_text(f"{args.output_dir}/anchor_report.md", report)

    results = {"num_sentences": len(corpus.sentences), "num_selection_images": len(dataset)}
    if scores is not None:
        results["mean_anchor_score"] = float(scores[indices[mask]].mean())
        results["mean_sentence_score"] = float(scores.mean())
    settings = {
        "strategy": anchor_args.anchor_selection,
        "num_anchor_sentences": anchor_args.num_anchor_sentences,
        "selection": anchor_args.selection_file
        or anchor_args.selection_split
        or f"first {anchor_args.max_images_per_class} training images per class",
        "selection_images": anchor_args.selection_images,
        "text_corpus": corpus_args.text_corpus,
        "templates": corpus_args.use_templates,
        "fusion_alpha": anchor_args.fusion_alpha,
        "detach_anchor_norm": anchor_args.detach_anchor_norm,
        "logit_scale": float(stage1.clip.logit_scale.detach().exp()),
    }
    entry = history_entry("run_select_anchors", "anss", settings, results)
    record_run(
        args.output_dir, model_args.model_name_or_path, entry, classifier.config, args, args.push_to_hub,
        "VL-LTR anchors (anchor sentence selection)",
    )  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "run_select_anchors")
