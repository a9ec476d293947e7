"""`--help` of every command-line entry point: `python -m training.<script>` and `python -m benchmarks.<script>`.

Entry points are found from the source (a module-level `main` or an `if __name__ == "__main__":` block), so a new
script is covered without editing this file. Each `main(["--help"])` runs in-process (the imports are shared, so the
whole file takes seconds); one subprocess per import-only path checks that `--help` does not wait for the slow
libraries that only the work itself needs."""

import ast
import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments

from training.cli import STANDARD_ARGUMENTS_TITLE, parse_args

ROOT = Path(__file__).resolve().parent.parent


def _entry_points() -> list[str]:
    modules = []
    for package in ("training", "benchmarks"):
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
            has_block = any(
                isinstance(node, ast.If)
                and "__main__" in ast.unparse(node.test)
                and "__name__" in ast.unparse(node.test)
                for node in tree.body
            )
            if has_main or has_block:
                modules.append(f"{package}.{path.stem}")
    return modules


ENTRY_POINTS = _entry_points()
# flags argparse lists for a TrainingArguments field: --name, --name-with-dashes, --no_name / --no-name
_STANDARD_FLAGS = {
    flag
    for name in TrainingArguments.__dataclass_fields__
    for flag in (name, name.replace("_", "-"), f"no_{name}", f"no-{name.replace('_', '-')}")
}
_FLAG = re.compile(r"^  (--[\w-]+)", re.MULTILINE)


def test_entry_points_are_found():
    for expected in ("training.run_cvlp", "training.run_eval", "training.compare", "benchmarks.run_all"):
        assert expected in ENTRY_POINTS
    assert "training.cli" not in ENTRY_POINTS and "benchmarks.common" not in ENTRY_POINTS


def _help(module: str, capsys) -> str:
    script = importlib.import_module(module)
    with pytest.raises(SystemExit) as stopped:
        script.main(["--help"])
    out, err = capsys.readouterr()
    assert stopped.value.code in (0, None), err
    assert "Traceback" not in out + err
    return out


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_answers(module, capsys):
    out = _help(module, capsys)
    assert out.startswith("usage:") and "-h, --help" in out
    flags = _FLAG.findall(out)
    assert len(flags) >= 1
    if STANDARD_ARGUMENTS_TITLE not in out:
        # no TrainingArguments flag (one this package does not redefine) may be listed without the marker
        assert "--logging_dir" not in flags and "--max_steps" not in flags, f"{module}: TrainingArguments unmarked"
        return
    before, after = out.split(STANDARD_ARGUMENTS_TITLE, 1)
    own = [flag for flag in _FLAG.findall(before) if flag != "--help"]
    assert own, f"{module}: no flag of its own before the TrainingArguments"
    # everything after the marker is a standard TrainingArguments flag: the script's own came first
    strays = [flag for flag in _FLAG.findall(after) if flag[2:] not in _STANDARD_FLAGS]
    assert not strays, f"{module}: its own flags {strays} are listed among the standard TrainingArguments"


def test_own_groups_come_first_and_redefined_defaults_stay_with_them(capsys):
    from training.cvlp_config import CVLPConfig

    out = _help("training.run_cvlp", capsys)
    titles = re.findall(r"^(\S[^\n]*):\n", out, flags=re.MULTILINE)
    assert titles[:2] == ["options", "ModelArguments"] and titles[-1] == STANDARD_ARGUMENTS_TITLE, titles
    before = out.split(STANDARD_ARGUMENTS_TITLE, 1)[0]
    redefined = [
        f.name
        for f in dataclasses.fields(CVLPConfig)
        if f.name in TrainingArguments.__dataclass_fields__ and f is not TrainingArguments.__dataclass_fields__[f.name]
    ]
    assert "weight_decay" in redefined  # the reference's 0.05, not transformers' 0
    for name in (*redefined, "output_dir", "distillation_beta"):
        assert f"\n  --{name} " in before, name


@dataclasses.dataclass
class _PercentArguments:
    share: float = dataclasses.field(default=0.1, metadata={"help": "10% of the epochs; 100%% kept as written."})


def test_a_percent_sign_in_help_is_printed(capsys):
    # argparse %-formats help strings: an unescaped "10%" crashed `run_lift --help` and `compare --help`
    with pytest.raises(SystemExit):
        parse_args((_PercentArguments,), ["--help"])
    out = capsys.readouterr().out
    assert "10% of the epochs; 100% kept as written. (default: 0.1)" in " ".join(out.split())


# Libraries that only the work needs; `--help` of every script answers without importing them.
SLOW_IMPORTS = ("datasets", "timm", "matplotlib", "pandas", "transformers.trainer", "evaluate")
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
print("IMPORTED", [m for m in {slow!r} if m in sys.modules])
"""


@pytest.mark.parametrize("module", ["training.run_cvlp", "training.compare"])
def test_help_defers_slow_imports(module):
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(slow=SLOW_IMPORTS), module],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "IMPORTED []"
