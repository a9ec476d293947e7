"""Reliability, second pass, through the real entry points: text files as editors and spreadsheets write them (BOM,
CRLF, trailing spaces), class-list integrity, output and checkpoint faults, interrupted runs and two runs on one
folder. Each fault stops with one line naming the file and line, the class or the path; odd but valid input works."""

import json

import pytest
import torch
from conftest import CLASS_NAMES, write_lt_dataset
from test_bad_input import FAST, assert_stopped_before_training, error_line, run, stage1_args

from training.corpus import build_class_corpus
from training.io_utils import check_class_names, read_user_text
from training.splits import read_class_names, read_image_list


@pytest.fixture
def data(tmp_path):
    return write_lt_dataset(tmp_path / "data")


def rewrite(path, transform) -> None:
    """Rewrites a text file through `transform(str) -> str`, as raw bytes (no newline translation)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(transform(text).encode("utf-8"))


def as_spreadsheet_saves_it(text: str) -> str:
    """A byte-order mark, CRLF line ends, trailing spaces and tabs, and blank lines at the end."""
    return "\ufeff" + "".join(line + " \t\r\n" for line in text.splitlines()) + "\r\n \r\n"


# ----------------------------------------------------------------------------------------------------------------------
# Text files: BOM, CRLF, trailing spaces, blank lines; undecodable bytes named by file and line
# ----------------------------------------------------------------------------------------------------------------------


def test_reader_bom_crlf_and_undecodable_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_user_text(path) == "one\ntwo\nthree\n"
    path.write_bytes(b"\xef\xbb\xbfok\r\nfine\r\ncaf\xe9\r\n")
    with pytest.raises(ValueError, match=r"a\.txt:3: not valid UTF-8 text \(byte 0xe9 at column 4\)"):
        read_user_text(path, "class-name file")
    path.write_bytes("a\nb\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"a\.txt: the file is UTF-16 text; save it as UTF-8"):
        read_user_text(path)
    with pytest.raises(ValueError, match=r"is a folder, not a split file"):
        read_user_text(tmp_path, "split file")


def test_every_user_text_file_as_a_spreadsheet_saves_it(data, tmp_path, tiny_clip_dir, capfd):
    """Split list, class names and JSON corpus with a BOM, CRLF, trailing spaces and trailing blank lines; a JSON
    argument file likewise: the run reads the same classes and images as from the clean files."""
    assert read_class_names(data["classes"]) == CLASS_NAMES
    clean = read_image_list(data["train"], data["root"])
    for key in ("train", "val", "classes", "corpus"):
        rewrite(data[key], as_spreadsheet_saves_it)
    assert open(data["classes"], "rb").read().startswith(b"\xef\xbb\xbf")
    assert read_class_names(data["classes"]) == CLASS_NAMES
    assert [(s.path, s.label) for s in read_image_list(data["train"], data["root"])] == [
        (s.path, s.label) for s in clean
    ]
    arguments = tmp_path / "args.json"
    arguments.write_bytes(("\ufeff" + json.dumps({"max_steps": 1, "_comment": "x"}, indent=1)).replace(
        "\n", "\r\n").encode("utf-8"))  # fmt: skip
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir, "--eval_file", data["val"])
    argv.remove("--max_steps"), argv.remove("1")
    code, err = run("run_cvlp", [str(arguments), *argv], capfd)
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_official_description_pages_with_bom_and_crlf(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    for i, name in enumerate(["cat", "dog"]):
        text = f"\ufeff{name.title()} is an animal.\r\nIt has four legs.\r\n== References ==\r\nA book.\r\n"
        (folder / f"desc_{i}.txt").write_bytes(text.encode("utf-8"))
    corpus = build_class_corpus(["cat", "dog"], tmp_path, use_templates=False)
    assert corpus.class_sentences(0) == ["Cat is an animal.", "It has four legs."]
    assert corpus.class_sentences(1) == ["Dog is an animal.", "It has four legs."]


@pytest.mark.parametrize("key", ["classes", "train", "corpus"])
def test_non_utf8_file_is_named_with_its_line(key, data, tmp_path, tiny_clip_dir, capfd):
    json.dump(json.load(open(data["corpus"])), open(data["corpus"], "w"), indent=1)
    with open(data[key], "rb") as f:
        lines = f.read().split(b"\n")
    lines[1] = lines[1].replace(b"e", b"\xe9", 1)
    with open(data[key], "wb") as f:
        f.write(b"\n".join(lines))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{data[key]}:2: not valid UTF-8" in line, line
    assert_stopped_before_training(tmp_path / "out")


def test_split_file_with_tabs_and_a_path_with_spaces(data, tmp_path, tiny_clip_dir, capfd):
    import os
    import shutil

    rows = open(data["train"]).read().splitlines()
    old = rows[0].split()[0]
    new = "my images/first image.png"
    os.makedirs(os.path.join(data["root"], "my images"))
    shutil.move(os.path.join(data["root"], old), os.path.join(data["root"], new))
    rows[0] = f"{new}\t0"
    rows[1] = rows[1].replace(" ", "\t")
    open(data["train"], "w").write("\n".join(rows) + "\n")
    samples = read_image_list(data["train"], data["root"])
    assert samples[0].path == os.path.join(data["root"], new) and samples[1].label == int(rows[1].split()[-1])
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out with spaces", tiny_clip_dir), capfd)
    assert code == 0, err[-2000:]


# ----------------------------------------------------------------------------------------------------------------------
# The class list
# ----------------------------------------------------------------------------------------------------------------------


def test_check_class_names():
    check_class_names(["a b", "a  c", "A_D"], "classes.txt")
    with pytest.raises(ValueError, match=r"classes\.txt:4: class name 'Red_Square ' repeats the name of label 0"):
        check_class_names(["red square", "b", "c", "Red_Square "], "classes.txt")
    with pytest.raises(ValueError, match=r"cats\.json: label 1: empty class name"):
        check_class_names(["a", " "], "cats.json", first_line=None)
    with pytest.raises(ValueError, match=r"x: no class names"):
        check_class_names([], "x")


@pytest.mark.parametrize(
    "lines, message",
    [
        (["red square", "green bar", "blue ring", "Red_Square"], ":4: class name 'Red Square' repeats the name of label 0"),
        (["red square", "green bar", "blue ring", "green bar"], ":4: class name 'green bar' repeats the name of label 1"),
        (["red square", "", "blue ring", "yellow dot"], ":2: empty class name"),
        ([], ": no class names"),
    ],
)  # fmt: skip
def test_class_list_faults_stop_before_any_work(lines, message, data, tmp_path, tiny_clip_dir, capfd):
    open(data["classes"], "w").write("".join(line + "\n" for line in lines))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{data['classes']}{message}" in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corpus_keys_colliding_after_normalisation(data, tmp_path, tiny_clip_dir, capfd):
    corpus = json.load(open(data["corpus"]))
    corpus["Green_Bar "] = ["Another green bar."]
    json.dump(corpus, open(data["corpus"], "w"))
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and data["corpus"] in line and "'green bar' and 'Green_Bar ' both name class 'green bar'" in line
    # a key that differs from its class only in case or spacing names that class
    del corpus["green bar"]
    json.dump(corpus, open(data["corpus"], "w"))
    built = build_class_corpus(CLASS_NAMES, data["corpus"], use_templates=False)
    assert built.class_sentences(1) == ["Another green bar."]


def test_inaturalist_categories_with_a_repeated_name(data, tmp_path, tiny_clip_dir, capfd):
    rows = [line.split() for line in open(data["train"]).read().splitlines()]
    split = {
        "images": [{"id": i, "file_name": path} for i, (path, _) in enumerate(rows)],
        "annotations": [{"image_id": i, "category_id": int(label)} for i, (_, label) in enumerate(rows)],
        "categories": [{"id": i, "name": name} for i, name in enumerate(["a", "b", "c", "B"])],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(split))
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir, "--text_corpus", "templates")
    argv[argv.index("--train_file") + 1] = str(path)
    i = argv.index("--class_names")
    del argv[i : i + 2]
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{path}: label 3: class name 'B' repeats the name of label 1" in line, line


# ----------------------------------------------------------------------------------------------------------------------
# JSON argument files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"learning_rate": "fast"}', "--learning-rate: invalid float value: 'fast' (see --help) (arguments from"),
        ('["--max_steps", 1]', "expected a JSON object of argument names and values, got a list"),
        ('{"max_steps": 1,\n "seed": }', ":2: not valid JSON"),
        ('{"no_such_flag": 1}', "no_such_flag"),
    ],
)
def test_json_argument_file_faults(content, message, data, tmp_path, tiny_clip_dir, capfd):
    arguments = tmp_path / "args.json"
    arguments.write_text(content)
    code, err = run("run_cvlp", [str(arguments), *stage1_args(data, tmp_path / "out", tiny_clip_dir)], capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and message in line and "usage:" not in err, err[-3000:]


# ----------------------------------------------------------------------------------------------------------------------
# Where outputs go
# ----------------------------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_lies_under_one(data, tmp_path, tiny_clip_dir, capfd):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    code, err = run("run_cvlp", stage1_args(data, existing, tiny_clip_dir), capfd)
    assert code == 2 and f"--output_dir {existing} is a file, not a folder" in error_line(err, "run_cvlp")
    code, err = run("run_cvlp", stage1_args(data, existing / "out", tiny_clip_dir), capfd)
    assert code == 2 and f"{existing} is a file, not a folder" in error_line(err, "run_cvlp")
    assert existing.read_text() == "keep me"


def test_output_dir_that_cannot_be_written(data, tmp_path, tiny_clip_dir, capfd, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # what a read-only mount answers (we may be root)
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"--output_dir {tmp_path / 'out'}: cannot write there (Read-only file system)" in line


def test_full_disk_at_the_final_save_and_in_the_history(data, tmp_path, tiny_clip_dir, capfd, monkeypatch):
    import errno

    import transformers.modeling_utils as modeling_utils

    from training import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    argv = stage1_args(data, out, tiny_clip_dir, "--save_strategy", "steps", "--save_steps", "1")
    real = modeling_utils.safe_save_file

    def save_checkpoints_only(tensors, filename, *args, **kwargs):
        return real(tensors, filename, *args, **kwargs) if "checkpoint-" in str(filename) else full()

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_checkpoints_only)
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"Saving the model in {out} failed (No space left on device)" in line, line
    assert (out / "checkpoint-1" / "model.safetensors").is_file()
    monkeypatch.undo()

    def history_on_a_full_disk(folder, history):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "training_history.json"))

    monkeypatch.setattr(cli, "write_history", history_on_a_full_disk)
    code, err = run("run_cvlp", argv + ["--overwrite_output_dir", "True"], capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{out / 'training_history.json'}: No space left on device" in line, line
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# Damaged checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------


def _damage(folder, fault: str) -> str:
    """Damages a copy of a checkpoint folder the way an interrupted copy or download does; returns the file."""
    name = {"cut_weights": "model.safetensors", "no_weights": "model.safetensors", "cut_config": "config.json",
            "no_config": "config.json", "cut_tokenizer": "tokenizer.json"}[fault]  # fmt: skip
    path = folder / name
    if fault.startswith("no_"):
        path.unlink()
    else:
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) * 2 // 3])
    return str(path)


@pytest.mark.parametrize("fault", ["cut_weights", "no_weights", "cut_config", "no_config", "cut_tokenizer"])
def test_damaged_checkpoint_folder_is_named_before_any_work(fault, data, tmp_path, tiny_clip_dir, capfd):
    import shutil

    folder = tmp_path / "clip copy"
    shutil.copytree(tiny_clip_dir, folder)
    damaged = _damage(folder, fault)
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", str(folder)), capfd)
    line = error_line(err, "run_cvlp")
    named = str(folder) if fault.startswith("no_") else damaged
    assert code == 2 and named in line and ("copy it again" in line or "copy or download it again" in line), line
    assert "Traceback" not in err
    assert_stopped_before_training(tmp_path / "out")


def test_from_pretrained_names_a_cut_short_weights_file(tmp_path, tiny_clip_dir):
    from conftest import make_classifier
    from safetensors.torch import save_file

    from modeling_vlltr import VLLTRForImageClassification, VLLTRModel
    from training.io_utils import safetensors_fault

    make_classifier(num_labels=4, num_anchors=3).save_pretrained(tmp_path / "classifier")
    for cls, folder in [(VLLTRModel, tmp_path / "clip"), (VLLTRForImageClassification, tmp_path / "classifier")]:
        if cls is VLLTRModel:
            import shutil

            shutil.copytree(tiny_clip_dir, folder)
        weights = folder / "model.safetensors"
        assert safetensors_fault(weights) is None
        raw = weights.read_bytes()
        weights.write_bytes(raw[:-100])
        assert safetensors_fault(weights) == f"is cut short ({len(raw) - 100:,} of {len(raw):,} bytes)"
        with pytest.raises(OSError, match=rf"{weights}: cannot read the weights .* copy or download it again"):
            cls.from_pretrained(folder)
    save_file({"x": __import__("torch").zeros(2)}, tmp_path / "ok.safetensors")
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:5])
    assert safetensors_fault(tmp_path / "short.safetensors") == "is cut short (5 bytes, not even a header)"


def test_damaged_stage2_checkpoint_in_run_eval_and_run_lgr(data, tmp_path, capfd):
    from conftest import make_classifier

    from training.data import eval_image_processor

    folder = tmp_path / "anchors"
    model = make_classifier(num_labels=4, num_anchors=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.save_pretrained(folder)
    eval_image_processor(32).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"crop_size": ')
    argv = ["--model_name_or_path", str(folder), "--test_file", data["test"], "--image_root", data["root"],
            "--output_dir", str(tmp_path / "eval"), *FAST]  # fmt: skip
    code, err = run("run_eval", argv, capfd)
    assert code == 2 and f"{folder / 'preprocessor_config.json'}:1: not valid JSON" in error_line(err, "run_eval")
    eval_image_processor(32).save_pretrained(folder)
    damaged = _damage(folder, "cut_weights")
    argv = ["--model_name_or_path", str(folder), "--train_file", data["train"], "--image_root", data["root"],
            "--output_dir", str(tmp_path / "lgr"), *FAST]  # fmt: skip
    code, err = run("run_lgr", argv, capfd)
    assert code == 2 and f"{damaged} is cut short" in error_line(err, "run_lgr")


# ----------------------------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM during training, and two runs on one output folder
# ----------------------------------------------------------------------------------------------------------------------


def _signal_after_checkpoint(command, out, env, signum, step: int = 4):
    """Starts the run, sends `signum` once checkpoint-`step` is written, and returns (exit status, stderr)."""
    import subprocess
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.time() + 240
    while not state.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(f"no checkpoint-{step} appeared: {process.stderr.read()[-2000:]}")
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def test_ctrl_c_stops_after_the_step_and_resume_matches_uninterrupted(tmp_path, tiny_clip_dir):
    """Ctrl-C sent to a real `python -m training.run_cvlp` process."""
    signame = "SIGINT"
    import re
    import signal
    import subprocess

    from test_resume import TRAIN_COUNTS, _check_same, _command, _env, _final_weights

    data = write_lt_dataset(tmp_path / "data", train_counts=TRAIN_COUNTS)
    env = _env(tmp_path)

    def command(out):
        return _command("training.run_cvlp", ["--model_name_or_path", tiny_clip_dir, "--train_file", data["train"],
                        "--image_root", data["root"], "--class_names", data["classes"], "--text_corpus",
                        data["corpus"], "--output_dir", str(out), "--learning_rate", "1e-3"]) + ["--max_steps", "12"]  # fmt: skip

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    background = subprocess.Popen(command(straight), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    signum = getattr(signal, signame)
    code, err = _signal_after_checkpoint(command(stopped), stopped, env, signum)
    lines = [line for line in err.splitlines() if line.startswith("run_cvlp:")]
    assert code == 128 + signum and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    match = re.fullmatch(rf"run_cvlp: stopped by {signame} after step (\d+); checkpoint-\1 is saved in {stopped}: run "
                         r"the same command with --resume_from_checkpoint last to continue\.", lines[0])  # fmt: skip
    assert match, lines[0]
    step = int(match.group(1))
    assert 4 <= step < 12 and not (stopped / "model.safetensors").exists()
    from training.cli import checkpoint_is_complete

    assert checkpoint_is_complete(stopped / f"checkpoint-{step}")
    resumed = subprocess.run(command(stopped) + ["--resume_from_checkpoint", "last"], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {stopped / f'checkpoint-{step}'}" in resumed.stderr
    assert background.wait(timeout=300) == 0, background.stderr.read().decode()[-3000:]
    _check_same(_final_weights(stopped), _final_weights(straight))


def test_sigterm_in_process_stops_saves_and_resumes_to_the_same_weights(data, tmp_path, tiny_clip_dir, capfd):
    """SIGTERM (a scheduler's pre-emption) while a stage-1 run trains in this process."""
    import os
    import signal
    import threading
    import time

    from safetensors.torch import load_file

    def argv(out):
        return stage1_args(data, out, tiny_clip_dir, "--save_strategy", "steps", "--save_steps", "2",
                           "--learning_rate", "1e-3", "--max_steps", "8", "--per_device_train_batch_size", "4")  # fmt: skip

    assert run("run_cvlp", argv(tmp_path / "straight"), capfd)[0] == 0
    out = tmp_path / "stopped"

    def terminate_after_the_first_checkpoint():
        deadline = time.time() + 120
        while not (out / "checkpoint-2" / "trainer_state.json").exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_after_the_first_checkpoint)
    sender.start()
    code, err = run("run_cvlp", argv(out), capfd)
    sender.join()
    assert code == 128 + signal.SIGTERM and "run_cvlp: stopped by SIGTERM after step" in err, err[-2000:]
    assert not (out / "model.safetensors").exists()
    assert run("run_cvlp", argv(out) + ["--resume_from_checkpoint", "last"], capfd)[0] == 0
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_signal_handlers_are_restored_after_training(data, tmp_path, tiny_clip_dir, capfd):
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)[0] == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_run_on_a_held_output_folder_is_refused(data, tmp_path, tiny_clip_dir, capfd):
    import subprocess
    import sys

    from training.cli import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    # another run's lock, taken the way lock_output_dir takes it (flock on the lock file, holding its process id)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(f'{os.getpid()}\\n'); f.flush(); "
         "print('held', flush=True); time.sleep(120)", str(out / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run("run_cvlp", stage1_args(data, out, tiny_clip_dir, "--overwrite_output_dir", "True"), capfd)
        line = error_line(err, "run_cvlp")
        assert code == 2 and f"--output_dir {out} is in use by another run (process {holder.pid})" in line, line
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, its lock does not
        holder.wait()
    assert (out / LOCK_FILE).exists()
    code, err = run("run_cvlp", stage1_args(data, out, tiny_clip_dir), capfd)
    assert code == 0, err[-2000:]
    assert not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------------------------------
# More unusual input, found by trying it
# ----------------------------------------------------------------------------------------------------------------------


def test_a_key_written_twice_in_a_json_file_is_named(data, tmp_path, tiny_clip_dir, capfd):
    """JSON keeps the last of two equal keys silently, which would drop the first one's sentences or setting."""
    text = open(data["corpus"]).read()
    open(data["corpus"], "w").write(text[:-1] + ', "blue ring": ["Again."]}')
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{data['corpus']}: the key 'blue ring' appears twice in one JSON object" in line, line
    arguments = tmp_path / "args.json"
    arguments.write_text('{"max_steps": 1, "seed": 1, "max_steps": 2}')
    code, err = run("run_cvlp", [str(arguments), *stage1_args(data, tmp_path / "out2", tiny_clip_dir)], capfd)
    assert code == 2 and f"{arguments}: the key 'max_steps' appears twice" in error_line(err, "run_cvlp")


def test_model_path_that_is_a_file_and_output_dir_that_is_a_looping_link(data, tmp_path, tiny_clip_dir, capfd):
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", data["train"]), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"--model_name_or_path {data['train']} is a file: pass the checkpoint folder" in line
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, err = run("run_cvlp", stage1_args(data, loop, tiny_clip_dir), capfd)
    assert code == 2 and f"--output_dir {loop} is a broken or looping symbolic link" in error_line(err, "run_cvlp")


def test_image_behind_a_symlink_loop_is_named_with_its_line(data, tmp_path, tiny_clip_dir, capfd):
    import os

    os.symlink("loop", os.path.join(data["root"], "images", "loop"))
    open(data["train"], "a").write("images/loop/x.png 0\n")
    rows = len(open(data["train"]).read().splitlines())
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", tiny_clip_dir), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"{data['train']}:{rows}: cannot read image" in line and "symbolic links" in line, line


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("run_cvlp", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0."),
        ("run_cvlp", ["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan."),
        ("run_cvlp", ["--learning_rate=-1e-3"], "--learning_rate must be >= 0, got -0.001."),
        ("run_cvlp", ["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number, got inf."),
        ("run_select_anchors", ["--num_anchor_sentences", "0"], "--num_anchor_sentences must be >= 1, got 0."),
        ("run_cvlp", ["--seed=-1"], "--seed must lie in [0, 2**32 - 1] (NumPy's seed range), got -1."),
    ],
)
def test_numeric_flags_out_of_range_are_named(script, flags, message, data, tmp_path, tiny_clip_dir, capfd):
    """A batch of 0 failed inside the DataLoader, M = 0 inside the anchor selection and a NaN learning rate inside
    the optimizer, each with a traceback; a negative learning rate trained uphill without a word."""
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir, *flags)
    if script == "run_select_anchors":
        argv[argv.index("--train_file")] = "--selection_file"
    code, err = run(script, argv, capfd)
    assert code == 2 and message in error_line(err, script), err[-2000:]
    assert_stopped_before_training(tmp_path / "out")


def test_a_batch_larger_than_the_training_split(data, tmp_path, tiny_clip_dir, capfd):
    """With the last incomplete batch dropped (the reference), no step would run: the Trainer failed on an
    unrelated message about max_steps."""
    images = len(open(data["train"]).read().splitlines())
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir, "--per_device_train_batch_size", "512")
    argv.remove("--max_steps"), argv.remove("1")
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"The training split has {images} images, fewer than one batch of 512" in line, line
    assert "--dataloader_drop_last False" in line
    assert_stopped_before_training(tmp_path / "out")
    code, err = run("run_cvlp", [*argv, "--dataloader_drop_last", "False", "--overwrite_output_dir"], capfd)
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_more_anchors_than_any_class_has_sentences(data, tmp_path, tiny_clip_dir, capfd, caplog):
    """M far beyond the fullest class allocated C × M anchor rows (400 GB for M = 100000): M is lowered to the most
    sentences a class has (its descriptions and the prompt templates), which gives the same head, since the slots
    past a class's sentences are masked out."""
    from modeling_vlltr import VLLTRForImageClassification

    def select(m):
        argv = stage1_args(data, tmp_path / f"m{m}", tiny_clip_dir, "--num_anchor_sentences", str(m))
        argv[argv.index("--train_file")] = "--selection_file"
        code, err = run("run_select_anchors", argv, capfd)
        assert code == 0, err[-2000:]
        return VLLTRForImageClassification.from_pretrained(tmp_path / f"m{m}")

    huge = select(100_000)
    most = huge.config.num_anchor_sentences
    assert most < 100_000 and bool(huge.anchor_mask[:, -1].any())  # the fullest class fills every slot
    assert f"--num_anchor_sentences 100000 is more than any class has sentences (at most {most})" in caplog.text
    exact = select(most)
    assert torch.equal(exact.anchor_mask, huge.anchor_mask)
    assert torch.equal(exact.anchor_text_embeds, huge.anchor_text_embeds)


def test_run_eval_on_a_checkpoint_without_anchors(data, tmp_path, tiny_clip_dir, capfd):
    """A stage-1 checkpoint (class names, no anchors) handed to run_eval failed in the forward pass."""
    from modeling_vlltr import VLLTRConfig, VLLTRForImageClassification

    config = VLLTRConfig.from_pretrained(tiny_clip_dir, id2label=dict(enumerate(CLASS_NAMES)))
    VLLTRForImageClassification(config).save_pretrained(tmp_path / "stage1")
    argv = ["--model_name_or_path", str(tmp_path / "stage1"), "--test_file", data["test"], "--train_file",
            data["train"], "--image_root", data["root"], "--output_dir", str(tmp_path / "eval"), *FAST]  # fmt: skip
    code, err = run("run_eval", argv, capfd)
    line = error_line(err, "run_eval")
    assert code == 2 and "has no anchor sentences: run python -m training.run_select_anchors" in line, line
    assert "or evaluate it with --knn 5" in line


def test_resume_from_a_saved_model_instead_of_a_checkpoint(data, tmp_path, tiny_clip_dir, capfd):
    """A final model folder (no trainer_state.json) was called 'stopped while saving'; the fix is another flag."""
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir, "--resume_from_checkpoint", tiny_clip_dir)
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "not a Trainer checkpoint (no trainer_state.json)" in line, line
    assert "pass it as --model_name_or_path" in line


def test_image_root_that_is_missing_or_a_file(data, tmp_path, tiny_clip_dir, capfd):
    """Every image of the split was reported missing one by one (or as 'Not a directory'), naming the first line
    instead of the flag at fault."""
    for root, problem in ((tmp_path / "nowhere", "no such folder"), (data["train"], "is a file, not a folder")):
        argv = stage1_args(data, tmp_path / "out", tiny_clip_dir, "--image_root", str(root))
        code, err = run("run_cvlp", argv, capfd)
        line = error_line(err, "run_cvlp")
        assert code == 2 and f"--image_root {root}: {problem}" in line and data["train"] in line, line
        assert_stopped_before_training(tmp_path / "out")


def test_shot_thresholds_the_wrong_way_round_stop_before_predicting(data, tmp_path, capfd):
    from conftest import make_classifier

    model = make_classifier(num_labels=len(CLASS_NAMES), num_anchors=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.save_pretrained(tmp_path / "anchors")
    argv = ["--model_name_or_path", str(tmp_path / "anchors"), "--test_file", data["test"], "--train_file",
            data["train"], "--image_root", data["root"], "--output_dir", str(tmp_path / "eval"),
            "--many_shot_threshold", "5", "--few_shot_threshold", "50", *FAST]  # fmt: skip
    code, err = run("run_eval", argv, capfd)
    line = error_line(err, "run_eval")
    assert code == 2 and "--few_shot_threshold 50 must be <= --many_shot_threshold 5." in line, line
    assert "Evaluating" not in err and not (tmp_path / "eval" / "metrics.json").exists()


def test_output_dir_that_is_the_input_checkpoint_is_refused_even_with_overwrite(data, tmp_path, tiny_clip_dir, capfd):
    """--overwrite_output_dir, which the 'already holds a run' message suggests, replaced the checkpoint the run
    started from."""
    import shutil

    start = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, start)
    before = (start / "model.safetensors").read_bytes()
    for output in (str(start), f"{start}/", str(tmp_path / "link")):
        if output.endswith("link"):
            (tmp_path / "link").symlink_to(start)
        argv = stage1_args(data, output, str(start), "--overwrite_output_dir")
        code, err = run("run_cvlp", argv, capfd)
        line = error_line(err, "run_cvlp")
        assert code == 2 and f"--output_dir {output} is the checkpoint given as --model_name_or_path" in line, line
    assert (start / "model.safetensors").read_bytes() == before
