"""Small, valid CIFAR-10/100 python-pickle folders for tests (the real layout, made-up pixels).

Each function writes the files ``streamsim.datasets`` reads and returns what it wrote, as
``{"train": (images uint8 N,3,32,32, labels int64), "test": (...)}``, so a test can compare.
Every class appears in both splits when there are at least as many samples as classes.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _make_split(rng: np.random.Generator, n: int, num_classes: int):
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0] = labels % 256  # first red pixel = label: easy to check by eye
    return images, labels


def _write(path: Path, batch: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar10(root: str | Path, n_train: int = 500, n_test: int = 100,
                 seed: int = 0) -> dict:
    """Write ``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = _make_split(rng, n_train, 10), _make_split(rng, n_test, 10)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _write(folder / f"data_batch_{i}",
               {b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": train[1][part].tolist(),
                b"data": train[0][part].reshape(len(part), -1),
                b"filenames": [f"img_{j}.png".encode() for j in part]})
    _write(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                   b"labels": test[1].tolist(),
                                   b"data": test[0].reshape(n_test, -1)})
    _write(folder / "batches.meta", {b"label_names": [f"class{k}".encode() for k in range(10)],
                                     b"num_vis": 3072})
    return {"train": train, "test": test}


def make_cifar100(root: str | Path, n_train: int = 500, n_test: int = 200,
                  seed: int = 0) -> dict:
    """Write ``root/cifar-100-python`` (train, test, meta) with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = _make_split(rng, n_train, 100), _make_split(rng, n_test, 100)
    for name, (images, labels) in (("train", train), ("test", test)):
        _write(folder / name, {b"fine_labels": labels.tolist(),
                               b"coarse_labels": (labels // 5).tolist(),
                               b"data": images.reshape(len(images), -1)})
    _write(folder / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)],
                             b"coarse_label_names": [f"c{k}".encode() for k in range(20)]})
    return {"train": train, "test": test}
