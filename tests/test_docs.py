"""The front page cannot drift from the code: every command of README.md's "Train on your data" screen and its
quick start runs as written on tiny data (the placeholders, a CLIP name and file names, are mapped to a tiny random
CLIP and a tiny long-tailed set; each training command also gets a short schedule)."""

import os
import re
import shlex
import shutil
from importlib import import_module
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--image_check", "header"]
SHORT = {"run_cvlp": ["--num_train_epochs", "1", "--per_device_train_batch_size", "8"],
         "run_lgr": ["--num_train_epochs", "1", "--per_device_train_batch_size", "8"],
         "run_select_anchors": ["--num_anchor_sentences", "6"],
         "run_eval": ["--many_shot_threshold", "8", "--few_shot_threshold", "4"]}  # fmt: skip


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The `python -m ...` commands of a bash block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("python")]


def write_imagefolder(data: dict, folder: Path) -> None:
    """The tiny set as an `imagefolder`: one sub-folder per class name, per split."""
    names = Path(data["classes"]).read_text().split()
    for split, source in (("train", "train"), ("validation", "val"), ("test", "test")):
        for line in Path(data[source]).read_text().splitlines():
            rel, label = line.split()
            target = folder / split / names[int(label)] / Path(rel).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(data["root"]) / rel, target)


def run(argv: list[str], placeholders: dict[str, str]) -> None:
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("training."), argv
    script = argv[2].split(".", 1)[1]
    args = [placeholders.get(a, a) for a in argv[3:]]
    import_module(f"training.{script}").main(args + FAST + SHORT.get(script, []))


@pytest.fixture(scope="module")
def placeholders(tiny_clip_dir, lt_dataset, tmp_path_factory):
    data = lt_dataset
    folder = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder(data, folder)
    return {"openai/clip-vit-base-patch16": tiny_clip_dir, "train.txt": data["train"], "val.txt": data["val"],
            "test.txt": data["test"], "classes.txt": data["classes"], "corpus.json": data["corpus"],
            "ROOT": data["root"], "DATA": str(folder)}  # fmt: skip


def test_train_on_your_data_commands_run_as_written(placeholders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    screen = blocks(section("Train on your data"), "bash")
    assert len(screen) == 2, "the screen's two routes: split files, and a 🤗 imagefolder with templates only"
    for block in screen:
        cmds = commands(block)
        assert [c[2] for c in cmds] == [
            f"training.{s}" for s in ("run_cvlp", "run_select_anchors", "run_lgr", "run_eval")
        ]
        for argv in cmds:
            run(argv, placeholders)
    assert (tmp_path / "out" / "eval" / "metrics.json").exists() and (
        tmp_path / "hf" / "eval" / "metrics.json"
    ).exists()
    # the quick start reads what `make demo` leaves: a classifier folder and the world's split files
    quick = blocks(section("Quick start"), "python")
    assert len(quick) == 1
    repo = re.search(r'repo = "([^"]+)"', quick[0]).group(1)
    data = re.search(r'open\("([^"]+)/test.txt"\)', quick[0]).group(1)
    shutil.copytree(tmp_path / "out" / "stage2", tmp_path / repo)
    shutil.copytree(placeholders["ROOT"], tmp_path / data)
    exec(compile(quick[0], str(README) + ":quick start", "exec"), {"__name__": "readme"})
    assert os.path.isdir(tmp_path / repo)
