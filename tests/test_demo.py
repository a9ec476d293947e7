"""The demo's dataset and its guards. The whole demo runs in `make demo` (and in CI); here only its parts."""

import json
import subprocess
import sys

import numpy as np
import pytest

from training.cli import UsageError
from training.demo import THRESHOLDS, build_digits, main


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"), seed=0)


def _rows(path):
    return [line.split() for line in open(path).read().splitlines()]


def test_splits_are_disjoint_balanced_and_long_tailed(digits):
    splits = {name: _rows(digits[name]) for name in ("train", "val", "test", "pool")}
    files = {name: {path for path, _ in rows} for name, rows in splits.items()}
    names = list(files)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not files[a] & files[b], f"{a} and {b} share images"
    assert sum(len(f) for f in files.values()) <= 1797
    test_counts = np.bincount([int(y) for _, y in splits["test"]], minlength=10)
    assert (test_counts == test_counts[0]).all(), "the test split is class-balanced"
    train_counts = np.bincount([int(y) for _, y in splits["train"]], minlength=10)
    assert train_counts.tolist() == digits["train_counts"]
    assert train_counts.max() / train_counts.min() >= 10, "imbalance ratio at least 10"
    ranked = np.sort(train_counts)[::-1]
    ratios = ranked[:-1] / ranked[1:]
    assert np.all(ratios > 1.2) and np.ptp(np.log(ratios)) < 0.35, "an exponential profile"
    groups = THRESHOLDS.group_of(train_counts)
    assert {"many", "medium", "few"} <= set(groups.tolist()), "classes in each shot group"


def test_files_are_in_the_formats_a_user_brings(digits):
    from training.corpus import build_class_corpus
    from training.splits import check_labels, read_class_names, read_image_list

    names = read_class_names(digits["classes"])
    assert len(names) == 10
    samples = read_image_list(digits["train"], digits["root"])
    check_labels(samples, len(names))
    from PIL import Image

    assert Image.open(samples[0].path).size == (32, 32)
    corpus = build_class_corpus(names, digits["corpus"])
    assert all(len(corpus.class_sentences(c)) > 80 for c in range(10)), "templates plus descriptions"
    assert json.load(open(digits["corpus"]))["seven"]


def test_same_seed_same_splits(digits, tmp_path):
    again = build_digits(tmp_path / "again", seed=0)
    for split in ("train", "val", "test", "pool"):
        assert _rows(again[split]) == _rows(digits[split])
    other = build_digits(tmp_path / "other", seed=1)
    assert _rows(other["train"]) != _rows(digits["train"])


def test_guards_fail_before_any_work(tmp_path, tiny_clip_dir):
    with pytest.raises(UsageError, match="--hub_model_id"):
        main(["--output_dir", str(tmp_path / "a"), "--push_to_hub"])
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="--clip .*not_clip.*'bert'"):
        main(["--output_dir", str(tmp_path / "b"), "--clip", str(not_clip)])
    with pytest.raises(UsageError, match="--clip"):
        main(["--output_dir", str(tmp_path / "c"), "--clip", str(tmp_path / "missing")])
    held = tmp_path / "held"
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a demo run"):
        main(["--output_dir", str(held), "--clip", tiny_clip_dir])
    assert (held / "notes.txt").read_text() == "mine"
    for folder in ("a", "b", "c"):
        assert not (tmp_path / folder).exists()


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.demo", "--output_dir", str(tmp_path / "x"), "--push_to_hub"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "training.demo: error: --push_to_hub needs --hub_model_id org/name (the repository to create or update)."
    ]


def test_held_out_splits_remove_one_class_and_keep_five_images_of_it(digits, tmp_path):
    from training.demo import CLASS_NAMES
    from training.demo_new_class import held_out_splits

    held_out = int(np.argmin(digits["train_counts"]))
    splits = held_out_splits(digits, held_out, tmp_path)
    names9 = open(splits["classes9"]).read().split()
    assert names9 == [n for c, n in enumerate(CLASS_NAMES) if c != held_out]
    assert open(splits["classes10"]).read().split() == [*names9, CLASS_NAMES[held_out]]
    original = {split: dict(_rows(digits[split])) for split in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        nine = _rows(splits[f"{split}9"])
        assert len(nine) == sum(1 for y in original[split].values() if int(y) != held_out)
        assert all(names9[int(y)] == CLASS_NAMES[int(original[split][path])] for path, y in nine)
    test10 = _rows(splits["test10"])
    assert len(test10) == len(original["test"]) and sum(y == "9" for _, y in test10) == 25
    new_train = [path for path, y in _rows(splits["train10"]) if y == "9"]
    assert len(new_train) == 5 and all(int(original["train"][p]) == held_out for p in new_train)
    assert [p for p, y in _rows(splits["val10"]) if y == "9"] == new_train  # AnSS sees the same 5 images
