"""Plumbing shared by the `run_*` scripts: argument parsing (a `.json` file of arguments, then command-line
overrides), one-line errors, the output-folder guard, and recording a finished run (history, model card, Hub)."""

import dataclasses
import errno
import fcntl
import json
import logging as pylogging
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import torch.distributed as dist
import transformers
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from transformers import AutoTokenizer, HfArgumentParser, PretrainedConfig, PreTrainedTokenizerBase, TrainingArguments
from transformers.integrations import integration_utils
from transformers.utils import logging

from .adapters import AdapterError
from .interrupt import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted
from .io_utils import DataError, WriteError, check_checkpoint_folder, read_user_text, unique_keys
from .model_card import (
    READ_ONLY_SCRIPTS,
    extend_history,
    read_history,
    trained_by,
    write_history,
    write_model_card,
)
from .threads import configure_threads

logger = logging.get_logger(__name__)


class UsageError(ValueError):
    """A wrong flag, path or checkpoint given on the command line."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments and errors
# ----------------------------------------------------------------------------------------------------------------------


def _json_to_argv(path: str) -> list[str]:
    try:
        values = json.loads(
            read_user_text(path, "argument file", UsageError), object_pairs_hook=unique_keys(path, UsageError)
        )
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    if not isinstance(values, dict):
        raise UsageError(
            f"{path}: expected a JSON object of argument names and values, got a {type(values).__name__}."
        )
    argv = []
    for key, value in values.items():
        if key.startswith("_"):  # "_comment", "_global_batch": notes for the reader
            continue
        if key.startswith("-"):
            raise UsageError(f"{path}: key {key!r}: write argument names without the leading dashes.")
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """`HfArgumentParser` over `dataclass_types`. A leading `.json` argument is a file of arguments (keys starting
    with "_" are comments); any further command-line flags override it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    source = ""
    if argv and argv[0].endswith(".json"):
        source = f" (arguments from {argv[0]} and the command line)"
        argv = _json_to_argv(argv[0]) + argv[1:]
    parser = _Parser(dataclass_types)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        check_argument_values(parsed)
        check_report_to(parsed)
        check_output_is_not_an_input(parsed)
    except ValueError as e:
        raise UsageError(f"{e}{source}") from None
    return parsed


# Numeric flags of the scripts (ours and TrainingArguments') and the least value that means anything; `None` stays
# allowed where a field defaults to it. A batch of 0 images or 0 anchors per class would otherwise fail deep inside
# a DataLoader or an allocation, and a negative learning rate would silently train uphill. The LGR / LIFT arguments
# check their own attention / adapter learning rates and τ in __post_init__.
AT_LEAST_ONE = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "num_anchor_sentences", "text_batch_size", "max_images_per_class", "explain_top_k", "batch_size", "knn_k",
)  # fmt: skip
AT_LEAST_ZERO = (
    "learning_rate", "attention_learning_rate", "adapter_learning_rate", "linear_learning_rate", "weight_decay",
    "num_train_epochs", "linear_epochs", "lift_epochs", "standin_epochs", "warmup_steps", "max_grad_norm",
    "dataloader_num_workers", "explain", "report_worst", "logit_adjustment_tau",
)  # fmt: skip


def check_argument_values(parsed) -> None:
    """Refuses a NaN or infinite number in any flag, and a value below the least meaningful one in the flags above,
    naming the flag (a ValueError that `parse_args` turns into one line)."""
    for arguments in parsed:
        for name, value in vars(arguments).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}.")
            if name in ("seed", "data_seed", "first_seed") and not 0 <= value < 2**32:
                raise ValueError(f"--{name} must lie in [0, 2**32 - 1] (NumPy's seed range), got {value}.")
            least = 1 if name in AT_LEAST_ONE else 0 if name in AT_LEAST_ZERO else None
            if least is not None and value < least:
                raise ValueError(f"--{name} must be >= {least}, got {value}.")


# --report_to names -> the transformers availability check and the pip package to install; the Trainer would
# otherwise fail only when it builds its callbacks, in a traceback (`WandbCallback requires wandb to be installed`).
_REPORT_PACKAGES = {
    "azure_ml": ("is_azureml_available", "azureml-core"), "comet_ml": ("is_comet_available", "comet-ml"),
    "flyte": ("is_flytekit_available", "flytekit flytekitplugins-deck-standard"),
}  # fmt: skip


def check_report_to(parsed) -> None:
    """Refuses a --report_to integration that transformers does not know or whose package is not installed, naming
    the package to install (or `--report_to none`)."""
    for arguments in parsed:
        if not isinstance(arguments, TrainingArguments):
            continue
        if any("," in name for name in arguments.report_to or []):
            # the command line gives one string: "tensorboard,mlflow" asks for both (a JSON argument file can give a list)
            arguments.report_to = [n.strip() for name in arguments.report_to for n in name.split(",") if n.strip()]
            if "none" in arguments.report_to or "all" in arguments.report_to:
                raise ValueError(f"--report_to {','.join(arguments.report_to)}: 'none' and 'all' stand alone.")
        for name in arguments.report_to or []:
            if name not in integration_utils.INTEGRATION_TO_CALLBACK:
                known = ", ".join(sorted(integration_utils.INTEGRATION_TO_CALLBACK))
                raise ValueError(f"--report_to {name}: not an integration transformers knows ({known}, all, none).")
            check, package = _REPORT_PACKAGES.get(name, (f"is_{name}_available", name))
            available = getattr(integration_utils, check, None)
            if available is not None and not available():
                raise ValueError(
                    f"--report_to {name}: the {name} package is not installed: pip install {package}, or pass "
                    f"--report_to none."
                )


INPUT_CHECKPOINTS = ("model_name_or_path", "clip", "stage1_checkpoint")


def check_output_is_not_an_input(parsed) -> None:
    """Writing a run into the checkpoint folder it starts from would replace that checkpoint (with
    --overwrite_output_dir) or be refused with advice to overwrite it: refuse it, naming both flags."""
    values = {name: value for arguments in parsed for name, value in vars(arguments).items()}
    output = values.get("output_dir")
    if not output or not os.path.isdir(output):
        return
    for name in INPUT_CHECKPOINTS:
        given = values.get(name)
        if isinstance(given, str) and os.path.isdir(given) and os.path.samefile(given, output):
            raise ValueError(
                f"--output_dir {output} is the checkpoint given as --{name}: the run would write over what it "
                f"starts from; choose another --output_dir."
            )


STANDARD_ARGUMENTS_TITLE = "standard 🤗 TrainingArguments (transformers), below"
_STANDARD_ARGUMENTS_DESCRIPTION = (
    "Every flag above is this script's own (or a TrainingArguments flag whose default the script changes); the "
    "flags from here on are transformers' TrainingArguments with their usual defaults (see TrainingArguments in the "
    "transformers docs)."
)
# TrainingArguments flags every run sets, listed with the script's own
_FIRST_STANDARD_ARGUMENTS = ("output_dir",)


def _group_description(dtype: type) -> str | None:
    """The first sentence of a dataclass's own docstring (dataclasses write a signature where there is none)."""
    doc = dtype.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(f"{dtype.__name__}("):
        return None
    return " ".join(doc.split()).split(". ")[0].rstrip(".") + "."


class _Parser(HfArgumentParser):
    """`HfArgumentParser` with one argument group per dataclass, in the script's order, and the standard
    `TrainingArguments` flags last under their own title, so that `--help` shows the script's flags first. argparse
    prints the whole usage (hundreds of Trainer flags) before a wrong value; one line is enough."""

    def __init__(self, dataclass_types, **kwargs):
        self._standard_fields: list[dataclasses.Field] = []
        super().__init__(dataclass_types, **kwargs)
        if self._standard_fields:
            group = self.add_argument_group(STANDARD_ARGUMENTS_TITLE, _STANDARD_ARGUMENTS_DESCRIPTION)
            for field in self._standard_fields:
                self._parse_dataclass_field(group, field)
        for action in self._actions:  # argparse %-formats help: a plain "10%" would crash --help
            if action.help:
                action.help = re.sub(r"%[%(]?", lambda m: m[0] if len(m[0]) == 2 else "%%", action.help)
        # argparse's usage lists every flag (over a hundred lines with TrainingArguments'): the required ones suffice
        required = " ".join(
            f"{a.option_strings[0]} {a.metavar or a.dest.upper()}" for a in self._actions if a.required
        )
        self.usage = f"%(prog)s [ARGS.json] {required} [--flag VALUE ...]".replace("  ", " ")

    def _add_dataclass_arguments(self, dtype):
        # HfArgumentParser._add_dataclass_arguments, with the group per dataclass and the split of TrainingArguments
        standard = TrainingArguments.__dataclass_fields__ if issubclass(dtype, TrainingArguments) else {}
        title = getattr(dtype, "_argument_group_name", dtype.__name__)
        if dtype is TrainingArguments:
            title, description = "output", None
        else:
            description = _group_description(dtype)
        group = self.add_argument_group(title, description)
        type_hints = get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            field.type = type_hints[field.name]
            # a field a subclass redefines (another default) is a new Field object: it belongs to the script
            if standard.get(field.name) is field and field.name not in _FIRST_STANDARD_ARGUMENTS:
                self._standard_fields.append(field)
            else:
                self._parse_dataclass_field(group, field)

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def run_main(main: Callable[[list[str] | None], Any], prog: str, argv: list[str] | None = None) -> Any:
    """Runs a script's `main`, turning user errors into one line on stderr and exit status 2. Set VLLTR_DEBUG=1 to
    see the traceback."""
    held_before = set(_held_locks)
    try:
        result = main(argv)
        _leave_process_group()
        return result
    except TrainingInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        if os.environ.get("VLLTR_DEBUG"):
            raise
        print(f"{prog}: interrupted before training started (nothing to resume from).", file=sys.stderr)
        raise SystemExit(130) from None
    except (DataError, UsageError, NonFiniteLossError, CheckpointWriteError, AdapterError, HubPushError) as e:
        if os.environ.get("VLLTR_DEBUG"):
            raise
        message = " ".join((e.strerror if isinstance(e, CheckpointWriteError) else original_message(e)).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except ImportError as e:  # an optional package a flag needs (--deepspeed, --optim adamw_bnb_8bit, ...)
        if os.environ.get("VLLTR_DEBUG"):
            raise
        first = " ".join(str(e).strip().split()) or type(e).__name__
        print(f"{prog}: error: a package this run needs is not installed: {first}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a full disk, a read-only or vanished output folder while writing the results
        if not (isinstance(e, WriteError) or e.errno in _WRITE_ERRNOS) or os.environ.get("VLLTR_DEBUG"):
            raise
        where = e.filename or "the output folder"
        print(
            f"{prog}: error: {where}: {e.strerror}; the files and checkpoints written before are intact: free space "
            f"or fix the permissions (or choose another --output_dir), then run again (--resume_from_checkpoint "
            f"last continues from the newest checkpoint).",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    finally:
        release_output_dirs(keep=held_before)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

# A DataLoader worker's exception is raised again in the main process as the same type, its message replaced by
# "Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last): ... DataError: <the
# original message>" (torch/_utils.py, ExceptionWrapper.reraise).
_WORKER_PREFIX = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def original_message(error: BaseException) -> str:
    """`str(error)`, or for an error re-raised from a DataLoader worker, the message the worker raised (what the
    same fault says with --dataloader_num_workers 0)."""
    text = str(error)
    if not _WORKER_PREFIX.match(text):
        return text
    name = re.escape(type(error).__name__)
    matches = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE))
    return text[matches[-1].end() :].strip() if matches else text


def _leave_process_group() -> None:
    """Under torchrun / accelerate, the other processes wait for the main one to finish writing (history, card,
    push) before all leave the process group together: a process exiting while another still holds the group
    aborts in gloo's teardown ("terminate called without an active exception") and fails the launch."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shot_thresholds(base, many: int | None, few: int | None):
    """`base` (a `ShotThresholds`) with --many_shot_threshold / --few_shot_threshold put in where given, checked
    before any work: the few-shot bound cannot lie above the many-shot one."""
    many = base.many if many is None else many
    few = base.few if few is None else few
    try:
        return dataclasses.replace(base, many=many, few=few)
    except ValueError:  # ShotThresholds refuses few > many
        raise UsageError(f"--few_shot_threshold {few} must be <= --many_shot_threshold {many}.") from None


def require_anchors(model, path: str, alternative: str = "") -> None:
    """The LGR head needs the anchors that run_select_anchors adds; a stage-1 checkpoint has none."""
    if model.config.head_type == "lgr" and not bool(model.anchor_mask.any()):
        raise UsageError(
            f"--model_name_or_path {path} has no anchor sentences: run python -m training.run_select_anchors on the "
            f"stage-1 output first{alternative}."
        )


def print_summary(title: str, lines: list[str], folder: str | os.PathLike) -> None:
    """What a script did, printed on stdout (the log may be silenced or scrolled away): `title`, the headline `lines`
    and the folder it wrote. Scripts call it last, from the main process only."""
    text = "\n".join([f"{title}:", *(f"  {line}" for line in lines), f"  wrote {folder}"])
    print(f"\n{text}", flush=True)


def percent(fraction: float | None) -> str:
    """An accuracy fraction as the summaries print it: `0.6123` -> `61.23%`; NaN (a group with no class) -> `n/a`."""
    return "n/a" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.2f}%"


def training_lines(train_result, log_history: list[dict]) -> list[str]:
    """A trainer's summary: its steps, the mean training loss of the run and the last logged one."""
    line = f"{train_result.global_step} optimizer steps; train loss {train_result.training_loss:.4f} (mean of the run)"
    logged = [entry for entry in log_history if "loss" in entry]
    if logged:
        line += f", {logged[-1]['loss']:.4f} at the last log (step {logged[-1]['step']})"
    return [line]


def evaluation_lines(results: dict) -> list[str]:
    """The evaluation split's loss and top-1 from a trainer's results (`eval_*` keys), when it had one."""
    shown = {key: value for key, value in results.items() if key in ("eval_loss", "eval_top1")}
    if not shown:
        return []
    values = [f"loss {shown['eval_loss']:.4f}" if "eval_loss" in shown else None]
    values.append(f"top-1 {percent(shown['eval_top1'])}" if "eval_top1" in shown else None)
    return ["evaluation split: " + ", ".join(v for v in values if v)]


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.set_verbosity(level)
    transformers.utils.logging.enable_explicit_format()
    logging.get_logger("training").setLevel(level)
    logging.get_logger("modeling_vlltr").setLevel(level)


class _ExpectedHeadReport(pylogging.Filter):
    """Drops transformers' LOAD REPORT when all it lists is new-head weights (keys outside the `clip.` backbone) as
    MISSING; any other row (a backbone weight missing, an unexpected or mismatched one) lets the report through."""

    def filter(self, record) -> bool:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # the report's colours on a terminal
        if "LOAD REPORT" not in text:
            return True
        rows = [row for row in re.findall(r"^\s*([\w.]+)\s*\|\s*([A-Z]+)\s*\|", text, flags=re.MULTILINE)]
        rows = [(key, status) for key, status in rows if key != "Key"]
        return not rows or not all(status == "MISSING" and not key.startswith("clip.") for key, status in rows)


def load_new_head(
    loader: Callable, path: str, *, init: str = "randomly", what: str = "--model_name_or_path", **kwargs
):
    """`load_checked(what, loader, path, **kwargs)` for a checkpoint without the head about to be created (a CLIP or
    a stage-1 model given a classifier). transformers' LOAD REPORT lists the new weights as MISSING ("Consider
    training on your downstream task"), read as an error although it is the point here: a report of exactly those
    weights is dropped for this one call and replaced by one line naming the head and how it starts (`init`). A
    report with anything else in it (a backbone weight missing, an unexpected or mismatched one) is shown as usual."""
    report = logging.get_logger("transformers.modeling_utils")  # the logger that emits the LOAD REPORT
    expected = _ExpectedHeadReport()
    report.addFilter(expected)
    try:
        model, info = load_checked(what, loader, path, output_loading_info=True, **kwargs)
    finally:
        report.removeFilter(expected)
    new = [k for k in info["missing_keys"] if not k.startswith("clip.")]
    if [k for k in new if not k.startswith("adaptformer.")]:
        extra = " and AdaptFormer adapters" if any(k.startswith("adaptformer.") for k in new) else ""
        logger.warning(
            f"New {model.config.head_type} classification head for {model.config.num_labels} classes{extra}, "
            f"initialised {init}: {path} has none, as expected."
        )
    return model


class _Hold(pylogging.Handler):
    """Keeps the records it is given, for `_HeldRecords`."""

    def __init__(self, records: list):
        super().__init__()
        self.records = records

    def emit(self, record):
        self.records.append(record)


class _HeldRecords:
    """Holds back what transformers logs inside the block (its LOAD REPORT of a damaged or mismatched checkpoint),
    and lets it out when the block succeeds: when loading fails, the one-line error is all the user reads."""

    def __init__(self):
        self.records: list = []
        self._root = logging.get_logger("transformers")
        self._handlers: list = []

    def __enter__(self):
        self._hold = _Hold(self.records)
        self._handlers = self._root.handlers[:]
        for handler in self._handlers:
            self._root.removeHandler(handler)
        self._root.addHandler(self._hold)
        return self

    def __exit__(self, kind, error, traceback):
        self._root.removeHandler(self._hold)
        for handler in self._handlers:
            self._root.addHandler(handler)
        if kind is None:
            self.release()
        return False

    def release(self) -> None:
        for record in self.records:
            self._root.handle(record)
        self.records.clear()


def load_checked(
    what: str, loader: Callable, path: str, *, tokenizer: bool = False, then: Callable | None = None, **kwargs
):
    """Calls `loader(path, **kwargs)`, turning a missing, damaged or wrong checkpoint into a `UsageError` naming
    `what` (a local folder's files are checked first, so a cut-short file is named before anything is loaded).
    `tokenizer=True` (implied when `loader` loads a tokenizer) also requires tokenizer files: without them
    transformers 5 builds an empty tokenizer that maps every character to one unknown id, and the run would train
    on nothing. Scripts that tokenise text pass it with their first load (the config), before any work. `then(result)`
    runs a check of the loaded object (e.g. `require_anchors`); what transformers logged while loading is shown only
    when the load and the check succeed."""
    owner = getattr(loader, "__self__", None)
    tokenizer = tokenizer or (isinstance(owner, type) and issubclass(owner, (AutoTokenizer, PreTrainedTokenizerBase)))
    check_checkpoint_folder(path, what, UsageError, weights=False)
    held = _HeldRecords()
    try:
        with held:
            result = loader(path, **kwargs)
            if then is not None:  # a check of the loaded object whose failure makes the LOAD REPORT moot
                then(result)
    except UsageError:
        raise
    except Exception as e:
        if isinstance(e, RuntimeError) and "ignore_mismatched_sizes" in str(e):
            # transformers logged a LOAD REPORT of the mismatched weights (held back here) and raised
            report = "\n".join(r.getMessage() for r in held.records)
            shapes = [line.strip() for line in report.splitlines() if "MISMATCH" in line and "|" in line]
            first = f" ({' '.join(shapes[0].split())})" if shapes else ""
            raise UsageError(
                f"{what} {path}: the weights' shapes do not match its config.json{first}: the config was edited or "
                f"belongs to another checkpoint; copy the folder again."
            ) from None
        if not isinstance(e, (OSError, ValueError)) and not type(e).__module__.startswith("safetensors"):
            held.release()
            raise
        if not isinstance(e, ValueError):  # a file is missing or unreadable: name it if it is the weights
            check_checkpoint_folder(path, what, UsageError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {path}: {first}") from None
    # The scripts load the config first: a missing or cut-short weights file (or tokenizer) is named now, before any
    # work; after the loader, so that a folder of another model type is named as such first.
    check_checkpoint_folder(path, what, UsageError, tokenizer=tokenizer)
    if isinstance(result, PretrainedConfig) or isinstance(getattr(result, "config", None), PretrainedConfig):
        configure_threads(getattr(result, "config", result))  # the first model a script loads sets the threads
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Output folder, resuming, recording and publishing a run
# ----------------------------------------------------------------------------------------------------------------------


def prepare_output_dir(training_args, script: str) -> str | None:
    """Refuses an output folder that already holds another run unless --overwrite_output_dir or
    --resume_from_checkpoint is given, and checks --push_to_hub before any work. Returns the checkpoint to resume
    from (`--resume_from_checkpoint last` or `True` picks the newest one in the output folder)."""
    if training_args.output_dir is None:
        raise UsageError("--output_dir is required.")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id org/name (the repository to create or update).")
    out = Path(training_args.output_dir)
    check_output_dir(out)
    if getattr(training_args, "process_index", 0) == 0:
        lock_output_dir(out)
    resume = getattr(training_args, "resume_from_checkpoint", None)
    if resume is not None and str(resume).lower() in ("last", "true"):
        resume = last_complete_checkpoint(out) if out.is_dir() else None
        if resume is None:
            raise UsageError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no complete checkpoint in {out}."
            )
        logger.warning(f"Resuming from {resume}.")
    elif resume is not None:
        if not Path(resume).is_dir():
            raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint folder.")
        if not (Path(resume) / "trainer_state.json").exists() and not Path(resume).name.startswith("checkpoint-"):
            inside = last_complete_checkpoint(resume)
            hint = (
                f"the newest checkpoint in it is {inside}"
                if inside
                else "to start from the weights it holds, pass it as --model_name_or_path instead"
            )
            raise UsageError(
                f"--resume_from_checkpoint {resume}: not a Trainer checkpoint (no trainer_state.json); it takes a "
                f"checkpoint-N folder written by an earlier run: {hint}."
            )
        if not checkpoint_is_complete(resume):
            raise UsageError(
                f"--resume_from_checkpoint {resume}: the checkpoint is incomplete (the run was stopped while saving "
                f"it); use an earlier one or --resume_from_checkpoint last."
            )
    if (
        out.is_dir()
        and any(p.name != LOCK_FILE for p in out.iterdir())
        and resume is None
        and not getattr(training_args, "overwrite_output_dir", 0)
    ):
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        owner = ""
        history = read_history(out)
        if history:  # the script that trained the model there: run_eval records its results in the same history
            owner = f" from {trained_by(history) or 'an earlier run'}"
            if history[-1].get("script") in READ_ONLY_SCRIPTS:
                owner += f" (evaluated since by {history[-1]['script']})"
        raise UsageError(
            f"--output_dir {out} already holds a run{owner} ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}). "
            f"Pass --resume_from_checkpoint last to continue it, --overwrite_output_dir to write over it, or choose "
            f"another folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    return resume


LOCK_FILE = ".vlltr.lock"
_held_locks: dict[str, Any] = {}  # output folder -> the open lock file this process holds


def lock_output_dir(out: Path) -> None:
    """Holds an advisory lock (`flock`) on `out/.vlltr.lock` until `release_output_dirs` (run_main calls it at the end)
    or the process ends, so a second run started on the same folder is refused while this one runs. The kernel drops
    the lock when its process dies, so a lock file left by a killed run blocks nothing."""
    key = str(out.resolve())
    if key in _held_locks:
        return
    path = out / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise UsageError(
            f"--output_dir {out} is in use by another run{f' (process {owner})' if owner else ''}: wait for it to "
            f"finish, or choose another folder."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[key] = handle


def release_output_dirs(keep: set[str] = frozenset()) -> None:
    """Releases the output-folder locks this process holds, except those of the folders in `keep` (and removes their
    files)."""
    for key, handle in list(_held_locks.items()):
        if key in keep:
            continue
        try:
            os.remove(Path(key) / LOCK_FILE)
        except OSError:
            pass
        handle.close()
        del _held_locks[key]


def check_output_dir(out: Path) -> None:
    """Refuses, before any work, an --output_dir that is a file, lies under a file, or cannot be written."""
    if out.is_symlink() and not out.exists():
        raise UsageError(
            f"--output_dir {out} is a broken or looping symbolic link: choose another path or fix the link."
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder: choose another path (or move the file away).")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output_dir {out}: {parent} is a file, not a folder: choose another path.")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(
            f"--output_dir {out}: cannot write there ({e.strerror or e}): choose a writable folder, or fix its "
            f"permissions."
        ) from None


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """The Trainer writes a checkpoint's `trainer_state.json` last: a folder whose state file is missing or cut
    short was interrupted while saving (a kill, a full disk) and must not be resumed from."""
    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (folder / "model.safetensors").is_file()


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `folder` that was completely written, skipping (with a warning) any newer one
    that was interrupted while saving."""
    checkpoints = sorted(
        (p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if checkpoint_is_complete(checkpoint):
            return str(checkpoint)
        logger.warning(f"{checkpoint} is incomplete (interrupted while saving); skipping it.")
    return None


class HubPushError(RuntimeError):
    """`--push_to_hub` failed (the Hub unreachable, no token, the push refused) after the local folder was written."""


_PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.tmp", ".*", "training_args.bin"]


def _push_failure(error: Exception) -> str:
    """Why a push failed, in a few words (huggingface_hub's and the HTTP client's messages run over many lines)."""
    if isinstance(error, OfflineModeIsEnabled):
        return "the Hub is switched off here (HF_HUB_OFFLINE=1)"
    if isinstance(error, LocalTokenNotFoundError):
        return "no Hub token: log in with `hf auth login` or pass --hub_token"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return f"the Hub refused the push (HTTP {status}): check the token's write access to the repository"
        return f"the Hub answered HTTP {status}"
    text = str(error).strip()
    first = text.splitlines()[0] if text else "no message"
    return f"the Hub could not be reached ({type(error).__name__}: {first[:200]})"


def push_folder(folder: str | os.PathLike, training_args, commit_message: str) -> str:
    """Creates (or reuses) `hub_model_id` and uploads `folder`: weights, config, remote code, image processor,
    tokenizer, card and reports; checkpoints and logs are left out. Returns the repository URL. Called once the
    folder is complete, so a failure (`HubPushError`) loses nothing: its message says how to push later."""
    repo_id = training_args.hub_model_id
    try:
        api = HfApi(token=training_args.hub_token)
        repo = api.create_repo(repo_id, private=bool(training_args.hub_private_repo), exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=_PUSH_IGNORE
        )
    except Exception as e:
        excludes = " ".join(f"--exclude '{p}'" for p in ("checkpoint-*", "runs/*", ".*", "training_args.bin"))
        raise HubPushError(
            f"--push_to_hub {repo_id}: {_push_failure(e)}. The local folder {folder} is complete; push it later "
            f"with: hf upload {repo_id} {folder} {excludes}"
        ) from e
    logger.info(f"Pushed {folder} to {repo}")
    return str(repo)


def record_run(folder, source, entry: dict, config, args, push_to_hub: bool = False, message: str = "") -> None:
    """Appends `entry` to the input checkpoint's history in `folder`, regenerates the model card from it, and pushes
    `folder` to --hub_model_id when asked."""
    history = extend_history(source, entry)
    write_history(folder, history)
    write_model_card(folder, history, config, hub_model_id=args.hub_model_id)
    if push_to_hub:
        push_folder(folder, args, message)
