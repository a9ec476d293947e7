"""Reliability, third pass, through the real entry points: faults met inside DataLoader workers, model folders that
are not what they seem (no tokenizer, a Trainer checkpoint-N, a hand-edited label map), --report_to integrations
that are not installed, classes added under a name that already exists, a full disk at every kind of write (each
writer raising its own exception type), and a Hub that cannot be reached at push time. Each stops with one line
naming the file, class, flag or path, and loses nothing already written."""

import json
import re
import resource
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import CLASS_NAMES, make_classifier, write_lt_dataset
from test_bad_input import assert_stopped_before_training, error_line, run, stage1_args

from training import cli
from training.cli import HubPushError, original_message, push_folder
from training.data import eval_image_processor
from training.io_utils import DataError, WriteError, atomic_write_json, save_pretrained_to, writing


@pytest.fixture
def data(tmp_path):
    return write_lt_dataset(tmp_path / "data")


def _copy_without(folder, tmp_path, *patterns) -> str:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    for pattern in patterns:
        for path in target.glob(pattern):
            path.unlink()
    return str(target)


# ----------------------------------------------------------------------------------------------------------------------
# A fault inside a DataLoader worker reads like the same fault without workers
# ----------------------------------------------------------------------------------------------------------------------


def test_worker_error_is_unwrapped_to_the_original_line():
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("train.txt:5: cannot read image (OSError: image file is truncated)")
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(DataError) as caught:
        wrapper.reraise()
    assert "Original Traceback" in str(caught.value)  # what PyTorch raises in the main process
    assert original_message(caught.value) == "train.txt:5: cannot read image (OSError: image file is truncated)"
    assert original_message(ValueError("plain")) == "plain"


def test_broken_image_met_by_a_worker_is_one_line(data, tmp_path, tiny_clip_dir, capfd):
    """With the up-front check off, a DataLoader worker is the first to meet a file that is not an image."""
    path = Path(data["root"]) / open(data["train"]).read().splitlines()[4].split()[0]
    path.write_bytes(b"<html>not found</html>")  # a download that saved an error page
    lines = {}
    for workers in ("0", "2"):
        argv = stage1_args(data, tmp_path / f"out{workers}", tiny_clip_dir, "--image_check", "none",
                           "--dataloader_num_workers", workers, "--sampling", "instance",
                           "--dataloader_drop_last", "False")  # fmt: skip
        argv[argv.index("--max_steps") + 1] = "6"  # one epoch of the 23 images: every image is read
        code, err = run("run_cvlp", argv, capfd)
        assert code == 2 and "Traceback" not in err and "Caught" not in err, err[-2000:]
        lines[workers] = error_line(err, "run_cvlp")
    assert f"{data['train']}:5: cannot read image" in lines["2"]
    assert lines["2"] == lines["0"]


# ----------------------------------------------------------------------------------------------------------------------
# Model folders that are not what they seem
# ----------------------------------------------------------------------------------------------------------------------


def test_clip_folder_without_tokenizer_files_is_refused_before_training(data, tmp_path, tiny_clip_dir, capfd):
    clip = _copy_without(tiny_clip_dir, tmp_path, "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json")  # fmt: skip
    code, err = run("run_cvlp", stage1_args(data, tmp_path / "out", clip), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"--model_name_or_path {clip}: no tokenizer files" in line, line
    assert_stopped_before_training(tmp_path / "out")


def test_trainer_checkpoint_folder_names_the_output_folder_to_pass(data, tmp_path, tiny_clip_dir, capfd):
    stage1 = tmp_path / "stage1"
    code, err = run("run_cvlp", stage1_args(data, stage1, tiny_clip_dir, "--save_strategy", "steps", "--save_steps",
                                            "1"), capfd)  # fmt: skip
    assert code == 0, err[-2000:]
    checkpoint = stage1 / "checkpoint-1"
    argv = ["--model_name_or_path", str(checkpoint), "--train_file", data["train"], "--image_root", data["root"],
            "--class_names", data["classes"], "--text_corpus", data["corpus"], "--output_dir",
            str(tmp_path / "anchors"), "--num_anchor_sentences", "2", "--use_cpu", "--report_to", "none"]  # fmt: skip
    code, err = run("run_select_anchors", argv, capfd)
    line = error_line(err, "run_select_anchors")
    assert code == 2 and f"{checkpoint} is a Trainer checkpoint-N folder" in line, line
    assert f"pass the run's output folder {stage1} instead" in line
    assert not (tmp_path / "anchors" / "model.safetensors").exists()


@pytest.mark.parametrize("edit", ["from_one", "gap", "not_a_number"])
def test_hand_edited_label_map_names_config_json(edit, data, tmp_path, capfd):
    model = make_classifier(num_labels=4, num_anchors=3)
    model.save_pretrained(tmp_path / "ckpt")
    eval_image_processor(32).save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    names = list(config["id2label"].values())
    keys = {"from_one": ["1", "2", "3", "4"], "gap": ["0", "1", "2", "5"], "not_a_number": ["0", "1", "2", "x"]}[edit]
    config["id2label"] = dict(zip(keys, names))
    config_file.write_text(json.dumps(config))
    argv = ["--model_name_or_path", str(tmp_path / "ckpt"), "--test_file", data["val"], "--image_root", data["root"],
            "--output_dir", str(tmp_path / "eval"), "--use_cpu", "--report_to", "none"]  # fmt: skip
    code, err = run("run_eval", argv, capfd)
    line = error_line(err, "run_eval")
    assert code == 2 and f"{config_file}: id2label" in line and "Traceback" not in err, line


# ----------------------------------------------------------------------------------------------------------------------
# Integrations that are not installed
# ----------------------------------------------------------------------------------------------------------------------


def test_report_to_an_integration_that_is_not_installed(data, tmp_path, tiny_clip_dir, capfd):
    from transformers.integrations import integration_utils

    missing = next((name for name in ("wandb", "mlflow", "comet_ml", "neptune") if not getattr(
        integration_utils, {"comet_ml": "is_comet_available"}.get(name, f"is_{name}_available"))()), None)  # fmt: skip
    if missing is None:
        pytest.skip("every integration tried is installed here")
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir)
    argv[argv.index("--report_to") + 1] = missing
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and f"--report_to {missing}: the {missing} package is not installed" in line, line
    assert "--report_to none" in line and not (tmp_path / "out").exists()
    argv[argv.index("--report_to") + 1] = "no_such_logger"
    code, err = run("run_cvlp", argv, capfd)
    assert code == 2 and "not an integration transformers knows" in error_line(err, "run_cvlp")


def test_report_to_several_integrations_comma_separated_checks_each(data, tmp_path, tiny_clip_dir, capfd):
    from transformers.integrations import integration_utils

    if integration_utils.is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    argv = stage1_args(data, tmp_path / "out", tiny_clip_dir)
    argv[argv.index("--report_to") + 1] = "none,tensorboard"
    code, err = run("run_cvlp", argv, capfd)
    assert code == 2 and "'none' and 'all' stand alone" in error_line(err, "run_cvlp")
    argv[argv.index("--report_to") + 1] = "tensorboard,no_such_logger"  # each name is checked, in order
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "--report_to tensorboard: the tensorboard package is not installed" in line, line


@pytest.mark.parametrize("flag", ["deepspeed", "bnb"])
def test_a_flag_whose_package_is_missing_is_one_line(flag, data, tmp_path, tiny_clip_dir, capfd):
    import importlib.util

    package = {"deepspeed": "deepspeed", "bnb": "bitsandbytes"}[flag]
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    extra = {"deepspeed": ["--deepspeed", json.dumps({"train_batch_size": "auto"})],
             "bnb": ["--optim", "adamw_bnb_8bit"]}[flag]  # fmt: skip
    out = tmp_path / "out"
    code, err = run("run_cvlp", stage1_args(data, out, tiny_clip_dir, *extra), capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "a package this run needs is not installed" in line and package in line, line
    assert "Traceback" not in err
    assert_stopped_before_training(out)


def test_config_edited_to_other_shapes_is_one_line_without_the_load_report(data, tmp_path, capfd):
    model = make_classifier(num_labels=4, num_anchors=3)
    model.save_pretrained(tmp_path / "ckpt")
    eval_image_processor(32).save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["clip_config"]["vision_config"]["hidden_size"] += 16  # the weights keep the old width
    config_file.write_text(json.dumps(config))
    argv = ["--model_name_or_path", str(tmp_path / "ckpt"), "--test_file", data["val"], "--image_root", data["root"],
            "--output_dir", str(tmp_path / "eval"), "--use_cpu", "--report_to", "none"]  # fmt: skip
    code, err = run("run_eval", argv, capfd)
    line = error_line(err, "run_eval")
    assert code == 2 and "the weights' shapes do not match its config.json" in line and "MISMATCH" in line, line
    assert "LOAD REPORT" not in err and "Traceback" not in err


def test_stage1_output_given_to_stage2_is_one_line_without_the_load_report(data, tmp_path, tiny_clip_dir, capfd):
    stage1 = tmp_path / "stage1"
    assert run("run_cvlp", stage1_args(data, stage1, tiny_clip_dir), capfd)[0] == 0
    argv = ["--model_name_or_path", str(stage1), "--train_file", data["train"], "--image_root", data["root"],
            "--output_dir", str(tmp_path / "stage2"), "--use_cpu", "--report_to", "none"]  # fmt: skip
    code, err = run("run_lgr", argv, capfd)
    assert code == 2 and "has no anchor sentences" in error_line(err, "run_lgr")
    assert "LOAD REPORT" not in err and "MISSING" not in err, err[-2000:]


# ----------------------------------------------------------------------------------------------------------------------
# Classes added later
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def anchor_checkpoint(tmp_path, tiny_clip_dir):
    model = make_classifier(num_labels=4, num_anchors=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.config.label2id = {n: i for i, n in enumerate(CLASS_NAMES)}
    folder = tmp_path / "anchors"
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_clip_dir) / name).exists():
            shutil.copy(Path(tiny_clip_dir) / name, folder / name)
    eval_image_processor(32).save_pretrained(folder)
    return folder


def test_add_classes_refuses_a_name_equal_after_normalisation(anchor_checkpoint, tmp_path, capfd):
    from training import add_classes

    names = tmp_path / "new.txt"
    existing = CLASS_NAMES[1]
    names.write_text(f"  {existing.upper().replace(' ', '_')} \n")
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({names.read_text().strip(): ["A thing with a colour."]}))
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run_main(add_classes.main, "add_classes", ["--model_name_or_path", str(anchor_checkpoint), "--class_names",
                     str(names), "--text_corpus", str(corpus), "--output_dir", str(tmp_path / "grown")])  # fmt: skip
    line = error_line(capfd.readouterr().err, "add_classes")
    assert stop.value.code == 2 and f"{names}:" in line and f"as {existing!r}" in line and "label 1" in line, line
    assert not (tmp_path / "grown" / "model.safetensors").exists()


def test_train_classes_without_training_images_is_refused(anchor_checkpoint, tmp_path, capfd):
    data = write_lt_dataset(tmp_path / "data", train_counts=[6, 5, 4, 0])
    argv = ["--model_name_or_path", str(anchor_checkpoint), "--train_file", data["train"], "--image_root",
            data["root"], "--class_names", data["classes"], "--output_dir", str(tmp_path / "lgr"), "--train_classes",
            CLASS_NAMES[3].upper(), "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu",
            "--report_to", "none", "--dataloader_drop_last", "False"]  # fmt: skip
    code, err = run("run_lgr", argv, capfd)
    line = error_line(err, "run_lgr")
    assert code == 2 and f"class {CLASS_NAMES[3]!r} has no image in the training split" in line, line
    assert_stopped_before_training(tmp_path / "lgr")


# ----------------------------------------------------------------------------------------------------------------------
# A full disk at every write: each writer's own exception type becomes one line naming the path
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def file_size_limit(limit: int):
    """Every file this process writes is cut at `limit` bytes, as on a full disk: Python ignores SIGXFSZ, so the
    write fails with EFBIG and each writer reports it its own way (OSError, torch.save's RuntimeError, a
    SafetensorError)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_writing_names_the_path_whatever_the_writer_raises(tmp_path):
    from safetensors.torch import save_file

    big = {"w": torch.zeros(50_000)}
    writers = {
        "torch.save": lambda path: torch.save(big, path),
        "safetensors": lambda path: save_file(big, path),
        "open": lambda path: open(path, "wb").write(b"x" * 300_000),
    }
    for name, write in writers.items():
        path = tmp_path / f"{name}.out"
        with file_size_limit(100_000), pytest.raises(WriteError) as caught:
            with writing(path):
                write(path)
        assert caught.value.filename == str(path), name
        assert caught.value.strerror in ("File too large", "the file was cut short while writing (a full disk or a "
                                         "file-size limit)"), (name, caught.value.strerror)  # fmt: skip
    # an atomic write that fails keeps the file's earlier content
    atomic_write_json(tmp_path / "kept.json", {"a": 1})
    with file_size_limit(100_000), pytest.raises(WriteError):
        atomic_write_json(tmp_path / "kept.json", {"a": "x" * 300_000})
    assert json.loads((tmp_path / "kept.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("fails", ["weights", "optimizer"])
def test_full_disk_at_a_checkpoint_keeps_the_earlier_one(fails, data, tmp_path, tiny_clip_dir, capfd):
    out = tmp_path / "out"
    argv = stage1_args(data, out, tiny_clip_dir, "--save_strategy", "steps", "--save_steps", "1")
    code, err = run("run_cvlp", argv, capfd)
    assert code == 0, err[-2000:]
    first = out / "checkpoint-1"
    sizes = _sizes(first)
    weights, optimizer = sizes["model.safetensors"], sizes["optimizer.pt"]
    assert optimizer > weights  # AdamW keeps two moments per weight
    limit = weights // 2 if fails == "weights" else (weights + optimizer) // 2
    before = {name: (first / name).read_bytes() for name in sizes}
    argv = [*argv, "--resume_from_checkpoint", "last"]
    argv[argv.index("--max_steps") + 1] = "2"
    with file_size_limit(limit):
        code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert f"Writing {out / 'checkpoint-2'} failed (" in line and "the earlier checkpoints are intact" in line, line
    assert {name: (first / name).read_bytes() for name in sizes} == before


def test_full_disk_when_anchor_selection_saves(data, tmp_path, tiny_clip_dir, capfd):
    stage1 = tmp_path / "stage1"
    code, err = run("run_cvlp", stage1_args(data, stage1, tiny_clip_dir), capfd)
    assert code == 0, err[-2000:]
    out = tmp_path / "anchors"
    argv = ["--model_name_or_path", str(stage1), "--train_file", data["train"], "--image_root", data["root"],
            "--class_names", data["classes"], "--text_corpus", data["corpus"], "--output_dir", str(out),
            "--num_anchor_sentences", "2", "--use_cpu", "--report_to", "none"]  # fmt: skip
    with file_size_limit((stage1 / "model.safetensors").stat().st_size // 2):
        code, err = run("run_select_anchors", argv, capfd)
    line = error_line(err, "run_select_anchors")
    assert code == 2 and "Traceback" not in err and f"{out}: File too large" in line, line
    assert (stage1 / "model.safetensors").is_file()  # the input is untouched


def test_token_cache_on_a_full_disk_is_skipped_with_a_warning(tmp_path, tokenizer, caplog):
    from training.corpus import build_class_corpus, tokenize_corpus

    corpus = build_class_corpus(CLASS_NAMES, None, True)
    with file_size_limit(1_000):
        tokens = tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path / "cache")
    assert tokens.input_ids.shape[0] == len(corpus.sentences)
    assert "Could not write the token cache" in caplog.text and "File too large" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_save_pretrained_to_a_full_disk_names_the_folder(tmp_path):
    model = make_classifier(num_labels=3, num_anchors=2)
    with file_size_limit(10_000), pytest.raises(WriteError) as caught:
        save_pretrained_to(model, tmp_path / "model")
    assert caught.value.filename == str(tmp_path / "model") and caught.value.strerror == "File too large"


# ----------------------------------------------------------------------------------------------------------------------
# A Hub that cannot be reached, no token, a refused push: one line after the local folder is complete
# ----------------------------------------------------------------------------------------------------------------------


class _Args:
    hub_model_id = "org/name"
    hub_token = None
    hub_private_repo = False


def test_push_to_an_unreachable_hub_says_how_to_push_later(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    (tmp_path / "model").mkdir()
    with pytest.raises(HubPushError) as caught:
        push_folder(tmp_path / "model", _Args(), "msg")
    message = str(caught.value)
    assert message.startswith("--push_to_hub org/name: the Hub could not be reached") and "\n" not in message
    assert f"The local folder {tmp_path / 'model'} is complete; push it later with: hf upload org/name" in message


def test_push_refused_or_offline(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    response = SimpleNamespace(status_code=403, headers={}, request=None)  # what the client keeps of the reply
    for error, said in [(HfHubHTTPError("403 Forbidden", response=response), "refused the push (HTTP 403)"),
                        (OfflineModeIsEnabled("offline"), "switched off here (HF_HUB_OFFLINE=1)")]:  # fmt: skip

        class Api:
            def __init__(self, token=None):
                pass

            def create_repo(self, *args, _error=error, **kwargs):
                raise _error

        monkeypatch.setattr(cli, "HfApi", Api)
        with pytest.raises(HubPushError, match=re.escape(said)):
            push_folder(tmp_path, _Args(), "msg")


def test_run_with_push_to_an_unreachable_hub_keeps_the_local_folder(data, tmp_path, tiny_clip_dir, capfd, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    out = tmp_path / "out"
    argv = stage1_args(data, out, tiny_clip_dir, "--push_to_hub", "True", "--hub_model_id", "org/name")
    code, err = run("run_cvlp", argv, capfd)
    line = error_line(err, "run_cvlp")
    assert code == 2 and "Traceback" not in err and "the Hub could not be reached" in line, line
    assert f"The local folder {out} is complete" in line
    for name in ("model.safetensors", "config.json", "README.md", "tokenizer_config.json"):
        assert (out / name).is_file(), name
