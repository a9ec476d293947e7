"""A class that arrives after training, measured on the demo's data (the embedded world by default, `--data digits`
for the digits): train VL-LTR on all classes but one, add the last from its description alone
(`training.add_classes`: no image of it), then give it its first 5 images (`run_select_anchors --classes`,
`run_lgr --train_classes`); against chance and zero-shot CLIP on the same test images.

    python -m training.demo_new_class --output_dir demo_new_class            # the rarest class is held out
    python -m training.demo_new_class --output_dir demo_new_class_digits --data digits --held_out seven

Steps: the demo's splits (`training.demo.build_data`, same seed) with one class removed from every split; the
stand-in CLIP (or `--clip`); stage 1, anchor selection and stage 2 on the other classes with the demo's settings;
`add_classes` with the held-out class's descriptions alone (`--use_templates False`), and for comparison with its
name's 80 prompt templates plus its descriptions (the script's default); then, from the first, AnSS on the other
classes' selection images plus the held-out class's 5 training images, and its row of the image branch trained on
the other classes' training split plus those 5 images. Every model is scored on the full test split. Writes
`results.json` and `new_class_results.md` (the table, as measured), and explanations of a few held-out test images.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from modeling_vlltr import VLLTRForImageClassification

from . import add_classes, run_cvlp, run_lgr, run_select_anchors
from .cli import UsageError, run_main
from .data import ProcessorTransform, eval_image_processor
from .demo import SETTINGS, _check_output_dir, build_data, zero_shot_logits
from .embedding import predict_logits
from .explain import explain_examples, explanation_figure, explanation_report
from .io_utils import atomic_write_json, atomic_write_text
from .splits import ImageDataset, read_image_list


def _write_split(path: Path, rows: list[tuple[str, int]]) -> str:
    atomic_write_text(path, "".join(f"{rel} {label}\n" for rel, label in rows))
    return str(path)


def _rows(path: str) -> list[tuple[str, int]]:
    return [(rel, int(label)) for rel, label in (line.split() for line in Path(path).read_text().splitlines())]


def held_out_splits(data: dict, held_out: int | list[int], out: Path, new_images: int = 5) -> dict:
    """The splits of the kept classes (labels renumbered 0..K-1 in class order; files named `*_nine` from the
    digits' 9 + 1), and the files of the grown model, whose new classes (`held_out`, one class id or a list) get the
    last labels K, K+1, ... in the order given: the full test split, and the selection / training splits with the
    first `new_images` training images of each new class."""
    held = [held_out] if isinstance(held_out, int) else list(held_out)
    class_names = data["class_names"]
    descriptions = json.loads(Path(data["corpus"]).read_text())
    names9 = [name for c, name in enumerate(class_names) if c not in held]
    new = len(names9)
    new_label = {c: names9.index(name) for c, name in enumerate(class_names) if c not in held}
    new_label |= {c: new + k for k, c in enumerate(held)}
    split = {s: [(rel, new_label[c]) for rel, c in _rows(data[s])] for s in ("train", "val", "test")}
    new_train = [row for k in range(len(held)) for row in [r for r in split["train"] if r[1] == new + k][:new_images]]
    new_names = [class_names[c] for c in held]
    paths = {
        "root": data["root"],
        "new_class": new_names[0],
        "new_classes": new_names,
        "num_new_train": len(new_train),
        "new_label": new,
        "new_labels": list(range(new, new + len(held))),
    }
    for s in ("train", "val", "test"):
        paths[f"{s}9"] = _write_split(out / f"{s}_nine.txt", [(rel, y) for rel, y in split[s] if y < new])
    paths["test10"] = _write_split(out / "test_ten.txt", split["test"])
    paths["val10"] = _write_split(out / "val_nine_plus_new.txt", [r for r in split["val"] if r[1] < new] + new_train)
    paths["train10"] = _write_split(
        out / "train_nine_plus_new.txt", [r for r in split["train"] if r[1] < new] + new_train
    )
    paths["classes9"] = str(out / "classes_nine.txt")
    atomic_write_text(paths["classes9"], "\n".join(names9) + "\n")
    paths["classes10"] = str(out / "classes_ten.txt")
    atomic_write_text(paths["classes10"], "\n".join([*names9, *new_names]) + "\n")
    paths["new_names"] = str(out / "new_class.txt")
    atomic_write_text(paths["new_names"], "\n".join(new_names) + "\n")
    paths["corpus9"] = str(out / "corpus_nine.json")
    atomic_write_json(paths["corpus9"], {name: descriptions[name] for name in names9})
    paths["corpus10"] = str(out / "corpus_ten.json")
    atomic_write_json(paths["corpus10"], descriptions)
    paths["new_corpus"] = str(out / "new_class.json")
    atomic_write_json(paths["new_corpus"], {name: descriptions[name] for name in new_names})
    return paths


def _accuracies(predictions: np.ndarray, labels: np.ndarray, new_label: int) -> dict:
    new, old = labels == new_label, labels != new_label
    return {
        "new_class_top1": float((predictions[new] == new_label).mean()) if new.any() else None,
        "nine_classes_top1": float((predictions[old] == labels[old]).mean()),
        "all_top1": float((predictions == labels).mean()),
    }


@torch.no_grad()
def _evaluate(checkpoint: Path, split: str, root: str) -> tuple[np.ndarray, np.ndarray, ImageDataset]:
    model = VLLTRForImageClassification.from_pretrained(checkpoint).eval()
    processor = eval_image_processor(model.config.clip_config.vision_config.image_size)
    dataset = ImageDataset(read_image_list(split, root), ProcessorTransform(processor))
    out = predict_logits(model, dataset, batch_size=64)
    return out["logits"].argmax(-1).numpy(), np.asarray(dataset.labels), dataset


def predict_split(checkpoint: Path | str, split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """The classifier at `checkpoint`'s predicted class and the label of every image of the split file `split`."""
    predictions, labels, _ = _evaluate(Path(checkpoint), split, root)
    return predictions, labels


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.demo_new_class", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_new_class")
    parser.add_argument("--data", choices=list(SETTINGS), default="world", help="The demo's data: world or digits.")
    parser.add_argument("--held_out", default=None, help="The class to hold out (default: the rarest in training).")
    parser.add_argument("--clip", default=None, help="A CLIP folder (e.g. demo_output/standin_clip) to start from.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.data]
    out = Path(args.output_dir)
    manifest = {"demo": f"vlltr {args.data}-lt new class", "seed": args.seed, "clip": args.clip,
                "held_out": args.held_out}  # fmt: skip
    _check_output_dir(out, manifest, args.overwrite_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo_manifest.json", manifest)
    torch.manual_seed(args.seed)
    start = time.time()

    data = build_data(args.data, out / "data", args.seed)
    class_names = data["class_names"]
    if args.held_out is not None and args.held_out not in class_names:
        raise UsageError(f"--held_out {args.held_out!r}: not one of the demo's classes ({', '.join(class_names)}).")
    counts = np.array(data["train_counts"])
    held_out = class_names.index(args.held_out) if args.held_out else int(np.argmin(counts))
    splits = held_out_splits(data, held_out, out)
    name, new = class_names[held_out], splits["new_label"]
    print(f"Held out: {name!r} ({counts[held_out]} training images in the demo)")
    clip = args.clip or setting.pretrain(data, out / "standin_clip", args.seed)

    plain = ["--seed", str(args.seed), "--report_to", "none", "--disable_tqdm", "True"]
    fast = [*plain, "--logging_steps", "20", "--save_strategy", "no", "--dataloader_num_workers", "0",
            "--image_check", "header"]  # fmt: skip
    augment = ["--hflip", "0", "--crop_scale_min", "0.6", "--rand_augment", "False", "--random_erasing", "0"]
    nine = ["--image_root", splits["root"], "--class_names", splits["classes9"], *fast]
    ten = ["--image_root", splits["root"], "--class_names", splits["classes10"], *fast]

    # ---- VL-LTR on nine classes (the demo's settings) ----------------------------------------------------------------
    run_cvlp.main(
        ["--model_name_or_path", clip, "--train_file", splits["train9"], "--text_corpus", splits["corpus9"],
         "--output_dir", str(out / "stage1"), "--num_train_epochs", str(setting.stage1_epochs),
         "--per_device_train_batch_size", "64", "--learning_rate", "5e-4", *augment, *nine]
    )  # fmt: skip
    run_select_anchors.main(
        ["--model_name_or_path", str(out / "stage1"), "--selection_file", splits["val9"], "--text_corpus",
         splits["corpus9"], "--num_anchor_sentences", "16", "--output_dir", str(out / "anchors"), *nine]
    )  # fmt: skip
    run_lgr.main(
        ["--model_name_or_path", str(out / "anchors"), "--train_file", splits["train9"], "--output_dir",
         str(out / "nine"), "--num_train_epochs", str(setting.stage2_epochs), "--per_device_train_batch_size", "64",
         "--learning_rate", "3e-3", *augment, *nine]
    )  # fmt: skip

    # ---- The held-out class: from its sentences, then with 5 images ---------------------------------------------------
    for folder, templates in (("added", "False"), ("added_with_name", "True")):
        add_classes.main(
            ["--model_name_or_path", str(out / "nine"), "--class_names", splits["new_names"], "--text_corpus",
             splits["new_corpus"], "--use_templates", templates, "--output_dir", str(out / folder), *plain]
        )  # fmt: skip
    run_select_anchors.main(
        ["--model_name_or_path", str(out / "added"), "--classes", name, "--selection_file", splits["val10"],
         "--text_corpus", splits["corpus10"], "--output_dir", str(out / "added_anss"), *ten]
    )  # fmt: skip
    run_lgr.main(
        ["--model_name_or_path", str(out / "added_anss"), "--train_classes", name, "--train_file",
         splits["train10"], "--output_dir", str(out / "added_row"), "--num_train_epochs", "10",
         "--per_device_train_batch_size", "64", "--learning_rate", "1e-2", *augment, *ten]
    )  # fmt: skip

    # ---- Scores on the full test split ----------------------------------------------------------------------------------
    nine_pred, nine_labels, _ = _evaluate(out / "nine", splits["test9"], splits["root"])
    before = float((nine_pred == nine_labels).mean())
    rows = {}
    zs_logits, zs_labels = zero_shot_logits(clip, data)  # all the original classes, original labels
    zs_pred = zs_logits.argmax(-1)
    zero_shot = {
        "new_class_top1": float((zs_pred[zs_labels == held_out] == held_out).mean()),
        "nine_classes_top1": float((zs_pred[zs_labels != held_out] == zs_labels[zs_labels != held_out]).mean()),
        "all_top1": float((zs_pred == zs_labels).mean()),
    }
    rows["Chance"] = {"new_class_top1": 1 / len(class_names), "nine_classes_top1": 1 / len(class_names),
                      "all_top1": 1 / len(class_names)}  # fmt: skip
    rows[f"Zero-shot CLIP (80 prompts, {len(class_names)} classes)"] = zero_shot
    rows[f"VL-LTR trained on the other {new} (cannot predict it)"] = {
        "new_class_top1": 0.0, "nine_classes_top1": before, "all_top1": None
    }  # fmt: skip
    stages = {
        f"+ {name!r} added from its description alone (no image)": "added",
        "  (or from its name's 80 prompt templates + its description, instead)": "added_with_name",
        "+ its anchors re-selected by AnSS with 5 images": "added_anss",
        "+ its image-branch row trained on the 5 images": "added_row",
    }
    explained_dataset, added_predictions = None, None
    for label, folder in stages.items():
        predictions, labels, dataset = _evaluate(out / folder, splits["test10"], splits["root"])
        rows[label] = _accuracies(predictions, labels, new)
        if folder == "added":
            explained_dataset = dataset
            added_predictions = predictions
    for label, row in rows.items():
        row["nine_change"] = row["nine_classes_top1"] - before if label in stages else None

    # ---- Why? The held-out class's test images explained by the model that only read about it ------------------------
    model = VLLTRForImageClassification.from_pretrained(out / "added").eval()
    labels = explained_dataset.labels
    new_images = np.flatnonzero(labels == new)
    right = [int(i) for i in new_images if added_predictions[i] == new][:3]
    wrong = [int(i) for i in new_images if added_predictions[i] != new][:3]
    items = explain_examples(model, explained_dataset, sorted(right + wrong), top_k=4)
    atomic_write_text(
        out / "explanations.md", explanation_report(items, model.config.id2label, f"(new class {name!r})")
    )
    explanation_figure(items, explained_dataset, out / "explanations.png")

    lines = [
        f"Held-out class: **{name}** ({int(counts[held_out])} training images in the demo; "
        f"{int((labels == new).sum())} test images). Top-1 in %, on the {len(class_names)}-class test split "
        f"({len(labels)} images); the {new}-class model is scored on its classes' test images. The first '+' "
        "row adds the class from its description alone (its sentences, no template, no image); the row below it "
        "from its name's 80 prompt templates plus its sentences.",
        "",
        f"| model | {name} top-1 | other {new} classes top-1 | change on the other {new} |",
        "|---|---|---|---|",
    ]
    for label, row in rows.items():
        change = "" if row["nine_change"] is None else f"{100 * row['nine_change']:+.1f}"
        lines.append(f"| {label} | {_pct(row['new_class_top1'])} | {_pct(row['nine_classes_top1'])} | {change} |")
    table = "\n".join(lines)
    print(table)
    results = {
        "held_out": name,
        "data": args.data,
        "chance": 1 / len(class_names),
        "train_counts": dict(zip(class_names, counts.tolist())),
        "new_class_images": splits["num_new_train"],
        "rows": rows,
        "table_markdown": table,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "new_class_results.md", table + "\n")
    print(f"\nWrote {out / 'results.json'}, {out / 'new_class_results.md'} and {out / 'explanations.md'} in "
          f"{results['seconds']:.0f} s.")  # fmt: skip
    return results


if __name__ == "__main__":
    run_main(main, "training.demo_new_class")
