"""What one device streams and when: the shared definition behind producers and in-process
sources, so both give the identical stream for the same seed.

Item ``seq`` (0, 1, 2, ...) arrives at ``event_offset_s`` (stream seconds from the start,
from the device's ``RateSchedule``) and carries dataset sample ``dataset_index``. The device's
indices are replayed pass after pass, each pass in a fresh shuffled order. Shuffles and
Poisson gaps come from generators derived from (seed, device), never the global RNG.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from streamsim.schedule import ARRIVALS, RateSchedule, count_blocks

_SHUFFLE_STREAM = 0x5F1E
_ARRIVAL_STREAM = 0xA221


class DeviceStream:
    """Device ``device``'s stream: iterate ``(seq, event_offset_s, dataset_index)`` in time
    order (infinite unless the schedule stops); ``until(duration_s)`` or ``plan(duration_s)``
    bound it. Every iteration starts afresh from seq 0 and gives the same items."""

    def __init__(self, dataset, indices: np.ndarray, schedule: RateSchedule, device: int,
                 seed: int, arrivals: str = "even"):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or len(self.indices) == 0:
            raise ValueError(f"device {device}: needs a non-empty 1-d index array, got shape "
                             f"{self.indices.shape}")
        self.schedule = schedule
        self.device = int(device)
        self.seed = int(seed)
        if arrivals not in ARRIVALS:
            raise ValueError(f"arrivals {arrivals!r}: use one of {', '.join(ARRIVALS)}")
        self.arrivals = arrivals

    def __repr__(self) -> str:
        return (f"DeviceStream(device={self.device}, {len(self.indices)} indices, "
                f"{self.schedule}, arrivals={self.arrivals!r}, seed={self.seed})")

    def _rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.device, purpose])

    def _passes(self) -> Iterator[np.ndarray]:
        """The device's indices, one freshly shuffled pass after another."""
        rng = self._rng(_SHUFFLE_STREAM)
        while True:
            yield self.indices[rng.permutation(len(self.indices))]

    def _blocks(self, limit: float = np.inf) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]]:
        """(seqs, offsets_s, dataset_indices) in blocks, for count-space points < ``limit``."""
        rng = self._rng(_ARRIVAL_STREAM) if self.arrivals == "poisson" else None
        passes = self._passes()
        pending = np.empty(0, dtype=np.int64)  # shuffled indices not yet assigned
        seq = 0
        for block in count_blocks(self.arrivals, rng):
            points = block[block < limit]
            offsets = self.schedule.time_of_count(points)
            offsets = offsets[np.isfinite(offsets)]  # the schedule stopped for good
            n = len(offsets)
            if n:
                parts, have = [pending], len(pending)
                while have < n:
                    parts.append(next(passes))
                    have += len(parts[-1])
                pending = np.concatenate(parts)
                yield np.arange(seq, seq + n, dtype=np.int64), offsets, pending[:n]
                pending = pending[n:]
                seq += n
            if n < len(block):
                return

    def __iter__(self) -> Iterator[tuple[int, float, int]]:
        for seqs, offsets, idx in self._blocks():
            yield from zip(seqs.tolist(), offsets.tolist(), idx.tolist())

    def until(self, duration_s: float) -> Iterator[tuple[int, float, int]]:
        """The items with event offset in [0, duration_s)."""
        for seqs, offsets, idx in self._blocks(self.schedule.count_limit(duration_s)):
            yield from zip(seqs.tolist(), offsets.tolist(), idx.tolist())

    def blocks(self, duration_s: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """What ``until(duration_s)`` yields, in time-ordered blocks of arrays:
        (seqs, offsets_s, dataset_indices)."""
        return self._blocks(self.schedule.count_limit(duration_s))

    def plan(self, duration_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Everything ``until(duration_s)`` yields, as arrays: (seqs, offsets_s, indices)."""
        blocks = list(self._blocks(self.schedule.count_limit(duration_s)))
        if not blocks:
            empty = np.empty(0, dtype=np.int64)
            return empty, np.empty(0, dtype=np.float64), empty
        return tuple(np.concatenate(parts) for parts in zip(*blocks))


def merged_blocks(streams, duration_s: float
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every stream's items in [0, duration_s), merged by event time, in blocks of arrays
    ``(offsets_s, slots, seqs, dataset_indices)`` (``slot``: position in ``streams``). The
    items come in (offset, slot, seq) order, as ``heapq.merge`` of the streams' ``until``
    tuples would give them, without a Python step per item."""
    sources = [s.blocks(duration_s) for s in streams]
    empty = np.empty(0, dtype=np.int64)
    held = [(empty, np.empty(0, dtype=np.float64), empty)] * len(sources)

    def refill(slot: int) -> bool:
        for block in sources[slot]:
            if len(block[0]):
                held[slot] = block
                return True
        return False

    live = [slot for slot in range(len(sources)) if refill(slot)]
    while live:
        # everything up to the earliest end of a held block is known on every stream
        horizon = min(held[slot][1][-1] for slot in live)
        parts = []
        for slot in live:
            seqs, offsets, indices = held[slot]
            k = int(np.searchsorted(offsets, horizon, side="right"))
            if k:
                parts.append((offsets[:k], np.full(k, slot, dtype=np.int64), seqs[:k],
                              indices[:k]))
                held[slot] = (seqs[k:], offsets[k:], indices[k:])
        live = [slot for slot in live if len(held[slot][0]) or refill(slot)]
        offsets, slots, seqs, indices = (np.concatenate(p) for p in zip(*parts))
        if len(parts) > 1:
            order = np.lexsort((seqs, slots, offsets))
            offsets, slots, seqs, indices = (offsets[order], slots[order], seqs[order],
                                             indices[order])
        yield offsets, slots, seqs, indices
