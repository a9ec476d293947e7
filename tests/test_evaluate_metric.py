"""The long-tail metric as a local 🤗 `evaluate` module: loads offline by path, same numbers as `training.metrics`."""

from pathlib import Path

import numpy as np
import pytest

from training.metrics import ShotThresholds, long_tail_metrics

METRIC = Path(__file__).resolve().parents[1] / "training" / "long_tail_accuracy"


@pytest.mark.parametrize("inclusive", [False, True])
def test_local_evaluate_metric_matches_training_metrics(inclusive):
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(METRIC))
    rng = np.random.default_rng(0)
    num_classes = 12
    # counts on and around both boundaries, so the two conventions group them differently
    counts = np.array([150, 100, 101, 99, 50, 21, 20, 19, 5, 0, 100, 20])
    labels = rng.integers(0, num_classes - 1, 300)  # the last class has no evaluation image
    logits = rng.normal(size=(300, num_classes)) + 2.0 * np.eye(num_classes)[labels] * rng.random((300, 1))
    expected = long_tail_metrics(logits, labels, counts, ShotThresholds(100, 20, inclusive))
    for start in range(0, 300, 128):  # batches, as an evaluation loop adds them
        metric.add_batch(predictions=logits[start : start + 128].argmax(1), references=labels[start : start + 128])
    got = metric.compute(train_class_counts=counts.tolist(), many_shot_threshold=100, few_shot_threshold=20,
                         inclusive=inclusive)  # fmt: skip
    assert got["accuracy"] == pytest.approx(expected["top1"])
    for group in ("many", "medium", "few"):
        assert got[f"{group}_accuracy"] == pytest.approx(expected[f"{group}_top1"], nan_ok=True)
        assert got[f"num_{group}_classes"] == expected[f"num_{group}_classes"]
    groups = ShotThresholds(100, 20, inclusive).group_of(counts)
    assert (groups == "many").sum() != (ShotThresholds(100, 20, not inclusive).group_of(counts) == "many").sum()
