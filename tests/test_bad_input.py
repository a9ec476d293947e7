"""Bad input, fed to the real entry points (the run_* scripts through their command-line wrapper, `from_pretrained`,
the pipeline): each stops with one line that names the file and line, the class or the tensor at fault, before any
training, and leaves nothing half-written; odd but valid input is converted and used."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, make_classifier, write_lt_dataset
from PIL import Image

from modeling_vlltr import VLLTRForImageClassification
from training import run_cvlp, run_eval, run_lgr, run_select_anchors
from training.cli import run_main
from training.data import eval_image_processor

FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"]
SCRIPTS = {"run_cvlp": run_cvlp, "run_select_anchors": run_select_anchors, "run_lgr": run_lgr, "run_eval": run_eval}


@pytest.fixture
def data(tmp_path):
    return write_lt_dataset(tmp_path / "data")


def run(script: str, argv: list[str], capfd) -> tuple[int, str]:
    """Runs a script the way its command line does; returns (exit status, what it printed on stderr)."""
    capfd.readouterr()
    try:
        run_main(SCRIPTS[script].main, script, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capfd.readouterr().err


def error_line(stderr: str, script: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{script}: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def stage1_args(data, out, tiny_clip_dir, *extra):
    return [
        "--model_name_or_path", tiny_clip_dir, "--train_file", data["train"], "--image_root", data["root"],
        "--class_names", data["classes"], "--text_corpus", data["corpus"], "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "4", *FAST, *extra,
    ]  # fmt: skip


def replace_line(path: str, lineno: int, text: str) -> None:
    lines = open(path).read().splitlines()
    lines[lineno - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


def assert_stopped_before_training(out) -> None:
    assert not out.exists() or not any(p.name.startswith("checkpoint") or p.name == "model.safetensors"
                                       for p in out.iterdir())  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_image_names_file_and_line(data, tmp_path, tiny_clip_dir, capfd):
    replace_line(data["train"], 3, "images/nowhere.png 0")
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{data['train']}:3: image not found" in line
    assert_stopped_before_training(tmp_path / "out")


@pytest.mark.parametrize("kind", ["truncated", "not_an_image"])
def test_unreadable_image_names_file_and_line(kind, data, tmp_path, tiny_clip_dir, capfd):
    path = os.path.join(data["root"], open(data["train"]).read().splitlines()[4].split()[0])
    if kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    else:
        open(path, "w").write("this is not a PNG")
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    assert code == 2 and f"{data['train']}:5: cannot read image" in error_line(err, "run_cvlp")
    assert_stopped_before_training(tmp_path / "out")


def test_cmyk_16_bit_and_grayscale_images_are_converted_and_used(data, tmp_path, tiny_clip_dir, capfd):
    rows = open(data["train"]).read().splitlines()
    paths = [os.path.join(data["root"], rows[i].split()[0]) for i in range(3)]
    Image.open(paths[0]).convert("CMYK").save(paths[0].replace(".png", ".jpg"))
    Image.fromarray(np.asarray(Image.open(paths[1]).convert("L"), dtype=np.uint16) * 257).save(paths[1])
    Image.open(paths[2]).convert("L").save(paths[2])
    rows[0] = rows[0].replace(".png", ".jpg")
    open(data["train"], "w").write("\n".join(rows) + "\n")
    assert Image.open(paths[0].replace(".png", ".jpg")).mode == "CMYK"
    assert Image.open(paths[1]).mode.startswith("I")
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir, "--sampling", "instance"), capfd)
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Labels and splits
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, message",
    [
        ("9", "label 9 is outside the class list (0..3)"),
        ("-1", "negative label -1"),
        ("two", "label 'two' is not an integer"),
    ],
)
def test_bad_labels_name_file_and_line(label, message, data, tmp_path, tiny_clip_dir, capfd):
    path = open(data["train"]).read().splitlines()[6].split()[0]
    replace_line(data["train"], 7, f"{path} {label}")
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{data['train']}:7:" in line and message in line


def test_empty_split_and_single_class_split(data, tmp_path, tiny_clip_dir, capfd):
    open(data["train"], "w").write("\n\n")
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "a", tiny_clip_dir), capfd)
    assert code == 2 and "the split is empty" in error_line(err, "run_cvlp")
    one_class = [r for r in open(data["val"]).read().splitlines() if r.endswith(" 0")]
    open(data["train"], "w").write("\n".join(one_class) + "\n")
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "b", tiny_clip_dir), capfd)
    assert code == 2 and "holds images of 1 class(es) only" in error_line(err, "run_cvlp")


# ----------------------------------------------------------------------------------------------------------------------
# The text corpus
# ----------------------------------------------------------------------------------------------------------------------


def test_class_without_sentences_is_named(data, tmp_path, tiny_clip_dir, capfd):
    corpus = json.load(open(data["corpus"]))
    del corpus[CLASS_NAMES[2]]
    json.dump(corpus, open(data["corpus"], "w"))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"2 ('{CLASS_NAMES[2]}')" in line and "--text_corpus templates" in line
    # asked for explicitly, the templates alone are fine
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "t", tiny_clip_dir, "--text_corpus", "templates"), capfd)
    assert code == 0, err[-2000:]


def test_corpus_naming_an_unknown_class(data, tmp_path, tiny_clip_dir, capfd):
    corpus = json.load(open(data["corpus"]))
    corpus["purple triangle"] = ["A purple triangle."]
    json.dump(corpus, open(data["corpus"], "w"))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "'purple triangle'" in line and data["corpus"] in line


def test_corpus_that_is_not_utf8(data, tmp_path, tiny_clip_dir, capfd):
    open(data["corpus"], "wb").write('{"red square": ["caf\xe9"]}'.encode("latin-1"))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and data["corpus"] in line and "not valid UTF-8" in line


def test_long_empty_and_duplicate_sentences(data, tmp_path, tiny_clip_dir, capfd, caplog):
    corpus = json.load(open(data["corpus"]))
    corpus[CLASS_NAMES[0]] += ["a " + "very " * 60 + "long sentence.", "", "   ", corpus[CLASS_NAMES[0]][0]]
    corpus[CLASS_NAMES[1]] += [corpus[CLASS_NAMES[1]][1]]
    json.dump(corpus, open(data["corpus"], "w"))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    assert code == 0, err[-2000:]
    assert "dropped 2 empty sentence(s) and removed 0 duplicate(s)" in caplog.text  # duplicates kept, as the reference
    assert "1 sentence(s) longer than 77 tokens were truncated" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def anchor_checkpoint(tmp_path):
    model = make_classifier(num_labels=4, num_anchors=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.config.label2id = {n: i for i, n in enumerate(CLASS_NAMES)}
    model.save_pretrained(tmp_path / "anchors")
    eval_image_processor(32).save_pretrained(tmp_path / "anchors")
    return tmp_path / "anchors"


def test_checkpoint_classes_differ_from_the_data(data, anchor_checkpoint, tmp_path, capfd):
    names = list(CLASS_NAMES)
    names[2] = "green ring"
    open(data["classes"], "w").write("\n".join(names) + "\n")
    argv = ["--model_name_or_path", str(anchor_checkpoint), "--train_file", data["train"], "--image_root",
            data["root"], "--class_names", data["classes"], "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            *FAST]  # fmt: skip
    code, err = run("run_lgr", argv, capfd)
    line = error_line(err, "run_lgr")
    assert code == 2 and f"label 2 is '{CLASS_NAMES[2]}' in the checkpoint but 'green ring' in the data" in line
    open(data["classes"], "w").write("\n".join(CLASS_NAMES[:3]) + "\n")
    code, err = run("run_lgr", argv[: -len(FAST) - 4] + ["--output_dir", str(tmp_path / "o2"), *FAST], capfd)
    assert code == 2 and "The checkpoint has 4 classes but the data has 3" in error_line(err, "run_lgr")


def test_anchors_with_nan_or_wrong_shape_stop_at_load(anchor_checkpoint, data, tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    weights = load_file(anchor_checkpoint / "model.safetensors")
    nan = dict(weights)
    nan["anchor_text_embeds"] = nan["anchor_text_embeds"].clone()
    nan["anchor_text_embeds"][1, 0, 3] = float("nan")
    save_file(nan, anchor_checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="anchor_text_embeds in .* hold NaN or inf for 1 class"):
        VLLTRForImageClassification.from_pretrained(anchor_checkpoint)
    argv = ["--model_name_or_path", str(anchor_checkpoint), "--test_file", data["test"], "--train_file",
            data["train"], "--image_root", data["root"], "--output_dir", str(tmp_path / "eval"), *FAST]  # fmt: skip
    code, err = run("run_eval", argv, capfd)
    assert code == 2 and "anchor_text_embeds" in error_line(err, "run_eval") and "NaN" in err
    wrong = dict(weights)
    wrong["anchor_text_embeds"] = torch.randn(4, 2, 16)
    save_file(wrong, anchor_checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"anchor_text_embeds .* has shape \(4, 2, 16\).*\(4, 3, 16\)"):
        VLLTRForImageClassification.from_pretrained(anchor_checkpoint)


def test_checkpoint_without_anchors_is_refused_by_stage2(tiny_clip_dir, data, tmp_path, capfd):
    argv = ["--model_name_or_path", tiny_clip_dir, "--train_file", data["train"], "--image_root", data["root"],
            "--class_names", data["classes"], "--output_dir", str(tmp_path / "out"), *FAST]  # fmt: skip
    code, err = run("run_lgr", argv, capfd)
    assert code == 2 and "has no anchor sentences: run python -m training.run_select_anchors" in error_line(
        err, "run_lgr"
    )


def test_not_a_clip_checkpoint(data, tmp_path, capfd):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", str(folder)), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "holds a 'bert' config" in line and str(folder) in line
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out2", str(tmp_path / "nothing")), capfd)
    assert code == 2 and "--model_name_or_path" in error_line(err, "run_cvlp")


# ----------------------------------------------------------------------------------------------------------------------
# Training and outputs
# ----------------------------------------------------------------------------------------------------------------------


def test_diverging_run_stops_with_the_step_and_keeps_good_checkpoints(data, tmp_path, tiny_clip_dir, capfd):
    out = tmp_path / "out"
    argv = stage1_args(data, out, tiny_clip_dir, "--learning_rate", "1000", "--warmup_steps", "0", "--save_strategy",
                       "steps", "--save_steps", "1", "--save_total_limit", "5")  # fmt: skip
    argv[argv.index("--max_steps") + 1] = "8"
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and re.search(r"(loss is nan|NaN or infinite) at step \d+", line), line
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints, "the checkpoints written before the divergence are kept"
    from safetensors.torch import load_file

    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values()), checkpoint
    assert not (out / "model.safetensors").exists()


def test_full_disk_while_saving_stops_with_one_line_and_keeps_the_earlier_checkpoint(
    data, tmp_path, tiny_clip_dir, capfd, monkeypatch
):
    import transformers.modeling_utils as modeling_utils

    real_save, calls = modeling_utils.safe_save_file, []

    def save_until_the_disk_is_full(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_until_the_disk_is_full)
    out = tmp_path / "out"
    argv = stage1_args(data, out, tiny_clip_dir, "--save_strategy", "steps", "--save_steps", "1")
    argv[argv.index("--max_steps") + 1] = "3"
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "checkpoint-2 failed" in line and "No space left on device" in line
    monkeypatch.undo()
    from training.cli import last_complete_checkpoint

    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    code, err = run("run_cvlp", argv + ["--resume_from_checkpoint", "last"], capfd)
    assert code == 0, err[-2000:]


def test_output_folder_of_another_run_is_refused(data, tmp_path, tiny_clip_dir, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("someone's results")
    code, err = run("run_cvlp", stage1_args(data, out, tiny_clip_dir), capfd)
    assert code == 2 and "already holds a run" in error_line(err, "run_cvlp")
    assert (out / "results.txt").read_text() == "someone's results" and len(list(out.iterdir())) == 1
    code, err = run("run_cvlp", stage1_args(data, out, tiny_clip_dir, "--overwrite_output_dir", "True"), capfd)
    assert code == 0, err[-2000:]


def test_half_written_checkpoint_is_not_resumed_from(data, tmp_path, tiny_clip_dir, capfd, caplog):
    out = tmp_path / "out"
    argv = stage1_args(data, out, tiny_clip_dir, "--save_strategy", "steps", "--save_steps", "1")
    argv[argv.index("--max_steps") + 1] = "2"
    assert run("run_cvlp", argv, capfd)[0] == 0
    # a later checkpoint cut short by a kill: weights written, trainer state not
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    argv[argv.index("--max_steps") + 1] = "3"
    code, err = run("run_cvlp", argv + ["--resume_from_checkpoint", "last"], capfd)
    assert code == 0, err[-2000:]
    assert "checkpoint-3 is incomplete" in caplog.text and f"Resuming from {out / 'checkpoint-2'}" in caplog.text
    code, err = run("run_cvlp", argv + ["--resume_from_checkpoint", str(out / "checkpoint-9")], capfd)
    assert code == 2


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    from training import io_utils

    target = tmp_path / "metrics.json"
    io_utils.atomic_write_json(target, {"top1": 0.5})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(io_utils.json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        io_utils.atomic_write_json(target, {"top1": 0.9})
    monkeypatch.undo()
    real_replace = os.replace
    monkeypatch.setattr(io_utils.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io_utils.atomic_write_text(tmp_path / "README.md", "x" * 10_000)
    monkeypatch.setattr(io_utils.os, "replace", real_replace)
    assert json.loads(target.read_text()) == {"top1": 0.5}
    assert not (tmp_path / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"], "no temporary file is left behind"


def test_written_reports_go_through_atomic_writes():
    """Every JSON, report and card the scripts write goes through training.io_utils (write to a temporary name in
    the same folder, then rename)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "training"
    offenders = []
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("write_text", "dump"):
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open" and len(node.args) > 1:
                mode = node.args[1]
                if isinstance(mode, ast.Constant) and "w" in str(mode.value) and path.name != "io_utils.py":
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_torch_load_is_always_weights_only():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("training/*.py"), *root.glob("modeling_vlltr/*.py"), *root.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load":
                if getattr(node.func.value, "id", "") == "torch":
                    keywords = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in keywords and getattr(keywords["weights_only"], "value", None) is True, (
                        f"{path}:{node.lineno}"
                    )


def test_remote_code_does_no_io_at_import(tmp_path):
    """The two files shipped as remote code open no file and no socket when imported."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "modeling_vlltr"
    script = textwrap.dedent(
        f"""
        import builtins, io, socket, sys, importlib.util, os
        import torch, transformers  # their own imports may read files; ours may not
        from transformers import CLIPModel, PreTrainedModel, CLIPConfig
        def forbidden(*args, **kwargs):
            raise AssertionError(f"I/O at import: {{args[:1]}}")
        builtins.open = io.open = os.open = forbidden
        socket.socket = forbidden
        sys.path.insert(0, {str(package.parent)!r})
        import modeling_vlltr.configuration_vlltr, modeling_vlltr.modeling_vlltr
        print("NO-IO")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "NO-IO" in result.stdout, result.stderr[-2000:]


def test_pipeline_memory_stays_flat_over_2000_images(tiny_classifier, tmp_path):
    import gc

    import psutil
    from transformers import pipeline

    tiny_classifier.save_pretrained(tmp_path)
    eval_image_processor(32).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(100)]
    process = psutil.Process()

    def classify(n: int) -> int:
        for _ in range(0, n, len(images)):
            classifier(images, batch_size=50, top_k=2)
        gc.collect()
        return process.memory_info().rss

    classify(500)  # warm-up
    after_warmup = classify(500)
    after_2000 = classify(2000)
    growth_mb = (after_2000 - after_warmup) / 2**20
    assert growth_mb < 20, f"RSS grew by {growth_mb:.1f} MB over 2,000 images after warm-up"


@pytest.mark.parametrize("given", ["{tmp}/no_such_run/stage1", "./no_such_folder", "../elsewhere/stage1"])
def test_a_missing_local_checkpoint_folder_is_named_as_such(given, data, tmp_path, capfd, monkeypatch):
    """A path no Hub id can be is reported as a missing folder, not with the Hub's repo-id rules."""
    monkeypatch.chdir(tmp_path)
    path = given.format(tmp=tmp_path)
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", path), capfd)
    line = error_line(err, "run_cvlp")
    assert code != 0 and f"--model_name_or_path {path}: no such folder" in line, line
    assert "Repo id" not in err and "Traceback" not in err
