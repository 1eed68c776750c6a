"""Randomized data injection: a device also trains on a random share of other streams.

The paper (ScaDLES, randomized data injection): against non-IID label skew, each device
shares a fraction ``beta`` of its streaming data with a random fraction ``alpha`` of the other
devices. The original code only pretended (each rank drew "injected" samples from its own
full copy of the dataset); here real samples move through the device topics.

Pull form, and how it maps to the paper's push form
---------------------------------------------------
A device *takes* rather than being sent. Besides its own topic, device ``i`` reads the other
devices' topics with its own offsets (its own source per peer, Kafka group
``...inject-<i>-from-<j>``, so the peers' own consumption is never disturbed). At every step
it draws ``k = ceil(alpha x (W - 1))`` other devices uniformly without replacement and takes
up to ``beta x n_j`` samples from each chosen ``j``, where ``n_j`` is what ``j``'s stream
delivered in the current window (event time in ``(now - window_s, now]``, and after the
last time ``i`` read ``j``). The count is ``beta x n_j`` stochastically rounded (expectation
exactly ``beta x n_j``), the samples a uniform subset of the window. What is not taken is
discarded from the injector's view (truncation-like), so memory stays bounded by a window.

Push (paper): each ``j`` sends ``beta x n_j`` to ``k`` receivers; per window
``sum_j k beta n_j`` samples move. Pull (here): each of the ``W - 1`` other devices picks ``j``
with probability ``k / (W - 1)``, so ``j`` has ``k`` receivers in expectation, each taking
``beta x n_j`` in expectation: the same ``sum_j k beta n_j`` samples move, in expectation. The
difference is which side is exact: in push form every sender has exactly ``k`` receivers, in
pull form every receiver has exactly ``k`` senders. Bytes: ``injected_bytes`` counts the
records injected (what a push would send); reading a peer's window costs ``read_bytes``
(the whole window, of which ``beta`` is kept, and what expired unread while the peer was not
drawn), reported in ``summary()``.

Pool form (``inject_from="pool"``): a producer fills one shared topic with an IID sample of
the whole training set (``streamsim.pool``: ``python -m streamsim.pool``); every device
takes up to ``beta x (its local batch size)`` per step from the pool's current window, with
its own offsets. ``alpha`` only switches it on (``alpha == 0`` turns injection off).

Time. Injection never waits for data and never moves the clock. On a virtual clock a record
has arrived when its event time is ``<= clock.now()``; the injector polls a chosen peer until a
later record or the end-of-stream marker proves the window complete (wall time only), so a
virtual run is deterministic per seed. On a wall clock it takes what has been fetched.

Randomness. The choices of step ``s`` come from ``numpy.random.default_rng([seed, TAG,
device, s])``: never the global RNG, different across devices, identical for the same seed,
and a resumed run repeats them without saving generator state.

Training. Injected samples are concatenated to the local batch, trained on like local ones
and, by default (``inject_weight="all"``, the paper's choice), count in the device's b_i for
the weighted aggregation. ``inject_weight="local"`` keeps b_i = local samples only (the
injected ones still shape the device's mean gradient, but not its weight).

Where the peers' records come from is not the injector's business: it opens each peer
through a sources factory (``scadles.sources``: Kafka topics or in-process twins).

The trainer's seam::

    factory = sources.sources_factory(cfg, rank, dataset, plan, streams, prefix)
    injector = make_injector(cfg, rank, factory)   # None when alpha == 0
    ...                                            # after the local batch is formed:
    batch, inj = injector.augment(batch, clock, step) if injector else (batch, NO_INJECTION)
    weight_bsz = inj.get("weight_bsz", len(batch))
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque

import numpy as np

from scadles.sources import POOL, SourcesFactory
from streamsim.record import HEADER_BYTES, EndOfStream, Sample

log = logging.getLogger(__name__)

INJECT_FROM = ("devices", "pool")
INJECT_WEIGHTS = ("all", "local")
_INJECT_STREAM = 0x1A7E  # separates injection draws from other users of the same seed
_EPS = 1e-9              # float slack: 0.7 x 10 must give 7, not 8

NO_INJECTION = {"injected": 0, "injected_bytes": 0, "injected_from": [],
                "injected_counts": []}


# --------------------------------------------------------------------------------------------
# Pure choices (unit-tested on their own)
# --------------------------------------------------------------------------------------------

def num_peers(alpha: float, world_size: int) -> int:
    """How many other devices a device draws from per step: ceil(alpha x (W - 1))."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    return min(world_size - 1, math.ceil(alpha * (world_size - 1) - _EPS))


def step_rng(seed: int, device: int, step: int) -> np.random.Generator:
    """The generator of one device's injection choices at one step."""
    return np.random.default_rng([int(seed), _INJECT_STREAM, int(device), int(step)])


def choose_peers(rng: np.random.Generator, device: int, world_size: int,
                 alpha: float) -> list[int]:
    """ceil(alpha x (W - 1)) distinct other devices, uniformly at random, sorted."""
    if not 0 <= device < world_size:
        raise ValueError(f"device={device} outside [0, {world_size})")
    k = num_peers(alpha, world_size)
    if k == 0:
        return []
    others = np.array([d for d in range(world_size) if d != device])
    return sorted(int(d) for d in rng.choice(others, size=k, replace=False))


def share_count(beta: float, base: int, u: float) -> int:
    """beta x base, stochastically rounded with the uniform draw ``u`` in [0, 1): the floor,
    plus one with probability equal to the fractional part (expectation exactly beta x base).
    ``base`` is a peer's window count (devices) or the local batch size (pool)."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if base < 0 or not 0 <= u < 1:
        raise ValueError(f"base={base} must be >= 0 and u={u} in [0, 1)")
    x = beta * base
    whole = math.floor(x + _EPS)
    return int(whole) + (1 if u < x - whole - _EPS else 0)


def pick(rng: np.random.Generator, available: int, count: int) -> np.ndarray:
    """``count`` distinct positions of ``available``, uniformly, in increasing order."""
    if count >= available:
        return np.arange(available)
    return np.sort(rng.choice(available, size=count, replace=False))


# --------------------------------------------------------------------------------------------
# One peer topic as the injector sees it
# --------------------------------------------------------------------------------------------

class _Peer:
    """A peer's source and the fetched records not yet consumed (taken or discarded)."""

    def __init__(self, key, source, cutoff_s: float = -math.inf):
        self.key = key
        self.source = source
        self.pending: deque[tuple[int, Sample]] = deque()  # fetched, event-time order
        self.eos_offset: int | None = None                 # offset of the end marker
        self.horizon_s = -math.inf  # latest event time fetched
        self.cutoff_s = cutoff_s    # everything up to here was consumed
        self.committed: int | None = None
        # records consumed: taken, discarded (not taken) or expired (older than a window)
        self.read = self.read_bytes = self.expired = self.discarded = 0
        self.last_seq, self.duplicates = -1, 0  # a repeated seq (a producer retry) is dropped

    def ingest(self, records) -> None:
        for offset, record in records:
            if self.eos_offset is not None:
                break  # nothing after the end-of-stream marker belongs to the stream
            if record.__class__ is EndOfStream:
                self.eos_offset = offset
            elif record.seq <= self.last_seq:
                self.duplicates += 1
                continue
            else:
                self.last_seq = record.seq
                self.pending.append((offset, record))
            if record.event_time_s > self.horizon_s:
                self.horizon_s = record.event_time_s

    def expire(self, before_s: float) -> None:
        """Forget fetched samples with event time <= before_s (older than the window)."""
        pending = self.pending
        while pending and pending[0][1].event_time_s <= before_s:
            self.consumed(pending.popleft()[1])
            self.expired += 1

    def consumed(self, sample: Sample) -> None:
        self.read += 1
        self.read_bytes += HEADER_BYTES + sample.pixels.nbytes

    def next_offset(self) -> int:
        """Offset of the first record not yet consumed: where a resumed reader starts."""
        if self.pending:
            return self.pending[0][0]
        if self.eos_offset is not None:
            return self.eos_offset
        return self.source.position()


# --------------------------------------------------------------------------------------------
# The injector
# --------------------------------------------------------------------------------------------

class Injector:
    """Adds injected samples to a device's local batch, step after step.

    ``sources_factory(key, start)`` opens the source of a peer: ``key`` is a device id or
    ``POOL``, ``start`` is ``"beginning"`` or an offset (from ``load_state_dict``). Sources are
    opened on first use; on a wall clock every opened source is drained (without waiting)
    at every step, so fetches stay in flight.
    """

    def __init__(self, device: int, world_size: int, alpha: float, beta: float,
                 window_s: float, seed: int, sources_factory: SourcesFactory,
                 inject_from: str = "devices", inject_weight: str = "all",
                 poll_timeout_s: float = 0.1, stall_timeout_s: float = 60.0,
                 commit_each_step: bool = True):
        # -- what is injected
        if inject_from not in INJECT_FROM:
            raise ValueError(f"inject_from={inject_from!r}: use one of {', '.join(INJECT_FROM)}")
        if inject_weight not in INJECT_WEIGHTS:
            raise ValueError(f"inject_weight={inject_weight!r}: use one of "
                             f"{', '.join(INJECT_WEIGHTS)}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha} must be in (0, 1] (0 turns injection off: "
                             f"make_injector returns None)")
        if not 0 <= beta <= 1:
            raise ValueError(f"beta={beta} must be in [0, 1]")
        if not 0 <= device < world_size:
            raise ValueError(f"device={device} outside [0, world_size={world_size})")
        if not window_s > 0:
            raise ValueError(f"window_s={window_s} must be > 0")
        self.device, self.world_size = int(device), int(world_size)
        self.alpha, self.beta, self.window_s = float(alpha), float(beta), float(window_s)
        self.seed = int(seed)
        self.inject_from, self.inject_weight = inject_from, inject_weight
        # -- where it comes from and how long we poll for completeness (wall seconds)
        self.sources_factory = sources_factory
        self.poll_timeout_s = float(poll_timeout_s)
        self.stall_timeout_s = float(stall_timeout_s)
        self.commit_each_step = commit_each_step
        self._peers: dict[object, _Peer] = {}
        self._starts: dict[object, int] = {}      # from load_state_dict
        self._cutoffs: dict[object, float] = {}   # from load_state_dict
        # -- cumulative counters (summary())
        self.steps = self.injected = self.injected_bytes = self.incomplete = 0
        self.last_ids: list[tuple[int, int]] = []  # (device, seq) injected at the last step
        log.info("injection on device %d: from %s, alpha %g (%d peers/step), beta %g, "
                 "window %g s, weight %s", device, inject_from, alpha,
                 1 if inject_from == "pool" else num_peers(alpha, world_size), beta,
                 window_s, inject_weight)

    # -- the seam -----------------------------------------------------------------------------

    def augment(self, batch, clock, step: int):
        """``batch`` plus this step's injected samples, and the step's stats:
        ``injected``, ``injected_bytes`` (record bytes), ``injected_from`` (peers drawn),
        ``injected_counts`` (taken from each), ``weight_bsz`` (b_i for aggregation)."""
        now_s = clock.now()
        rng = step_rng(self.seed, self.device, step)
        local_bsz = len(batch)
        if self.inject_from == "pool":
            chosen = [POOL]
        else:
            chosen = choose_peers(rng, self.device, self.world_size, self.alpha)
        if not clock.is_virtual:
            for peer in list(self._peers.values()):  # keep every open source drained
                self._drain(peer, now_s)
        samples: list[Sample] = []
        counts = []
        for key in chosen:
            peer = self._peer(key)
            self._fill(peer, now_s, clock.is_virtual)
            peer.expire(max(peer.cutoff_s, now_s - self.window_s))
            available = 0
            for _, s in peer.pending:
                if s.event_time_s > now_s:
                    break
                available += 1
            base = local_bsz if key == POOL else available
            n = min(available, share_count(self.beta, base, rng.random()))
            positions = set(pick(rng, available, n).tolist())
            for p in range(available):
                _, s = peer.pending.popleft()
                peer.consumed(s)
                if p in positions:
                    samples.append(s)
            peer.discarded += available - n
            peer.cutoff_s = now_s
            counts.append(n)
        if self.commit_each_step:
            self._commit([self._peers[k] for k in chosen])
        self.steps += 1
        injected_bytes = sum(HEADER_BYTES + s.pixels.nbytes for s in samples)
        self.injected += len(samples)
        self.injected_bytes += injected_bytes
        self.last_ids = [(s.device, s.seq) for s in samples]
        out = _concat(batch, samples) if samples else batch
        stats = {"injected": len(samples), "injected_bytes": injected_bytes,
                 "injected_from": [k if k == POOL else int(k) for k in chosen],
                 "injected_counts": counts,
                 "weight_bsz": len(out) if self.inject_weight == "all" else local_bsz}
        return out, stats

    def state_dict(self) -> dict:
        """Per peer the offset a resumed reader starts from and the end of the last window
        consumed; the step's choices need no state (they derive from the step)."""
        peers = {str(k): {"offset": p.next_offset(), "cutoff_s": p.cutoff_s}
                 for k, p in self._peers.items()}
        for k, offset in self._starts.items():  # loaded but not yet opened
            peers.setdefault(str(k), {"offset": offset, "cutoff_s": self._cutoffs[k]})
        return {"version": 1, "peers": peers,
                "totals": {"steps": self.steps, "injected": self.injected,
                           "injected_bytes": self.injected_bytes}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"injector state version {state.get('version')!r}: expected 1")
        if self._peers:
            raise RuntimeError("load_state_dict must come before the first augment()")
        for k, entry in state["peers"].items():
            key = POOL if k == POOL else int(k)
            self._starts[key] = int(entry["offset"])
            self._cutoffs[key] = float(entry["cutoff_s"])
        totals = state.get("totals", {})
        self.steps = int(totals.get("steps", 0))
        self.injected = int(totals.get("injected", 0))
        self.injected_bytes = int(totals.get("injected_bytes", 0))

    def summary(self) -> dict:
        """Cumulative: injected samples and bytes, and what reading the peers cost."""
        peers = self._peers.values()
        return {"steps": self.steps, "injected": self.injected,
                "injected_bytes": self.injected_bytes,
                "read": sum(p.read for p in peers),
                "read_bytes": sum(p.read_bytes for p in peers),
                "expired": sum(p.expired for p in peers),
                "discarded": sum(p.discarded for p in peers),
                "incomplete_windows": self.incomplete,
                "duplicates": sum(p.duplicates for p in peers),
                "malformed": sum(sum(p.source.malformed.values()) for p in peers)}

    def close(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        try:
            self._commit(peers)
        finally:
            for peer in peers:
                peer.source.close()

    # -- reading peers ------------------------------------------------------------------------

    def _peer(self, key) -> _Peer:
        peer = self._peers.get(key)
        if peer is None:
            start = self._starts.pop(key, "beginning")
            cutoff = self._cutoffs.pop(key, -math.inf)
            peer = self._peers[key] = _Peer(key, self.sources_factory(key, start), cutoff)
            if isinstance(start, int):
                peer.committed = start
        return peer

    def _fill(self, peer: _Peer, now_s: float, virtual: bool) -> None:
        """Fetch the peer's records up to ``now_s``: all of them on a virtual clock (until a
        later record or the end marker proves it), what is there on a wall clock."""
        if not virtual:
            self._drain(peer, now_s)
            return
        lower_s = max(peer.cutoff_s, now_s - self.window_s)
        idle_since = time.monotonic()
        while peer.eos_offset is None and peer.horizon_s <= now_s:
            records = peer.source.poll(self.poll_timeout_s)
            peer.ingest(records)
            peer.expire(lower_s)  # bounded memory while skipping a backlog
            if records:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.stall_timeout_s:
                self.incomplete += 1
                log.warning("injection: no record on topic %s for %.0f s and no end marker; "
                            "injecting from an incomplete window at t=%.3f (the run is no "
                            "longer deterministic)", peer.source.topic, self.stall_timeout_s,
                            now_s)
                return

    def _drain(self, peer: _Peer, now_s: float) -> None:
        """Take what the source has without waiting (wall clock)."""
        lower_s = max(peer.cutoff_s, now_s - self.window_s)
        while peer.eos_offset is None:
            records = peer.source.poll(0.0)
            peer.ingest(records)
            peer.expire(lower_s)
            if not records or peer.horizon_s > now_s:
                break

    def _commit(self, peers) -> None:
        for peer in peers:
            offset = peer.next_offset()
            if offset != peer.committed:
                peer.source.commit(offset)
                peer.committed = offset


def _concat(batch, samples: list[Sample]):
    """The local batch with ``samples`` appended (a new Batch; the other fields unchanged)."""
    n = len(samples)
    injected = np.stack([s.pixels for s in samples])
    images = injected if len(batch) == 0 else np.concatenate([batch.images, injected])
    return dataclasses.replace(
        batch, images=images,
        labels=np.concatenate([batch.labels, np.fromiter((s.label for s in samples),
                                                         np.int64, n)]),
        seqs=np.concatenate([batch.seqs, np.fromiter((s.seq for s in samples), np.int64, n)]),
        event_times_s=np.concatenate([batch.event_times_s,
                                      np.fromiter((s.event_time_s for s in samples),
                                                  np.float64, n)]))


# --------------------------------------------------------------------------------------------
# Building an injector from a run's configuration
# --------------------------------------------------------------------------------------------

def make_injector(cfg, device: int, sources_factory: SourcesFactory,
                  world_size: int | None = None) -> Injector | None:
    """The injector of ``device`` for a run's config (``alpha``, ``beta``, ``inject_from``,
    ``inject_weight``, ``window_s``, ``seed``, ``world_size``), or None when injection is
    off (``alpha == 0`` or ``beta == 0``) or there is nobody to inject from.
    ``sources_factory``: see ``Injector`` (``scadles.sources.sources_factory`` builds one)."""
    world_size = int(cfg.world_size if world_size is None else world_size)
    alpha, beta = float(cfg.alpha), float(cfg.beta)
    if alpha == 0 or beta == 0 or (cfg.inject_from == "devices" and world_size < 2):
        return None
    return Injector(device, world_size, alpha, beta, cfg.window_s, cfg.seed, sources_factory,
                    inject_from=cfg.inject_from, inject_weight=cfg.inject_weight)
