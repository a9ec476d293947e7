"""Arguments of the LIFT peer (`run_lift`): LIFT's recipe as defaults (Shi et al., "Long-Tail Learning with Foundation
Model: Heavy Fine-Tuning Hurts", ICML 2024; reference code shijxcs/LIFT `utils/config.py`, `configs/model/*.yaml`,
`trainer.py`)."""

from dataclasses import dataclass, field

from .adapters import AdapterArguments
from .arguments import AugmentationArguments
from .corpus import LIFT_PROMPT_MODES
from .lgr_config import LGRConfig

# VL-LTR's ImageNet-LT / Places-LT schedule is 50 (stage 1) + 50 (stage 2) epochs; LIFT trains 10% of that.
VLLTR_TOTAL_EPOCHS = 100
ADAPTERS = ("adaptformer", "lora", "none")


@dataclass
class LIFTConfig(LGRConfig):
    """Training arguments of LIFT (`configs/model/clip_vit_b16.yaml`, `trainer.py` `build_optimizer`): SGD with
    momentum 0.9, lr 0.01 and weight decay 5e-4 on every trained parameter (biases, LayerNorms and the adapter scale
    included), batch 128, 10 epochs (20 on iNaturalist 2018), a cosine schedule without warm-up stepped once per epoch
    (`CosineAnnealingLR(optim, num_epochs)`), the logit-adjusted cross entropy with τ = 1, plain shuffling, no Mixup /
    CutMix / label smoothing, and the last incomplete batch kept (PyTorch's `DataLoader` default). `LIFTTrainer`
    reads `lr_schedule_per_epoch` and `decay_all_parameters`."""

    num_train_epochs: float = field(
        default=VLLTR_TOTAL_EPOCHS // 10, metadata={"help": "Epochs (LIFT: 10, 20 on iNaturalist 2018)."}
    )
    learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the adapters and the head."})
    optim: str = field(default="sgd", metadata={"help": "Optimizer (LIFT: SGD with momentum, see --optim_args)."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Optimizer arguments (LIFT: 0.9)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (LIFT 5e-4)."})
    decay_all_parameters: bool = field(
        default=True,
        metadata={
            "help": "Weight decay on every trained parameter, as LIFT's SGD applies it; False: none on biases and "
            "1-D parameters (the VL-LTR stages' rule)."
        },
    )
    lr_schedule_per_epoch: bool = field(
        default=True,
        metadata={
            "help": "With --lr_scheduler_type cosine: change the learning rate once per epoch, lr·(1 + cos(π·e/E))/2 "
            "in epoch e of E (LIFT's CosineAnnealingLR stepped per epoch); False: the Trainer's per-step cosine."
        },
    )
    logit_adjustment: float = field(
        default=1.0, metadata={"help": "τ of the logit-adjusted loss CE(z + τ·log π, y) (LIFT: 1)."}
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup Beta(α, α); LIFT uses none."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix Beta(α, α); LIFT uses none."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing (LIFT: none)."})
    dataloader_drop_last: bool = field(
        default=False, metadata={"help": "Drop the last incomplete batch (LIFT: kept)."}
    )
    sampling: str = field(
        default="instance",
        metadata={
            "help": "Training sampler (LIFT: plain shuffle, 'instance').",
            "choices": ["sqrt", "class", "instance"],
        },
    )


@dataclass
class LIFTAugmentationArguments(AugmentationArguments):
    """LIFT's training transform (`trainer.py` `build_data_loader`): torchvision RandomResizedCrop and a horizontal
    flip, nothing else. (LIFT's crop is bilinear, the package's torchvision crop bicubic.)"""

    rand_augment: bool = field(default=False, metadata={"help": "RandAugment m9 (LIFT: none)."})
    random_erasing: float = field(default=0.0, metadata={"help": "RandomErasing probability (LIFT: none)."})
    augmentation: str = field(
        default="torchvision",
        metadata={
            "help": "Library of the training transform: 'torchvision' (LIFT's) or 'timm'.",
            "choices": ["timm", "torchvision"],
        },
    )


@dataclass
class LIFTArguments(AdapterArguments):
    """The adapters in the frozen image tower and the cosine head with its initialisation from text."""

    adapter: str = field(
        default="adaptformer",
        metadata={
            "help": "'adaptformer' (LIFT's main results): one AdaptFormer per vision layer, saved in the model; "
            "'lora': peft LoRA adapters (--lora_*), merged into the saved weights; 'none': a frozen tower.",
            "choices": list(ADAPTERS),
        },
    )
    adapter_dim: int | None = field(
        default=None,
        metadata={
            "help": "AdaptFormer bottleneck r; default LIFT's rule 2^max(0, floor(log2(C / (2·layers)))) (32 for "
            "ImageNet-LT on ViT-B/16)."
        },
    )
    peft: str | None = field(
        default=None,
        metadata={
            "help": "Older spelling of --adapter: 'lora' = --adapter lora, 'none' = --adapter none.",
            "choices": ["none", "lora"],
        },
    )
    prompt_mode: str = field(
        default="default",
        metadata={
            "help": "The text that initialises the head (LIFT's `prompt`): 'default' ('a photo of a {}.'), "
            "'classname' (the bare name), 'ensemble' (CLIP's 80 ImageNet templates, averaged), 'descriptor' (the "
            "phrases of --descriptors, averaged per class).",
            "choices": list(LIFT_PROMPT_MODES),
        },
    )
    descriptors: str | None = field(
        default=None,
        metadata={
            "help": "With --prompt_mode descriptor: a JSON file mapping each class name to a list of phrases (LIFT's "
            "utils/descriptors_imagenet.json layout)."
        },
    )
    prompt_templates: str | None = field(
        default=None,
        metadata={
            "help": "Instead of --prompt_mode: your own prompt(s), '|'-separated ({} is the class name), averaged "
            "after normalisation; 'imagenet' = the 80 CLIP ImageNet templates (--prompt_mode ensemble)."
        },
    )
    classifier_feature: str = field(
        default="pooled",
        metadata={
            "help": "What the cosine head classifies: 'pooled' (LIFT: the image tower's feature before the "
            "projection, the head initialised from the text embeddings mapped back through it) or 'projected' (E_I, "
            "the head initialised from the text embeddings themselves).",
            "choices": ["pooled", "projected"],
        },
    )
    cosine_scale: float = field(default=25.0, metadata={"help": "s of the cosine head s·cos(f, w_c) (LIFT: 25)."})

    def __post_init__(self):
        if self.peft is not None:  # the older flag: --peft lora / none
            self.adapter = self.peft
        if self.adapter not in ADAPTERS:
            raise ValueError(f"--adapter must be one of {ADAPTERS}, got {self.adapter!r}.")
        if self.save_adapter and self.adapter != "lora":
            raise ValueError(
                "--save_adapter writes a peft LoRA adapter: it needs --adapter lora (AdaptFormer adapters are saved "
                "in model.safetensors)."
            )
        self.peft = "lora" if self.adapter == "lora" else "none"
        super().__post_init__()
        if self.adapter_dim is not None and self.adapter_dim < 1:
            raise ValueError(f"--adapter_dim must be >= 1, got {self.adapter_dim}.")
        if self.prompt_mode not in LIFT_PROMPT_MODES:
            raise ValueError(f"--prompt_mode must be one of {LIFT_PROMPT_MODES}, got {self.prompt_mode!r}.")
        if (self.prompt_mode == "descriptor") != (self.descriptors is not None):
            raise ValueError("--descriptors (a class -> phrases JSON file) goes with --prompt_mode descriptor.")
        if self.prompt_templates is not None:
            if self.prompt_mode != "default":
                raise ValueError("--prompt_templates replaces --prompt_mode: give one of them.")
            if self.prompt_templates != "imagenet" and not all("{}" in t for t in self.templates):
                raise ValueError(
                    f"--prompt_templates: every template needs a {{}} for the class name, got {self.prompt_templates!r}."
                )
        if not self.cosine_scale > 0:
            raise ValueError(f"--cosine_scale must be > 0, got {self.cosine_scale}.")

    @property
    def templates(self) -> list[str] | None:
        """The --prompt_templates given ('imagenet' spelled out by `corpus.lift_prompts`), or None."""
        if self.prompt_templates is None:
            return None
        return [t.strip() for t in self.prompt_templates.split("|") if t.strip()]
