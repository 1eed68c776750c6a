"""A dataset plug-in from outside the package (``--dataset mydata:stripes``), and a broken one."""
from __future__ import annotations

import numpy as np

from streamsim.datasets import ArrayDataset


def stripes(split: str, seed: int = 0) -> ArrayDataset:
    """1x8x8 grayscale images of 4 classes: class c is a bright stripe in row pair c."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    count = 400 if split == "train" else 100
    labels = rng.integers(0, 4, size=count)
    images = rng.integers(0, 60, size=(count, 1, 8, 8)).astype(np.uint8)
    for c in range(4):
        images[labels == c, 0, 2 * c:2 * c + 2, :] = 220
    return ArrayDataset("stripes", labels, 4, images, source="tests/plugins/mydata.py")


def not_a_dataset(split: str):
    return [1, 2, 3]
