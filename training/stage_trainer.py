"""What both stages' Trainers share: the long-tail sampler, the reference weight-decay rule, a hard stop on a
non-finite loss, and logging of the loss terms."""

import signal
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .adapters import ADAPTER_DIR, AdapterError, has_adapters, load_adapter_for_resume, merged_state_dict, save_adapter
from .data import LongTailSampler
from .interrupt import CheckpointWriteError, NonFiniteLossError, StopOnSignal, TrainingInterrupted
from .io_utils import DataError, WriteError, describe_write_failure, writing

logger = logging.get_logger(__name__)


class _FiniteGradientGuard(TrainerCallback):
    """Stops the run before an optimizer step with NaN / inf gradients (a finite loss can still blow up the
    gradients), so that step's weights never reach a checkpoint."""

    def __init__(self, trainer: "StageTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_finite_gradients()


class StageTrainer(Trainer):
    # Our losses are per-batch means: let the Trainer divide them by the accumulation steps (docs/method.md §7).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._terms: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.add_callback(_FiniteGradientGuard(self))
        if has_adapters(self.model) and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise AdapterError("--peft lora runs under DDP or on one device, not DeepSpeed / FSDP (merging needs the "
                               "whole weights on one process; LoRA's frozen tower needs no sharding).")  # fmt: skip

    def train(self, *args, **kwargs):
        """`Trainer.train`; SIGINT or SIGTERM stops it after the current step with a checkpoint saved, and raises
        `TrainingInterrupted` saying how to resume (the previous signal handlers are restored either way)."""
        self._check_one_batch_fits()
        stop = StopOnSignal()
        self.add_callback(stop)
        stop.install()
        try:
            result = super().train(*args, **kwargs)
        finally:
            stop.restore()
            self.remove_callback(stop)
        if stop.stopped_at is not None:
            name = signal.Signals(stop.signum).name
            raise TrainingInterrupted(
                stop.signum,
                f"stopped by {name} after step {stop.stopped_at}; checkpoint-{stop.stopped_at} is saved in "
                f"{self.args.output_dir}: run the same command with --resume_from_checkpoint last to continue.",
            )
        return result

    def _check_one_batch_fits(self) -> None:
        """With the last incomplete batch dropped (the reference), a batch larger than the training split leaves
        an epoch of no step: the Trainer would fail on an unrelated message, or never finish with --max_steps."""
        if self.train_dataset is None or not self.args.dataloader_drop_last:
            return
        try:
            images = len(self.train_dataset)
        except TypeError:  # a streamed dataset has no length to check
            return
        batch = self.args.per_device_train_batch_size * self.args.world_size
        if images < batch:
            processes = f" × {self.args.world_size} processes" if self.args.world_size > 1 else ""
            raise DataError(
                f"The training split has {images} images, fewer than one batch of {batch} "
                f"(--per_device_train_batch_size {self.args.per_device_train_batch_size}{processes}), and the last "
                f"incomplete batch is dropped (--dataloader_drop_last): lower the batch size or pass "
                f"--dataloader_drop_last False."
            )

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LongTailSampler(dataset.labels, mode=self.args.sampling, seed=seed)

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        """`dataloader_drop_last` is meant for training (reference `drop_last=True`); evaluation sees every image."""
        drop_last = self.args.dataloader_drop_last
        if not is_training:
            self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        finally:
            self.args.dataloader_drop_last = drop_last

    def get_decay_parameter_names(self, model) -> list[str]:
        """Reference `optim_factory`: no weight decay on 1-D parameters and biases; everything else (including the
        0-dim `logit_scale`, a quirk of the reference code) is decayed."""
        return [n for n, p in model.named_parameters() if p.ndim != 1 and not n.endswith(".bias")]

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).item():
            step = self.state.global_step + 1
            raise NonFiniteLossError(
                f"The training loss is {loss.item()} at step {step} (epoch {self.state.epoch or 0:.2f}); stopping "
                f"before the optimizer step. Checkpoints already in {self.args.output_dir} are intact: lower the "
                f"learning rate or check the data, then resume with --resume_from_checkpoint."
            )

    def _check_finite_gradients(self) -> None:
        if self.accelerator.scaler is not None:
            return  # fp16 loss scaling expects inf gradients now and then and skips those steps itself
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all().item():
            step = self.state.global_step + 1
            raise NonFiniteLossError(
                f"The gradients are NaN or infinite at step {step} (epoch {self.state.epoch or 0:.2f}) although the "
                f"loss was finite; stopping before the optimizer step. Checkpoints already in {self.args.output_dir} "
                f"are intact: lower the learning rate or set --max_grad_norm, then resume with --resume_from_checkpoint."
            )

    def _save_checkpoint(self, model, trial) -> None:
        # The weights, the optimizer and scheduler state (torch.save), the RNG state and trainer_state.json: any of
        # them can meet a full disk, each writer raising its own type.
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            cause = e.strerror if isinstance(e, WriteError) else describe_write_failure(e, folder)
            raise CheckpointWriteError(
                getattr(e, "errno", None),
                f"Writing {folder} failed ({cause}); the earlier checkpoints are intact (the incomplete one is "
                f"skipped on resume): free space, then resume with --resume_from_checkpoint last.",
                str(folder),
            ) from e

    # -- saving: one-line errors; with adapters, checkpoints hold merged weights plus the adapter for resuming ------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if has_adapters(model):
            state_dict = merged_state_dict(model)  # W + (α/r)·B·A under the plain names: from_pretrained needs no peft
        super()._save(output_dir, state_dict=state_dict)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        folder = output_dir or self.args.output_dir
        try:
            super().save_model(output_dir, _internal_call)
            model = self.accelerator.unwrap_model(self.model)
            if _internal_call and has_adapters(model) and self.args.should_save:
                # a checkpoint written during training: the adapter itself too, which resuming reads back
                with writing(Path(folder) / ADAPTER_DIR):
                    save_adapter(model, Path(folder) / ADAPTER_DIR, None)
        except Exception as e:
            if _internal_call or not self.args.should_save:  # within _save_checkpoint, which names the checkpoint
                raise
            cause = e.strerror if isinstance(e, WriteError) else describe_write_failure(e, folder)
            raise CheckpointWriteError(
                getattr(e, "errno", None),
                f"Saving the model in {folder} failed ({cause}); the checkpoints written before are intact: free "
                f"space, then resume with --resume_from_checkpoint last.",
                str(folder),
            ) from e

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if not has_adapters(self.accelerator.unwrap_model(model)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_for_resume(self.accelerator.unwrap_model(model), resume_from_checkpoint)

    def _record(self, **terms: torch.Tensor | None) -> None:
        for name, value in terms.items():
            if value is not None:
                self._terms[name].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._terms and "loss" in logs:  # training logs get the averaged loss terms since the last log
            means = torch.stack([torch.stack(values).mean() for values in self._terms.values()])  # (T,)
            if self.args.world_size > 1:
                # Each process averaged its own batches (stage 2's terms are local means); every process reaches
                # this point (the Trainer gathers the loss just before), so the terms are averaged like the loss.
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            for name, value in zip(self._terms, means.tolist()):
                logs[name] = round(value, 6)
            self._terms.clear()
        super().log(logs, start_time)
