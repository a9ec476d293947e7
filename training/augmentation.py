"""The reference training augmentation, built by timm (the library the official code uses), and the seeding that makes
it a pure function of a per-sample seed.

The official `datasets.py` `build_transform` calls timm's `create_transform(is_training=True, ...)` with the VL-LTR
defaults: RandomResizedCrop (scale (0.08, 1), bicubic), horizontal flip 0.5, RandAugment `rand-m9-mstd0.5-inc1`
(which turns timm's ColorJitter off), CLIP mean/std, then RandomErasing (p 0.25, mode "pixel", one box) on the
normalised tensor. `timm_train_transform` makes exactly that call.

timm's ops draw from Python's `random`, NumPy's global generator (RandAugment's op choice) and torch's global
generator (flip, erasing noise). `seeded_rngs(seed)` seeds all three from one per-sample seed and restores their states
afterwards, so the augmentation of a draw depends on its seed only (same-seed reproducibility, resume equality,
independence from the number of data-loader workers).
"""

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

REFERENCE_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
AUGMENTATIONS = ("timm", "torchvision")


def timm_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    rand_augment: bool = True,
    random_erasing: float = 0.25,
    rand_augment_policy: str = REFERENCE_RAND_AUGMENT,
) -> transforms.Compose:
    """timm's `create_transform(is_training=True)` with the reference VL-LTR settings (official `datasets.py`
    `build_transform`, `main.py` defaults): `RandomResizedCropAndInterpolation(image_size, scale=crop_scale,
    interpolation="bicubic")`, `RandomHorizontalFlip(hflip)`, timm `RandAugment(rand_augment_policy)` (each of its 2 ops
    applied with p = 0.5, magnitude 9 with Gaussian noise σ 0.5, fill = the mean colour), `ToTensor`,
    `Normalize(mean, std)`, timm `RandomErasing(random_erasing, mode="pixel", max_count=1)`.

    timm adds ColorJitter 0.4 only when no auto-augment policy is set; the reference sets one, so there is no jitter,
    and `rand_augment=False` here means no photometric augmentation at all (no jitter either)."""
    from timm.data import auto_augment as timm_auto_augment  # here: timm is slow to import (`--help` needs none)
    from timm.data import create_transform

    transform = create_transform(
        image_size,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=hflip,
        color_jitter=None,
        auto_augment=rand_augment_policy if rand_augment else None,
        interpolation="bicubic",
        mean=tuple(mean),
        std=tuple(std),
        re_prob=random_erasing,
        re_mode="pixel",
        re_count=1,
    )
    for step in transform.transforms:
        for op in getattr(step, "ops", []):  # RandAugment's AugmentOp list
            if op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's `posterize` as it behaved with the Pillow of the reference runs. At magnitude 10 (reached by m9 with its
    σ 0.5 noise about 2 % of the time) `PosterizeIncreasing` keeps 0 bits: Pillow < 13 returned a black image
    (`value & ~255`), Pillow ≥ 13 raises "bits must be between or equal to 1 and 8" and stops the run."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


@contextlib.contextmanager
def seeded_rngs(seed: int | None) -> Iterator[None]:
    """Within the block, torch's, NumPy's and Python's global generators are seeded from `seed`; their previous states
    are restored on exit. `seed=None` leaves them alone (an unseeded, non-reproducible draw)."""
    if seed is None:
        yield
        return
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # three distinct streams: torch seeds its Mersenne twister with the low 32 bits of `seed`, so NumPy's (the same
        # generator) gets a key derived through SeedSequence rather than `seed` itself
        random.seed(seed)
        np.random.seed(np.random.SeedSequence([seed, 1]).generate_state(4))
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


__all__ = ["AUGMENTATIONS", "REFERENCE_RAND_AUGMENT", "posterize", "seeded_rngs", "timm_train_transform"]
