# Copyright 2026 The vlltr authors. Licensed under the Apache License, Version 2.0.
"""Long-tail accuracy as an 🤗 `evaluate` metric: overall top-1 and many / medium / few-shot accuracy.

Self-contained (numpy and evaluate only), so `evaluate.load("training/long_tail_accuracy")` works offline by path in
any process. Its numbers are those of `training.metrics.long_tail_metrics` (tested against it).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy of class predictions, overall and per shot group. A class is "many-shot", "medium-shot" or "few-shot" by its
number of training images. Standard convention (OLTR, the default): many if n > many_shot_threshold, few if
n < few_shot_threshold, medium otherwise. The official VL-LTR code's (`inclusive=True`): many if n >= many, few if
n <= few. A group's accuracy is the mean of the per-class accuracies of its classes that have evaluation images (NaN
for a group without one).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    train_class_counts (`list[int]`): number of training images of each class, indexed by class id.
    many_shot_threshold (`int`, defaults to 100), few_shot_threshold (`int`, defaults to 20).
    inclusive (`bool`, defaults to `False`): the official code's convention (boundaries belong to many / few).
Returns:
    accuracy, many_accuracy, medium_accuracy, few_accuracy (fractions in [0, 1]), and num_many_classes,
    num_medium_classes, num_few_classes.
Example:
    >>> metric = evaluate.load("training/long_tail_accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], train_class_counts=[150, 10])["accuracy"]
    0.6666666666666666
"""


class LongTailAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Tian et al., VL-LTR, ECCV 2022 (arXiv 2111.13579); Liu et al., OLTR, CVPR 2019.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        train_class_counts=None,
        many_shot_threshold: int = 100,
        few_shot_threshold: int = 20,
        inclusive: bool = False,
    ):
        if train_class_counts is None:
            raise ValueError("long_tail_accuracy needs train_class_counts (training images per class id).")
        predictions, references = np.asarray(predictions, np.int64), np.asarray(references, np.int64)
        counts = np.asarray(train_class_counts)
        num_classes = len(counts)
        if references.size and (references.min() < 0 or references.max() >= num_classes):
            raise ValueError(f"references must lie in [0, {num_classes}) = range(len(train_class_counts)).")
        seen = np.bincount(references, minlength=num_classes).astype(np.float64)  # (C,)
        hits = np.bincount(references[predictions == references], minlength=num_classes).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(seen > 0, hits / seen, np.nan)  # (C,)
        if inclusive:
            many, few = counts >= many_shot_threshold, counts <= few_shot_threshold
        else:
            many, few = counts > many_shot_threshold, counts < few_shot_threshold
        groups = {"many": many, "medium": ~many & ~few, "few": few & ~many}
        result = {"accuracy": float((predictions == references).mean()) if references.size else float("nan")}
        for name, members in groups.items():
            values = per_class[members & (seen > 0)]
            result[f"{name}_accuracy"] = float(values.mean()) if values.size else float("nan")
            result[f"num_{name}_classes"] = int(members.sum())
        return result
