"""Add classes to a VL-LTR classifier from their descriptions alone, without images and without training.

Each new class's sentences are built by the corpus loader used for anchor selection (CLIP's 80 prompt templates,
then the class's descriptions), embedded by the checkpoint's own stage-1 text tower, and the M closest to the
class's mean embedding become its anchors (`VLLTRForImageClassification.add_classes`). The image branch has never
seen the new classes: their probability comes from the text branch alone, and the trained classes share the rest
as before. The grown checkpoint goes to a new folder; the input checkpoint is left untouched.

    python -m training.add_classes --model_name_or_path OUT3 --class_names new_classes.txt \
        --text_corpus new_corpus.json --output_dir OUT5

`--class_names` lists the new classes, one per line; `--text_corpus` maps each new class's name (or its line
number, from 0) to its sentences, or is a folder of desc_<i>.txt files numbered in the same way.
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer, TrainingArguments

from modeling_vlltr import VLLTRForImageClassification

from .arguments import CorpusArguments, ModelArguments
from .cli import (
    UsageError,
    load_checked,
    parse_args,
    prepare_output_dir,
    print_summary,
    record_run,
    run_main,
    setup_logging,
)
from .corpus import build_class_corpus
from .data import eval_image_processor
from .io_utils import atomic_write_json, save_pretrained_to
from .model_card import history_entry
from .splits import read_class_names


@dataclass
class AddClassesArguments:
    """The classes to add (their descriptions come from --text_corpus)."""

    class_names: str | None = field(
        default=None, metadata={"help": "The new classes: a file with one class name per line."}
    )
    text_batch_size: int = field(default=256, metadata={"help": "Sentences embedded per batch."})


def main(argv: list[str] | None = None) -> dict:
    model_args, corpus_args, add_args, args = parse_args(
        (ModelArguments, CorpusArguments, AddClassesArguments, TrainingArguments), argv
    )
    setup_logging(args)
    if add_args.class_names is None:
        raise UsageError("--class_names is required: a file with the new class names, one per line.")
    source = Path(str(model_args.model_name_or_path))
    if args.output_dir and source.is_dir() and Path(args.output_dir).resolve() == source.resolve():
        raise UsageError("--output_dir must differ from --model_name_or_path: the input checkpoint is left untouched.")
    prepare_output_dir(args, "add_classes")
    hub = model_args.hub_kwargs

    # ---- The checkpoint, its tokenizer, and the new classes' sentences ------------------------------------------------
    model = load_checked(
        "--model_name_or_path", VLLTRForImageClassification.from_pretrained, model_args.model_name_or_path, **hub
    )
    if model.config.head_type != "lgr" or not bool(model.anchor_mask.any()):
        raise UsageError(
            f"--model_name_or_path {model_args.model_name_or_path}: classes are added to a classifier with anchors "
            f"(the output of run_select_anchors or run_lgr)."
        )
    tokenizer = load_checked(
        "--model_name_or_path", AutoTokenizer.from_pretrained, model_args.model_name_or_path, **hub
    )
    names = read_class_names(add_args.class_names)
    corpus = build_class_corpus(
        names, corpus_args.text_corpus, corpus_args.use_templates, corpus_args.drop_duplicate_sentences
    )
    sentences = [corpus.class_sentences(k) for k in range(len(names))]

    # ---- Grow the classifier -------------------------------------------------------------------------------------------
    num_before = model.config.num_labels
    try:
        new_ids = model.add_classes(names, sentences, tokenizer, batch_size=add_args.text_batch_size)
    except ValueError as e:
        raise UsageError(f"{add_args.class_names}: {e}") from None  # names the class (and the sentence) at fault

    # ---- The grown checkpoint ------------------------------------------------------------------------------------------
    save_pretrained_to(model, args.output_dir)
    save_pretrained_to(tokenizer, args.output_dir)
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub)
    except (OSError, ValueError):
        image_processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    save_pretrained_to(image_processor, args.output_dir)
    anchors = model.config.anchor_sentences
    atomic_write_json(
        Path(args.output_dir) / "added_classes.json",
        {
            "rule": "the M sentences closest to the class's mean text embedding (no images)",
            "classes": [{"label": c, "name": model.config.id2label[c], "anchors": anchors[c]} for c in new_ids],
        },
    )
    results = {"num_labels_before": num_before, "num_labels": model.config.num_labels}
    settings = {
        "classes": ", ".join(names),
        "class_names": add_args.class_names,
        "text_corpus": corpus_args.text_corpus,
        "templates": corpus_args.use_templates,
        "num_sentences": len(corpus.sentences),
        "anchors": "closest to the class mean text embedding",
        "fusion": "text branch alone for the added classes",
    }
    entry = history_entry("add_classes", "add_classes", settings, results)
    record_run(
        args.output_dir, model_args.model_name_or_path, entry, model.config, args, args.push_to_hub,
        f"VL-LTR: {len(names)} class(es) added from text",
    )  # fmt: skip
    print_summary(
        f"add_classes: {len(names)} class(es) added to {model_args.model_name_or_path} from text",
        [
            f"{num_before} -> {model.config.num_labels} classes; new: "
            + ", ".join(f"{c}: {model.config.id2label[c]!r} ({len(anchors[c])} anchors)" for c in new_ids[:10])
            + (", ..." if len(new_ids) > 10 else ""),
            f"their anchors: {args.output_dir}/added_classes.json",
        ],
        args.output_dir,
    )
    return {"new_labels": new_ids, **results}


if __name__ == "__main__":
    run_main(main, "add_classes")
