"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (a scheduler's pre-emption): the run finishes the
optimizer step in progress, saves a checkpoint and ends with a line that says how to resume; `--resume_from_checkpoint
last` then continues exactly where it stopped. A second signal stops at once. Also the errors that stop a run early
(a non-finite loss, a failed checkpoint write), kept apart from the Trainer so that the scripts' error handling
(`training.cli.run_main`) imports without it."""

import signal
import threading

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .io_utils import WriteError

logger = logging.get_logger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN or infinite: the run stops before the optimizer step, so no checkpoint
    holds damaged weights."""


class CheckpointWriteError(WriteError):
    """Writing a checkpoint or the final model failed (e.g. a full disk), whatever the writer raised (`OSError`,
    `torch.save`'s `RuntimeError`, a `SafetensorError`): the earlier checkpoints are intact."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; `signum` is the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopOnSignal(TrainerCallback):
    """Installs handlers for SIGINT and SIGTERM while `trainer.train()` runs (`install` / `restore`, the previous
    handlers are put back), and turns a signal into "save a checkpoint and stop" at the end of the current optimizer
    step. Under several processes the processes agree (any one signalled stops all, at the same step)."""

    def __init__(self):
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop at once, as without this handler
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning(
            f"{signal.Signals(signum).name} received: stopping after the current step and saving a checkpoint "
            f"(send it again to stop at once)."
        )

    def _any_process_signalled(self, args) -> bool:
        flag = self.signum is not None
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            signalled = torch.tensor([flag], dtype=torch.int32, device=args.device)  # (1,)
            torch.distributed.all_reduce(signalled, op=torch.distributed.ReduceOp.MAX)
            if signalled.item() and self.signum is None:
                self.signum = signal.SIGTERM  # another process was signalled
            return bool(signalled.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._any_process_signalled(args) and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint of this step is already written
            control.should_save = False
            control.should_evaluate = False
        return control
