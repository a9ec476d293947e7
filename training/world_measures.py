"""What the embedded world (`training.world`) lets one measure beside the methods' top-1: its premise (zero-shot by
class name against zero-shot by the visual descriptions), how visual the anchors AnSS keeps are, and how visual the
anchors the explanations point at are. Only these measurements read `visual_sentences.json`; no method does."""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from modeling_vlltr import VLLTRModel

from .corpus import IMAGENET_TEMPLATES
from .data import ProcessorTransform, eval_image_processor
from .embedding import embed_images
from .splits import ImageDataset, read_image_list

ATTRIBUTES = ("shape", "colour", "pattern")


def load_world(root: str | Path) -> dict:
    """The world's metadata (`world.json`), corpus and visual flags, with a lookup `visual_of[sentence]` (a sentence
    shared by two classes is visual if it is visual in either)."""
    root = Path(root)
    world = json.loads((root / "world.json").read_text())
    corpus = json.loads((root / "corpus.json").read_text())
    flags = json.loads((root / "visual_sentences.json").read_text())
    visual_of: dict[str, bool] = {}
    for name, sentences in corpus.items():
        for sentence, visual in zip(sentences, flags[name]):
            key = " ".join(sentence.split())
            visual_of[key] = visual_of.get(key, False) or bool(visual)
    return {"world": world, "corpus": corpus, "flags": flags, "visual_of": visual_of}


def is_visual(sentence: str, visual_of: dict[str, bool]) -> bool:
    """Whether a corpus sentence is one of the world's visual descriptions (templates and non-visual sentences are
    not)."""
    return visual_of.get(" ".join(sentence.split()), False)


@torch.no_grad()
def class_embeddings(model, tokenizer, class_sentences: list[list[str]]) -> torch.Tensor:
    """Each class's sentences embedded, normalised, averaged and normalised again (CLIP's prompt ensembling, here over
    any sentences): (C, D)."""
    rows = []
    for sentences in class_sentences:
        enc = tokenizer(sentences, padding=True, truncation=True, max_length=77, return_tensors="pt")
        embeds = model.get_text_features(**enc).pooler_output  # (n, D)
        rows.append(F.normalize(F.normalize(embeds.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)  # (C, D)


@torch.no_grad()
def zero_shot_predictions(clip_path: str, root: str | Path, test_file: str, by_text: dict[str, list[list[str]]]):
    """The CLIP at `clip_path` as a zero-shot classifier of the test split, once per entry of `by_text` (a name ->
    per class, the sentences whose averaged embedding stands for it): the test labels and, per entry, the predicted
    class of every test image."""
    model = VLLTRModel.from_pretrained(clip_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    test = ImageDataset(
        read_image_list(test_file, root),
        ProcessorTransform(eval_image_processor(model.config.clip_config.vision_config.image_size)),
    )
    image = F.normalize(embed_images(model, test, desc="Zero-shot: test images"), dim=-1)  # (N, D)
    predictions = {
        key: (image @ class_embeddings(model, tokenizer, sentences).T).argmax(-1).numpy()
        for key, sentences in by_text.items()
    }
    return np.asarray(test.labels), predictions


def texts_by(kind: str, class_names: list[str], corpus: dict, flags: dict) -> list[list[str]]:
    """Per class, the sentences of a zero-shot classifier: `name` (CLIP's 80 prompt templates of the class name),
    `visual_descriptions` (its visual sentences, or all if it has none) or `all_descriptions`."""
    if kind == "name":
        return [[t.format(n) for t in IMAGENET_TEMPLATES] for n in class_names]
    if kind == "visual_descriptions":
        return [[s for s, v in zip(corpus[n], flags[n]) if v] or corpus[n] for n in class_names]
    return [corpus[n] for n in class_names]


PREMISE_KINDS = ("name", "visual_descriptions", "all_descriptions")


def premise_predictions(clip_path: str, root: str | Path, test_file: str, class_names: list[str]):
    """`zero_shot_predictions` by each of `PREMISE_KINDS`: the test labels and the predictions per kind."""
    world = load_world(root)
    by_text = {k: texts_by(k, class_names, world["corpus"], world["flags"]) for k in PREMISE_KINDS}
    return zero_shot_predictions(clip_path, root, test_file, by_text)


def premise(clip_path: str, root: str | Path, test_file: str, class_names: list[str], zero_shot=None) -> dict:
    """Zero-shot top-1 of the CLIP at `clip_path` on the test split by the class names in CLIP's 80 prompt
    templates, by the averaged visual sentences of each class, and by all its description sentences; beside chance,
    and for the visual-description classifier how often the predicted class shares each attribute with the true
    one. `zero_shot`: what `premise_predictions` returned for the same arguments, when the caller has it already."""
    world = load_world(root)
    labels, predicted = zero_shot or premise_predictions(clip_path, root, test_file, class_names)
    result = {"chance": 1.0 / len(class_names), "test_images": int(len(labels))}
    for key in PREMISE_KINDS:
        predictions = predicted[key]
        result[f"zero_shot_by_{key}_top1"] = float((predictions == labels).mean())
        if key == "visual_descriptions":
            attributes = {c["name"]: c for c in world["world"]["classes"]}
            for a in ATTRIBUTES:
                values = np.array([attributes[n][a] for n in class_names])
                result[f"visual_descriptions_{a}_agreement"] = float((values[predictions] == values[labels]).mean())
    return result


def anchor_visual_share(anchor_sentences: list[list[str]], visual_of: dict[str, bool]) -> float:
    """The share of visual sentences among the anchors kept (all classes' slots together)."""
    flat = [s for sentences in anchor_sentences for s in sentences]
    return float(np.mean([is_visual(s, visual_of) for s in flat])) if flat else float("nan")


def corpus_visual_share(class_sentences: list[list[str]], visual_of: dict[str, bool]) -> float:
    """The share of visual sentences among the candidates anchor selection chooses from."""
    return anchor_visual_share(class_sentences, visual_of)


def explanation_visual_share(model, dataset, visual_of: dict[str, bool], top_k: int = 3, batch_size: int = 64) -> dict:
    """For every image of `dataset`, the share of visual sentences among the `top_k` anchors of its predicted class
    that the LGR attention weighs most (`VLLTRForImageClassification.explain`); the mean over images, and the mean
    over the correctly classified ones."""
    from .data import eval_collator

    shares, correct = [], []
    for start in range(0, len(dataset), batch_size):
        batch = eval_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        with torch.no_grad():
            explained = model.explain(batch["pixel_values"], top_k=top_k)
        for item, label in zip(explained, batch["labels"].tolist()):
            anchors = [a["sentence"] for a in item["anchors"] if a["sentence"] is not None]
            shares.append(np.mean([is_visual(s, visual_of) for s in anchors]) if anchors else np.nan)
            correct.append(item["label"] == label)
    shares, correct = np.asarray(shares, dtype=float), np.asarray(correct)
    return {
        "top_k": top_k,
        "visual_share_top_anchors": float(np.nanmean(shares)),
        "visual_share_top_anchors_correct": float(np.nanmean(shares[correct])) if correct.any() else float("nan"),
        "images": int(len(shares)),
    }


def anchors_of(folder: str | Path) -> list[list[str]]:
    """The anchor sentences a `run_select_anchors` output keeps, per class (its config's `anchor_sentences`)."""
    return json.loads((Path(folder) / "config.json").read_text())["anchor_sentences"]


def anchor_shares(folders: dict[str, str | Path], class_names: list[str], corpus_file: str, visual_of: dict) -> dict:
    """The visual share of the anchors in each `run_select_anchors` folder (keyed by strategy), beside the share in
    the descriptions alone and among all candidates (the 80 prompt templates plus the descriptions, what the
    selection chooses from)."""
    from .corpus import build_class_corpus

    candidates = build_class_corpus(class_names, corpus_file)
    descriptions = build_class_corpus(class_names, corpus_file, use_templates=False)
    by_class = [candidates.class_sentences(c) for c in range(len(class_names))]
    result = {
        "corpus_descriptions": corpus_visual_share(
            [descriptions.class_sentences(c) for c in range(len(class_names))], visual_of
        ),
        "corpus_candidates": corpus_visual_share(by_class, visual_of),
    }
    for name, folder in folders.items():
        result[name] = anchor_visual_share(anchors_of(folder), visual_of)
    return result


def pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"
