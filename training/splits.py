"""Labelled splits: from a split file (ImageNet-LT / Places-LT list), an iNaturalist JSON or a 🤗 dataset, plus the
`DataArguments`, to a checked dataset of (image, label) with its class names.

`load_labelled_split` is the one way the scripts read a split. Labels, emptiness and the number of classes are
checked there, once, before any image is opened; `LabelledSplit.dataset(transform)` then checks every image (per
`--image_check`) and returns the `ImageDataset` the trainers and evaluation read. Every user-data error is a one-line
`DataError` naming the file and line, the row, the class or the image at fault.
"""

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, load_dataset
from PIL import Image, ImageFile
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .arguments import DataArguments
from .augmentation import seeded_rngs
from .io_utils import DataError, check_class_names, read_text_file

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Images and labels
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSample:
    path: str
    label: int
    where: str  # "file:line" (or "file: image id N"), for error messages


def read_image_list(list_file: str | os.PathLike, image_root: str | os.PathLike) -> list[ImageSample]:
    """Reads an ImageNet-LT / Places-LT split file: one `relative/path label` per line, paths relative to
    `image_root`. Blank lines are skipped. Returns a list of `ImageSample` (labels are checked by `check_labels`)."""
    samples = []
    lines = read_text_file(list_file, "split file").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{lineno}"
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'relative/path label', got {line.strip()!r}.")
        rel_path, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{where}: label {label_text!r} is not an integer.") from None
        samples.append(ImageSample(os.path.join(image_root, rel_path), label, where))
    return samples


def read_inat_json(json_file: str | os.PathLike, image_root: str | os.PathLike):
    """Reads an iNaturalist 2018 split (`images`, `annotations`, `categories`). Annotations are joined to images by
    `image_id` (the reference code zips the two lists by position). Categories are sorted by id and label i is the
    i-th category. Returns `(samples, class_names)`."""
    try:
        data = json.loads(read_text_file(json_file, "iNaturalist JSON file"))
    except json.JSONDecodeError as e:
        raise DataError(f"{json_file}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{json_file}: missing the {key!r} list of an iNaturalist JSON file.")
    categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    class_names = [str(c.get("name", c["id"])) for c in categories] or None
    try:
        label_by_image = {ann["image_id"]: ann["category_id"] for ann in data["annotations"]}
        images = [(image["id"], image["file_name"]) for image in data["images"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{json_file}: an image or annotation entry lacks the key {e}.") from None
    samples = []
    for image_id, file_name in images:
        where = f"{json_file}: image id {image_id} ({file_name})"
        if image_id not in label_by_image:
            raise DataError(f"{where}: has no annotation.")
        category = label_by_image[image_id]
        if label_of and category not in label_of:
            raise DataError(f"{where}: category_id {category} is not in the categories list.")
        samples.append(ImageSample(os.path.join(image_root, file_name), label_of.get(category, category), where))
    return samples, class_names


def load_rgb(image: Any) -> Image.Image:
    """Opens a path (or takes a PIL image) and returns an RGB image. CMYK, palette, RGBA and grayscale images are
    converted; 16-bit and float images are rescaled to 8 bit first (PIL would clip them): by their bit depth, or for
    32-bit and float images by the smallest of 1, 255, 65535 that bounds their values."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image.load()  # decode now, so a truncated file fails here (inside the caller's error handling)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            high = 65535.0
        elif image.mode == "F":
            high = 1.0 if array.max() <= 1.0 else 255.0 if array.max() <= 255.0 else float(array.max())
        else:  # 32-bit "I": 16-bit PNGs open in this mode
            high = 255.0 if array.max() <= 255.0 else 65535.0 if array.max() <= 65535.0 else float(array.max())
        array = np.clip(array, 0.0, None) / high * 255.0
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return image


def _verify_one(sample: ImageSample, full: bool) -> str | None:
    try:
        with Image.open(sample.path) as image:
            if full:
                image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; still reads every byte of the file
                image.load()
            else:
                image.verify()
    except FileNotFoundError:
        return f"{sample.where}: image not found: {sample.path}"
    except Exception as e:  # PIL raises many types for broken files
        return f"{sample.where}: cannot read image {sample.path} ({type(e).__name__}: {e})"
    return None


def check_images(dataset: "ImageDataset", mode: str = "full", num_workers: int = 4) -> None:
    """Opens every image of `dataset` before training, so a missing, unreadable or truncated file stops the run at
    once, naming the split file and line. `mode`: "full" decodes each image (catches truncation), "header" only
    reads headers, "none" skips the check."""
    if mode not in ("full", "header", "none"):
        raise ValueError(f"image check mode must be 'full', 'header' or 'none', got {mode!r}.")
    if mode == "none" or len(dataset) == 0:
        return
    if isinstance(dataset.source, list):
        check = lambda i: _verify_one(dataset.source[i], mode == "full")  # noqa: E731
    elif mode == "full":  # a 🤗 dataset: decode each row

        def check(i):
            try:
                dataset.load_image(i)
            except DataError as e:
                return str(e)
            return None
    else:
        return
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    block = 512  # checked in blocks, so the first bad file stops the check without waiting for the rest
    try:
        with (
            ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool,
            tqdm(total=len(dataset), desc="Checking images", leave=False, unit="img") as bar,
        ):
            for start in range(0, len(dataset), block):
                indices = range(start, min(start + block, len(dataset)))
                for error in pool.map(check, indices):
                    if error is not None:
                        raise DataError(error)
                bar.update(len(indices))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


class ImageDataset(torch.utils.data.Dataset):
    """Images with labels from a split file (a list of `ImageSample`) or a 🤗 `datasets.Dataset`.

    `dataset[i]` or `dataset[(i, seed)]` returns `{"pixel_values", "labels", "sample_seed"}`. With a seed (from
    `LongTailSampler`) the random augmentation of that draw is a pure function of the seed, so a resumed run sees
    exactly the images an uninterrupted one would, whatever the number of data-loader workers.
    """

    def __init__(self, source, transform, image_column: str = "image", label_column: str = "label"):
        self.source = source
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        if isinstance(source, list):
            self.labels = np.array([s.label for s in source], dtype=np.int64)
        else:
            self.labels = np.asarray(source[label_column], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        return self.source[index].where if isinstance(self.source, list) else f"dataset row {index}"

    def load_image(self, index: int) -> Image.Image:
        try:  # a 🤗 dataset decodes the image when the row is read
            raw = self.source[index].path if isinstance(self.source, list) else self.source[index][self.image_column]
            return load_rgb(raw)
        except Exception as e:
            raise DataError(f"{self.describe(index)}: cannot read image ({type(e).__name__}: {e})") from None

    def __getitem__(self, key) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.load_image(index)
        with seeded_rngs(seed):  # torch, NumPy and Python `random` (timm's ops use all three), restored afterwards
            pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, "labels": int(self.labels[index]), "sample_seed": seed}


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


# ----------------------------------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------------------------------


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line; line i is label i. Underscores become spaces (as in the reference preprocessing)."""
    lines = read_text_file(path, "class-name file").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for lineno, line in enumerate(lines, start=1):
        name = line.strip().replace("_", " ")
        if not name:
            raise DataError(f"{path}:{lineno}: empty class name.")
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names.")
    check_class_names(names, path, DataError)
    return names


def check_split_classes(labels: np.ndarray, num_classes: int, split_name: str, min_classes: int = 2) -> None:
    present = np.unique(labels)
    if len(present) < min_classes:
        raise DataError(
            f"{split_name}: holds images of {len(present)} class(es) only; a classifier needs at least {min_classes}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Loading a labelled split: the one path every script takes
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_class_names(config) -> list[str] | None:
    """The checkpoint's class names, or None when its id2label is the default placeholder (LABEL_0, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    if sorted(id2label) != list(range(len(id2label))):  # a hand-edited config (folders are checked on loading)
        raise DataError(f"The checkpoint's id2label numbers its classes {sorted(id2label)}; they must be 0..N-1.")
    names = [id2label[i] for i in range(len(id2label))]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def resolve_class_names(
    data_args: DataArguments, split_names: list[str] | None, checkpoint_names=None, source: str = "the split"
) -> list[str]:
    """Class names from --class_names, else the split (ClassLabel / iNaturalist categories), else the checkpoint.
    When the checkpoint has class names and they differ from the data's, stop and name the difference."""
    names = read_class_names(data_args.class_names) if data_args.class_names else split_names
    if split_names is not None and not data_args.class_names:  # iNaturalist categories, a ClassLabel feature
        check_class_names(split_names, source, DataError, first_line=None)
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


def check_labels(source, num_classes: int, description: str = "", label_column: str = "label") -> np.ndarray:
    """The split's labels, after checking each lies in [0, num_classes): a split file's error names its file and
    line (or iNaturalist image id), a 🤗 dataset's its row. Returns the labels as an int64 array."""
    if isinstance(source, list):
        for sample in source:
            if sample.label < 0:
                raise DataError(f"{sample.where}: negative label {sample.label}.")
            if sample.label >= num_classes:
                raise DataError(
                    f"{sample.where}: label {sample.label} is outside the class list (0..{num_classes - 1})."
                )
        return np.array([s.label for s in source], dtype=np.int64)
    labels = np.asarray(source[label_column], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{description} row {int(bad[0])}: label {labels[bad[0]]} is outside the class list (0..{num_classes - 1})."
        )
    return labels


def _read_source(data_args: DataArguments, split_file: str | None, hf_split: str | None):
    """`(source, class names the split itself gives or None, description)` of one split, or `(None, None, None)`
    when neither a split file nor a 🤗 dataset split is given."""
    if split_file:
        root = data_args.image_root if data_args.image_root is not None else os.path.dirname(split_file)
        if data_args.image_root is not None and not os.path.isdir(root):
            problem = "is a file, not a folder" if os.path.exists(root) else "no such folder"
            raise DataError(f"--image_root {root}: {problem} (the folder the paths in {split_file} are relative to).")
        if str(split_file).endswith(".json"):
            samples, names = read_inat_json(split_file, root)
            return samples, names, str(split_file)
        return read_image_list(split_file, root), None, str(split_file)
    if not (data_args.dataset_name and hf_split):
        return None, None, None
    description = f"{data_args.dataset_name}[{hf_split}]"
    try:
        dataset = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir, split=hf_split
        )
    except Exception as e:  # datasets raises many types for a missing dataset or split
        raise DataError(f"--dataset_name {data_args.dataset_name} split {hf_split!r}: {e}") from None
    for column in (data_args.image_column, data_args.label_column):
        if column not in dataset.column_names:
            raise DataError(f"{description} has no column {column!r} (columns: {dataset.column_names}).")
    feature = dataset.features[data_args.label_column]
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    return dataset, names, description


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance: float, seed: int = 0) -> np.ndarray:
    """The images a long-tailed version of a (balanced) split keeps: class c keeps the first
    n_c = int(N/C · (1/ρ)^(c/(C−1))) of its images in a seeded shuffle, the profile of Cao et al. 2019 (LDAM,
    `IMBALANCECIFAR100.get_img_num_per_cls`) as LIFT builds CIFAR-100-LT (shijxcs/LIFT `datasets/cifar100.py`: one
    `np.random.seed(seed)`, then one `np.random.shuffle` per class in label order; the same draws here, so a split in
    torchvision's CIFAR-100 order gives LIFT's images). Returns the kept row indices, grouped by class (N', )."""
    labels = np.asarray(labels)
    image_max = len(labels) / num_classes
    rng = np.random.RandomState(seed)
    keep = []
    for c in range(num_classes):
        count = int(image_max * (1.0 / imbalance) ** (c / (num_classes - 1.0)))
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        keep.append(rows[:count])
    return np.concatenate(keep)


@dataclass
class LabelledSplit:
    """One split with its checked labels and class names. `dataset(transform)` gives the images."""

    name: str  # "training split", "test split", ... (for messages)
    description: str  # the split file, or "dataset[split]" (for messages and the run history)
    source: Any  # a list of `ImageSample`, or a 🤗 `datasets.Dataset`
    class_names: list[str]
    labels: np.ndarray  # (N,) int64, each in [0, len(class_names))
    image_column: str = "image"
    label_column: str = "label"
    image_check: str = "full"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        """(C,) images of each class in this split."""
        return class_counts(self.labels, self.num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray, description: str) -> "LabelledSplit":
        """The split restricted to `rows` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        source = [self.source[i] for i in rows] if isinstance(self.source, list) else self.source.select(rows.tolist())
        return replace(self, description=description, source=source, labels=self.labels[rows])

    def first_per_class(self, limit: int) -> "LabelledSplit":
        """The first `limit` images of each class, in split order (the reference iNaturalist selection set)."""
        keep = np.concatenate([np.flatnonzero(self.labels == c)[:limit] for c in np.unique(self.labels)])
        keep.sort()
        source = [self.source[i] for i in keep] if isinstance(self.source, list) else self.source.select(keep.tolist())
        description = f"first {limit} images per class of {self.description}"
        return replace(self, description=description, source=source, labels=self.labels[keep])

    def dataset(self, transform) -> "ImageDataset":
        """An `ImageDataset` applying `transform`, after every image was checked (per --image_check)."""
        dataset = ImageDataset(self.source, transform, self.image_column, self.label_column)
        check_images(dataset, self.image_check)
        return dataset


def load_labelled_split(
    data_args: DataArguments,
    split_file: str | None,
    hf_split: str | None,
    name: str,
    *,
    class_names: list[str] | None = None,
    checkpoint_names: list[str] | None = None,
    min_classes: int = 1,
    training: bool = False,
) -> LabelledSplit | None:
    """Reads one split (a list file, an iNaturalist JSON, or `hf_split` of --dataset_name) and checks it: not empty,
    every label within the class list, at least `min_classes` classes present. No image is opened yet.

    Args:
        data_args: the scripts' `DataArguments` (image root, dataset name and columns, --class_names, --image_check).
        split_file / hf_split: where the split is; None for both means the split was not given (returns None).
        name: what the split is for ("training split", ...), used in messages.
        class_names: the class list to check against (e.g. the training split's, for an evaluation split); by
            default --class_names, else the names the split gives, else `checkpoint_names`, which must then agree.
        training: this is the training split, which --long_tail_imbalance makes long-tailed (`long_tail_indices`).
    """
    source, split_names, description = _read_source(data_args, split_file, hf_split)
    if source is None:
        return None
    if len(source) == 0:
        raise DataError(f"{description}: the split is empty.")
    if class_names is None:
        class_names = resolve_class_names(data_args, split_names, checkpoint_names, description)
    labels = check_labels(source, len(class_names), description, data_args.label_column)
    check_split_classes(labels, len(class_names), name, min_classes)
    split = LabelledSplit(
        name, description, source, list(class_names), labels,
        data_args.image_column, data_args.label_column, data_args.image_check,
    )  # fmt: skip
    if training and data_args.long_tail_imbalance is not None:
        ratio, seed = data_args.long_tail_imbalance, data_args.long_tail_seed
        rows = long_tail_indices(labels, len(class_names), ratio, seed)
        split = split.subset(rows, f"{description}, long-tailed with imbalance {ratio:g} (seed {seed})")
        check_split_classes(split.labels, len(class_names), name, min_classes)
    return split


def load_training_splits(
    data_args: DataArguments, checkpoint_names: list[str] | None = None
) -> tuple[LabelledSplit, LabelledSplit | None]:
    """What every training script reads: the training split (required, at least two classes) and, when --eval_file
    / --eval_split is given, the evaluation split, checked against the training split's class list."""
    train = load_labelled_split(
        data_args, data_args.train_file, data_args.train_split, "training split",
        checkpoint_names=checkpoint_names, min_classes=2, training=True,
    )  # fmt: skip
    if train is None:
        raise DataError("Give the training images: --train_file (a list file or iNaturalist JSON) or --dataset_name.")
    evaluation = load_labelled_split(
        data_args, data_args.eval_file, data_args.eval_split, "evaluation split", class_names=train.class_names
    )
    return train, evaluation
