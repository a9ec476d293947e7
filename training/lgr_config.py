"""Stage 2 (LGR, language-guided recognition) training arguments."""

from dataclasses import dataclass, field

from .stage_config import StageConfig


@dataclass
class LGRConfig(StageConfig):
    """Arguments of `LGRTrainer`. Defaults are the reference ImageNet-LT ViT-B/16 run (`finetune_vit16.py`,
    docs/method.md §3.4-3.6): frozen vision tower, lr 1e-3 for the image-branch MLP, 1e-6 for the anchor attention, 50
    epochs, no warm-up, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, square-root sampling."""

    attention_learning_rate: float = field(
        default=1e-6,
        metadata={
            "help": "Learning rate of the anchor attention (W_q, W_k and their LayerNorms); the reference `text_lr` "
            "is 1e-6, which keeps them near their identity initialisation."
        },
    )
    adapter_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the LoRA adapters with --peft lora (default: `learning_rate`)."},
    )
    train_vision_tower: bool = field(
        default=False,
        metadata={"help": "Train the CLIP vision tower at `learning_rate` (reference: iNaturalist only)."},
    )
    train_classes: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated class names: train only their rows of the image branch's last layer (e.g. "
            "classes added from text, once a few images of them exist), every other weight frozen, and fuse them "
            "like the trained classes from then on. Default: train the whole head."
        },
    )
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup Beta(α, α); 0 = off (reference 0.8)."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta(α, α); 0 = off (reference 1.0)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (reference 1.0)."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of CutMix instead of Mixup when both are on (reference 0.5)."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets (reference 0.1)."})
    logit_adjustment: float = field(
        default=0.0,
        metadata={
            "help": "τ of the logit-adjusted loss for the image branch (Menon et al., ICLR 2021, Eq. 10): the training "
            "loss uses CE(P_I + τ·log π, y), π the class prior from the training counts; inference is unchanged. "
            "0 = off (the paper's L_rec); LIFT uses 1."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Image-branch MLP (and vision tower) learning rate."})
    num_train_epochs: float = field(default=50, metadata={"help": "Epochs (reference 50; iNaturalist 360)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Reference 128 per GPU × 8 GPUs."})

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha", "attention_learning_rate", "logit_adjustment"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("mixup_prob", "mixup_switch_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.adapter_learning_rate is not None and self.adapter_learning_rate < 0:
            raise ValueError(f"--adapter_learning_rate must be >= 0, got {self.adapter_learning_rate}.")
        super().__post_init__()
