"""Explanations of a classifier's predictions on a split: which anchor sentences each image attended to (the LGR
attention, `VLLTRForImageClassification.explain`), written as a Markdown report and a picture of each image beside
its top sentences, in the spirit of the paper's "lion" / "mountain bike" figure."""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from .data import eval_collator
from .io_utils import atomic_write

logger = logging.get_logger(__name__)


def pick_examples(predictions: np.ndarray, labels: np.ndarray, count: int) -> list[int]:
    """`count` positions of the split to explain: up to half of them wrong predictions (the ones a practitioner
    checks first), the rest correct ones, each taken in split order; fewer if the split is smaller."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    wrong = np.flatnonzero(predictions != labels).tolist()
    right = np.flatnonzero(predictions == labels).tolist()
    num_wrong = min(len(wrong), max(count - len(right), math.ceil(count / 2)))
    chosen = wrong[:num_wrong] + right[: count - num_wrong]
    return sorted(chosen)


@torch.no_grad()
def explain_examples(model, dataset, indices: Sequence[int], top_k: int = 5, batch_size: int = 16) -> list[dict]:
    """Runs `model.explain` on `dataset[i]` for each index. Each item holds `index`, `where` (file and line or
    dataset row), `true_label`, `predicted` (the explanation of the predicted class) and, for a wrong prediction,
    `true` (the explanation of the true class: which of its sentences the image did match)."""
    device = next(model.parameters()).device
    items = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        batch = eval_collator([dataset[i] for i in chunk])
        pixels = batch["pixel_values"].to(device)
        predicted = model.explain(pixels, top_k=top_k)
        true = model.explain(pixels, top_k=top_k, class_ids=batch["labels"])
        for i, p, t, y in zip(chunk, predicted, true, batch["labels"].tolist()):
            items.append(
                {
                    "index": i,
                    "where": dataset.describe(i),
                    "true_label": y,
                    "predicted": p,
                    "true": None if p["label"] == y else t,
                }
            )
    return items


def _anchor_lines(explanation: dict) -> list[str]:
    lines = []
    for rank, anchor in enumerate(explanation["anchors"], start=1):
        text = anchor["sentence"] if anchor["sentence"] is not None else f"(anchor {anchor['slot']}: text not stored)"
        lines.append(f"{rank}. `{anchor['weight']:.3f}` {' '.join(text.split())}")
    return lines


def explanation_report(items: list[dict], class_names: Sequence[str], title: str = "") -> str:
    """A Markdown report of `explain_examples`: per image, the true and predicted class, the fused / image-branch /
    text-branch probabilities of the prediction, and its anchor sentences ranked by attention weight (for a wrong
    prediction, the true class's as well)."""
    num_wrong = sum(item["true"] is not None for item in items)
    parts = [
        f"# Why this class? {title}".rstrip() + "\n\n",
        f"{len(items)} images, {len(items) - num_wrong} correct and {num_wrong} wrong. For each, the anchor sentences "
        "of the predicted class ranked by the LGR attention the image puts on them (softmax of QKᵀ/√D over the "
        "class's anchors; the weights sum to 1 over all its anchors, of which the top ones are listed). P = fused "
        "probability, P_I / P_T = image / text branch.\n",
    ]
    for item in items:
        p = item["predicted"]
        verdict = "correct" if item["true"] is None else "wrong"
        parts.append(
            f"\n## Image {item['index']} ({verdict}): `{item['where']}`\n\n"
            f"True class: **{class_names[item['true_label']]}**. Predicted: **{p['class_name']}** "
            f"(P = {p['probability']:.3f}, P_I = {p['image_probability']:.3f}, P_T = {p['text_probability']:.3f}).\n\n"
        )
        parts.append("\n".join(_anchor_lines(p)) + "\n")
        if item["true"] is not None:
            t = item["true"]
            parts.append(
                f"\nSentences of the true class {t['class_name']!r} (P = {t['probability']:.3f}, "
                f"P_I = {t['image_probability']:.3f}, P_T = {t['text_probability']:.3f}):\n\n"
            )
            parts.append("\n".join(_anchor_lines(t)) + "\n")
    return "".join(parts)


def explanation_figure(items: list[dict], dataset, path: str | Path, max_chars: int = 70) -> None:
    """One row per image: the image, then its predicted class's top anchor sentences as horizontal bars of their
    attention weight (green title if correct; red, with the true class, if wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(items)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.2 * rows), gridspec_kw={"width_ratios": [1, 3.5]}, squeeze=False)
    for (ax_image, ax_bars), item in zip(axes, items):
        p = item["predicted"]
        ax_image.imshow(dataset.load_image(item["index"]))
        ax_image.set_axis_off()
        correct = item["true"] is None
        title = f"{p['class_name']} ({p['probability']:.2f})"
        title += "" if correct else f"\ntrue: {item['true']['class_name']}"
        ax_image.set_title(title, color="green" if correct else "red", fontsize=9)
        labels = [
            (a["sentence"] or f"anchor {a['slot']}")[:max_chars]
            + ("…" if len(a["sentence"] or "") > max_chars else "")
            for a in p["anchors"]
        ]
        weights = [a["weight"] for a in p["anchors"]]
        bars = ax_bars.barh(range(len(weights)), weights, color="tab:blue")
        ax_bars.bar_label(bars, labels=[f"{w:.3f}" for w in weights], fontsize=7, padding=2)
        ax_bars.set_yticks(range(len(weights)), labels, fontsize=8)
        ax_bars.invert_yaxis()
        ax_bars.set_xlim(0, 1.25 * max(weights))
        ax_bars.set_xlabel("attention weight", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


__all__ = ["explain_examples", "explanation_figure", "explanation_report", "pick_examples"]
