"""Datasets as uint8 sample arrays: the name -> loader registry the producers stream from.

Every loader returns an ``ArrayDataset``: labels always in memory, pixels as uint8 C,H,W
(exactly what the record codec carries). CIFAR and Fashion-MNIST are read straight from
their standard files into one uint8 N,C,H,W array, so a batch is one fancy index.
``imagefolder`` decodes lazily, one image per ``pixels(i)``, so an ImageNet-sized folder is
never held in memory. A missing dataset raises ``DatasetError`` saying where it looked and
how to get the data; ``synthetic`` is used only when asked for by name.

``--dataset module:callable`` names a loader outside the package (a plug-in, imported by
``streamsim.plugins``): ``load_dataset`` calls it like the built-ins and checks that it
returned an ``ArrayDataset``.

CLI: ``python -m streamsim.datasets NAME [--data-dir D] [--split S]`` prints what it found
(NAME may be a plug-in).
"""
from __future__ import annotations

import argparse
import gzip
import inspect
import os
import pickle
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from streamsim import plugins

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "test")
# Where Debian's dataset-fashion-mnist package puts the files (checked after data_dir).
SYSTEM_FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
# ImageNet statistics: the usual normalization for photos we cannot scan up front.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(RuntimeError):
    """A dataset that is not where we looked; the message says how to get it."""


def default_data_dir() -> Path:
    """``$SCADLES_DATA_DIR``, else ``<repo>/data``."""
    return Path(os.environ.get("SCADLES_DATA_DIR") or REPO / "data")


class ArrayDataset:
    """Samples as uint8 (C, H, W) with int64 labels.

    Either ``images`` (uint8 N,C,H,W in memory) or ``load_pixels(i)`` (lazy decode) gives the
    pixels. ``mean``/``std`` are per-channel in [0, 1] units; when not given they are computed
    exactly from ``images`` on first use (a per-channel histogram, no float copy of the data).
    """

    def __init__(self, name: str, labels: np.ndarray, num_classes: int,
                 images: np.ndarray | None = None, *,
                 sample_shape: tuple[int, int, int] | None = None,
                 load_pixels: Callable[[int], np.ndarray] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 classes: Sequence[str] | None = None, source: str = ""):
        self.name = name
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else None
        self.source = source
        if images is not None:
            if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(self.labels):
                raise ValueError(f"images must be uint8 (N,C,H,W) with N = {len(self.labels)}, "
                                 f"got {images.dtype} {images.shape}")
            self._images = np.ascontiguousarray(images)
            self.sample_shape = tuple(int(d) for d in images.shape[1:])
        elif load_pixels is not None and sample_shape is not None:
            self._images = None
            self.sample_shape = tuple(int(d) for d in sample_shape)
        else:
            raise ValueError("ArrayDataset needs images, or load_pixels with sample_shape")
        self._load_pixels = load_pixels
        self._mean = tuple(float(m) for m in mean) if mean is not None else None
        self._std = tuple(float(s) for s in std) if std is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ArrayDataset({self.name!r}, {len(self)} samples, shape {self.sample_shape}, "
                f"{self.num_classes} classes)")

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    def pixels(self, i: int) -> np.ndarray:
        """Sample ``i`` as uint8 (C, H, W)."""
        if self._images is not None:
            return self._images[i]
        return self._load_pixels(int(i))

    def batch_pixels(self, idx: np.ndarray | Sequence[int]) -> np.ndarray:
        """Samples ``idx`` as one uint8 (N, C, H, W) array."""
        idx = np.asarray(idx, dtype=np.int64)
        if self._images is not None:
            return self._images[idx]
        out = np.empty((len(idx),) + self.sample_shape, dtype=np.uint8)
        for j, i in enumerate(idx):
            out[j] = self._load_pixels(int(i))
        return out

    @property
    def mean(self) -> tuple[float, ...]:
        if self._mean is None:
            self._mean, self._std = _channel_stats(self._images)
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        if self._std is None:
            self._mean, self._std = _channel_stats(self._images)
        return self._std


def _channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple, tuple]:
    """Exact per-channel mean and std in [0, 1] units, from 256-bin histograms."""
    channels = images.shape[1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk]
        for c in range(channels):
            hist[c] += np.bincount(block[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = hist.sum(axis=1)
    mean = (hist @ values) / total
    var = (hist @ values ** 2) / total - mean ** 2
    return tuple(mean.tolist()), tuple(np.sqrt(np.maximum(var, 0.0)).tolist())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------- CIFAR (python pickles)

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _load_cifar(name: str, folder_name: str, files: dict[str, list[str]], label_key: bytes,
                num_classes: int, split: str, data_dir: Path | None,
                download: bool) -> ArrayDataset:
    _check_split(split)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / folder_name
    if not folder.is_dir() and (root / files[split][0]).is_file():
        folder = root  # data_dir points at the extracted folder itself
    if download and not all((folder / f).is_file() for f in files[split]):
        _torchvision_download(name, root, split)
        folder = root / folder_name
    paths = [folder / f for f in files[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        tarball = folder_name.replace("-batches-py", "-python") + ".tar.gz"
        raise DatasetError(f"{name}: {missing[0].name} not found in {folder}; run with "
                           f"--download (needs network), or extract {tarball} into {root}")
    images, labels = [], []
    for path in paths:
        try:
            batch = _unpickle(path)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise DatasetError(f"{name}: {path} is not a CIFAR python batch ({e}); delete it "
                               f"and run with --download") from e
    labels_all = np.concatenate(labels)
    if labels_all.min() < 0 or labels_all.max() >= num_classes:
        raise DatasetError(f"{name}: labels in {folder} outside [0, {num_classes})")
    return ArrayDataset(name, labels_all, num_classes, np.concatenate(images),
                        source=str(folder))


def _torchvision_download(name: str, root: Path, split: str) -> None:
    """Fetch a dataset with torchvision's downloader (network needed)."""
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100,
           "fashion-mnist": tvd.FashionMNIST}[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(root=str(root), train=(split == "train"), download=True)
    except Exception as e:  # network, disk, integrity: all end the same way for the user
        raise DatasetError(f"{name}: download into {root} failed ({e})") from e


def load_cifar10(split: str = "train", data_dir: Path | None = None, download: bool = False,
                 image_size: int = 224, seed: int = 0) -> ArrayDataset:
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _load_cifar("cifar10", "cifar-10-batches-py", files, b"labels", 10, split,
                       data_dir, download)


def load_cifar100(split: str = "train", data_dir: Path | None = None, download: bool = False,
                  image_size: int = 224, seed: int = 0) -> ArrayDataset:
    files = {"train": ["train"], "test": ["test"]}
    return _load_cifar("cifar100", "cifar-100-python", files, b"fine_labels", 100, split,
                       data_dir, download)


# ---------------------------------------------------------------- Fashion-MNIST (idx files)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped): the MNIST family's array format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an idx file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: {array.size} values for shape {dims}")
    return array.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(split: str = "train", data_dir: Path | None = None,
                       download: bool = False, image_size: int = 224,
                       seed: int = 0) -> ArrayDataset:
    _check_split(split)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    places = [root / "FashionMNIST" / "raw", root / "fashion-mnist", *SYSTEM_FASHION_MNIST_DIRS]
    if download and not any(all(_find_idx(p, s) for s in stems) for p in places):
        _torchvision_download("fashion-mnist", root, split)
    for place in places:
        found = [_find_idx(place, s) for s in stems]
        if all(found):
            images = read_idx(found[0])
            labels = read_idx(found[1]).astype(np.int64)
            if images.ndim != 3 or len(images) != len(labels):
                raise DatasetError(f"fashion-mnist: {found[0]} has shape {images.shape} for "
                                   f"{len(labels)} labels")
            return ArrayDataset("fashion-mnist", labels, 10,
                                np.asarray(images, dtype=np.uint8)[:, None, :, :],
                                source=str(place))
    raise DatasetError(f"fashion-mnist: {stems[0]}[.gz] not found in "
                       f"{', '.join(str(p) for p in places)}; apt-get install "
                       f"dataset-fashion-mnist (or make data), or use --download")


# ---------------------------------------------------------------- ImageFolder (lazy)

def load_imagefolder(split: str = "train", data_dir: Path | None = None,
                     download: bool = False, image_size: int = 224,
                     seed: int = 0) -> ArrayDataset:
    """torchvision ImageFolder at ``data_dir/<split>`` (``val`` also serves ``test``), or
    ``data_dir`` itself for ``train``; images become square ``image_size`` RGB on access."""
    _check_split(split)
    if image_size < 1:
        raise ValueError(f"image_size {image_size}: must be >= 1")
    root = Path(data_dir) if data_dir is not None else default_data_dir() / "imagefolder"
    candidates = [root / split] + ([root / "val"] if split == "test" else [])
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None and split == "train" and root.is_dir():
        folder = root
    if folder is None:
        raise DatasetError(f"imagefolder: no folder for split {split!r} (looked for "
                           f"{', '.join(str(c) for c in candidates)}); put one sub-folder "
                           f"of images per class there and pass --data-dir")
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        folder_ds = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"imagefolder: {folder} has no class folders with images ({e})") from e
    paths = [path for path, _ in folder_ds.samples]
    size = (image_size, image_size)

    def load_pixels(i: int) -> np.ndarray:
        with Image.open(paths[i]) as img:
            rgb = img.convert("RGB").resize(size, Image.BILINEAR)
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))

    return ArrayDataset("imagefolder", np.asarray(folder_ds.targets, dtype=np.int64),
                        len(folder_ds.classes), sample_shape=(3, image_size, image_size),
                        load_pixels=load_pixels, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        classes=folder_ds.classes, source=str(folder))


# ---------------------------------------------------------------- synthetic

def load_synthetic(split: str = "train", data_dir: Path | None = None, download: bool = False,
                   image_size: int = 224, seed: int = 0, num_samples: int | None = None,
                   num_classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32),
                   noise_sd: float = 48.0) -> ArrayDataset:
    """A learnable stand-in: each class a smooth random pattern, each sample that pattern
    plus Gaussian noise. Train and test share the class patterns (same ``seed``)."""
    _check_split(split)
    if num_samples is None:
        num_samples = 5000 if split == "train" else 1000
    c, h, w = shape
    if num_samples < 1 or num_classes < 1 or min(shape) < 1:
        raise ValueError(f"synthetic: num_samples {num_samples}, num_classes {num_classes}, "
                         f"shape {shape}: all must be >= 1")
    pattern_rng = np.random.default_rng([seed, 0x5E])
    coarse = pattern_rng.uniform(16, 240, size=(num_classes, c, 4, 4)).astype(np.float32)
    rows, cols = np.arange(h) * 4 // h, np.arange(w) * 4 // w
    patterns = coarse[:, :, rows][:, :, :, cols]  # (K, C, H, W), blocky upsample
    sample_rng = np.random.default_rng([seed, 0x5E, SPLITS.index(split) + 1])
    labels = sample_rng.integers(0, num_classes, size=num_samples)
    noise = sample_rng.standard_normal((num_samples, c, h, w), dtype=np.float32)
    images = np.clip(patterns[labels] + noise_sd * noise, 0, 255).astype(np.uint8)
    return ArrayDataset("synthetic", labels, num_classes, images, source=f"seed {seed}")


# ---------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "fashion-mnist": load_fashion_mnist,
    "imagefolder": load_imagefolder,
    "synthetic": load_synthetic,
}


# In-memory datasets this process loaded, by their arguments: a process that forks ranks
# (scadles.rankhost) loads a split once and every rank shares its pages.
_LOADED: dict[tuple, ArrayDataset] = {}


def dataset_loader(name: str) -> Callable[..., ArrayDataset]:
    """The loader of ``name``: a key of ``DATASETS``, or a plug-in ``module:callable``
    (imported here; ``plugins.PluginError``, a ValueError, when it cannot be)."""
    return plugins.resolve(name, DATASETS, "--dataset", "unknown dataset", "MODULE:CALLABLE")


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None,
                 download: bool = False, image_size: int = 224, seed: int = 0,
                 **options: object) -> ArrayDataset:
    """Load dataset ``name`` (a key of ``DATASETS`` or a plug-in ``module:callable``);
    ``options`` go to its loader. An in-memory dataset is loaded once per process (and
    kept: it is read-only).

    A plug-in loader is called like the built-ins, with the keywords it accepts among
    ``split`` ("train" | "test"), ``data_dir`` (a Path or None), ``download``,
    ``image_size`` and ``seed`` (all of them when it takes ``**kwargs``), and must return an
    ``ArrayDataset``; anything else, or an exception other than ``DatasetError``, is a
    ``plugins.PluginError`` with a one-line message."""
    loader = dataset_loader(name)
    key = (name, split, None if data_dir is None else str(Path(data_dir).resolve()),
           image_size, seed, tuple(sorted(options.items())))
    if key in _LOADED:
        return _LOADED[key]
    kwargs = dict(split=split, data_dir=None if data_dir is None else Path(data_dir),
                  download=download, image_size=image_size, seed=seed, **options)
    if name in DATASETS:
        ds = loader(**kwargs)
    else:
        ds = _load_plugin(name, loader, kwargs)
    if ds.in_memory:
        _LOADED[key] = ds
    return ds


def _load_plugin(name: str, loader: Callable, kwargs: dict) -> ArrayDataset:
    """Call a plug-in loader with the keywords it takes; check it returned an ArrayDataset."""
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        params = []
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params}
        kwargs = {k: v for k, v in kwargs.items() if k in accepted or k == "split"}
    try:
        ds = loader(**kwargs)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's loader may raise anything)
        raise plugins.PluginError(f"--dataset {name!r} ({kwargs['split']} split) raised "
                                  f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(ds, ArrayDataset):
        raise plugins.PluginError(f"--dataset {name!r} returned a {type(ds).__name__} for the "
                                  f"{kwargs['split']} split: it must return a "
                                  f"streamsim.datasets.ArrayDataset")
    if len(ds) == 0:
        raise plugins.PluginError(f"--dataset {name!r} returned an empty {kwargs['split']} "
                                  f"split")
    return ds


def main(argv: list[str] | None = None) -> int:
    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter

    logsetup.configure("datasets")
    parser = argparse.ArgumentParser(prog="python -m streamsim.datasets",
                                     description="Show what a dataset name finds.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("name", help=f"{' | '.join(DATASETS)} | MODULE:CALLABLE (a plug-in)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="train", choices=SPLITS, help="which split to load")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--image-size", type=int, default=224, help="imagefolder only")
    args = parser.parse_args(argv)
    # The imported module, not __main__: a plug-in builds streamsim.datasets.ArrayDataset.
    from streamsim import datasets

    try:
        ds = datasets.load_dataset(args.name, split=args.split, data_dir=args.data_dir,
                                   download=args.download, image_size=args.image_size)
    except datasets.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unknown name, a broken plug-in
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{ds.name} {args.split}: {len(ds)} samples, shape {ds.sample_shape}, "
          f"{ds.num_classes} classes, from {ds.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
