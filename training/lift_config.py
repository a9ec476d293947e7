"""Training arguments of the LIFT-style peer (`run_lift`): LGR's trainer with LIFT's recipe as defaults."""

from dataclasses import dataclass, field

from .adapters import AdapterArguments
from .lgr_config import LGRConfig

# VL-LTR's ImageNet-LT / Places-LT schedule is 50 (stage 1) + 50 (stage 2) epochs; LIFT trains 10% of that.
VLLTR_TOTAL_EPOCHS = 100


@dataclass
class LIFTConfig(LGRConfig):
    """Arguments of the LIFT-style run (Shi et al., "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning
    Hurts", ICML 2024; reference code shijxcs/LIFT `configs/`, `utils/config.py`): SGD with momentum 0.9, lr 0.01,
    weight decay 5e-4, batch 128, cosine schedule, logit-adjusted cross entropy with τ = 1, plain instance sampling,
    no Mixup / CutMix / label smoothing, 10 epochs (10% of VL-LTR's 50 + 50). The head is a cosine classifier
    initialised from the class-name prompt embeddings, the image tower frozen with adapters (`--peft lora`)."""

    num_train_epochs: float = field(
        default=VLLTR_TOTAL_EPOCHS // 10, metadata={"help": "Epochs (LIFT: 10; 10% of VL-LTR's 50 + 50)."}
    )
    learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the adapters and the head."})
    optim: str = field(default="sgd", metadata={"help": "Optimizer (LIFT: SGD with momentum, see --optim_args)."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Optimizer arguments (LIFT: 0.9)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (LIFT 5e-4)."})
    logit_adjustment: float = field(
        default=1.0, metadata={"help": "τ of the logit-adjusted loss CE(z + τ·log π, y) (LIFT: 1)."}
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup Beta(α, α); LIFT uses none."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix Beta(α, α); LIFT uses none."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing (LIFT: none)."})
    sampling: str = field(
        default="instance",
        metadata={
            "help": "Training sampler (LIFT: plain shuffle, 'instance').",
            "choices": ["sqrt", "class", "instance"],
        },
    )


@dataclass
class LIFTArguments(AdapterArguments):
    """The adapters (LoRA on by default) and the initialisation of the cosine head."""

    peft: str = field(
        default="lora",
        metadata={
            "help": "'lora' (default): adapters in the frozen image tower; 'none': a frozen tower.",
            "choices": ["none", "lora"],
        },
    )
    prompt_templates: str = field(
        default="a photo of a {}.",
        metadata={
            "help": "The class-name prompt(s) whose text embeddings initialise the cosine head, '|'-separated "
            "({} is the class name); 'imagenet' = the 80 CLIP ImageNet templates. Several prompts are averaged "
            "after normalisation (CLIP's zero-shot ensemble). LIFT's default is 'a photo of a {}.'."
        },
    )
    cosine_scale: float = field(default=25.0, metadata={"help": "s of the cosine head s·cos(E_I, w_c) (LIFT: 25)."})

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_templates != "imagenet" and not all("{}" in t for t in self.templates):
            raise ValueError(
                f"--prompt_templates: every template needs a {{}} for the class name, got {self.prompt_templates!r}."
            )
        if not self.cosine_scale > 0:
            raise ValueError(f"--cosine_scale must be > 0, got {self.cosine_scale}.")

    @property
    def templates(self) -> list[str]:
        return [t.strip() for t in self.prompt_templates.split("|") if t.strip()]
