"""Long-tail evaluation: overall top-1/top-5 and many / medium / few-shot accuracy, a per-class plot and a JSON dump."""

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from training.io_utils import atomic_write, atomic_write_json

logger = logging.get_logger(__name__)

ArrayLike = np.ndarray | torch.Tensor | Sequence

SHOT_GROUPS = ("many", "medium", "few")
TOP1_GROUPS = ("overall", *SHOT_GROUPS)  # the keys of group_top1, in table order


# --- shot groups


@dataclass(frozen=True)
class ShotThresholds:
    """Where the many / medium / few-shot groups split, by number of training images n of a class.

    Standard OLTR convention (`inclusive=False`, the default, docs/method.md §4.8): many if n > `many`, few if n < `few`,
    medium otherwise (so 20..100 inclusive is medium). Official VL-LTR code (`inclusive=True`, `engine.py`
    `shot_acc`): many if n >= `many`, few if n <= `few`, so a class with exactly 100 images is "many" and one with
    exactly 20 is "few". Classes with no training image count as "few" under both.

    Args:
        many (`int`, *optional*, defaults to 100): boundary of the many-shot group.
        few (`int`, *optional*, defaults to 20): boundary of the few-shot group.
        inclusive (`bool`, *optional*, defaults to `False`): whether the boundaries themselves belong to the many and
            few groups (the official code) rather than to the medium group (the standard convention).

    Example:

    ```python
    >>> ShotThresholds.from_name("official").group_of(np.array([20, 21, 100])).tolist()
    ['few', 'medium', 'many']
    ```
    """

    many: int = 100
    few: int = 20
    inclusive: bool = False

    def __post_init__(self):
        if self.few > self.many:
            raise ValueError(f"ShotThresholds needs few <= many, got few={self.few}, many={self.many}")

    @classmethod
    def from_name(cls, name: str) -> "ShotThresholds":
        """`"standard"` (>100 / 20-100 / <20) or `"official"` (>=100 / 21-99 / <=20, the reference code's)."""
        named = {"standard": STANDARD, "official": OFFICIAL}
        if name not in named:
            raise ValueError(f"Unknown shot thresholds {name!r}; allowed: {sorted(named)}")
        return named[name]

    def group_of(self, counts: ArrayLike) -> np.ndarray:
        """Shot group ("many", "medium" or "few") of each class, given its number of training images (C,)."""
        counts = _to_numpy(counts)
        if self.inclusive:
            many, few = counts >= self.many, counts <= self.few
        else:
            many, few = counts > self.many, counts < self.few
        return np.where(many, "many", np.where(few, "few", "medium"))


STANDARD = ShotThresholds()
OFFICIAL = ShotThresholds(inclusive=True)


def _resolve_thresholds(thresholds: ShotThresholds | str) -> ShotThresholds:
    return ShotThresholds.from_name(thresholds) if isinstance(thresholds, str) else thresholds


def _to_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()
        return array.numpy()
    return np.asarray(array)


# --- accuracies


def per_class_accuracy(predictions: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Fraction of each class's evaluation images predicted correctly, (C,) float64; NaN for a class with none."""
    predictions, labels = _to_numpy(predictions).reshape(-1), _to_numpy(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must have the same length")
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)  # (C,)
    hits = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / totals, np.nan)


def topk_correct(logits: ArrayLike, labels: ArrayLike, k: int) -> np.ndarray:
    """Whether each label is among the k highest logits, (N,) bool; k is clamped to the number of classes C.
    k = 1 is the argmax (the first class wins a tie, as in `per_class_accuracy`'s predictions); for k > 1 ties at
    the k-th place are broken by `torch.topk`, in no documented order."""
    logits = _to_numpy(logits)  # (N, C)
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)  # (N,)
    k = max(1, min(k, logits.shape[1]))
    if k == 1:
        return logits.argmax(axis=1) == labels
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    top = logits.topk(k, dim=1).indices  # (N, k)
    return (top == labels[:, None]).any(dim=1).numpy()


def shot_group_accuracy(per_class: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Mean of the per-class accuracies of each shot group's classes that have evaluation images (OLTR convention:
    every class weighs the same, whatever its number of evaluation images); NaN for a group with no such class."""
    accuracies = {}
    for group in SHOT_GROUPS:
        values = per_class[(groups == group) & ~np.isnan(per_class)]
        accuracies[group] = float(values.mean()) if values.size else float("nan")
    return accuracies


def group_top1(metrics: dict) -> dict[str, float]:
    """{"overall", "many", "medium", "few"}: top-1 of a `long_tail_metrics` result or a `run_eval` report."""
    return {"overall": metrics["top1"], **{group: metrics[f"{group}_top1"] for group in SHOT_GROUPS}}


def long_tail_metrics(
    logits: ArrayLike,
    labels: ArrayLike,
    train_class_counts: ArrayLike,
    thresholds: ShotThresholds | str = STANDARD,
    image_logits: ArrayLike | None = None,
    text_logits: ArrayLike | None = None,
    shot_logits: ArrayLike | None = None,
    prefix: str = "",
) -> dict[str, float | int | list]:
    """Overall, per-branch and many / medium / few-shot accuracy of (N, C) scores against (N,) labels.

    All accuracies are **fractions in [0, 1]** (the paper's tables are in percent). Keys, each preceded by `prefix`:

    * `top1`, `top5`: overall accuracy of `logits` (any score whose argmax is the prediction: logits, or the fused
      probability α·softmax(P^I) + (1 − α)·softmax(P^T) of docs/method.md §3.7); top-k is clamped to C.
    * `many_top1`, `medium_top1`, `few_top1`: shot-group accuracy, the mean of the per-class top-1 accuracies of the
      group's classes that have evaluation images (the OLTR convention). A group with no such class gives
      `float("nan")` (not a missing key), so the set of keys never changes; `write_metrics_json` writes it as null.
    * `num_many_classes`, `num_medium_classes`, `num_few_classes`: number of classes in each group, by training count
      (whether or not they have evaluation images).
    * `per_class_top1`: list of C per-class top-1 accuracies of the logits the shot groups use (NaN for a class with
      no evaluation image); the only list-valued entry.
    * `image_top1`, `image_top5` / `text_top1`, `text_top5`: the same for `image_logits` (P^I) / `text_logits` (P^T)
      when given.

    The shot groups use `logits` unless `shot_logits` is given. The official code (`engine.py` `evaluate_LT`) takes
    its shot groups from argmax(P^I + P^T), the summed branch logits, while its overall accuracy uses the α-fused
    probability; pass `shot_logits=image_logits + text_logits` to reproduce that.
    """
    thresholds = _resolve_thresholds(thresholds)
    logits, labels = _to_numpy(logits), _to_numpy(labels).reshape(-1).astype(np.int64)
    counts = _to_numpy(train_class_counts).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must have shape (N, C) with N = len(labels) = {labels.shape[0]}, got {logits.shape}")
    num_classes = logits.shape[1]
    if counts.shape != (num_classes,):
        raise ValueError(f"train_class_counts must have shape ({num_classes},) like logits' C, got {counts.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")

    metrics: dict[str, float | int | list] = {}
    branches = {"": logits, "image_": image_logits, "text_": text_logits}
    for name, branch_logits in branches.items():
        if branch_logits is None:
            continue
        branch_logits = _to_numpy(branch_logits)
        if branch_logits.shape != logits.shape:
            raise ValueError(f"{name}logits must have shape {logits.shape}, got {branch_logits.shape}")
        metrics[f"{name}top1"] = float(topk_correct(branch_logits, labels, 1).mean()) if labels.size else math.nan
        metrics[f"{name}top5"] = float(topk_correct(branch_logits, labels, 5).mean()) if labels.size else math.nan

    shot_logits = logits if shot_logits is None else _to_numpy(shot_logits)
    if shot_logits.shape != logits.shape:
        raise ValueError(f"shot_logits must have shape {logits.shape}, got {shot_logits.shape}")
    per_class = per_class_accuracy(shot_logits.argmax(axis=1), labels, num_classes)  # (C,)
    groups = thresholds.group_of(counts)  # (C,)
    for group, accuracy in shot_group_accuracy(per_class, groups).items():
        metrics[f"{group}_top1"] = accuracy
    for group in SHOT_GROUPS:
        metrics[f"num_{group}_classes"] = int((groups == group).sum())
    metrics["per_class_top1"] = per_class.tolist()
    return {f"{prefix}{key}": value for key, value in metrics.items()}


class LongTailMetrics:
    """A `transformers.Trainer` `compute_metrics`: `long_tail_metrics` of an `EvalPrediction`, list entries dropped.

    `eval_pred.predictions` is one (N, C) array of logits, or a tuple `(logits, image_logits)` (FC head) or
    `(logits, image_logits, text_logits)` (LGR head); `eval_pred.label_ids` is (N,).

    Args:
        train_class_counts (`array-like` of shape `(C,)`): number of training images of each class.
        thresholds (`ShotThresholds` or `str`, *optional*, defaults to `STANDARD`): shot-group boundaries, or their
            name, `"standard"` or `"official"`.
        shot_logits_from_branches (`bool`, *optional*, defaults to `False`): with three predictions, take the shot
            groups from image_logits + text_logits, as the official code does (docs/method.md §3.7), instead of from
            `logits`.

    Example:

    ```python
    >>> trainer = Trainer(model, args, eval_dataset=test_set, compute_metrics=LongTailMetrics(train_counts))
    ```
    """

    def __init__(
        self,
        train_class_counts: ArrayLike,
        thresholds: ShotThresholds | str = STANDARD,
        shot_logits_from_branches: bool = False,
    ):
        self.train_class_counts = _to_numpy(train_class_counts)
        self.thresholds = _resolve_thresholds(thresholds)
        self.shot_logits_from_branches = shot_logits_from_branches

    def __call__(self, eval_pred) -> dict[str, float | int]:
        predictions = eval_pred.predictions
        if not isinstance(predictions, tuple | list):
            predictions = (predictions,)
        if not 1 <= len(predictions) <= 3:
            raise ValueError(
                "predictions must be logits, (logits, image_logits) or (logits, image_logits, text_logits); "
                f"got a tuple of {len(predictions)}"
            )
        logits, image_logits, text_logits = (list(predictions) + [None, None])[:3]
        shot_logits = None
        if self.shot_logits_from_branches and text_logits is not None:
            shot_logits = _to_numpy(image_logits) + _to_numpy(text_logits)  # (N, C)
        metrics = long_tail_metrics(
            logits,
            eval_pred.label_ids,
            self.train_class_counts,
            thresholds=self.thresholds,
            image_logits=image_logits,
            text_logits=text_logits,
            shot_logits=shot_logits,
        )
        return {key: value for key, value in metrics.items() if not isinstance(value, list)}


# --- outputs


def plot_per_class_accuracy(
    per_class: Mapping[str, ArrayLike],
    train_class_counts: ArrayLike,
    path: str | os.PathLike,
    thresholds: ShotThresholds | str = STANDARD,
    title: str | None = None,
) -> None:
    """Writes a PNG of per-class accuracy (y, fraction) against training images per class (x, log scale), one marker
    series per method (the keys of `per_class`, each (C,)), with dashed lines at the shot thresholds.

    Classes without an evaluation image (NaN) are skipped, and so are classes with no training image (the log axis
    cannot show them; logged). Uses matplotlib's Agg canvas directly, not pyplot, so no global backend is changed
    and no figure stays open. The file is written atomically.
    """
    thresholds = _resolve_thresholds(thresholds)
    counts = _to_numpy(train_class_counts).reshape(-1).astype(np.float64)  # (C,)
    if (counts <= 0).any():
        logger.warning(f"{int((counts <= 0).sum())} classes have no training image; left out of the log-scale plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: matplotlib is slow to import
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = "o^sDvP*X<>"
    for index, (method, accuracies) in enumerate(per_class.items()):
        accuracies = _to_numpy(accuracies).reshape(-1).astype(np.float64)  # (C,)
        if accuracies.shape != counts.shape:
            raise ValueError(f"per_class[{method!r}] has shape {accuracies.shape}, expected {counts.shape}")
        keep = (counts > 0) & ~np.isnan(accuracies)
        axes.scatter(
            counts[keep], accuracies[keep], s=12, alpha=0.6, marker=markers[index % len(markers)], label=method
        )
    many_sign, few_sign = (">=", "<=") if thresholds.inclusive else (">", "<")
    axes.axvline(thresholds.many, color="grey", linestyle="--", label=f"many: n {many_sign} {thresholds.many}")
    axes.axvline(thresholds.few, color="grey", linestyle=":", label=f"few: n {few_sign} {thresholds.few}")
    axes.set_xscale("log")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("training images per class")
    axes.set_ylabel("per-class top-1 accuracy")
    if title:
        axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = _to_numpy(value)
    if isinstance(value, np.ndarray):
        return [_json_safe(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
    """Writes `metrics` as JSON, atomically; numpy/torch scalars and arrays become numbers and lists, and NaN or
    infinite values become null (strict JSON has no NaN)."""
    atomic_write_json(path, _json_safe(metrics))


# --- stage-1 evaluation


@torch.no_grad()
def sentence_retrieval_metrics(
    image_embeds: torch.Tensor,
    image_labels: torch.Tensor,
    text_embeds: torch.Tensor,
    text_labels: torch.Tensor,
    k: int = 5,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Stage-1 (CVLP) evaluation, reference `evaluate_pretrain`: `image_top1`, the class of each image's nearest
    sentence (cosine), and `knn_{k}`, the majority class among its k nearest sentences (a tie goes to the class met
    first, i.e. the more similar one). Fractions in [0, 1]."""
    image = torch.nn.functional.normalize(image_embeds.float(), dim=-1)  # (N_i, D)
    text = torch.nn.functional.normalize(text_embeds.float().to(image.device), dim=-1)  # (N_t, D)
    image_labels = torch.as_tensor(image_labels).to(image.device)
    text_labels = torch.as_tensor(text_labels).to(image.device)
    k = min(k, len(text))
    nearest_correct = knn_correct = 0
    for start in range(0, len(image), chunk_size):
        rows = slice(start, start + chunk_size)
        top = (image[rows] @ text.T).topk(k, dim=-1).indices  # (n, k), most similar first
        top_labels = text_labels[top]  # (n, k)
        votes = (top_labels[:, :, None] == top_labels[:, None, :]).sum(-1)  # (n, k) votes for each position's class
        rank = votes * (k + 1) - torch.arange(k, device=votes.device)  # most votes, then the earliest position
        winner = top_labels.gather(1, rank.argmax(-1, keepdim=True))[:, 0]  # (n,)
        nearest_correct += int((top_labels[:, 0] == image_labels[rows]).sum())
        knn_correct += int((winner == image_labels[rows]).sum())
    total = max(len(image), 1)
    return {"image_top1": nearest_correct / total, f"knn_{k}": knn_correct / total}


__all__ = [
    "sentence_retrieval_metrics",
    "OFFICIAL",
    "STANDARD",
    "LongTailMetrics",
    "ShotThresholds",
    "long_tail_metrics",
    "per_class_accuracy",
    "plot_per_class_accuracy",
    "shot_group_accuracy",
    "topk_correct",
    "write_metrics_json",
]
