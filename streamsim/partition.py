"""Split a dataset's sample indices across ``world_size`` edge devices.

Schemes:
  ``iid``            equal shuffled shards (the remainder, < world_size samples, is left out).
  ``noniid``         the sorted labels cut into ``world_size`` contiguous groups as evenly as
                     possible: CIFAR-10 x 10 devices -> one label each, CIFAR-100 x 25 -> four
                     each (the paper's setups). With more devices than labels, each label goes
                     to a contiguous group of devices that split its samples.
  ``dirichlet:A``    label skew: each label's samples split by proportions drawn from
                     Dirichlet(A, ..., A); small A = strong skew. No device is left empty.

Every draw comes from a generator seeded by ``seed`` (never the global RNG), so the same seed
gives the same partition in every process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("iid", "noniid", "dirichlet:ALPHA")
_PARTITION_STREAM = 0x9A27  # separates partition draws from other users of the same seed


@dataclass
class Partition:
    """Which dataset indices each device streams (sorted), and what that holds."""

    scheme: str
    indices: list[np.ndarray]
    labels_per_device: list[list[int]]
    samples_per_device: list[int]

    @property
    def world_size(self) -> int:
        return len(self.indices)

    def summary(self) -> dict:
        """JSON-able: scheme, labels_per_device, samples_per_device."""
        return {"scheme": self.scheme,
                "labels_per_device": [list(map(int, ls)) for ls in self.labels_per_device],
                "samples_per_device": [int(n) for n in self.samples_per_device]}

    def format(self) -> str:
        """A printable table: one row per device."""
        lines = [f"partition {self.scheme}: {sum(self.samples_per_device)} samples on "
                 f"{self.world_size} devices",
                 f"{'device':>6}  {'samples':>8}  {'labels':>6}  which"]
        for device, (n, labels) in enumerate(zip(self.samples_per_device,
                                                 self.labels_per_device)):
            lines.append(f"{device:>6}  {n:>8}  {len(labels):>6}  {_ranges(labels)}")
        return "\n".join(lines)


def _ranges(values: list[int], limit: int = 60) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7' (cut at ``limit`` characters)."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    text = ",".join(parts)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """``'dirichlet:0.5'`` -> ('dirichlet', 0.5); ValueError naming the valid schemes."""
    kind, sep, arg = scheme.partition(":")
    if kind in ("iid", "noniid") and not sep:
        return kind, None
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(f"partition {scheme!r}: ALPHA must be a number > 0")
        return kind, alpha
    raise ValueError(f"partition {scheme!r}: use one of {', '.join(SCHEMES)}")


def make_partition(labels: np.ndarray, world_size: int, scheme: str, seed: int) -> Partition:
    """Assign every sample index (of ``labels``) to one of ``world_size`` devices."""
    kind, alpha = parse_scheme(scheme)
    labels = np.asarray(labels, dtype=np.int64)
    if world_size < 1:
        raise ValueError(f"world_size {world_size}: must be >= 1")
    if len(labels) < world_size:
        raise ValueError(f"{len(labels)} samples cannot feed {world_size} devices")
    rng = np.random.default_rng([seed, _PARTITION_STREAM])
    if kind == "iid":
        shard = len(labels) // world_size
        order = rng.permutation(len(labels))
        parts = [order[r * shard:(r + 1) * shard] for r in range(world_size)]
    elif kind == "noniid":
        parts = _noniid(labels, world_size, rng)
    else:
        parts = _dirichlet(labels, world_size, alpha, rng)
    indices = [np.sort(p).astype(np.int64) for p in parts]
    return Partition(scheme=scheme, indices=indices,
                     labels_per_device=[np.unique(labels[ix]).tolist() for ix in indices],
                     samples_per_device=[len(ix) for ix in indices])


def _noniid(labels: np.ndarray, world_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = {int(k): rng.permutation(np.flatnonzero(labels == k)) for k in classes}
    if world_size <= len(classes):
        groups = np.array_split(classes, world_size)
        return [np.concatenate([by_class[int(k)] for k in group]) for group in groups]
    # More devices than labels: label k goes to the k-th contiguous group of devices.
    parts: list[np.ndarray] = []
    for k, devices in zip(classes, np.array_split(np.arange(world_size), len(classes))):
        parts.extend(np.array_split(by_class[int(k)], len(devices)))
    if min(len(p) for p in parts) == 0:
        raise ValueError(f"noniid with {world_size} devices: a label has fewer samples than "
                         f"the devices sharing it")
    return parts


def _dirichlet(labels: np.ndarray, world_size: int, alpha: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(world_size)]
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        proportions = rng.dirichlet(np.full(world_size, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for device, part in enumerate(np.split(members, cuts)):
            buckets[device].append(part)
    parts = [np.concatenate(b) for b in buckets]
    # Tiny ALPHA can leave a device empty; give it one sample of the largest device.
    for device in range(world_size):
        if len(parts[device]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[device], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts
