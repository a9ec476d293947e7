"""Stage 1 (CVLP, class-wise visual-linguistic pre-training) training arguments."""

from dataclasses import dataclass, field

from .losses import DISTILLATION_FORMS
from .stage_config import StageConfig


@dataclass
class CVLPConfig(StageConfig):
    """Arguments of `CVLPTrainer`. Defaults are the reference ImageNet-LT ViT-B/16 run (`pretrain_vit16.py`,
    docs/method.md §1.5): lr 3.5e-5, 50 epochs with 5 warm-up epochs, per-device batch 128 on 8 GPUs (global 1024)."""

    distillation_beta: float = field(
        default=0.5,
        metadata={
            "help": "β in L = (1 − β)·L_ccl + β·L_dis (reference `distillation_beta` = 0.5; the paper's "
            "L = λ·L_ccl + (1 − λ)·L_dis with λ = 1 − β, docs/method.md §1.4). 0 turns distillation off (the 'w/o L_dis' ablation) and skips the teacher."
        },
    )
    distillation_form: str = field(
        default="code",
        metadata={
            "help": "L_dis: 'code' (the official code's full soft-target cross-entropy, student at its own learned "
            "scale, teacher at CLIP's 100; the published numbers) or 'paper' (the slides' diagonal form: per direction "
            "−softmax(s')_ii·log softmax(s)_ii, with the student's learned scale shared by both).",
            "choices": list(DISTILLATION_FORMS),
        },
    )
    label_smoothing: float = field(
        default=0.1,
        metadata={"help": "ε of L_ccl's label smoothing (reference code 0.1; the paper does not mention it)."},
    )
    teacher_text_cache: bool = field(
        default=True,
        metadata={
            "help": "Compute the frozen teacher's sentence embeddings once per sentence (they do not depend on the "
            "image augmentation) instead of once per batch. Same values, less compute."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Train at this input size (e.g. 384, the paper's best iNaturalist run) instead of the checkpoint's: "
            "the position embeddings are resampled once (bicubic) and saved, so the output is a plain model of this "
            "size and the later stages follow it. Default: the checkpoint's size (224 for ViT-B/16)."
        },
    )
    learning_rate: float = field(default=3.5e-5, metadata={"help": "AdamW learning rate (reference ViT-B/16)."})
    num_train_epochs: float = field(default=50, metadata={"help": "Epochs (reference 50; iNaturalist 100)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warm-up, steps or a ratio (reference 5 of 50 epochs)."}
    )
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Reference 128 per GPU × 8 GPUs."})

    def __post_init__(self):
        if not 0.0 <= self.distillation_beta <= 1.0:
            raise ValueError(f"--distillation_beta must lie in [0, 1], got {self.distillation_beta}.")
        if self.distillation_form not in DISTILLATION_FORMS:
            raise ValueError(
                f"--distillation_form must be one of {DISTILLATION_FORMS}, got {self.distillation_form!r}."
            )
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image_size must be positive, got {self.image_size}.")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"--label_smoothing must lie in [0, 1], got {self.label_smoothing}.")
        super().__post_init__()
