"""Plumbing shared by the `run_*` scripts: argument parsing (a `.json` file of arguments, then command-line
overrides), one-line errors, the output-folder guard, the training history that model cards are built from, and
publishing a folder to the Hub."""

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from transformers import HfArgumentParser
from transformers.utils import logging

from .adapters import AdapterError
from .data import DataError
from .io_utils import atomic_write_json
from .stage_trainer import CheckpointWriteError, NonFiniteLossError

logger = logging.get_logger(__name__)

HISTORY_FILE = "training_history.json"


class UsageError(ValueError):
    """A wrong flag, path or checkpoint given on the command line."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments and errors
# ----------------------------------------------------------------------------------------------------------------------


def _json_to_argv(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read the argument file ({e}).") from None
    argv = []
    for key, value in values.items():
        if key.startswith("_"):  # "_comment", "_global_batch": notes for the reader
            continue
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
    if argv and argv[0].endswith(".json"):
        argv = _json_to_argv(argv[0]) + argv[1:]
    parser = HfArgumentParser(dataclass_types)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:
        raise UsageError(str(e)) from None


def run_main(main: Callable[[list[str] | None], Any], prog: str, argv: list[str] | None = None) -> Any:
    """Runs a script's `main`, turning user errors into one line on stderr and exit status 2. Set VLLTR_DEBUG=1 to
    see the traceback."""
    try:
        result = main(argv)
        _leave_process_group()
        return result
    except (DataError, UsageError, NonFiniteLossError, CheckpointWriteError, AdapterError) as e:
        if os.environ.get("VLLTR_DEBUG"):
            raise
        message = " ".join((e.strerror if isinstance(e, CheckpointWriteError) else str(e)).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _leave_process_group() -> None:
    """Under torchrun / accelerate, the other processes wait for the main one to finish writing (history, card,
    push) before all leave the process group together: a process exiting while another still holds the group
    aborts in gloo's teardown ("terminate called without an active exception") and fails the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.set_verbosity(level)
    transformers.utils.logging.enable_explicit_format()
    logging.get_logger("training").setLevel(level)
    logging.get_logger("modeling_vlltr").setLevel(level)


def load_new_head(loader: Callable, path: str, **kwargs):
    """`loader(path, **kwargs)` for a checkpoint that lacks the weights of a head we are about to create: the
    transformers LOAD REPORT that lists them as MISSING is expected here, so it is replaced by one line."""
    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = loader(path, output_loading_info=True, **kwargs)
    finally:
        logging.set_verbosity(previous)
    if info["missing_keys"]:
        logger.info(f"New (randomly initialised) weights, not in {path}: {sorted(info['missing_keys'])}")
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("clip.")]
    if info["mismatched_keys"] or unexpected:
        logger.warning(f"{path}: unexpected {unexpected}, mismatched {info['mismatched_keys']}")
    return model


def load_checked(what: str, loader: Callable, path: str, **kwargs):
    """Calls `loader(path, **kwargs)`, turning a missing or wrong checkpoint into a `UsageError` naming `what`."""
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {path}: {first}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Output folder, resuming, publishing
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
        if not checkpoint_is_complete(resume):
            raise UsageError(
                f"--resume_from_checkpoint {resume}: the checkpoint is incomplete (the run was stopped while saving "
                f"it); use an earlier one or --resume_from_checkpoint last."
            )
    if (
        out.is_dir()
        and any(out.iterdir())
        and resume is None
        and not getattr(training_args, "overwrite_output_dir", 0)
    ):
        held = sorted(p.name for p in out.iterdir())
        owner = ""
        history = read_history(out)
        if history:
            owner = f" from {history[-1].get('script', 'an earlier run')}"
        raise UsageError(
            f"--output_dir {out} already holds a run{owner} ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}). "
            f"Pass --resume_from_checkpoint last to continue it, --overwrite_output_dir to write over it, or choose "
            f"another folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    return resume


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


def push_folder(folder: str | os.PathLike, training_args, commit_message: str) -> str:
    """Creates (or reuses) `hub_model_id` and uploads `folder`: weights, config, remote code, image processor,
    tokenizer, card and reports; checkpoints and logs are left out. Returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=training_args.hub_token)
    repo = api.create_repo(training_args.hub_model_id, private=bool(training_args.hub_private_repo), exist_ok=True)
    api.upload_folder(
        repo_id=training_args.hub_model_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.tmp", ".*", "training_args.bin"],
    )
    logger.info(f"Pushed {folder} to {repo}")
    return str(repo)


# ----------------------------------------------------------------------------------------------------------------------
# Training history (what the model cards are generated from)
# ----------------------------------------------------------------------------------------------------------------------


def read_history(folder: str | os.PathLike) -> list[dict]:
    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning(f"Ignoring an unreadable {path}.")
        return []


def write_history(folder: str | os.PathLike, history: list[dict]) -> None:
    atomic_write_json(Path(folder) / HISTORY_FILE, history)


def history_entry(script: str, stage: str, settings: dict, results: dict | None = None) -> dict:
    return {
        "script": script,
        "stage": stage,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {k: v for k, v in settings.items() if v is not None},
        # timings say nothing about the model and would change the card on every run
        "results": {k: v for k, v in (results or {}).items() if "runtime" not in k and "per_second" not in k},
    }


def schedule_settings(args) -> dict:
    """The optimisation settings both training stages record in their history (and so in the model card)."""
    return {
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "world_size": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "sampling": args.sampling,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
    }


def record_run(folder, source, entry: dict, config, args, push_to_hub: bool = False, message: str = "") -> None:
    """Appends `entry` to the input checkpoint's history in `folder`, regenerates the model card from it, and pushes
    `folder` to --hub_model_id when asked."""
    from .model_card import write_model_card

    history = extend_history(source, entry)
    write_history(folder, history)
    write_model_card(folder, history, config, hub_model_id=args.hub_model_id)
    if push_to_hub:
        push_folder(folder, args, message)


def extend_history(source: str | os.PathLike, entry: dict) -> list[dict]:
    """The history of the input checkpoint (if it is a local folder), plus `entry`."""
    history = read_history(source) if Path(str(source)).is_dir() else []
    if not history:
        history = [{"script": "base", "stage": "base", "settings": {"model_name_or_path": str(source)}}]
    return history + [entry]
