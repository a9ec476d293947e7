"""Training arguments shared by both stages: the sampler, and the reference code's optimiser defaults."""

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .data import SAMPLING_MODES


@dataclass
class StageConfig(TrainingArguments):
    """`TrainingArguments` with the defaults shared by the VL-LTR reference runs (docs/method.md §1.5, §3.6): AdamW with
    weight decay 0.05 (none on 1-D parameters and biases), no gradient clipping, a cosine schedule, `drop_last`,
    square-root sampling, and a hard stop on a non-finite loss (the Trainer would otherwise skip it silently)."""

    sampling: str = field(
        default="sqrt",
        metadata={
            "help": "Training image sampler: 'sqrt' (class drawn with probability proportional to sqrt(n_c), the "
            "reference default in both stages), 'class' (class-balanced) or 'instance' (plain shuffle).",
            "choices": list(SAMPLING_MODES),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Write into an output folder that already holds another run (otherwise refused)."},
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (reference 0.05)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0 = off (reference)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (reference: cosine)."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch (reference)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every batch key (custom collators)."})
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Keep False: a non-finite loss stops the run instead of being skipped."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "Every trainable parameter is used in both stages (frozen towers have requires_grad=False), so "
            "DDP need not search for unused ones each step."
        },
    )

    def __post_init__(self):
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"--sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}.")
        if self.use_cpu or not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every loader otherwise
        super().__post_init__()
