"""The LIFT peer's Trainer: LGR's trainer (logit-adjusted cross entropy on the head's logits, frozen towers, adapters
trained) with LIFT's optimiser rules: weight decay on every trained parameter and a cosine schedule stepped once per
epoch (shijxcs/LIFT `trainer.py` `build_optimizer`)."""

import math

import torch

from .lgr_trainer import LGRTrainer


def epoch_cosine_factor(step: int, steps_per_epoch: int, num_epochs: float) -> float:
    """LIFT's `CosineAnnealingLR(optim, T_max=num_epochs)` stepped after each epoch: the factor on the base learning
    rate during optimizer step `step` (0-based) is (1 + cos(π·e / E)) / 2, e = ⌊step / steps_per_epoch⌋."""
    epoch = step // steps_per_epoch
    return 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))


class LIFTTrainer(LGRTrainer):
    """`LGRTrainer` with `LIFTConfig`'s `decay_all_parameters` and `lr_schedule_per_epoch`."""

    def get_decay_parameter_names(self, model) -> list[str]:
        if self.args.decay_all_parameters:  # LIFT's SGD decays the adapters' biases, LayerNorms and scale too
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is not None or not (
            self.args.lr_schedule_per_epoch and self.args.lr_scheduler_type == "cosine"
        ):
            return super().create_scheduler(num_training_steps, optimizer)
        batches = len(self.get_train_dataloader())
        steps_per_epoch = max(1, math.ceil(batches / self.args.gradient_accumulation_steps))  # the Trainer's count
        epochs = self.args.num_train_epochs if self.args.max_steps <= 0 else num_training_steps / steps_per_epoch
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer if optimizer is None else optimizer,
            lambda step: epoch_cosine_factor(step, steps_per_epoch, epochs),
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler


__all__ = ["LIFTTrainer", "epoch_cosine_factor"]
