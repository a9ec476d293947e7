"""The training transform is timm's, with the reference policy, and a pure function of the per-sample seed."""

import random

import numpy as np
import pytest
import torch
from conftest import write_lt_dataset
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from training.augmentation import posterize, seeded_rngs
from training.data import CLIP_MEAN, CLIP_STD, train_transform
from training.splits import ImageDataset, read_image_list

# timm's "inc1" op set (`_RAND_INCREASING_TRANSFORMS`), written out so a change in timm or in the policy string shows
INCREASING_OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
]  # fmt: skip


def _only(steps, kind):
    found = [t for t in steps if isinstance(t, kind)]
    assert len(found) == 1, f"expected one {kind.__name__} in {steps}"
    return found[0]


def test_train_transform_is_timm_with_the_reference_policy():
    steps = train_transform(224).transforms
    crop = _only(steps, RandomResizedCropAndInterpolation)
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert _only(steps, transforms.RandomHorizontalFlip).p == 0.5
    assert not any(isinstance(t, transforms.ColorJitter) for t in steps)  # timm turns it off under RandAugment

    rand_augment = _only(steps, RandAugment)
    assert rand_augment.num_layers == 2 and rand_augment.choice_weights is None
    assert [op.name for op in rand_augment.ops] == INCREASING_OPS
    for op in rand_augment.ops:
        assert op.prob == 0.5 and op.magnitude == 9 and op.magnitude_std == 0.5
        assert op.kwargs["fillcolor"] == tuple(round(255 * m) for m in CLIP_MEAN)  # mean-colour fill
        assert op.kwargs["resample"] == Image.Resampling.BICUBIC

    normalize = _only(steps, transforms.Normalize)
    assert np.allclose(normalize.mean, CLIP_MEAN) and np.allclose(normalize.std, CLIP_STD)
    erasing = _only(steps, RandomErasing)
    assert erasing.probability == 0.25 and erasing.mode == "pixel" and erasing.per_pixel
    assert erasing.min_count == erasing.max_count == 1
    # erasing runs last, on the normalised tensor
    assert steps.index(erasing) == len(steps) - 1 and steps.index(normalize) < steps.index(erasing)


def test_switches_and_torchvision_option():
    steps = train_transform(32, crop_scale=(0.5, 1.0), hflip=0, rand_augment=False, random_erasing=0).transforms
    assert _only(steps, RandomResizedCropAndInterpolation).scale == (0.5, 1.0)
    kinds = (transforms.RandomHorizontalFlip, transforms.ColorJitter, RandAugment, RandomErasing)
    assert not any(isinstance(t, kinds) for t in steps)
    from torchvision.transforms import v2

    assert isinstance(train_transform(32, augmentation="torchvision"), v2.Compose)
    with pytest.raises(ValueError, match="augmentation"):
        train_transform(32, augmentation="albumentations")


@pytest.fixture
def dataset(tmp_path):
    data = write_lt_dataset(tmp_path, train_counts=[3, 2], eval_per_class=1)
    return ImageDataset(read_image_list(data["train"], data["root"]), train_transform(32))


def test_seeded_draws_are_reproducible_and_leave_every_global_generator(dataset):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = [dataset[(i % len(dataset), 1000 + i)]["pixel_values"] for i in range(12)]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    # other global states, same seeds: the same images (RandAugment draws its ops from NumPy, the crop from random)
    random.seed(6)
    np.random.seed(6)
    torch.manual_seed(6)
    again = [dataset[(i % len(dataset), 1000 + i)]["pixel_values"] for i in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # different seeds give different augmentations
    other = [dataset[(i % len(dataset), 5000 + i)]["pixel_values"] for i in range(12)]
    assert sum(not torch.equal(a, b) for a, b in zip(first, other)) >= 10


def test_seeded_rngs_makes_three_distinct_streams():
    with seeded_rngs(7):
        a = (random.random(), float(np.random.random_sample()), float(torch.rand(())))
    with seeded_rngs(7):
        b = (random.random(), float(np.random.random_sample()), float(torch.rand(())))
    assert a == b and len(set(a)) == 3
    # NumPy's legacy generator is not seeded with the very key torch's Mersenne twister gets
    with seeded_rngs(7):
        assert not np.array_equal(np.random.get_state()[1], np.random.RandomState(7).get_state()[1])


def test_posterize_keeping_no_bit_is_black_as_with_the_reference_pillow():
    steps = train_transform(32).transforms
    op = next(op for op in _only(steps, RandAugment).ops if op.name == "PosterizeIncreasing")
    assert op.aug_fn is posterize
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # 4 - int(10 / 10 * 4) = 0 bits kept
    assert np.array_equal(np.asarray(op(image)), np.zeros((16, 16, 3), np.uint8))
    # 1..7 bits: Pillow's own posterize, from the old lookup table `value & ~(2 ** (8 - bits) - 1)`
    pixels = np.asarray(image)
    for bits in (1, 3, 7):
        expected = pixels & (~(2 ** (8 - bits) - 1) & 0xFF)
        assert np.array_equal(np.asarray(posterize(image, bits)), expected)
    assert posterize(image, 8) is image
