"""Anchor sentence selection (AnSS): pick each class's M anchor sentences with the stage-1 model and build the
stage-2 checkpoint (`VLLTRForImageClassification` with the anchors and the learned `logit_scale` stored).

Each sentence is scored by its L_lin against a selection image set (softmax over all selection images, its own
class's images as positives); the M lowest per class are kept. The reference scores against the LT validation split
for ImageNet-LT and Places-LT, and against at most 50 training images per class for iNaturalist.

    python -m training.run_select_anchors --model_name_or_path OUT1 --selection_file val.txt --image_root ROOT \
        --class_names classes.txt --text_corpus corpus.json --num_anchor_sentences 64 --output_dir OUT2

The paper's FC-head ablation (docs/method.md §3.9, ablation row 5) starts here too: `--head_type fc` builds the
classifier with one linear layer on E_I instead of the LGR head. It has no anchors, so no sentence is scored and no
corpus is read; the selection (or training) split only supplies the class names and their order. Train it with
run_lgr like the LGR head:

    python -m training.run_select_anchors --model_name_or_path OUT1 --train_file train.txt --image_root ROOT \
        --class_names classes.txt --head_type fc --output_dir OUT2_FC

Without --selection_file the first --max_images_per_class training images of each class are used (with a warning;
the ImageNet-LT and Places-LT recipes refuse it). For iNaturalist the reference draws them with the square-root
sampler, with replacement, through the training augmentation (--selection_images train, the iNaturalist recipe's
default):

    python -m training.run_select_anchors --model_name_or_path OUT1 --train_file train2018.json --image_root ROOT \
        --text_corpus inat_wiki --max_images_per_class 50 --selection_images train --fusion_alpha 0.7 --output_dir OUT2

With --classes, on a classifier checkpoint (e.g. one grown by `training.add_classes`), only the named classes'
anchors are re-selected with AnSS (the selection split must hold images of them; other classes' images stay in the
softmax); every other class, the head and the fusion settings are kept:

    python -m training.run_select_anchors --model_name_or_path OUT5 --classes "purple star" --selection_file val.txt \
        --image_root ROOT --class_names all_classes.txt --text_corpus corpus.json --output_dir OUT6
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, TrainingArguments
from transformers.utils import logging

from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification, VLLTRModel
from modeling_vlltr.configuration_vlltr import DEFAULT_FUSION_ALPHA

from .anchors import (
    BALANCE_ADVICE,
    STRATEGIES,
    anchor_report,
    anchors_record,
    description_counts,
    description_summary,
    embed_and_select_anchors,
    replace_class_anchors,
    restrict_to_classes,
)
from .arguments import AugmentationArguments, CorpusArguments, DataArguments, ModelArguments
from .cli import (
    UsageError,
    load_checked,
    load_new_head,
    parse_args,
    prepare_output_dir,
    print_summary,
    record_run,
    run_main,
    setup_logging,
)
from .corpus import load_corpus
from .data import ProcessorTransform, eval_image_processor, train_transform_from_args
from .embedding import embed_images
from .io_utils import atomic_write_json, atomic_write_text, save_pretrained_to
from .model_card import history_entry
from .selection import SELECTION_IMAGES, TRAINING_IMAGES_WARNING, SampledSelection
from .splits import checkpoint_class_names, load_labelled_split

logger = logging.get_logger(__name__)


@dataclass
class AnchorArguments:
    """The selection images, the number of anchors and how they are chosen, and the classifier head."""

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
    num_anchor_sentences: int = field(
        default=64,
        metadata={"help": "M, anchors kept per class (reference 64); lowered to the most sentences any class has."},
    )
    anchor_selection: str = field(
        default="anss",
        metadata={
            "help": "'anss' (lowest L_lin), 'cutoff' (first M in corpus order) or 'random'.",
            "choices": list(STRATEGIES),
        },
    )
    fusion_alpha: float = field(
        default=DEFAULT_FUSION_ALPHA,
        metadata={"help": "Test-time fusion α of the classifier (reference 0.2; iNaturalist 0.7)."},
    )
    detach_anchor_norm: bool = field(
        default=False, metadata={"help": "Detach ‖G‖ in the text branch (reference v_detach, iNaturalist)."}
    )
    head_type: str = field(
        default="lgr",
        metadata={
            "help": "'lgr' (the anchors' language-guided head) or 'fc' (one linear layer on E_I, the paper's FC "
            "ablation; no sentence is scored then, and --text_corpus is not needed).",
            "choices": ["lgr", "fc"],
        },
    )
    classes: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated class names: re-select only their anchors in a classifier checkpoint (e.g. "
            "classes added from text, once a few images of them exist); the other classes keep theirs."
        },
    )
    report_worst: int = field(default=5, metadata={"help": "Least visual sentences listed per class in the report."})
    text_batch_size: int = field(default=256, metadata={"help": "Sentences embedded per batch."})


def _chosen_classes(classes: str | None, class_names: list[str]) -> list[int] | None:
    if classes is None:
        return None
    ids = {name: c for c, name in enumerate(class_names)}
    wanted = [name.strip() for name in classes.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ids]
    if unknown or not wanted:
        raise UsageError(f"--classes {classes!r}: no class named {unknown[:3] or classes!r} in the class list.")
    return sorted({ids[name] for name in wanted})


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
    hub = model_args.hub_kwargs

    # ---- Class names, the selection images and the corpus ------------------------------------------------------------
    config = load_checked(
        "--model_name_or_path", VLLTRConfig.from_pretrained, model_args.model_name_or_path, tokenizer=True, **hub
    )
    checkpoint_names = checkpoint_class_names(config)
    selection = load_labelled_split(
        data_args, anchor_args.selection_file, anchor_args.selection_split, "selection split",
        checkpoint_names=checkpoint_names,
    )  # fmt: skip
    if selection is None:  # no selection split: the first K training images of each class
        train = load_labelled_split(
            data_args, data_args.train_file, data_args.train_split, "training split", checkpoint_names=checkpoint_names
        )
        if train is None:
            raise UsageError("Give the selection images: --selection_file, or --train_file / --dataset_name.")
        selection = train.first_per_class(anchor_args.max_images_per_class)
        if anchor_args.anchor_selection == "anss":
            logger.warning(TRAINING_IMAGES_WARNING.format(limit=anchor_args.max_images_per_class))
    class_names = selection.class_names
    num_classes = len(class_names)
    if anchor_args.head_type == "fc":
        return _fc_classifier(model_args, selection, anchor_args, args)
    chosen = _chosen_classes(anchor_args.classes, class_names)  # None: every class
    classifier = None
    if chosen is not None:  # re-select some classes of a classifier: keep its head and its M
        classifier = load_checked(
            "--model_name_or_path", VLLTRForImageClassification.from_pretrained, model_args.model_name_or_path, **hub
        )
        if classifier.config.head_type != "lgr" or not bool(classifier.anchor_mask.any()):
            raise UsageError("--classes re-selects anchors in a classifier checkpoint with anchors (LGR head).")
        anchor_args.num_anchor_sentences = classifier.config.num_anchor_sentences
    missing = sorted(set(range(num_classes) if chosen is None else chosen) - set(selection.labels.tolist()))
    if missing and anchor_args.anchor_selection == "anss":
        names = ", ".join(repr(class_names[c]) for c in missing[:5])
        raise UsageError(f"The selection split has no image of {len(missing)} class(es) ({names}); AnSS needs them.")
    tokenizer = load_checked(
        "--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub
    )
    corpus, tokens = load_corpus(corpus_args, class_names, tokenizer, config.clip_config.text_config)
    most = int(torch.bincount(torch.as_tensor(corpus.labels), minlength=num_classes).max())
    if chosen is None and anchor_args.num_anchor_sentences > most:
        # Slots past a class's last sentence are masked out of the LGR attention, so M beyond the fullest class
        # only costs memory (C × M anchor rows): keep M = the most sentences any class has; the head is the same.
        logger.warning(
            f"--num_anchor_sentences {anchor_args.num_anchor_sentences} is more than any class has sentences "
            f"(at most {most}): keeping {most} anchors per class."
        )
        anchor_args.num_anchor_sentences = most
    image_size = config.clip_config.vision_config.image_size
    image_processor = eval_image_processor(image_size)
    if anchor_args.selection_images == "train":  # the reference iNaturalist selection: sampled, augmented draws
        dataset = SampledSelection(selection.dataset(train_transform_from_args(aug_args, image_size)), args.seed)
        selection_labels = dataset.labels
        undrawn = sorted(set(range(num_classes) if chosen is None else chosen) - set(selection_labels.tolist()))
        if undrawn and anchor_args.anchor_selection == "anss":
            names = ", ".join(repr(class_names[c]) for c in undrawn[:5])
            raise UsageError(
                f"The square-root draws (--seed {args.seed}) picked no image of {len(undrawn)} class(es) ({names}); "
                f"AnSS needs them: use another --seed or --selection_images eval."
            )
    else:
        dataset = selection.dataset(ProcessorTransform(image_processor))
        selection_labels = selection.labels
    score_labels = selection_labels
    if chosen is not None:  # from here on the corpus holds the chosen classes only, labelled 0..K-1
        corpus, tokens, score_labels = restrict_to_classes(corpus, tokens, selection_labels, chosen)

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
            torch.as_tensor(score_labels),
            len(corpus.class_names),
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
    anchor_sentences = [[corpus.sentences[i] for i in indices[c][mask[c]].tolist()] for c in range(len(indices))]
    if chosen is not None:
        replace_class_anchors(classifier, chosen, anchors, mask, anchor_sentences)
    else:
        classifier = load_new_head(
            VLLTRForImageClassification.from_pretrained,
            model_args.model_name_or_path,
            init="randomly, with the anchors selected here",
            config=classifier_config,
            **hub,
        )
        classifier.set_anchor_embeddings(anchors, mask)
        classifier.set_anchor_sentences(anchor_sentences)
    save_pretrained_to(classifier, args.output_dir)
    save_pretrained_to(tokenizer, args.output_dir)
    save_pretrained_to(image_processor, args.output_dir)

    record = anchors_record(
        anchor_args.anchor_selection, corpus.class_names, corpus.sentences, scores, indices, mask, labels=chosen
    )
    atomic_write_json(f"{args.output_dir}/anchors.json", record)
    report = anchor_report(
        corpus.class_names, corpus.sentences, corpus.labels, scores, indices, mask,
        num_worst=anchor_args.report_worst, from_template=corpus.from_template,
    )  # fmt: skip
    atomic_write_text(f"{args.output_dir}/anchor_report.md", report)

    results = {"num_sentences": len(corpus.sentences), "num_selection_images": len(dataset)}
    if scores is not None:
        results["mean_anchor_score"] = float(scores[indices[mask]].mean())
        results["mean_sentence_score"] = float(scores.mean())
    settings = {
        "strategy": anchor_args.anchor_selection,
        "num_anchor_sentences": anchor_args.num_anchor_sentences,
        "selection": selection.description,
        "selection_images": anchor_args.selection_images,
        "text_corpus": corpus_args.text_corpus,
        "templates": corpus_args.use_templates,
        "fusion_alpha": anchor_args.fusion_alpha,
        "detach_anchor_norm": anchor_args.detach_anchor_norm,
        "classes": anchor_args.classes,
        "logit_scale": float(stage1.clip.logit_scale.detach().exp()),
    }
    entry = history_entry("run_select_anchors", "anss", settings, results)
    record_run(
        args.output_dir, model_args.model_name_or_path, entry, classifier.config, args, args.push_to_hub,
        "VL-LTR anchors (anchor sentence selection)",
    )  # fmt: skip
    kept = mask.sum(dim=1)  # (C,) anchors kept per class
    fewest, low, high = int(kept.argmin()), int(kept.min()), int(kept.max())
    lines = []
    if corpus.from_template is not None and corpus.from_template.any() and not corpus.from_template.all():
        own_kept, own_total = description_counts(corpus.labels, indices, mask, corpus.from_template)
        summary = description_summary(own_kept, own_total, corpus.class_names)
        log = logger.warning if ((own_kept == 0) & (own_total > 0)).any() else logger.info
        log(f"Anchors: {summary}; {BALANCE_ADVICE} (per class: {args.output_dir}/anchor_report.md).")
        for c, name in enumerate(corpus.class_names):
            logger.info(
                f"Anchors of {name!r}: {own_kept[c]} of its {own_total[c]} own descriptions, of {int(kept[c])}."
            )
        lines.append(f"{summary} (--use_templates False selects from them alone)")
    print_summary(
        f"run_select_anchors: {anchor_args.anchor_selection} anchors for {len(corpus.class_names)} classes of "
        f"{model_args.model_name_or_path}",
        [
            f"{len(corpus.sentences)} sentences scored on {len(dataset)} selection images; anchors kept per class: "
            + (
                f"{low} (M)"
                if low == high
                else f"{low} to {high} (M = {anchor_args.num_anchor_sentences}; fewest: "
                f"{corpus.class_names[fewest]!r})"
            ),
            *lines,
            f"every class's kept and least visual sentences: {args.output_dir}/anchor_report.md",
        ],
        args.output_dir,
    )
    return results


def _fc_classifier(model_args: ModelArguments, selection, anchor_args: AnchorArguments, args) -> dict:
    """The stage-2 starting checkpoint with the FC head: the stage-1 CLIP and a new `Linear(D, C)`; nothing to select."""
    hub = model_args.hub_kwargs
    id2label = dict(enumerate(selection.class_names))
    config = VLLTRConfig.from_pretrained(
        model_args.model_name_or_path,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        head_type="fc",
        **hub,
    )
    classifier = load_new_head(
        VLLTRForImageClassification.from_pretrained, model_args.model_name_or_path, config=config, **hub
    )
    save_pretrained_to(classifier, args.output_dir)
    save_pretrained_to(
        load_checked("--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub),
        args.output_dir,
    )
    save_pretrained_to(eval_image_processor(config.clip_config.vision_config.image_size), args.output_dir)
    results = {"num_classes": len(id2label)}
    entry = history_entry("run_select_anchors", "fc_head", {"head_type": "fc", "classes": selection.description})
    record_run(
        args.output_dir, model_args.model_name_or_path, entry, classifier.config, args, args.push_to_hub,
        "VL-LTR FC head (the paper's FC ablation)",
    )  # fmt: skip
    print_summary(
        f"run_select_anchors: FC head for {len(id2label)} classes on {model_args.model_name_or_path}",
        ["no anchors (the FC head has none); train it with run_lgr"],
        args.output_dir,
    )
    return results


if __name__ == "__main__":
    run_main(main, "run_select_anchors")
