"""`--push_to_hub --hub_model_id org/name` uploads a complete, loadable checkpoint through the real `huggingface_hub`
client, against a fake Hub on a local port (tests/fake_hub.py).

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when it is imported, and conftest.py has already imported it
offline, so the pushing scripts run in subprocesses with the fake Hub's endpoint in their environment.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO_ROOT, run_without_the_package
from fake_hub import fake_hub

ANCHORS_REPO = "mockorg/vlltr-anchors"
EVAL_REPO = "mockorg/vlltr-eval"
NUM_CLASSES = 4  # conftest.CLASS_NAMES

# What a published classifier checkpoint must hold: weights, config, remote code, image processor, tokenizer, card,
# and the anchor report the card points to.
REQUIRED_FILES = {
    "config.json",
    "model.safetensors",
    "modeling_vlltr.py",
    "configuration_vlltr.py",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "README.md",
    "anchor_report.md",
}
# Planted in the checkpoint folder before the run_eval push: none of them may be uploaded.
DECOYS = ["checkpoint-1/model.safetensors", "checkpoint-1/trainer_state.json", "runs/events.out", "training_args.bin"]


def _hub_env(hub, scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_TOKEN="any-token",
        HF_HOME=str(scratch / "hf"),
        VLLTR_CACHE=str(scratch / "vlltr"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


def _run_script(module: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"training.{module}", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:200]
    return yaml.safe_load(text.split("---\n", 2)[1])


def _served_in_order(paths: list[str], repo_id: str) -> bool:
    wanted = iter(["/api/repos/create", f"/api/models/{repo_id}/preupload/main", f"/api/models/{repo_id}/commit/main"])
    step = next(wanted)
    for path in paths:
        if path == step:
            step = next(wanted, None)
            if step is None:
                return True
    return False


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_clip_dir, lt_dataset):
    """Runs run_select_anchors (a plain CLIP folder as the stage-1 model) and then run_eval on its output, both with
    --push_to_hub, against one fake Hub. The anchors folder gets decoys planted between the two pushes."""
    tmp = tmp_path_factory.mktemp("hub_push")
    out2, out4 = tmp / "anchors", tmp / "eval"
    d = lt_dataset
    with fake_hub(tmp / "hub") as hub:
        env = _hub_env(hub, tmp)
        anchors = _run_script(
            "run_select_anchors",
            ["--model_name_or_path", tiny_clip_dir, "--selection_file", d["val"], "--image_root", d["root"],
             "--class_names", d["classes"], "--text_corpus", d["corpus"], "--num_anchor_sentences", 4,
             "--output_dir", out2, "--use_cpu", "--push_to_hub", "--hub_model_id", ANCHORS_REPO],
            env,
        )  # fmt: skip
        anchors_local = _digests(out2) if anchors.returncode == 0 else {}
        anchors_requests = list(hub.paths)
        for rel in DECOYS:
            (out2 / rel).parent.mkdir(parents=True, exist_ok=True)
            (out2 / rel).write_bytes(b"must not be uploaded")
        evaluated = None
        if anchors.returncode == 0:
            evaluated = _run_script(
                "run_eval",
                ["--model_name_or_path", out2, "--test_file", d["test"], "--train_file", d["train"],
                 "--image_root", d["root"], "--output_dir", out4, "--use_cpu", "--push_to_hub",
                 "--hub_model_id", EVAL_REPO, "--dataset_tag", "toy-lt"],
                env,
            )  # fmt: skip
    return SimpleNamespace(
        hub=hub,
        out2=out2,
        out4=out4,
        anchors=anchors,
        anchors_local=anchors_local,
        anchors_requests=anchors_requests,
        evaluated=evaluated,
    )


def _check_checkpoint(hub, repo_id: str) -> dict:
    """The checks both pushes share; returns the uploaded README's front matter."""
    assert repo_id in [c["repo_id"] for c in hub.created], hub.created
    assert not hub.errors, hub.errors
    files = set(hub.repo_files(repo_id))
    assert REQUIRED_FILES <= files, f"missing {sorted(REQUIRED_FILES - files)}; uploaded {sorted(files)}"
    assert "tokenizer.json" in files or "vocab.json" in files, sorted(files)
    leaked = sorted(f for f in files if f.startswith(("checkpoint-", "runs/")) or f == "training_args.bin")
    assert not leaked, f"uploaded {leaked}"
    folder = hub.repo_dir(repo_id)
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map", {})
    assert {"AutoConfig", "AutoModel", "AutoModelForImageClassification"} <= set(auto_map), auto_map
    for target in auto_map.values():  # every auto_map entry names a module that was uploaded
        module = target.split("--")[-1].split(".")[0]
        assert f"{module}.py" in files, (target, sorted(files))
    assert len(config["id2label"]) == NUM_CLASSES, config.get("id2label")
    card = _front_matter(folder / "README.md")
    assert card["library_name"] == "transformers", card
    assert card["pipeline_tag"] == "image-classification", card
    return card


def test_run_select_anchors_pushes_a_complete_checkpoint(pushed):
    result = pushed.anchors
    assert result.returncode == 0, result.stderr[-4000:]
    hub = pushed.hub
    assert _served_in_order(pushed.anchors_requests, ANCHORS_REPO), pushed.anchors_requests
    card = _check_checkpoint(hub, ANCHORS_REPO)
    assert "model-index" not in card  # nothing evaluated yet
    uploaded = _digests(hub.repo_dir(ANCHORS_REPO))
    assert uploaded == pushed.anchors_local, "the upload differs from the output folder"
    commit = next(c for c in hub.commits if c.repo_id == ANCHORS_REPO)
    assert commit.revision == "main" and commit.summary, commit


def test_run_eval_pushes_the_evaluated_checkpoint_with_its_card(pushed):
    assert pushed.anchors.returncode == 0, pushed.anchors.stderr[-4000:]
    result = pushed.evaluated
    assert result.returncode == 0, result.stderr[-4000:]
    hub = pushed.hub
    assert _served_in_order(hub.paths, EVAL_REPO), hub.paths
    card = _check_checkpoint(hub, EVAL_REPO)
    uploaded = _digests(hub.repo_dir(EVAL_REPO))
    local = {k: v for k, v in _digests(pushed.out2).items() if k not in DECOYS}
    assert uploaded == local, "the upload differs from the evaluated checkpoint folder (less the decoys)"

    metrics = json.loads((pushed.out4 / "metrics.json").read_text())
    [entry] = card["model-index"]
    found = {
        metric["name"]: (metric["value"], res["dataset"]["type"])
        for res in entry["results"]
        for metric in res["metrics"]
    }
    assert "Top-1" in found, found
    value, dataset_type = found["Top-1"]
    assert value == round(100 * metrics["top1"], 2), (value, metrics["top1"])
    assert dataset_type == "toy-lt"
    assert card.get("datasets") == ["toy-lt"], card
    commit = next(c for c in hub.commits if c.repo_id == EVAL_REPO)
    assert commit.summary == f"VL-LTR evaluated: top-1 {metrics['top1']:.4f}", commit


def test_uploaded_checkpoint_loads_with_remote_code_only(pushed, tmp_path):
    """The folder the fake Hub received loads with trust_remote_code=True in a process where neither
    `modeling_vlltr` nor `training` can be imported."""
    assert pushed.evaluated is not None and pushed.evaluated.returncode == 0, "run_eval did not push"
    folder = pushed.hub.repo_dir(EVAL_REPO)
    result = run_without_the_package(
        f"""
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoTokenizer
        folder = {str(folder)!r}
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()  # the base model: its CLIP
        assert type(base).__name__ == "VLLTRModel" and "transformers_modules" in type(base).__module__, type(base)
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            output = model(pixels)
            logits = output.logits
            expected = output.image_embeds / output.image_embeds.norm(dim=-1, keepdim=True)  # E_I / ‖E_I‖
            torch.testing.assert_close(base(pixel_values=pixels).image_embeds, expected)
        assert tuple(logits.shape) == (1, {NUM_CLASSES}), tuple(logits.shape)
        assert torch.isfinite(logits).all(), logits
        AutoImageProcessor.from_pretrained(folder)
        assert AutoTokenizer.from_pretrained(folder)("a red square")["input_ids"]
        print("REMOTE-OK", type(model).__name__)
        """,
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        OMP_NUM_THREADS="1",
    )
    assert result.returncode == 0 and "REMOTE-OK" in result.stdout, result.stdout + result.stderr[-4000:]


def _usage_args(script: str, clip: str, d: dict) -> list:
    data = ["--image_root", d["root"], "--class_names", d["classes"]]
    return {
        "run_cvlp": ["--model_name_or_path", clip, "--train_file", d["train"], *data, "--text_corpus", d["corpus"]],
        "run_select_anchors": ["--model_name_or_path", clip, "--selection_file", d["val"], *data,
                               "--text_corpus", d["corpus"], "--num_anchor_sentences", 4],
        "run_lgr": ["--model_name_or_path", clip, "--train_file", d["train"], *data],
        "run_eval": ["--model_name_or_path", clip, "--test_file", d["test"], "--train_file", d["train"], *data],
    }[script]  # fmt: skip


def test_push_to_hub_without_hub_model_id_is_a_usage_error(tiny_clip_dir, lt_dataset, tmp_path):
    """Every run script refuses --push_to_hub without --hub_model_id with one line and status 2, before any work: no
    output folder, no request to the Hub. The four scripts run side by side to save wall time."""
    scripts = ["run_cvlp", "run_select_anchors", "run_lgr", "run_eval"]
    with fake_hub(tmp_path / "hub") as hub:
        env = _hub_env(hub, tmp_path)
        running = {}
        for script in scripts:
            args = [*_usage_args(script, tiny_clip_dir, lt_dataset), "--output_dir", tmp_path / script, "--use_cpu"]
            running[script] = subprocess.Popen(
                [sys.executable, "-m", f"training.{script}", *map(str, args), "--push_to_hub"],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        results = {script: (proc.communicate(timeout=300), proc.returncode) for script, proc in running.items()}
    for script, ((_, stderr), returncode) in results.items():
        assert returncode == 2, f"{script}: exit {returncode}\n{stderr[-4000:]}"
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, f"{script}: {stderr}"
        assert lines[0].startswith(f"{script}: error:") and "--hub_model_id" in lines[0], lines[0]
        out = tmp_path / script
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert hub.requests == [], hub.requests
    assert not any(hub.storage.iterdir()), sorted(p.name for p in hub.storage.iterdir())
