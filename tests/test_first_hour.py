"""What a newcomer sees in the first hour: every script ends with a summary on stdout that holds the numbers it wrote
(checked against the files, not typed in), and the messages of the usual first mistakes say what to do."""

import contextlib
import io
import json
import re

import pytest

from training import add_classes, run_cvlp, run_eval, run_lgr, run_select_anchors
from training.cli import percent
from training.model_card import read_history

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0", "--logging_steps", "1"]
M = 6


def _run(script, argv: list[str]) -> tuple[dict, str]:
    """`script.main(argv)` and what it printed on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = script.main(argv)
    return result, out.getvalue()


def _summary(stdout: str, script: str) -> str:
    """The summary block a script printed last: its title line `script: ...` and the indented lines after it."""
    match = re.search(rf"^{script}: .*(?:\n  .*)+\Z", stdout.rstrip(), flags=re.MULTILINE)
    assert match, stdout[-2000:]
    return match[0]


@pytest.fixture(scope="module")
def runs(tiny_clip_dir, lt_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("first_hour")
    d = lt_dataset
    common = ["--image_root", d["root"], *FAST]
    printed = {}
    _, printed["run_cvlp"] = _run(
        run_cvlp,
        ["--model_name_or_path", tiny_clip_dir, "--train_file", d["train"], "--class_names", d["classes"],
         "--text_corpus", d["corpus"], "--output_dir", str(out / "stage1"), "--max_steps", "3",
         "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", *common],
    )  # fmt: skip
    _, printed["run_select_anchors"] = _run(
        run_select_anchors,
        ["--model_name_or_path", str(out / "stage1"), "--selection_file", d["val"], "--class_names", d["classes"],
         "--text_corpus", d["corpus"], "--num_anchor_sentences", str(M), "--output_dir", str(out / "anchors"),
         *common],
    )  # fmt: skip
    _, printed["run_lgr"] = _run(
        run_lgr,
        ["--model_name_or_path", str(out / "anchors"), "--train_file", d["train"], "--output_dir", str(out / "stage2"),
         "--max_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", *common],
    )  # fmt: skip
    _, printed["run_eval"] = _run(
        run_eval,
        ["--model_name_or_path", str(out / "stage2"), "--test_file", d["test"], "--train_file", d["train"],
         "--output_dir", str(out / "eval"), "--many_shot_threshold", "8", "--few_shot_threshold", "4", *common],
    )  # fmt: skip
    return out, printed


@pytest.mark.parametrize("script, folder", [("run_cvlp", "stage1"), ("run_lgr", "stage2")])
def test_trainers_print_their_loss_and_folder(runs, script, folder):
    out, printed = runs
    summary = _summary(printed[script], script)
    entry = [e for e in read_history(out / folder) if e["script"] == script][-1]
    assert f"train loss {entry['results']['train_loss']:.4f} (mean of the run)" in summary
    newest = max((out / folder).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((newest / "trainer_state.json").read_text())
    last = [e for e in state["log_history"] if "loss" in e][-1]
    assert f"{last['loss']:.4f} at the last log (step {last['step']})" in summary
    assert f"{state['global_step']} optimizer steps" in summary
    assert summary.rstrip().endswith(f"wrote {out / folder}")


def test_eval_prints_top1_and_the_shot_groups_of_metrics_json(runs):
    out, printed = runs
    summary = _summary(printed["run_eval"], "run_eval")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert f"top-1 {100 * metrics['top1']:.2f}%" in summary
    assert f"top-5 {100 * metrics['top5']:.2f}%" in summary
    for group, bound in (("many", "> 8"), ("medium", "between"), ("few", "< 4")):
        value = metrics[f"{group}_top1"]
        shown = "n/a" if value is None else f"{100 * value:.2f}%"
        assert f"{group} {shown} ({metrics[f'num_{group}_classes']} classes, {bound})" in summary
    assert f"on {metrics['num_test_images']} images" in summary
    assert summary.rstrip().endswith(f"wrote {out / 'eval'}")


def test_anchor_selection_prints_the_anchors_kept_and_the_report(runs):
    out, printed = runs
    summary = _summary(printed["run_select_anchors"], "run_select_anchors")
    record = json.loads((out / "anchors" / "anchors.json").read_text())
    kept = [len(c["anchors"]) for c in record["classes"]] if "classes" in record else None
    assert kept, record.keys()
    shown = f"{M} (M)" if min(kept) == max(kept) == M else f"{min(kept)} to {max(kept)} (M = {M};"
    assert f"anchors kept per class: {shown}" in summary
    assert f"{out / 'anchors'}/anchor_report.md" in summary and (out / "anchors" / "anchor_report.md").is_file()
    assert summary.rstrip().endswith(f"wrote {out / 'anchors'}")


def test_add_classes_prints_the_new_classes(runs, lt_dataset, tmp_path):
    out, _ = runs
    (tmp_path / "new.txt").write_text("purple star\n")
    (tmp_path / "new.json").write_text(json.dumps({"purple star": ["A purple star.", "Five purple points."]}))
    result, stdout = _run(
        add_classes,
        ["--model_name_or_path", str(out / "stage2"), "--class_names", str(tmp_path / "new.txt"),
         "--text_corpus", str(tmp_path / "new.json"), "--output_dir", str(tmp_path / "grown"), *FAST],
    )  # fmt: skip
    summary = _summary(stdout, "add_classes")
    added = json.loads((tmp_path / "grown" / "added_classes.json").read_text())["classes"]
    before, after = result["num_labels_before"], result["num_labels"]
    assert f"{before} -> {after} classes" in summary
    assert f"{added[0]['label']}: 'purple star' ({len(added[0]['anchors'])} anchors)" in summary


def test_percent_formats_fractions_and_missing_groups():
    assert percent(0.61234) == "61.23%" and percent(float("nan")) == "n/a" and percent(None) == "n/a"
