"""Training batches for VL-LTR: the long-tail sampler, the image transforms and the collators of both stages.

Splits and images are read in `splits.py`, the class text corpus in `corpus.py`.
"""

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from transformers import LevitImageProcessor
from transformers.image_utils import PILImageResampling

from .arguments import AugmentationArguments
from .augmentation import AUGMENTATIONS, timm_train_transform
from .corpus import TokenizedCorpus

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def eval_image_processor(image_size: int) -> LevitImageProcessor:
    """The reference evaluation transform: resize the short side to `int(256 / 224 · image_size)` (256 for 224),
    bicubic, centre-crop `image_size`, CLIP mean/std (official `datasets/__init__.py` `build_transform`). Saved with
    every checkpoint, so the pipeline and `run_eval` preprocess exactly as the paper evaluates.

    It is transformers' `LevitImageProcessor`, whose resize is that same formula: its `size["shortest_edge"]` is the
    model's input size, as for CLIP's own processor, so clients that read `size` as the input size (the stock
    `run_image_classification.py` example) feed `image_size` pixels. Its output equals a `CLIPImageProcessor` resizing
    to 256 and cropping 224, bit for bit (`tests/test_data.py`)."""
    return LevitImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
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


def train_transform_from_args(aug_args: AugmentationArguments, image_size: int):
    """`train_transform` with the run's --crop_scale_min, --hflip, --rand_augment, --random_erasing, --augmentation."""
    return train_transform(
        image_size,
        (aug_args.crop_scale_min, 1.0),
        aug_args.hflip,
        aug_args.rand_augment,
        aug_args.random_erasing,
        aug_args.augmentation,
    )


def training_datasets(train, evaluation, aug_args: AugmentationArguments, image_size: int):
    """The datasets a training run reads: `train` (a `LabelledSplit`) through the training augmentation and, when
    given, `evaluation` through the evaluation image processor. Returns `(train_dataset, eval_dataset or None,
    image_processor)`; the processor is saved with the checkpoint."""
    image_processor = eval_image_processor(image_size)
    train_dataset = train.dataset(train_transform_from_args(aug_args, image_size))
    eval_dataset = evaluation.dataset(ProcessorTransform(image_processor)) if evaluation is not None else None
    return train_dataset, eval_dataset, image_processor


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
    `engine.py` `train_one_epoch`). The draw is a function of the sample's seed. Adds `input_ids`, `attention_mask`
    (trimmed to the longest sentence of the batch) and `sentence_ids` (positions in the corpus).

    Args:
        tokens: the tokenised corpus.
        sentence_labels (`(N,)`): class id of every sentence; the corpus lists its sentences grouped by class, in
            label order (as `ClassCorpus` does).
    """

    def __init__(self, tokens: TokenizedCorpus, sentence_labels):
        self.input_ids = tokens.input_ids
        self.attention_mask = tokens.attention_mask
        sizes = torch.bincount(torch.as_tensor(np.asarray(sentence_labels), dtype=torch.int64))  # (C,)
        self.starts = torch.cumsum(sizes, 0) - sizes  # (C,) first sentence of each class
        self.sizes = sizes

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
