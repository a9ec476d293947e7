"""Command-line arguments shared by the `run_*` scripts: the model, the data, the text corpus and the training
augmentation. Only dataclasses: splits are read by `splits.py`, the corpus by `corpus.py`."""

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "Stage 1: a CLIP checkpoint, Hub name or folder (e.g. openai/clip-vit-base-patch16). Later "
            "stages: the previous stage's output folder (or Hub name)."
        }
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) to pin the checkpoint to."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})

    @property
    def hub_kwargs(self) -> dict:
        """The keyword arguments every `from_pretrained` of the run takes (revision and cache folder)."""
        return {"revision": self.model_revision, "cache_dir": self.cache_dir}


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training split: an ImageNet-LT / Places-LT list file ('relative/path label' per line) or an "
            "iNaturalist 2018 JSON file."
        },
    )
    eval_file: str | None = field(default=None, metadata={"help": "Validation split evaluated during training."})
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the split files' paths are relative to (default: the file's folder)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Instead of split files: a 🤗 datasets dataset (Hub name, 'imagefolder', or a local folder) "
            "with image and label columns."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The 🤗 datasets configuration."})
    data_dir: str | None = field(default=None, metadata={"help": "`data_dir` for load_dataset (e.g. imagefolder)."})
    train_split: str = field(default="train", metadata={"help": "Split name of the 🤗 dataset used for training."})
    eval_split: str | None = field(default=None, metadata={"help": "Split name of the 🤗 dataset for evaluation."})
    image_column: str = field(default="image", metadata={"help": "Image column of the 🤗 dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of the 🤗 dataset."})
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "File with one class name per line (line i = label i). Default: the dataset's ClassLabel "
            "feature, the iNaturalist categories, or the checkpoint's id2label."
        },
    )
    image_check: str = field(
        default="full",
        metadata={
            "help": "Check every image before training: 'full' decodes them (catches truncated files), 'header' "
            "opens them, 'none' skips the check.",
            "choices": ["full", "header", "none"],
        },
    )
    long_tail_imbalance: float | None = field(
        default=None,
        metadata={
            "help": "Make the training split long-tailed first (e.g. CIFAR-100-LT from CIFAR-100): class c of C keeps "
            "int(N/C · ρ^(−c/(C−1))) of its images, the exponential profile of Cao et al. 2019 (LDAM) with imbalance "
            "ratio ρ = n_max / n_min (100, 50 or 10 for CIFAR-100-LT); see training.splits.long_tail_indices."
        },
    )
    long_tail_seed: int = field(default=0, metadata={"help": "Seed of the images --long_tail_imbalance keeps."})

    def __post_init__(self):
        if self.long_tail_imbalance is not None and not self.long_tail_imbalance >= 1:
            raise ValueError(f"--long_tail_imbalance must be a ratio >= 1, got {self.long_tail_imbalance}.")


@dataclass
class CorpusArguments:
    text_corpus: str | None = field(
        default=None,
        metadata={
            "help": "Class descriptions: a JSON file mapping class name or index to sentences, a folder of "
            "desc_<i>.txt Wikipedia files (official VL-LTR layout), or 'templates' for the prompt templates alone."
        },
    )
    use_templates: bool = field(
        default=True, metadata={"help": "Prepend CLIP's 80 ImageNet prompt templates per class (reference runs)."}
    )
    drop_duplicate_sentences: bool = field(
        default=False,
        metadata={"help": "Remove repeated sentences within a class (the reference keeps them)."},
    )
    token_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of the tokenised corpus (default ~/.cache/vlltr or $VLLTR_CACHE)."}
    )


@dataclass
class AugmentationArguments:
    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop minimum area (reference 0.08)."})
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability (reference 0.5)."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment m9 (reference rand-m9-mstd0.5-inc1)."})
    random_erasing: float = field(default=0.25, metadata={"help": "RandomErasing probability (reference 0.25)."})
    augmentation: str = field(
        default="timm",
        metadata={
            "help": "Library of the training transform: 'timm' (the reference's own create_transform) or "
            "'torchvision' (an approximation: RandAugment without magnitude noise, both ops always, black fill).",
            "choices": ["timm", "torchvision"],
        },
    )
