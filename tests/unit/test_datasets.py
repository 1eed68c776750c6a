"""Dataset loaders: CIFAR fixtures, the real Fashion-MNIST, imagefolder, synthetic, errors."""
import json

import numpy as np
import pytest

from streamsim import datasets
from streamsim.datasets import DATASETS, ArrayDataset, DatasetError, load_dataset
from tests.cifar_fixture import make_cifar10, make_cifar100


def _check_matches(ds: ArrayDataset, images: np.ndarray, labels: np.ndarray):
    assert len(ds) == len(labels)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.pixels(3).dtype == np.uint8 and ds.pixels(3).shape == ds.sample_shape
    np.testing.assert_array_equal(ds.pixels(3), images[3])
    idx = np.array([5, 0, 5, len(ds) - 1])
    batch = ds.batch_pixels(idx)
    assert batch.dtype == np.uint8 and batch.shape == (4,) + ds.sample_shape
    np.testing.assert_array_equal(batch, images[idx])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_fixture_loads(tmp_path, split):
    written = make_cifar10(tmp_path, n_train=250, n_test=60)
    ds = load_dataset("cifar10", split=split, data_dir=tmp_path)
    assert (ds.name, ds.num_classes, ds.sample_shape) == ("cifar10", 10, (3, 32, 32))
    _check_matches(ds, *written[split])
    assert set(ds.labels.tolist()) == set(range(10))
    assert len(ds.mean) == len(ds.std) == 3
    assert all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std)


def test_cifar10_from_the_extracted_folder_itself(tmp_path):
    written = make_cifar10(tmp_path, n_train=50, n_test=10)
    ds = load_dataset("cifar10", split="test", data_dir=tmp_path / "cifar-10-batches-py")
    _check_matches(ds, *written["test"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_fixture_loads_fine_labels(tmp_path, split):
    written = make_cifar100(tmp_path, n_train=300, n_test=200)
    ds = load_dataset("cifar100", split=split, data_dir=tmp_path)
    assert (ds.num_classes, ds.sample_shape) == (100, (3, 32, 32))
    _check_matches(ds, *written[split])
    assert ds.labels.max() == 99  # fine labels, not the 20 coarse ones


def test_channel_stats_are_exact(tmp_path):
    images, _ = make_cifar10(tmp_path, n_train=50, n_test=10)["train"]
    ds = load_dataset("cifar10", data_dir=tmp_path)
    scaled = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(ds.std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)


def test_fashion_mnist_real_train(fashion_mnist):
    ds = fashion_mnist
    assert (len(ds), ds.sample_shape, ds.num_classes) == (60000, (1, 28, 28), 10)
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 6000))
    assert ds.batch_pixels(np.arange(8)).shape == (8, 1, 28, 28)
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_fashion_mnist_real_test():
    ds = load_dataset("fashion-mnist", split="test")
    assert (len(ds), ds.sample_shape, ds.num_classes) == (10000, (1, 28, 28), 10)
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))


def test_fashion_mnist_in_torchvision_layout(tmp_path, fashion_mnist, monkeypatch):
    """An uncompressed idx pair under <data_dir>/FashionMNIST/raw is found first."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = fashion_mnist.batch_pixels(np.arange(20))[:, 0]
    labels = fashion_mnist.labels[:20].astype(np.uint8)
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + np.array([20, 28, 28], ">u4").tobytes() + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + np.array([20], ">u4").tobytes() + labels.tobytes())
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIRS", [])
    ds = load_dataset("fashion-mnist", split="test", data_dir=tmp_path)
    assert ds.source == str(raw)
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.batch_pixels(np.arange(20))[:, 0], images)


def test_missing_fashion_mnist_names_every_place(tmp_path, monkeypatch):
    nowhere = tmp_path / "system"
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIRS", [nowhere])
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    message = str(info.value)
    for place in (tmp_path / "FashionMNIST" / "raw", tmp_path / "fashion-mnist", nowhere):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "make data" in message
    assert "\n" not in message


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"),
                                          ("cifar100", "cifar-100-python")])
def test_missing_cifar_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(DatasetError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / folder) in message and "--download" in message
    assert "\n" not in message


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    make_cifar10(tmp_path, n_train=50, n_test=10)
    monkeypatch.setenv("SCADLES_DATA_DIR", str(tmp_path))
    assert len(load_dataset("cifar10", split="test")) == 10


def test_corrupt_cifar_batch_is_a_dataset_error(tmp_path):
    make_cifar10(tmp_path, n_train=50, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", split="test", data_dir=tmp_path)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("synthetic", split="validation")
    assert set(DATASETS) == {"cifar10", "cifar100", "fashion-mnist", "imagefolder",
                             "synthetic"}


def test_synthetic_is_deterministic_and_learnable():
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    assert (len(a), a.sample_shape, a.num_classes) == (5000, (3, 32, 32), 10)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.batch_pixels(np.arange(len(a))),
                                  b.batch_pixels(np.arange(len(b))))
    assert not np.array_equal(a.batch_pixels(np.arange(50)), c.batch_pixels(np.arange(50)))
    # Learnable: class means of the train split classify the test split.
    assert len(load_dataset("synthetic", split="test", seed=3)) == 1000
    test = load_dataset("synthetic", split="test", seed=3, num_samples=300)
    train_x = a.batch_pixels(np.arange(2000)).reshape(2000, -1).astype(np.float32)
    train_y = a.labels[:2000]
    centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in range(10)])
    test_x = test.batch_pixels(np.arange(len(test))).reshape(len(test), -1).astype(np.float32)
    distances = (centroids ** 2).sum(axis=1)[None, :] - 2 * test_x @ centroids.T
    assert (distances.argmin(axis=1) == test.labels).mean() > 0.95


def test_synthetic_size_options():
    ds = load_dataset("synthetic", num_samples=64, num_classes=4, shape=(1, 8, 8))
    assert (len(ds), ds.num_classes, ds.sample_shape) == (64, 4, (1, 8, 8))
    assert ds.labels.max() < 4


def _write_png_folder(root, size=(30, 20)):
    from PIL import Image

    colors = {"cat": (250, 10, 10), "dog": (10, 10, 250)}
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", size, color).save(root / name / f"{i}.png")
    Image.new("L", size, 128).save(root / "dog" / "gray.png")  # grayscale becomes RGB


def test_imagefolder_tiny_pngs(tmp_path):
    _write_png_folder(tmp_path / "train")
    ds = load_dataset("imagefolder", data_dir=tmp_path, image_size=16)
    assert not ds.in_memory
    assert (len(ds), ds.num_classes, ds.sample_shape) == (7, 2, (3, 16, 16))
    assert ds.classes == ["cat", "dog"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1, 1])
    cat = ds.pixels(0)
    assert cat.dtype == np.uint8 and cat.shape == (3, 16, 16)
    assert cat[0].min() > 200 and cat[2].max() < 50
    batch = ds.batch_pixels(np.array([3, 0]))
    assert batch.shape == (2, 3, 16, 16) and batch[0, 2].min() > 200
    assert len(ds.mean) == len(ds.std) == 3
    with pytest.raises(DatasetError, match="test"):
        load_dataset("imagefolder", split="test", data_dir=tmp_path)


def test_imagefolder_val_serves_test(tmp_path):
    _write_png_folder(tmp_path / "val", size=(8, 8))
    ds = load_dataset("imagefolder", split="test", data_dir=tmp_path, image_size=8)
    assert len(ds) == 7 and ds.source == str(tmp_path / "val")


def test_cli_prints_what_it_found(tmp_path, capsys):
    make_cifar10(tmp_path, n_train=50, n_test=10)
    assert datasets.main(["cifar10", "--data-dir", str(tmp_path), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "10 samples" in out and "(3, 32, 32)" in out and "10 classes" in out
    assert datasets.main(["cifar100", "--data-dir", str(tmp_path)]) == 1
    assert "cifar-100-python" in capsys.readouterr().err


def test_array_dataset_rejects_bad_images():
    with pytest.raises(ValueError):
        ArrayDataset("x", np.zeros(3), 2, np.zeros((3, 1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        ArrayDataset("x", np.zeros(3), 2, np.zeros((2, 1, 2, 2), dtype=np.uint8))
    json.dumps(list(load_dataset("synthetic", num_samples=10).mean))
