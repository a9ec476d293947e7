"""Command-line arguments shared by the `run_*` scripts (model and data), and loading a split from them."""

import os
from dataclasses import dataclass, field

import numpy as np

from .data import (
    DataError,
    ImageDataset,
    ProcessorTransform,
    check_images,
    check_split_classes,
    eval_image_processor,
    read_class_names,
    read_image_list,
    read_inat_json,
    train_transform,
)


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


def load_split(data_args: DataArguments, split_file: str | None, hf_split: str | None, num_classes: int | None):
    """Reads one split from a list file / iNaturalist JSON, or from a 🤗 dataset. Returns `(source, class_names)`
    where `source` feeds `ImageDataset` and `class_names` is what the split itself names (or None)."""
    if split_file:
        root = data_args.image_root if data_args.image_root is not None else os.path.dirname(split_file)
        if split_file.endswith(".json"):
            return read_inat_json(split_file, root, num_classes)
        return read_image_list(split_file, root, num_classes), None
    if data_args.dataset_name and hf_split:
        from datasets import ClassLabel, load_dataset

        try:
            dataset = load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir, split=hf_split
            )
        except Exception as e:  # datasets raises many types for a missing dataset or split
            raise DataError(f"--dataset_name {data_args.dataset_name} split {hf_split!r}: {e}") from None
        for column in (data_args.image_column, data_args.label_column):
            if column not in dataset.column_names:
                raise DataError(
                    f"{data_args.dataset_name}[{hf_split}] has no column {column!r} (columns: {dataset.column_names})."
                )
        if len(dataset) == 0:
            raise DataError(f"{data_args.dataset_name}[{hf_split}]: the split is empty.")
        feature = dataset.features[data_args.label_column]
        names = list(feature.names) if isinstance(feature, ClassLabel) else None
        labels = np.asarray(dataset[data_args.label_column])
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            row = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
            raise DataError(
                f"{data_args.dataset_name}[{hf_split}] row {row}: label {labels[row]} is outside the class list "
                f"(0..{num_classes - 1})."
            )
        return dataset, names
    return None, None


def resolve_class_names(data_args: DataArguments, split_names: list[str] | None, checkpoint_names=None) -> list[str]:
    """Class names from --class_names, else the split (ClassLabel / iNaturalist categories), else the checkpoint.
    When the checkpoint has class names and they differ from the data's, stop and name the difference."""
    names = read_class_names(data_args.class_names) if data_args.class_names else split_names
    if names is None:
        names = checkpoint_names
    if names is None:
        raise DataError("No class names: pass --class_names (a file with one class name per line, line i = label i).")
    if checkpoint_names is not None and list(checkpoint_names) != list(names):
        if len(checkpoint_names) != len(names):
            raise DataError(
                f"The checkpoint has {len(checkpoint_names)} classes but the data has {len(names)}; "
                f"use the checkpoint trained on this dataset."
            )
        first = next(i for i, (a, b) in enumerate(zip(checkpoint_names, names)) if a != b)
        raise DataError(
            f"The checkpoint's classes differ from the data's: label {first} is {checkpoint_names[first]!r} in the "
            f"checkpoint but {names[first]!r} in the data."
        )
    return list(names)


def checkpoint_class_names(config) -> list[str] | None:
    """The checkpoint's class names, or None when its id2label is the default placeholder (LABEL_0, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label[i] for i in range(len(id2label))]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def build_dataset(data_args: DataArguments, source, transform, split_label: str) -> ImageDataset:
    """An `ImageDataset` over `source`, after every image was checked (per --image_check)."""
    dataset = ImageDataset(source, transform, data_args.image_column, data_args.label_column)
    check_images(dataset, data_args.image_check)
    if len(dataset) == 0:
        raise DataError(f"{split_label}: the split is empty.")
    return dataset


def check_labels(source, num_classes: int, data_args: DataArguments, split_label: str) -> np.ndarray:
    """The split's labels, after checking each lies in [0, num_classes) (naming the file and line, or the row)."""
    if isinstance(source, list):
        for sample in source:
            if not 0 <= sample.label < num_classes:
                raise DataError(
                    f"{sample.where}: label {sample.label} is outside the class list (0..{num_classes - 1})."
                )
        return np.array([s.label for s in source], dtype=np.int64)
    labels = np.asarray(source[data_args.label_column], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{split_label} row {int(bad[0])}: label {labels[bad[0]]} is outside the class list (0..{num_classes - 1})."
        )
    return labels


def read_training_split(data_args: DataArguments, checkpoint_names: list[str] | None):
    """The training split both stages read: its source, the class names and its labels, checked (labels within the
    class list, at least two classes) before any image is opened. Returns `(source, class_names, labels)`."""
    source, split_names = load_split(data_args, data_args.train_file, data_args.train_split, None)
    if source is None:
        raise DataError("Give the training images: --train_file (a list file or iNaturalist JSON) or --dataset_name.")
    class_names = resolve_class_names(data_args, split_names, checkpoint_names)
    labels = check_labels(source, len(class_names), data_args, "training split")
    check_split_classes(labels, len(class_names), "training split")
    return source, class_names, labels


def build_training_datasets(data_args: DataArguments, aug_args: AugmentationArguments, source, num_classes: int,
                            image_size: int):  # fmt: skip
    """The training dataset (training augmentation) and, when --eval_file / --eval_split is given, the evaluation
    dataset (the evaluation image processor), every image checked. Returns `(train, eval or None, processor)`."""
    image_processor = eval_image_processor(image_size)
    transform = train_transform(
        image_size,
        (aug_args.crop_scale_min, 1.0),
        aug_args.hflip,
        aug_args.rand_augment,
        aug_args.random_erasing,
        aug_args.augmentation,
    )
    train_dataset = build_dataset(data_args, source, transform, "training split")
    eval_dataset = None
    eval_source, _ = load_split(data_args, data_args.eval_file, data_args.eval_split, num_classes)
    if eval_source is not None:
        check_labels(eval_source, num_classes, data_args, "evaluation split")
        eval_dataset = build_dataset(data_args, eval_source, ProcessorTransform(image_processor), "evaluation split")
    return train_dataset, eval_dataset, image_processor
