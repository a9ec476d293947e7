"""`python -m training.compare` on the tiny long-tailed set: one smoke run of two methods over two seeds with tiny
schedules, checked against the runs it leaves behind (seeds really differ, every number recomputes from the saved
predictions, the table's verdicts follow the printed rule)."""

import json
from pathlib import Path

import numpy as np
import pytest

from training import compare
from training.cli import UsageError

TINY = ["--stage1_epochs", "1", "--stage2_epochs", "1", "--batch_size", "8", "--num_anchor_sentences", "4",
        "--knn_k", "3", "--many_shot_threshold", "8", "--few_shot_threshold", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def comparison(tiny_clip_dir, lt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    d = lt_dataset
    argv = ["--clip", tiny_clip_dir, "--train_file", d["train"], "--test_file", d["test"], "--selection_file",
            d["val"], "--image_root", d["root"], "--class_names", d["classes"], "--text_corpus", d["corpus"],
            "--methods", "vlltr,knn", "--seeds", "2", "--output_dir", str(out), *TINY]  # fmt: skip
    return out, compare.main(argv)


def test_every_number_recomputes_from_the_saved_predictions(comparison, lt_dataset):
    out, results = comparison
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("vlltr", 0), ("knn", 0), ("vlltr", 1), ("knn", 1)]
    counts = np.bincount([int(line.split()[1]) for line in open(lt_dataset["train"]) if line.strip()], minlength=4)
    groups = np.array(["many" if n > 8 else "few" if n < 4 else "medium" for n in counts])
    for run in results["runs"]:
        saved = np.load(Path(run["folder"]) / "predictions.npz")
        predictions, labels = saved["logits"].argmax(1), saved["labels"]
        assert run["overall"] == pytest.approx(np.mean(predictions == labels))
        per_class = np.array([np.mean(predictions[labels == c] == c) for c in range(4)])
        for group in ("many", "medium", "few"):
            if (groups == group).any():
                assert run[group] == pytest.approx(per_class[groups == group].mean())
    for method in ("vlltr", "knn"):
        values = [r["overall"] for r in results["runs"] if r["method"] == method]
        summary = results["methods"][method]["overall"]
        assert summary["mean"] == pytest.approx(np.mean(values))
        assert summary["std"] == pytest.approx(np.std(values, ddof=1))


def test_seeds_give_different_runs(comparison):
    out, results = comparison
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    first, second = (np.load(Path(runs["vlltr", s]["folder"]) / "predictions.npz")["logits"] for s in (0, 1))
    assert not np.allclose(first, second)
    assert runs["vlltr", 0]["folder"] != runs["vlltr", 1]["folder"]
    # the KNN run of a seed uses that seed's stage-1 model, which VL-LTR of the same seed shares
    assert runs["knn", 1]["steps"][0] == runs["vlltr", 1]["steps"][0] != runs["vlltr", 0]["steps"][0]


def test_table_prints_the_paper_and_the_verdicts(comparison):
    out, results = comparison
    table = (out / "table.md").read_text()
    assert "| 70.1 |" in table and "| 63.9 |" in table  # the paper's reported numbers, beside the measured ones
    assert compare.RULE in table
    (claim,) = results["claims"]
    assert claim["claim"] == "LGR > KNN head" and claim["paper_difference"] == pytest.approx(6.2)
    vlltr, knn = results["methods"]["vlltr"]["overall"], results["methods"]["knn"]["overall"]
    diff, spread = vlltr["mean"] - knn["mean"], vlltr["std"] + knn["std"]
    expected = "holds" if diff > spread else "contradicted" if -diff > spread else "within spread"
    assert claim["verdict"] == expected and f"| {expected} |" in table
    for picture in ("compare.png", "per_class_accuracy.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]


def test_seeds_in_parallel_processes_give_the_same_runs(comparison, tiny_clip_dir, lt_dataset, tmp_path):
    """--jobs 2 runs each seed in its own spawned process: the same numbers as one seed after the other."""
    out, results = comparison
    d = lt_dataset
    argv = ["--clip", tiny_clip_dir, "--train_file", d["train"], "--test_file", d["test"], "--selection_file",
            d["val"], "--image_root", d["root"], "--class_names", d["classes"], "--text_corpus", d["corpus"],
            "--methods", "vlltr,knn", "--seeds", "2", "--jobs", "2", "--output_dir", str(tmp_path / "p"), *TINY]  # fmt: skip
    parallel = compare.main(argv)
    assert [(r["method"], r["seed"]) for r in parallel["runs"]] == [(r["method"], r["seed"]) for r in results["runs"]]
    for one, other in zip(results["runs"], parallel["runs"]):
        assert Path(other["folder"]).is_relative_to(tmp_path / "p")
        assert {g: one[g] for g in ("overall", "many", "medium", "few")} == {
            g: other[g] for g in ("overall", "many", "medium", "few")
        }


def test_peers_run_and_report(tiny_clip_dir, lt_dataset, tmp_path):
    """The LIFT-style peer, VL-LTR with LoRA and the logit-adjusted probe are real runs of their scripts: each leaves
    its checkpoint's own evaluation, whose numbers recompute from the saved predictions."""
    d = lt_dataset
    argv = ["--clip", tiny_clip_dir, "--train_file", d["train"], "--test_file", d["test"], "--selection_file",
            d["val"], "--image_root", d["root"], "--class_names", d["classes"], "--text_corpus", d["corpus"],
            "--methods", "lift,vlltr_lora,linear_la", "--seeds", "1", "--linear_epochs", "1",
            "--output_dir", str(tmp_path), *TINY]  # fmt: skip
    results = compare.main(argv)
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"lift", "vlltr_lora", "linear_la"}
    for method, run in runs.items():
        saved = np.load(Path(run["folder"]) / "predictions.npz")
        assert run["overall"] == pytest.approx(np.mean(saved["logits"].argmax(1) == saved["labels"]))
        assert results["methods"][method]["seconds_mean"] > 0
    lift = json.loads((tmp_path / "seed_0" / "lift" / "config.json").read_text())
    assert lift["head_type"] == "cosine"
    assert json.loads((tmp_path / "seed_0" / "lift_eval" / "metrics.json").read_text())["head"]
    history = json.loads((tmp_path / "seed_0" / "vlltr_lora_stage2" / "training_history.json").read_text())
    assert {e["script"]: e["settings"].get("peft") for e in history if "run_" in e["script"]} == {
        "run_cvlp": "lora",
        "run_select_anchors": None,
        "run_lgr": "lora",
    }


def test_unknown_method_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="unknown method.*nope"):
        compare.main(["--methods", "vlltr,nope", "--output_dir", str(tmp_path)])


def test_random_init_keeps_the_architecture_and_differs_by_seed(tiny_clip_dir, tmp_path):
    import torch
    from transformers import CLIPModel

    start = CLIPModel.from_pretrained(tiny_clip_dir)
    # seeds 1 and 2: the fixture's CLIP is itself a random init drawn with torch.manual_seed(0)
    compare.save_random_init(tiny_clip_dir, tmp_path / "a", seed=1)
    compare.save_random_init(tiny_clip_dir, tmp_path / "b", seed=2)
    a, b = CLIPModel.from_pretrained(tmp_path / "a"), CLIPModel.from_pretrained(tmp_path / "b")
    assert a.config.to_dict()["vision_config"] == start.config.to_dict()["vision_config"]
    weight = "vision_model.encoder.layers.0.mlp.fc1.weight"
    tensors = [m.state_dict()[weight] for m in (start, a, b)]
    assert tensors[0].shape == tensors[1].shape
    assert not torch.equal(tensors[0], tensors[1]) and not torch.equal(tensors[1], tensors[2])
    assert (tmp_path / "a" / "tokenizer_config.json").is_file() or (tmp_path / "a" / "vocab.json").is_file()


def test_world_measurements_recompute_from_the_runs(tiny_clip_dir, tmp_path):
    """On a folder written by `training.world`, compare measures the premise and the visual share of the anchors
    each strategy kept; the shares recompute from the anchor folders and visual_sentences.json."""
    from training.world import WorldArguments, build_world

    w = build_world(WorldArguments(output_dir=str(tmp_path / "world"), num_classes=6, imbalance=5, max_per_class=10,
                                   test_per_class=2, selection_per_class=2, pool_size=20))  # fmt: skip
    argv = ["--clip", tiny_clip_dir, "--train_file", w["train"], "--test_file", w["test"], "--selection_file",
            w["val"], "--image_root", w["root"], "--class_names", w["classes"], "--text_corpus", w["corpus"],
            "--methods", "vlltr,random,linear_ce", "--seeds", "1", "--linear_epochs", "1",
            "--output_dir", str(tmp_path / "out"), *TINY]  # fmt: skip
    results = compare.main(argv)
    world = results["world"]
    corpus = json.loads(Path(w["corpus"]).read_text())
    flags = json.loads(Path(w["visual_sentences"]).read_text())
    visual = {s for name in corpus for s, f in zip(corpus[name], flags[name]) if f}
    for strategy, folder in (("anss", "vlltr_anchors"), ("random", "random_anchors")):
        anchors = json.loads((tmp_path / "out" / "seed_0" / folder / "config.json").read_text())["anchor_sentences"]
        flat = [s for per_class in anchors for s in per_class]
        assert world[f"anchor_visual_share_{strategy}"]["mean"] == pytest.approx(
            sum(s in visual for s in flat) / len(flat)
        )
    described = sum(len(v) for v in corpus.values())
    assert world["anchor_visual_share_corpus_descriptions"]["mean"] == pytest.approx(len(visual) / described)
    assert world["anchor_visual_share_corpus_candidates"]["mean"] == pytest.approx(len(visual) / (described + 80 * 6))
    assert world["chance"]["mean"] == pytest.approx(1 / 6)
    assert 0 <= world["explanations_visual_share_top3"]["mean"] <= 1
    assert "linear_few_top1" in world and "cutoff" not in json.dumps(list(world))
    assert "visual share: anchors kept by AnSS" in (tmp_path / "out" / "table.md").read_text()
    # classes added from text alone: held out of VL-LTR's training, then added from their descriptions
    row = results["world_per_seed"][0]
    held = row["new_classes"]
    assert len(held) == 3 and set(held) <= set(corpus)
    seed_dir = tmp_path / "out" / "seed_0" / "new_classes"
    kept = json.loads((seed_dir / "kept_stage2" / "config.json").read_text())["id2label"]
    assert len(kept) == 3 and not set(kept.values()) & set(held)
    for tag, templates in (("descriptions", False), ("name_and_descriptions", True)):
        added = json.loads((seed_dir / f"added_from_{tag}" / "added_classes.json").read_text())["classes"]
        assert [c["name"] for c in added] == held and [c["label"] for c in added] == [3, 4, 5]
        for c in added:
            own = set(corpus[c["name"]])
            assert set(c["anchors"]) <= own if not templates else any(s not in own for s in c["anchors"])
        top1 = row[f"new_class_added_from_{tag}_top1"]
        assert 0 <= top1 <= 1 and top1 * 6 == pytest.approx(round(top1 * 6))  # 2 test images x 3 classes
    assert row["new_class_chance"] == pytest.approx(1 / 6)
    assert world["new_class_zero_shot_by_name_top1"]["mean"] == pytest.approx(row["new_class_zero_shot_by_name_top1"])
    assert "classes added from text alone: from their descriptions" in (tmp_path / "out" / "table.md").read_text()


def test_too_many_new_classes_is_one_line_before_any_run(tiny_clip_dir, tmp_path):
    from training.world import WorldArguments, build_world

    w = build_world(WorldArguments(output_dir=str(tmp_path / "world"), num_classes=4, imbalance=2, max_per_class=4,
                                   test_per_class=1, selection_per_class=1, pool_size=8))  # fmt: skip
    argv = ["--clip", tiny_clip_dir, "--train_file", w["train"], "--test_file", w["test"], "--image_root", w["root"],
            "--class_names", w["classes"], "--text_corpus", w["corpus"], "--new_classes", "3",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UsageError, match=r"--new_classes must be between 0 and 2 .*got 3"):
        compare.main(argv)
    assert not (tmp_path / "out" / "seed_0").exists()
