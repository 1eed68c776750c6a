"""Partitions: sizes, labels per device, determinism, and the paper's two non-IID setups."""
import json

import numpy as np
import pytest

from streamsim.partition import make_partition


def _labels(num_classes, per_class, seed=0):
    """Shuffled labels with ``per_class`` samples of each class (like CIFAR's train split)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


CIFAR10 = _labels(10, 500)
CIFAR100 = _labels(100, 50)


def _check_disjoint(part, n_total, complete=True):
    union = np.concatenate(part.indices)
    assert len(np.unique(union)) == len(union)
    if complete:
        assert len(union) == n_total
    for ix in part.indices:
        assert ix.dtype == np.int64 and np.all(np.diff(ix) > 0)
    assert part.samples_per_device == [len(ix) for ix in part.indices]


@pytest.mark.parametrize("world_size", [1, 3, 10, 16])
def test_iid_equal_shards(world_size):
    part = make_partition(CIFAR10, world_size, "iid", seed=0)
    shard = len(CIFAR10) // world_size
    assert part.samples_per_device == [shard] * world_size
    _check_disjoint(part, len(CIFAR10), complete=False)
    assert len(np.concatenate(part.indices)) == len(CIFAR10) - len(CIFAR10) % world_size
    if shard >= 200:  # a random shard of this size holds every label
        assert all(ls == list(range(10)) for ls in part.labels_per_device)


def test_noniid_cifar10_on_10_devices_one_label_each():
    part = make_partition(CIFAR10, 10, "noniid", seed=0)
    assert part.labels_per_device == [[r] for r in range(10)]
    for r, ix in enumerate(part.indices):
        np.testing.assert_array_equal(ix, np.flatnonzero(CIFAR10 == r))
    _check_disjoint(part, len(CIFAR10))


def test_noniid_cifar100_on_25_devices_four_contiguous_labels_each():
    part = make_partition(CIFAR100, 25, "noniid", seed=0)
    assert part.labels_per_device == [[4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3]
                                      for r in range(25)]
    assert part.samples_per_device == [200] * 25
    _check_disjoint(part, len(CIFAR100))


def test_noniid_uneven_groups_are_as_even_as_possible():
    part = make_partition(CIFAR10, 3, "noniid", seed=0)
    assert part.labels_per_device == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    _check_disjoint(part, len(CIFAR10))


def test_noniid_more_devices_than_labels_split_each_label():
    part = make_partition(CIFAR10, 20, "noniid", seed=0)
    assert part.labels_per_device == [[r // 2] for r in range(20)]
    assert part.samples_per_device == [250] * 20
    _check_disjoint(part, len(CIFAR10))
    part = make_partition(CIFAR10, 16, "noniid", seed=0)  # 6 labels on 2 devices, 4 on 1
    assert [ls[0] for ls in part.labels_per_device] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5,
                                                        6, 7, 8, 9]
    _check_disjoint(part, len(CIFAR10))


def test_noniid_label_with_too_few_samples_for_its_devices():
    with pytest.raises(ValueError, match="fewer samples"):
        make_partition(np.array([0, 0, 0, 1]), 4, "noniid", seed=0)


def _max_label_share(part, labels):
    return np.mean([np.bincount(labels[ix]).max() / len(ix) for ix in part.indices])


def test_dirichlet_skew_follows_alpha():
    skewed = make_partition(CIFAR10, 10, "dirichlet:0.1", seed=0)
    balanced = make_partition(CIFAR10, 10, "dirichlet:1000", seed=0)
    for part in (skewed, balanced):
        _check_disjoint(part, len(CIFAR10))
        assert min(part.samples_per_device) >= 1
    assert _max_label_share(skewed, CIFAR10) > 0.5
    assert _max_label_share(balanced, CIFAR10) < 0.15
    assert all(ls == list(range(10)) for ls in balanced.labels_per_device)


def test_dirichlet_never_leaves_a_device_empty():
    part = make_partition(_labels(2, 20), 30, "dirichlet:0.01", seed=1)
    assert min(part.samples_per_device) >= 1
    _check_disjoint(part, 40)


@pytest.mark.parametrize("scheme", ["iid", "noniid", "dirichlet:0.5"])
def test_deterministic_under_seed(scheme):
    a = make_partition(CIFAR10, 7, scheme, seed=11)
    b = make_partition(CIFAR10, 7, scheme, seed=11)
    c = make_partition(CIFAR10, 7, scheme, seed=12)
    assert a.summary() == b.summary()
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    if scheme != "noniid":  # noniid membership is fixed by the labels; only order varies
        assert any(not np.array_equal(x, y) for x, y in zip(a.indices, c.indices))


@pytest.mark.parametrize("scheme", ["iid", "noniid", "dirichlet:0.5"])
def test_independent_of_the_global_rng(scheme):
    np.random.seed(1)
    state = np.random.get_state()[1].copy()
    a = make_partition(CIFAR10, 4, scheme, seed=5)
    assert np.array_equal(np.random.get_state()[1], state), "global RNG was used"
    np.random.seed(2)
    np.random.random(100)
    b = make_partition(CIFAR10, 4, scheme, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))


def test_summary_is_json_and_format_is_a_table():
    part = make_partition(CIFAR100, 25, "noniid", seed=0)
    summary = json.loads(json.dumps(part.summary()))
    assert set(summary) == {"scheme", "labels_per_device", "samples_per_device"}
    assert summary["scheme"] == "noniid" and summary["labels_per_device"][1] == [4, 5, 6, 7]
    table = part.format()
    assert len(table.splitlines()) == 2 + 25
    assert "0-3" in table and "96-99" in table


@pytest.mark.parametrize("scheme", ["IID", "non-iid", "dirichlet", "dirichlet:0",
                                    "dirichlet:-1", "dirichlet:x", "iid:3"])
def test_bad_scheme_names_the_valid_ones(scheme):
    with pytest.raises(ValueError, match="dirichlet") as info:
        make_partition(CIFAR10, 4, scheme, seed=0)
    assert repr(scheme) in str(info.value)


def test_bad_world_size():
    with pytest.raises(ValueError):
        make_partition(CIFAR10, 0, "iid", seed=0)
    with pytest.raises(ValueError):
        make_partition(np.arange(3), 4, "iid", seed=0)
