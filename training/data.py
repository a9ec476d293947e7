"""Data for VL-LTR: split files, class names, the class text corpus, samplers, transforms and collators.

Every user-data error is a `DataError` (a `ValueError`) with one line that names the file and line, the class or the
image at fault, raised before any training starts.
"""

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file
from torchvision.transforms import v2
from transformers import CLIPImageProcessor
from transformers.image_utils import PILImageResampling
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .augmentation import AUGMENTATIONS, seeded_rngs, timm_train_transform
from .io_utils import atomic_write

logger = logging.get_logger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """A problem with the user's data (a split file, an image, the class list or the text corpus)."""


# ----------------------------------------------------------------------------------------------------------------------
# Images and labels
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSample:
    path: str
    label: int
    where: str  # "file:line" (or "file: image id N"), for error messages


def _check_label(label: int, num_classes: int | None, where: str) -> None:
    if label < 0:
        raise DataError(f"{where}: negative label {label}.")
    if num_classes is not None and label >= num_classes:
        raise DataError(f"{where}: label {label} is outside the class list (0..{num_classes - 1}).")


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of a user file; a missing or non-UTF-8 file is a one-line `DataError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start}).") from None


def read_image_list(list_file: str | os.PathLike, image_root: str | os.PathLike, num_classes: int | None = None):
    """Reads an ImageNet-LT / Places-LT split file: one `relative/path label` per line, paths relative to
    `image_root`. Blank lines are skipped. Returns a list of `ImageSample`."""
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
        _check_label(label, num_classes, where)
        samples.append(ImageSample(os.path.join(image_root, rel_path), label, where))
    if not samples:
        raise DataError(f"{list_file}: the split is empty.")
    return samples


def read_inat_json(json_file: str | os.PathLike, image_root: str | os.PathLike, num_classes: int | None = None):
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
        label = label_of.get(category, category)
        _check_label(label, num_classes, where)
        samples.append(ImageSample(os.path.join(image_root, file_name), label, where))
    if not samples:
        raise DataError(f"{json_file}: the split is empty.")
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
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        logger.warning(f"{path}: {len(duplicates)} class name(s) appear more than once, e.g. {duplicates[:3]}.")
    return names


def check_split_classes(labels: np.ndarray, num_classes: int, split_name: str, min_classes: int = 2) -> None:
    present = np.unique(labels)
    if len(present) < min_classes:
        raise DataError(
            f"{split_name}: holds images of {len(present)} class(es) only; a classifier needs at least {min_classes}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# The class text corpus
# ----------------------------------------------------------------------------------------------------------------------

# CLIP's 80 ImageNet prompt templates (Radford et al. 2021; reference `mcloader/prompt_template.py`).
IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]  # fmt: skip

# Wikipedia sections the reference preprocessing drops (`mcloader/preprocess.py`).
DROPPED_SECTIONS = ("references", "external links", "further reading", "bibliography")

# A sentence ends after "." or "?" followed by white space or a capital letter, except after an abbreviation like
# "e.g." or a capital letter and a full stop (an initial, and also the end of an acronym: "the USA. It" stays one
# sentence). This is the reference `SentPreProcessor.split_sent` pattern (`mcloader/preprocess.py` L57-64), verbatim.
_SENTENCE_END = re.compile(r"(?<!\w\.\w.)(?<!([A-Z][a-z])|([A-Z])\.)(?<=\.|\?)(?=[\sA-Z])", re.X)


def split_sentences(text: str) -> list[str]:
    # the pattern's groups sit in a negative look-behind: `re.split` returns them as None
    return [s.strip() for s in _SENTENCE_END.split(text) if s is not None and s.strip()]


def wikipedia_text(text: str) -> str:
    """The summary plus every section except References / External links / Further reading / Bibliography.
    Lines starting with "==" are section headers (their own text is not kept)."""
    kept, dropped_level = [], None  # level ("==" = 2) of the dropped section we are in, if any
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("=="):
            level = len(stripped) - len(stripped.lstrip("="))
            if dropped_level is not None and level > dropped_level:
                continue  # a sub-section of a dropped section stays dropped
            dropped_level = level if stripped.strip("=").strip().lower() in DROPPED_SECTIONS else None
            continue
        if dropped_level is None:
            kept.append(stripped)
    return "\n".join(kept)


@dataclass
class ClassCorpus:
    """The sentences of every class, grouped by class in label order (`sentences[offsets[c]:offsets[c + 1]]` are
    class c's). Templates come first within a class, as in the reference corpus."""

    class_names: list[str]
    sentences: list[str]
    labels: np.ndarray  # (N,) class id of each sentence
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(self.labels, minlength=len(self.class_names)))])

    def class_sentences(self, c: int) -> list[str]:
        start, end = self.offsets[c], self.offsets[c + 1]
        return self.sentences[start:end]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for label, sentence in zip(self.labels.tolist(), self.sentences):
            h.update(f"{label}\t{sentence}\n".encode())
        return h.hexdigest()


def _corpus_from_json(path: Path, class_names: list[str]) -> dict[int, list[str]]:
    try:
        data = json.loads(read_text_file(path, "corpus file"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping class name or index to a list of sentences.")
    ambiguous = {name for name, count in Counter(class_names).items() if count > 1}
    index_of = {}
    for i, name in enumerate(class_names):
        index_of.setdefault(name, i)
    by_class: dict[int, list[str]] = {}
    for key, value in data.items():
        if key in index_of:
            c = index_of[key]
            if key in ambiguous:
                raise DataError(f"{path}: class name {key!r} is ambiguous (it names several classes); key by index.")
        elif str(key).isdigit() and int(key) < len(class_names):
            c = int(key)
        else:
            raise DataError(
                f"{path}: names class {key!r}, which is not in the class list ({len(class_names)} classes)."
            )
        if isinstance(value, str):
            value = split_sentences(value)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise DataError(f"{path}: the entry for class {key!r} must be a list of sentences (strings) or a text.")
        by_class.setdefault(c, []).extend(value)
    return by_class


def _corpus_from_wiki_dir(folder: Path, class_names: list[str]) -> dict[int, list[str]]:
    if (folder / "wiki").is_dir():
        folder = folder / "wiki"
    files = {}
    for path in folder.glob("desc_*.txt"):
        match = re.fullmatch(r"desc_(\d+)\.txt", path.name)
        if match:
            files[int(match.group(1))] = path
    extra = sorted(i for i in files if i >= len(class_names))
    if extra:
        raise DataError(f"{files[extra[0]]}: names class index {extra[0]}, but there are {len(class_names)} classes.")
    return {c: split_sentences(wikipedia_text(read_text_file(path, "corpus file"))) for c, path in files.items()}


def build_class_corpus(
    class_names: list[str],
    text_corpus: str | os.PathLike | None = None,
    use_templates: bool = True,
    drop_duplicates: bool = False,
) -> ClassCorpus:
    """Builds the sentence pool of every class.

    Args:
        class_names: label i is `class_names[i]`.
        text_corpus: a JSON file mapping class name or index to a list of sentences (or a text to split); a folder
            in the official VL-LTR layout (`desc_<i>.txt` Wikipedia files, optionally under `wiki/`); or `None` /
            `"templates"` for the prompt templates alone (asked for explicitly, since it drops the descriptions).
        use_templates: prepend CLIP's 80 ImageNet prompt templates to every class, as the reference runs do.
        drop_duplicates: remove repeated sentences within a class. Off by default: the reference
            (`SentPreProcessor`) keeps them, so a repeated sentence is drawn more often in stage 1 and can fill
            several anchor slots.

    Empty sentences are dropped (counted in `stats`, as are duplicates removed). A class with no
    sentence in a given corpus, or a corpus entry for a class that does not exist, is a `DataError`.
    """
    templates_only = text_corpus is None or str(text_corpus) == "templates"
    if templates_only and not use_templates:
        raise DataError("No text corpus given and the prompt templates are turned off: every class has no sentence.")
    by_class: dict[int, list[str]] = {}
    if not templates_only:
        path = Path(text_corpus)
        if path.is_dir():
            by_class = _corpus_from_wiki_dir(path, class_names)
        elif path.is_file():
            by_class = _corpus_from_json(path, class_names)
        else:
            raise DataError(
                f"{text_corpus}: text corpus not found (a JSON file, a desc_<i>.txt folder or 'templates')."
            )
        missing = [c for c in range(len(class_names)) if not any(s.strip() for s in by_class.get(c, []))]
        if missing:
            names = ", ".join(f"{c} ({class_names[c]!r})" for c in missing[:5])
            raise DataError(
                f"{text_corpus}: {len(missing)} class(es) have no sentences, e.g. {names}. Add descriptions, or pass "
                f"--text_corpus templates to train on the prompt templates alone."
            )
    sentences, labels = [], []
    stats = {"empty_dropped": 0, "duplicates_removed": 0, "template_sentences": 0}
    for c, name in enumerate(class_names):
        pool = [t.format(name) for t in IMAGENET_TEMPLATES] if use_templates else []
        stats["template_sentences"] += len(pool)
        seen = set()
        for sentence in pool + by_class.get(c, []):
            sentence = " ".join(sentence.split())
            if not sentence:
                stats["empty_dropped"] += 1
            elif drop_duplicates and sentence in seen:
                stats["duplicates_removed"] += 1
            else:
                seen.add(sentence)
                sentences.append(sentence)
                labels.append(c)
    if stats["empty_dropped"] or stats["duplicates_removed"]:
        logger.warning(
            f"Text corpus: dropped {stats['empty_dropped']} empty sentence(s) and removed "
            f"{stats['duplicates_removed']} duplicate(s) within a class."
        )
    corpus = ClassCorpus(list(class_names), sentences, np.array(labels, dtype=np.int64), stats)
    logger.info(f"Text corpus: {len(sentences)} sentences for {len(class_names)} classes.")
    return corpus


@dataclass
class TokenizedCorpus:
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    num_truncated: int


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{vocab}".encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLLTR_CACHE", Path.home() / ".cache" / "vlltr"))


def tokenize_corpus(corpus: ClassCorpus, tokenizer, max_length: int = 77, cache_dir=None) -> TokenizedCorpus:
    """Tokenises every sentence once to `max_length` tokens: `[SOT] + tokens[: max_length - 2] + [EOT]`, padded.
    Long sentences are truncated, not dropped (reference `SentPreProcessor.tokenize`), and counted in the log.
    The result is cached under `cache_dir` keyed by a hash of the sentences and the tokenizer's vocabulary (the
    reference keys its cache by dataset name only, so a changed corpus silently reused a stale one)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        f"{corpus.fingerprint()}\n{_tokenizer_fingerprint(tokenizer)}\n{max_length}".encode()
    ).hexdigest()[:32]
    cache_file = cache_dir / "tokens" / f"{key}.safetensors"
    if cache_file.exists():
        try:
            cached = load_file(cache_file)
            result = TokenizedCorpus(
                cached["input_ids"].long(), cached["attention_mask"].long(), int(cached["num_truncated"])
            )
            if len(result.input_ids) == len(corpus.sentences):
                logger.info(f"Loaded tokenised corpus from {cache_file}.")
                return result
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            logger.warning(f"Ignoring unreadable token cache {cache_file} ({e}).")

    encoded = tokenizer(corpus.sentences, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), max_length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(encoded), max_length), dtype=torch.int64)
    num_truncated = 0
    for i, ids in enumerate(encoded):
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos_id]
            num_truncated += 1
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    if num_truncated:
        logger.warning(f"Text corpus: {num_truncated} sentence(s) longer than {max_length} tokens were truncated.")
    result = TokenizedCorpus(input_ids, attention_mask, num_truncated)
    tensors = {
        "input_ids": input_ids.int(),
        "attention_mask": attention_mask.to(torch.int8),
        "num_truncated": torch.tensor(num_truncated),
    }
    try:
        atomic_write(cache_file, lambda tmp: save_file(tensors, tmp))
    except OSError as e:
        logger.warning(f"Could not write the token cache {cache_file} ({e}); continuing without it.")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------

SAMPLING_MODES = ("sqrt", "instance", "class")


class LongTailSampler(torch.utils.data.Sampler):
    """Draws one epoch of `num_samples` (default: the dataset size) training images and yields `(index, seed)`.

    - "sqrt" (reference default in both stages): class c is drawn with probability ∝ √n_c, images uniformly within
      their class, with replacement (per-image weight 1/√n_c).
    - "class": every class equally likely (per-image weight 1/n_c), with replacement.
    - "instance": a plain shuffle of the dataset.

    The epoch's draws and per-draw seeds depend only on `(seed, epoch)`, so every process of a distributed run
    generates the same sequence and Accelerate's batch sharding gives each process a disjoint share of it, and a
    resumed run replays it exactly. The seed of a draw fixes its augmentation and its paired sentence.
    """

    def __init__(self, labels, mode: str = "sqrt", num_samples: int | None = None, seed: int = 0):
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}.")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.mode = mode
        self.num_samples = int(num_samples) if num_samples is not None else len(self.labels)
        self.seed = seed
        self.epoch = 0
        counts = torch.bincount(self.labels).double()
        power = {"sqrt": 0.5, "class": 1.0, "instance": 0.0}[mode]
        self.weights = counts[self.labels].pow(-power)  # (N,) per-image weight 1/n_c^p

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) % 2**63)
        if self.mode == "instance" and self.num_samples == len(self.labels):
            indices = torch.randperm(len(self.labels), generator=generator)
        else:
            indices = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        return indices, seeds

    def __iter__(self):
        indices, seeds = self.draws()
        yield from zip(indices.tolist(), seeds.tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------------


def eval_image_processor(image_size: int, crop_pct: float = 0.875) -> CLIPImageProcessor:
    """The reference evaluation transform as a `CLIPImageProcessor`: resize the short side to
    `floor(image_size / crop_pct)` (256 for 224), bicubic, centre-crop `image_size`, CLIP mean/std. Saved with every
    checkpoint, so the pipeline and `run_eval` preprocess exactly as the paper evaluates."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": int(math.floor(image_size / crop_pct))},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


class ProcessorTransform:
    """Applies an image processor to one PIL image and returns a (3, H, W) tensor (picklable for workers)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def train_transform(
    image_size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    rand_augment: bool = True,
    random_erasing: float = 0.25,
    augmentation: str = "timm",
):
    """The reference training transform (timm `create_transform` with the VL-LTR configs): RandomResizedCrop
    (bicubic), horizontal flip, RandAugment `rand-m9-mstd0.5-inc1`, CLIP normalisation, RandomErasing p=0.25 with
    per-pixel random values (mode "pixel").

    `augmentation="timm"` (default) builds it with timm itself (`training.augmentation.timm_train_transform`).
    `augmentation="torchvision"` is the earlier torchvision v2 approximation, kept as an option: its RandAugment applies
    both ops always, fills with black, has no magnitude noise and samples from its own op list (magnitude 9 of 10 bins
    keeps timm's strength of 0.9 of the maximum)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}.")
    if augmentation == "timm":
        return timm_train_transform(
            image_size, CLIP_MEAN, CLIP_STD, tuple(crop_scale), hflip, rand_augment, random_erasing
        )
    steps = [
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rand_augment:
        steps.append(v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(steps)


# ----------------------------------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------------------------------


def _stack_images(features: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = torch.stack([f["pixel_values"] for f in features])  # (B, 3, H, W)
    labels = torch.tensor([f["labels"] for f in features], dtype=torch.int64)  # (B,)
    return pixel_values, labels


def _batch_generator(features: list[dict]) -> torch.Generator:
    seeds = [f.get("sample_seed") for f in features]
    if any(s is None for s in seeds):
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return torch.Generator().manual_seed(hash(tuple(seeds)) % 2**62)


class CVLPCollator:
    """Stage-1 batches: each image is paired with one sentence drawn uniformly from its class's pool (reference
    `train_one_epoch`). The draw is a function of the sample's seed. Adds `input_ids`, `attention_mask` (trimmed to
    the longest sentence of the batch) and `sentence_ids` (positions in the corpus)."""

    def __init__(self, tokens: TokenizedCorpus, corpus: ClassCorpus):
        self.input_ids = tokens.input_ids
        self.attention_mask = tokens.attention_mask
        offsets = corpus.offsets
        self.starts = torch.as_tensor(offsets[:-1], dtype=torch.int64)
        self.sizes = torch.as_tensor(np.diff(offsets), dtype=torch.int64)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values, labels = _stack_images(features)
        seeds = [f.get("sample_seed") for f in features]
        if any(s is None for s in seeds):
            draws = torch.randint(0, 2**62, (len(features),))
        else:
            draws = torch.tensor([s // 7 for s in seeds], dtype=torch.int64)  # decorrelated from the augmentation
        sentence_ids = self.starts[labels] + draws % self.sizes[labels]  # (B,)
        attention_mask = self.attention_mask[sentence_ids]
        length = int(attention_mask.sum(-1).max())
        return {
            "pixel_values": pixel_values,
            "input_ids": self.input_ids[sentence_ids, :length],
            "attention_mask": attention_mask[:, :length],
            "labels": labels,
            "sentence_ids": sentence_ids,
        }


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off)
    targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)
    return targets  # (B, C)


class MixupCutmixCollator:
    """Stage-2 batches with Mixup / CutMix and label smoothing in timm's "batch" mode (reference defaults: mixup
    α 0.8, cutmix α 1.0, prob 1.0, switch 0.5, smoothing 0.1): one λ per batch, each image mixed with the batch in
    reverse order, targets `λ·y + (1 − λ)·y_flipped` of smoothed one-hot vectors. CutMix corrects λ to the pasted
    area. With both alphas 0 and smoothing 0 the labels stay class ids. Randomness comes from the samples' seeds."""

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing = label_smoothing

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values, labels = _stack_images(features)
        mixing = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if not mixing and self.label_smoothing == 0:
            return {"pixel_values": pixel_values, "labels": labels}
        targets = one_hot_smoothed(labels, self.num_classes, self.label_smoothing)
        generator = _batch_generator(features)
        uniform = torch.rand(2, generator=generator).tolist()
        if not mixing or uniform[0] >= self.prob:
            return {"pixel_values": pixel_values, "labels": targets}
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or uniform[1] < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = _sample_beta(alpha, generator)
        flipped = pixel_values.flip(0)
        if use_cutmix:
            height, width = pixel_values.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy = int(torch.randint(0, height, (), generator=generator))
            cx = int(torch.randint(0, width, (), generator=generator))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            pixel_values = pixel_values.clone()
            pixel_values[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        else:
            pixel_values = pixel_values * lam + flipped * (1.0 - lam)
        return {"pixel_values": pixel_values, "labels": targets * lam + targets.flip(0) * (1.0 - lam)}


def _sample_beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(α, α) by Jöhnk's algorithm from a seeded generator (torch.distributions takes no generator)."""
    while True:
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        x, y = u ** (1.0 / alpha), v ** (1.0 / alpha)
        if 0.0 < x + y <= 1.0:
            return x / (x + y)


def eval_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    pixel_values, labels = _stack_images(features)
    return {"pixel_values": pixel_values, "labels": labels}
