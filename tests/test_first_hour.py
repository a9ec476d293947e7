"""What a newcomer sees in the first hour: every script ends with a summary on stdout that holds the numbers it wrote
(checked against the files, not typed in), and the messages of the usual first mistakes say what to do."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_vlltr import VLLTRForImageClassification
from training import add_classes, run_cvlp, run_eval, run_lgr, run_select_anchors
from training.anchors import description_counts, description_summary
from training.arguments import DataArguments
from training.cli import UsageError, load_new_head, percent
from training.io_utils import DataError
from training.model_card import read_history, trained_by
from training.splits import resolve_class_names

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


# ----------------------------------------------------------------------------------------------------------------------
# Messages that point to the fix
# ----------------------------------------------------------------------------------------------------------------------

CHECKPOINT = ["t-shirt", "trouser", "ankle boot"]


def test_class_order_from_a_hf_dataset_names_imagefolder_and_both_fixes():
    data_args = DataArguments(dataset_name="imagefolder")
    alphabetical = sorted(CHECKPOINT)  # what imagefolder's ClassLabel gives
    with pytest.raises(DataError) as error:
        resolve_class_names(data_args, alphabetical, CHECKPOINT, "imagefolder[train]")
    text = str(error.value)
    assert "label 0 is 't-shirt' in the checkpoint but 'ankle boot' in the data (imagefolder[train])" in text
    assert "imagefolder numbers its class folders alphabetically" in text
    assert "id2label" in text and "rename the folders" in text  # relabel in the checkpoint's order ...
    assert "run_cvlp --model_name_or_path openai/clip-vit-base-patch16" in text  # ... or retrain from the base CLIP


def test_class_order_from_a_class_names_file_says_which_line_and_both_fixes(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("trouser\nt-shirt\nankle boot\n")
    with pytest.raises(DataError) as error:
        resolve_class_names(DataArguments(class_names=str(classes)), None, CHECKPOINT)
    text = str(error.value)
    assert f"label 0 is 't-shirt' in the checkpoint but 'trouser' in the data (--class_names {classes})" in text
    assert f"line i of {classes} names label i" in text and "list the names in that order" in text
    assert "run the pipeline again from the base CLIP" in text


def test_other_class_names_are_not_called_another_order(tmp_path):
    with pytest.raises(DataError) as error:
        resolve_class_names(DataArguments(), ["cat", "dog", "bird"], CHECKPOINT, "the split")
    text = str(error.value)
    assert "another order" not in text and "Use the checkpoint trained on this data" in text


def test_a_used_folder_is_refused_naming_the_script_that_trained_it(runs, lt_dataset):
    out, _ = runs
    history = read_history(out / "stage2")
    assert history[-1]["script"] == "run_eval"  # the evaluation recorded its results there last
    assert trained_by(history) == "run_lgr"
    argv = ["--model_name_or_path", str(out / "anchors"), "--train_file", lt_dataset["train"],
            "--image_root", lt_dataset["root"], "--output_dir", str(out / "stage2"), *FAST]  # fmt: skip
    with pytest.raises(UsageError, match=r"already holds a run from run_lgr \(evaluated since by run_eval\)"):
        run_lgr.main(argv)


def test_a_new_head_is_announced_in_one_line_without_the_missing_report(tiny_clip_dir, capfd, caplog):
    capfd.readouterr()
    model = load_new_head(VLLTRForImageClassification.from_pretrained, tiny_clip_dir, head_type="fc", num_labels=3)
    err = capfd.readouterr().err
    assert model.classifier.weight.shape[0] == 3
    assert f"New fc classification head for 3 classes, initialised randomly: {tiny_clip_dir} has none" in caplog.text
    assert "LOAD REPORT" not in err + caplog.text and "MISSING" not in err + caplog.text


def test_a_new_head_still_reports_missing_backbone_weights(tiny_clip_dir, tmp_path, caplog, capfd):
    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("final_layer_norm.weight"))
    save_file(
        {k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors", metadata={"format": "pt"}
    )
    capfd.readouterr()
    load_new_head(VLLTRForImageClassification.from_pretrained, str(folder), head_type="fc", num_labels=3)
    err = capfd.readouterr().err + caplog.text
    assert "New fc classification head" in err
    # transformers' own report, since it holds more than the new head: the backbone weight and the head's
    assert "LOAD REPORT" in err and re.search(rf"clip\.{re.escape(dropped)}\s*\| MISSING", err)
    assert re.search(r"classifier\.weight\s*\| MISSING", err)


def test_anchor_report_and_summary_count_the_users_descriptions(runs, lt_dataset):
    out, printed = runs
    descriptions = json.loads(Path(lt_dataset["corpus"]).read_text())
    record = json.loads((out / "anchors" / "anchors.json").read_text())
    kept = {c["name"]: sum(a["sentence"] in descriptions[c["name"]] for a in c["anchors"]) for c in record["classes"]}
    report = (out / "anchors" / "anchor_report.md").read_text()
    for c in record["classes"]:
        own, total = kept[c["name"]], len(descriptions[c["name"]])
        heading = f"## {c['label']}: {c['name']}\n\nKept anchors ({len(c['anchors'])} of {80 + total} sentences; "
        assert f"{heading}{own} of its {total} own descriptions, {len(c['anchors']) - own} templates)" in report
    line = f"{sum(kept.values())} of the {sum(map(len, descriptions.values()))} own descriptions kept as anchors"
    assert line in report and "--use_templates False" in report
    summary = _summary(printed["run_select_anchors"], "run_select_anchors")
    assert line in summary and "--use_templates False selects from them alone" in summary
    none = [name for name, k in kept.items() if k == 0]
    if none:
        assert f"{len(none)} class(es) keep none of theirs ({', '.join(map(repr, none[:5]))}" in summary


def test_description_counts_against_a_loop():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    from_template = np.array([True, False, False, True, True, False, True])
    indices = torch.tensor([[0, 2], [3, 5]])
    mask = torch.tensor([[True, True], [True, False]])
    kept, total = description_counts(labels, indices, mask, from_template)
    for c in range(2):
        chosen = indices[c][mask[c]].tolist()
        assert kept[c] == sum(not from_template[i] for i in chosen)
        assert total[c] == sum(1 for i, y in enumerate(labels.tolist()) if y == c and not from_template[i])
    assert "'1'" not in description_summary(kept, total, ["0", "1"]) or kept[1] == 0
