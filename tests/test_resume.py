"""A run killed mid-epoch (SIGKILL) and restarted with --resume_from_checkpoint finishes with the same weights as an
uninterrupted run: optimizer, schedule, sampler draws, sentence draws, augmentation and mixing all continue where
they were (on the CPU, deterministically)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CLASS_NAMES, make_classifier, write_lt_dataset
from safetensors.torch import load_file

from training.data import eval_image_processor

TRAIN_COUNTS = [40, 20, 10, 6]  # 76 images: 9 steps of 8 per epoch


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", VLLTR_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _command(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args, "--use_cpu", "--report_to", "none", "--disable_tqdm", "True",
            "--seed", "0", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "3",
            "--per_device_train_batch_size", "8", "--max_steps", "24", "--logging_steps", "4"]  # fmt: skip


def _kill_after_checkpoint(command: list[str], out, env, step: int = 4) -> None:
    """Starts the run and SIGKILLs it as soon as checkpoint-`step` is completely written."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.time() + 240
    while not state.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model.safetensors").exists(), "the run finished before the kill: the test proves nothing"


def _final_weights(out) -> dict:
    return load_file(out / "model.safetensors")


def _check_same(resumed, uninterrupted) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_lt_dataset(tmp_path_factory.mktemp("resume_data"), train_counts=TRAIN_COUNTS)


def _run_pair(module: str, args_for, tmp_path, env):
    """The uninterrupted run (in the background) and the killed one, side by side; then the resume."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    background = subprocess.Popen(_command(module, args_for(straight)), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)  # fmt: skip
    _kill_after_checkpoint(_command(module, args_for(killed)), killed, env)
    resumed = subprocess.run(
        _command(module, args_for(killed)) + ["--resume_from_checkpoint", "last"], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert background.wait(timeout=300) == 0, background.stderr.read().decode()[-3000:]
    _check_same(_final_weights(killed), _final_weights(straight))


def test_stage1_killed_and_resumed_matches_uninterrupted(data, tiny_clip_dir, tmp_path):
    def args_for(out):
        return ["--model_name_or_path", tiny_clip_dir, "--train_file", data["train"], "--image_root", data["root"],
                "--class_names", data["classes"], "--text_corpus", data["corpus"], "--output_dir", str(out),
                "--learning_rate", "1e-3"]  # fmt: skip

    _run_pair("training.run_cvlp", args_for, tmp_path, _env(tmp_path))


def test_stage2_killed_and_resumed_matches_uninterrupted(data, tmp_path):
    anchors = tmp_path / "anchors"
    model = make_classifier(num_labels=4, num_anchors=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.config.label2id = {n: i for i, n in enumerate(CLASS_NAMES)}
    model.save_pretrained(anchors)
    eval_image_processor(32).save_pretrained(anchors)

    def args_for(out):
        return [
            "--model_name_or_path",
            str(anchors),
            "--train_file",
            data["train"],
            "--image_root",
            data["root"],
            "--output_dir",
            str(out),
            "--learning_rate",
            "1e-2",
        ]  # fmt: skip  (Mixup / CutMix on: the default)

    _run_pair("training.run_lgr", args_for, tmp_path, _env(tmp_path))
