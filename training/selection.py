"""The image set anchor sentences are scored against (AnSS, paper Sec. 3.2), as the official code forms it.

`main.py` L417-425 of the official code picks the selection images by dataset:

- ImageNet-LT and Places-LT configs set `test=True`, so `--select` falls back to `data_loader_val`: every image of the
  LT validation split, once, through the evaluation transform (`selection_images="eval"` here);
- iNaturalist configs do not, so `--select` reuses `data_loader_train`, built on the first 50 training images of
  each class (`mcloader/inat.py` L16-24, `select=True`): one epoch of the square-root `WeightedDistributedSampler`
  with replacement (as many draws as images), each draw through the training augmentation
  (`selection_images="train"` here, the iNaturalist recipe's default).
"""

import numpy as np
import torch

from .data import LongTailSampler
from .splits import ImageDataset

SELECTION_IMAGES = ("eval", "train")

TRAINING_IMAGES_WARNING = (
    "Anchors are scored on the first {limit} training images of each class, not on a held-out split. The reference "
    "does this for iNaturalist only; its ImageNet-LT and Places-LT numbers score anchors on the LT validation split "
    "(20 images per class), so pass --selection_file for those."
)


class SampledSelection(torch.utils.data.Dataset):
    """One epoch of square-root draws (with replacement) from `dataset`, each item `dataset[(index, seed)]`: the image
    through `dataset`'s (training) transform, seeded per draw, so the selection set is a function of `seed` alone.

    The reference drops the last incomplete batch of its training loader (`drop_last=True`); every draw is kept here,
    so the set does not depend on the batch size or the number of processes."""

    def __init__(self, dataset: ImageDataset, seed: int = 0):
        self.dataset = dataset
        indices, seeds = LongTailSampler(dataset.labels, "sqrt", seed=seed).draws()
        self.draws = list(zip(indices.tolist(), seeds.tolist()))
        self.labels = np.asarray(dataset.labels)[indices.numpy()]  # (N,) the class of every draw

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, position: int) -> dict:
        return self.dataset[self.draws[position]]


__all__ = ["SELECTION_IMAGES", "SampledSelection", "TRAINING_IMAGES_WARNING"]
