"""Tests for training/metrics.py: shot groups at their boundaries, accuracies against naive loops, plot and JSON."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from training.metrics import (
    OFFICIAL,
    STANDARD,
    LongTailMetrics,
    ShotThresholds,
    long_tail_metrics,
    per_class_accuracy,
    plot_per_class_accuracy,
    topk_correct,
    write_metrics_json,
)

BOUNDARY_COUNTS = np.array([0, 1, 19, 20, 21, 99, 100, 101, 5000])


def naive_group(n: int, inclusive: bool) -> str:
    if inclusive:  # official code: many n >= 100, few n <= 20
        if n >= 100:
            return "many"
        if n <= 20:
            return "few"
        return "medium"
    if n > 100:  # OLTR standard: many n > 100, few n < 20
        return "many"
    if n < 20:
        return "few"
    return "medium"


def naive_per_class(predictions, labels, num_classes):
    result = []
    for c in range(num_classes):
        total = sum(1 for y in labels if y == c)
        hits = sum(1 for p, y in zip(predictions, labels) if y == c and p == y)
        result.append(hits / total if total else math.nan)
    return result


def naive_topk(logits, labels, k):
    correct = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: -row[c])
        correct.append(y in ranked[:k])
    return correct


def naive_group_accuracy(per_class, counts, inclusive):
    sums = {"many": [], "medium": [], "few": []}
    for acc, n in zip(per_class, counts.tolist()):
        if not math.isnan(acc):
            sums[naive_group(n, inclusive)].append(acc)
    return {g: (sum(v) / len(v) if v else math.nan) for g, v in sums.items()}


def make_eval(seed=0, num_classes=12, n=150):
    rng = np.random.default_rng(seed)
    counts = np.array([150, 101, 100, 99, 60, 21, 20, 19, 5, 130, 40, 3])[:num_classes]
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += rng.uniform(0, 2.5, n)  # better than chance, still many mistakes
    return logits.astype(np.float32), labels, counts


# --- shot groups


@pytest.mark.parametrize("thresholds,inclusive", [(STANDARD, False), (OFFICIAL, True)])
def test_group_of_at_boundaries(thresholds, inclusive):
    expected = [naive_group(n, inclusive) for n in BOUNDARY_COUNTS.tolist()]
    assert thresholds.group_of(BOUNDARY_COUNTS).tolist() == expected
    assert thresholds.group_of(torch.as_tensor(BOUNDARY_COUNTS)).tolist() == expected


def test_group_of_hand_written():
    counts = np.array([19, 20, 21, 99, 100, 101])
    assert STANDARD.group_of(counts).tolist() == ["few", "medium", "medium", "medium", "medium", "many"]
    assert OFFICIAL.group_of(counts).tolist() == ["few", "few", "medium", "medium", "many", "many"]


def test_thresholds_by_name_and_validation():
    assert ShotThresholds.from_name("standard") == STANDARD == ShotThresholds()
    assert ShotThresholds.from_name("official") == OFFICIAL == ShotThresholds(100, 20, True)
    with pytest.raises(ValueError, match="allowed"):
        ShotThresholds.from_name("oltr")
    with pytest.raises(ValueError, match="few <= many"):
        ShotThresholds(many=10, few=20)
    assert ShotThresholds(many=50, few=10).group_of(np.array([9, 10, 50, 51])).tolist() == [
        "few",
        "medium",
        "medium",
        "many",
    ]


# --- accuracies


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_accuracy_matches_naive(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 60)  # class 7 and 8 never appear
    predictions = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 9, 60))
    result = per_class_accuracy(predictions, labels, 9)
    expected = naive_per_class(predictions.tolist(), labels.tolist(), 9)
    np.testing.assert_allclose(result, expected, equal_nan=True)
    assert np.isnan(result[7]) and np.isnan(result[8])
    np.testing.assert_allclose(per_class_accuracy(torch.as_tensor(predictions), torch.as_tensor(labels), 9), result)


@pytest.mark.parametrize("k", [1, 2, 5, 50])
def test_topk_correct_matches_naive(k):
    logits, labels, _ = make_eval(seed=k)
    result = topk_correct(logits, labels, k)
    assert result.dtype == bool and result.shape == labels.shape
    assert result.tolist() == naive_topk(logits, labels, min(k, logits.shape[1]))
    if k == 50:  # clamped to C
        assert result.all()


@pytest.mark.parametrize("thresholds", [STANDARD, OFFICIAL])
@pytest.mark.parametrize("seed", [0, 3])
def test_long_tail_metrics_match_naive(seed, thresholds):
    logits, labels, counts = make_eval(seed)
    labels[labels == 4] = 5  # class 4 has no evaluation image: it must be left out of its group's mean
    metrics = long_tail_metrics(logits, labels, counts, thresholds=thresholds, prefix="eval_")
    predictions = logits.argmax(1).tolist()
    per_class = naive_per_class(predictions, labels.tolist(), 12)
    groups = naive_group_accuracy(per_class, counts, thresholds.inclusive)
    assert metrics["eval_top1"] == pytest.approx(np.mean(np.array(predictions) == labels))
    assert metrics["eval_top5"] == pytest.approx(np.mean(naive_topk(logits, labels, 5)))
    for group in ("many", "medium", "few"):
        assert metrics[f"eval_{group}_top1"] == pytest.approx(groups[group])
        expected_count = sum(naive_group(n, thresholds.inclusive) == group for n in counts.tolist())
        assert metrics[f"eval_num_{group}_classes"] == expected_count
    np.testing.assert_allclose(metrics["eval_per_class_top1"], per_class, equal_nan=True)
    assert 0.0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1.0
    assert "eval_image_top1" not in metrics and "eval_text_top1" not in metrics


def test_long_tail_metrics_branches_and_shot_logits():
    logits, labels, counts = make_eval(5)
    rng = np.random.default_rng(9)
    image_logits = logits + rng.normal(scale=1.0, size=logits.shape)
    text_logits = logits + rng.normal(scale=1.0, size=logits.shape)
    summed = image_logits + text_logits
    metrics = long_tail_metrics(
        torch.as_tensor(logits),
        torch.as_tensor(labels),
        counts,
        image_logits=image_logits,
        text_logits=torch.as_tensor(text_logits),
        shot_logits=summed,
    )
    assert metrics["image_top1"] == pytest.approx(np.mean(naive_topk(image_logits, labels, 1)))
    assert metrics["text_top5"] == pytest.approx(np.mean(naive_topk(text_logits, labels, 5)))
    assert metrics["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    per_class = naive_per_class(summed.argmax(1).tolist(), labels.tolist(), 12)
    groups = naive_group_accuracy(per_class, counts, inclusive=False)
    assert metrics["many_top1"] == pytest.approx(groups["many"])
    assert metrics["few_top1"] == pytest.approx(groups["few"])


def test_empty_group_is_nan():
    logits = np.eye(3, dtype=np.float32)
    metrics = long_tail_metrics(logits, np.arange(3), np.array([500, 200, 150]))
    assert metrics["many_top1"] == 1.0
    assert math.isnan(metrics["medium_top1"]) and math.isnan(metrics["few_top1"])
    assert metrics["num_few_classes"] == 0


def test_long_tail_metrics_validation():
    logits, labels, counts = make_eval()
    with pytest.raises(ValueError, match="train_class_counts"):
        long_tail_metrics(logits, labels, counts[:-1])
    with pytest.raises(ValueError, match="logits must have shape"):
        long_tail_metrics(logits[:-1], labels, counts)
    with pytest.raises(ValueError, match="image_logits"):
        long_tail_metrics(logits, labels, counts, image_logits=logits[:, :-1])


# --- Trainer compute_metrics


def test_long_tail_metrics_callable_single_array_and_tuples():
    logits, labels, counts = make_eval(2)
    image_logits, text_logits = logits * 0.5 + 0.1, logits[:, ::-1].copy()
    compute = LongTailMetrics(counts)
    single = compute(EvalPrediction(predictions=logits, label_ids=labels))
    assert set(single) == {
        "top1",
        "top5",
        "many_top1",
        "medium_top1",
        "few_top1",
        "num_many_classes",
        "num_medium_classes",
        "num_few_classes",
    }
    assert single["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels))

    fc = compute(EvalPrediction(predictions=(logits, image_logits), label_ids=labels))
    assert fc["image_top1"] == pytest.approx(np.mean(image_logits.argmax(1) == labels))
    assert "text_top1" not in fc

    lgr = compute(EvalPrediction(predictions=(logits, image_logits, text_logits), label_ids=labels))
    assert lgr["text_top1"] == pytest.approx(np.mean(text_logits.argmax(1) == labels))
    assert lgr["many_top1"] == single["many_top1"]
    assert not any(isinstance(value, list) for value in lgr.values())

    official = LongTailMetrics(counts, thresholds="official", shot_logits_from_branches=True)
    result = official(EvalPrediction(predictions=(logits, image_logits, text_logits), label_ids=labels))
    per_class = naive_per_class((image_logits + text_logits).argmax(1).tolist(), labels.tolist(), 12)
    groups = naive_group_accuracy(per_class, counts, inclusive=True)
    assert result["few_top1"] == pytest.approx(groups["few"])
    assert result["num_few_classes"] == 4  # 20, 19, 5 and 3 under the official <= 20
    assert single["num_few_classes"] == 3  # 19, 5 and 3 under the standard < 20
    assert result["top1"] == single["top1"]

    with pytest.raises(ValueError, match="tuple of 4"):
        compute(EvalPrediction(predictions=(logits,) * 4, label_ids=labels))


# --- outputs


def test_plot_writes_a_png(tmp_path):
    logits, labels, counts = make_eval(1)
    counts = counts.copy()
    counts[-1] = 0  # a class with no training image cannot sit on the log axis, and must not break the plot
    per_class = {
        "LGR": per_class_accuracy(logits.argmax(1), labels, 12),
        "zero-shot": torch.as_tensor(per_class_accuracy(np.zeros_like(labels), labels, 12)),
    }
    path = tmp_path / "plots" / "per_class.png"
    plot_per_class_accuracy(per_class, counts, path, thresholds=OFFICIAL, title="tiny")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["per_class.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="expected"):
        plot_per_class_accuracy({"bad": np.zeros(3)}, counts, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_metrics_json_round_trip(tmp_path):
    logits = np.eye(3, dtype=np.float32)
    metrics = long_tail_metrics(logits, np.array([0, 1, 1]), np.array([500, 50, 5]))
    metrics["extra"] = {"np_float": np.float32(0.5), "np_int": np.int64(7), "array": np.array([1.0, np.nan])}
    metrics["inf"] = float("inf")
    path = tmp_path / "metrics.json"
    write_metrics_json(path, metrics)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["few_top1"] is None  # class 2 has no evaluation image, so the few group is empty
    assert loaded["per_class_top1"] == [1.0, 0.5, None]
    assert loaded["many_top1"] == 1.0 and loaded["medium_top1"] == 0.5
    assert loaded["num_many_classes"] == 1
    assert loaded["extra"] == {"np_float": 0.5, "np_int": 7, "array": [1.0, None]}
    assert loaded["inf"] is None


def test_group_top1_reads_overall_and_each_shot_group():
    from training.metrics import group_top1

    metrics = {"top1": 0.5, "many_top1": 0.9, "medium_top1": 0.4, "few_top1": 0.1, "top5": 1.0}
    assert group_top1(metrics) == {"overall": 0.5, "many": 0.9, "medium": 0.4, "few": 0.1}
