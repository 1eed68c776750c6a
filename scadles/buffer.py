"""The stream buffer: one device topic in, training batches out.

The buffer reads a *source* (``scadles.sources``): the decoded records of one device topic,
in order, from Kafka (``KafkaSource``) or generated in-process (``InProcessSource``).

``StreamBuffer`` turns a source into batches under one of the paper's two policies:

- ``persistence``: every admitted sample stays until it is trained (or dropped for capacity);
  a batch takes the oldest, leftovers carry over to the next step.
- ``truncation``: only what arrived in the current window of ``window_s`` stream seconds is
  kept; older samples are discarded (``truncated``), a batch takes the newest and discards
  the rest of its window. On a wall clock a record may reach the consumer after the batch
  of its window was formed (a realtime producer lingers up to 200 ms); such a record was
  never offered, so it is kept for the next batch rather than truncated.

Both policies hold at most ``capacity`` samples; overflow drops the oldest (``dropped``).
A record whose sequence number the buffer has already fetched (a producer retry that wrote
a batch twice) is dropped and counted as ``duplicate``.

Time comes from the clock the caller passes. With a wall clock, records are admitted when
they are polled and waiting means polling. With a virtual clock, records are admitted by
event time (a record with ``event_time_s <= clock.now()`` has arrived) and waiting advances
the clock to the moment the wait would end, so a slow stream costs stream time, not wall
time. Records of a topic come in event-time order, so once a record later than ``t`` (or the
end-of-stream marker) has been fetched, every record up to ``t`` is known.

``commit_used()`` commits the offset of the oldest sample not yet trained or discarded, so a
run resumed from the committed offset neither loses nor repeats a sample; ``state_dict()``
is the buffer's side of that commit (the counters and the first sequence number not yet
used), which a checkpoint keeps so that a resumed run counts the whole run and still knows
duplicates.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from scadles.sources import Source
from streamsim.record import EndOfStream, Sample

POLICIES = ("persistence", "truncation")


class StreamStalled(RuntimeError):
    """No record arrived for ``stall_timeout_s`` while a batch needed data (and the broker,
    if there is one, still answers)."""


class _Interrupted(Exception):
    """A wait for data ended by the buffer's ``stop_requested``."""


# --------------------------------------------------------------------------------------------
# The buffer
# --------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One local training batch and what forming it cost."""

    images: np.ndarray         # uint8 (b, C, H, W)
    labels: np.ndarray         # int64 (b,)
    seqs: np.ndarray           # int64 (b,) per-device sequence numbers
    event_times_s: np.ndarray  # float64 (b,)
    wait_s: float              # clock seconds spent waiting in this call
    buffer_len: int            # samples left in the buffer after taking this batch
    dropped: int               # dropped for capacity during this call
    truncated: int             # discarded by truncation during this call
    ended: bool                # the stream ended and nothing is left after this batch
    buffer_peak: int = 0       # most samples held at once during this call (before taking)
    duplicates: int = 0        # records dropped as duplicates during this call

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def bytes(self) -> int:
        """Pixel bytes in the batch."""
        return int(self.images.nbytes)


class StreamBuffer:
    """Admitted samples of one device stream and the policy that turns them into batches."""

    COUNTERS = ("admitted", "trained", "dropped", "truncated", "duplicates")

    def __init__(self, source: Source, policy: str = "persistence", capacity: int = 10_000,
                 window_s: float = 1.0, stall_timeout_s: float = 60.0,
                 poll_timeout_s: float = 0.1,
                 stop_requested: Callable[[], bool] | None = None):
        """``stop_requested``: checked while waiting for data; when it returns True the wait
        ends and the call returns an empty batch (the trainer's agreed stop on SIGINT)."""
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: use one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        if not window_s > 0:
            raise ValueError(f"window_s={window_s} must be > 0")
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s={stall_timeout_s} must be > 0")
        self.source = source
        self.policy = policy
        self.capacity = int(capacity)
        self.window_s = float(window_s)
        self.stall_timeout_s = float(stall_timeout_s)
        self.poll_timeout_s = float(poll_timeout_s)
        self.stop_requested = stop_requested
        self._buf: deque[tuple[int, Sample]] = deque()      # admitted, oldest first
        self._pending: deque[tuple[int, Sample]] = deque()  # fetched, not yet admitted
        self._eos: tuple[int, EndOfStream] | None = None    # (offset, marker) once fetched
        self._eos_admitted = False
        self._horizon_s = -math.inf  # event time of the latest fetched record
        self._sample_shape = getattr(source, "sample_shape", None)
        self._last_arrival = time.monotonic()
        self._call_started = self._last_arrival
        self.admitted = self.trained = self.dropped = self.truncated = self.duplicates = 0
        self.peak_buffer_len = 0
        self._call_peak = 0  # most samples held during the current batch call
        self._last_seq = -1  # highest sequence number fetched: one at or below is a duplicate
        self._duplicate_offsets: deque[int] = deque()  # not yet below a committed offset
        self._duplicates_committed = 0
        # wall clock, truncation: (window start, time taken) of the last batch; records of
        # that window that arrive later were never offered and are kept
        self._offered: tuple[float, float] | None = None
        # Truncation on a virtual clock discards as it admits: a sample older than the
        # window that a batch could still take never enters the buffer, which then holds one
        # window, not everything since the last batch. None: the window ends at the time
        # admitted to; a number: the current batch's window starts there (while it waits for
        # min_bsz); -inf: off (a fixed-batch caller keeps everything).
        self._truncation_floor_s: float | None = None
        self._base: dict = {}  # counters of the run before a resume (load_state_dict)
        self._committed_state: dict = {"version": 1, "next_seq": 0,
                                       "counters": dict.fromkeys(self.COUNTERS, 0),
                                       "peak_buffer_len": 0, "malformed": {}}

    # -- public ---------------------------------------------------------------------------

    def next_window_batch(self, clock, min_bsz: int, max_bsz: int,
                          last_step_s: float, step_when_full: bool = False) -> Batch:
        """ScaDLES: wait until ``window_s`` has passed since ``last_step_s`` and ``min_bsz``
        samples are there (or the stream ended), then take up to ``max_bsz``.

        ``step_when_full`` (not in the paper): a buffer that holds ``max_bsz`` samples before
        the window is over does not wait for the rest of it."""
        if not 0 <= min_bsz <= max_bsz:
            raise ValueError(f"need 0 <= min_bsz ({min_bsz}) <= max_bsz ({max_bsz})")
        if min_bsz > self.capacity:
            raise ValueError(f"min_bsz={min_bsz} exceeds the buffer capacity {self.capacity}")
        start = self._begin(clock)
        if self.ended:
            return self._take(clock, start, 0, newest=False)
        try:
            ready_s = max(clock.now(), last_step_s + self.window_s)
            if step_when_full:
                ready_s = self._wait_until_full(clock, max_bsz, ready_s)
            else:
                self._wait_until(clock, ready_s)
            if self.policy == "truncation":
                # The current window is (ready_s - window_s, ...]: samples arriving while we
                # wait for min_bsz beyond ready_s belong to it too, so the wait always ends.
                self._truncate(ready_s - self.window_s, clock.is_virtual)
                self._truncation_floor_s = ready_s - self.window_s
            self._wait_for_count(clock, min_bsz)
        except _Interrupted:
            return self._take(clock, start, 0, newest=False)
        finally:
            self._truncation_floor_s = None
        if self.policy == "persistence":
            return self._take(clock, start, max_bsz, newest=False)
        batch = self._take(clock, start, max_bsz, newest=True)
        if not clock.is_virtual:
            self._offered = (ready_s - self.window_s, clock.now())
        return batch

    def next_fixed_batch(self, clock, bsz: int) -> Batch:
        """Conventional synchronous SGD: wait until ``bsz`` samples are there (or the stream
        ended), take the oldest ``bsz``. Persistence whatever ``policy`` says."""
        if not 1 <= bsz <= self.capacity:
            raise ValueError(f"bsz={bsz} must be in [1, capacity={self.capacity}]")
        start = self._begin(clock)
        self._truncation_floor_s = -math.inf
        try:
            self._wait_until(clock, clock.now())
            self._wait_for_count(clock, bsz)
        except _Interrupted:
            return self._take(clock, start, 0, newest=False)
        return self._take(clock, start, bsz, newest=False)

    def commit_used(self) -> int:
        """Commit (and return) the offset of the oldest sample not yet trained or discarded:
        everything before it was used, so a run resumed there loses and repeats nothing."""
        if self._buf:
            offset, next_seq = self._buf[0][0], self._buf[0][1].seq
        elif self._pending:
            offset, next_seq = self._pending[0][0], self._pending[0][1].seq
        elif self._eos is not None:
            offset = self._eos[0]  # a resumed run sees the end-of-stream marker again
            next_seq = self._last_seq + 1
        else:
            offset, next_seq = self.source.position(), self._last_seq + 1
        self.source.commit(offset)
        self._committed_state = self.state_dict(offset, next_seq)
        return offset

    def state_dict(self, offset: int | None = None, next_seq: int | None = None) -> dict:
        """The whole run's counters and the first sequence number not yet used, as of the
        last ``commit_used()`` (called with no arguments) or of ``offset`` / ``next_seq``.
        Every sample before a committed offset was trained or discarded, so the counters
        then are exact for it; malformed records count only below it."""
        if offset is None:
            return dict(self._committed_state)
        malformed_before = getattr(self.source, "malformed_before", None)
        malformed = (malformed_before(offset) if malformed_before is not None
                     else dict(self.source.malformed))
        duplicate_offsets = self._duplicate_offsets
        while duplicate_offsets and duplicate_offsets[0] < offset:
            duplicate_offsets.popleft()
            self._duplicates_committed += 1
        stats = self.stats()
        counters = {k: stats[k] for k in self.COUNTERS}
        counters["duplicates"] = self._base.get("duplicates", 0) + self._duplicates_committed
        # what is admitted beyond the offset is admitted again by a resumed run
        counters["admitted"] = counters["trained"] + counters["dropped"] + counters["truncated"]
        return {"version": 1, "next_seq": int(next_seq), "counters": counters,
                "peak_buffer_len": stats["peak_buffer_len"],
                "malformed": _add_counts(self._base.get("malformed", {}), malformed)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from a checkpoint's ``state_dict()``: its counters become the base
        of this one's, and a record before its next sequence number is a duplicate."""
        if state.get("version") != 1:
            raise ValueError(f"buffer state version {state.get('version')!r}: expected 1")
        self._base = {**state["counters"], "peak_buffer_len": state["peak_buffer_len"],
                      "malformed": dict(state["malformed"])}
        self._last_seq = int(state["next_seq"]) - 1
        self._committed_state = dict(state)

    @property
    def ended(self) -> bool:
        """The end-of-stream marker was admitted and every sample has been used."""
        return self._eos_admitted and not self._buf

    def __len__(self) -> int:
        return len(self._buf)

    def stats(self) -> dict:
        """Counters of the whole run (a resumed one's include the run before it):
        ``malformed`` per kind, ``peak_buffer_len``, ``buffer_len`` now."""
        base = self._base
        out = {k: base.get(k, 0) + getattr(self, k) for k in self.COUNTERS}
        out["malformed"] = _add_counts(base.get("malformed", {}), self.source.malformed)
        out["buffer_len"] = len(self._buf)
        out["peak_buffer_len"] = max(base.get("peak_buffer_len", 0), self.peak_buffer_len)
        return out

    def close(self) -> None:
        self.source.close()

    # -- fetching and admission -------------------------------------------------------------

    def _begin(self, clock) -> tuple[float, int, int, int]:
        self._call_started = time.monotonic()
        self._call_peak = len(self._buf)
        return clock.now(), self.dropped, self.truncated, self.duplicates

    def _fetch(self, timeout_s: float, needed: str) -> bool:
        """Poll the source once; raise StreamStalled when nothing came for too long (after
        checking the broker, when the source has one: a dead broker is named as such)."""
        if self.stop_requested is not None and self.stop_requested():
            raise _Interrupted()
        malformed_before = sum(self.source.malformed.values())
        records = self.source.poll(timeout_s)
        if records or sum(self.source.malformed.values()) != malformed_before:
            self._last_arrival = time.monotonic()
        else:
            idle_s = time.monotonic() - max(self._last_arrival, self._call_started)
            if idle_s > self.stall_timeout_s:
                check_broker = getattr(self.source, "check_broker", None)
                if check_broker is not None:
                    check_broker()
                topic = getattr(self.source, "topic", self.source)
                raise StreamStalled(
                    f"no record on topic {topic} for {idle_s:.0f} s and no end-of-stream "
                    f"marker while waiting for {needed}, though the broker answers: is the "
                    f"producer running (see producer.log in the log dir)?")
        eos = self._eos
        last_seq = self._last_seq
        for offset, record in records:
            if eos is not None:
                break  # nothing after the end-of-stream marker belongs to this stream
            if record.__class__ is EndOfStream:
                eos = self._eos = (offset, record)
            elif record.seq <= last_seq:
                self.duplicates += 1  # written twice (a producer retry): trained once
                self._duplicate_offsets.append(offset)
                continue
            else:
                last_seq = record.seq
                self._pending.append((offset, record))
            if record.event_time_s > self._horizon_s:
                self._horizon_s = record.event_time_s
        self._last_seq = last_seq
        return bool(records)

    def _admit(self, t_s: float) -> None:
        """Admit fetched samples with event time <= t_s (all of them for t_s = inf)."""
        pending, buf = self._pending, self._buf
        n = 0
        if t_s == math.inf:
            n = len(pending)
            buf.extend(pending)
            pending.clear()
        else:
            floor_s = -math.inf
            if self.policy == "truncation":
                floor_s = self._truncation_floor_s
                if floor_s is None:
                    floor_s = t_s - self.window_s
            while buf and buf[0][1].event_time_s <= floor_s:
                buf.popleft()
                self.truncated += 1
            while pending and pending[0][1].event_time_s <= t_s:
                item = pending.popleft()
                n += 1
                if item[1].event_time_s <= floor_s:
                    self.truncated += 1
                else:
                    buf.append(item)
        self.admitted += n
        over = len(buf) - self.capacity
        if over > 0:
            for _ in range(over):
                buf.popleft()
            self.dropped += over
        if len(buf) > self._call_peak:
            self._call_peak = len(buf)
            if len(buf) > self.peak_buffer_len:
                self.peak_buffer_len = len(buf)
        if (self._eos is not None and not pending
                and self._eos[1].event_time_s <= t_s):
            self._eos_admitted = True

    def _known_until(self, t_s: float) -> bool:
        """Every record with event time <= t_s has been fetched."""
        return self._eos is not None or self._horizon_s > t_s

    def _wait_until(self, clock, ready_s: float) -> None:
        """Let time pass until ``ready_s``, admitting what arrives until then."""
        if clock.is_virtual:
            while not self._known_until(ready_s):
                self._fetch(self.poll_timeout_s, f"records up to t={ready_s:.3f}")
            clock.advance_to(ready_s)
            self._admit(clock.now())
            return
        while True:
            remaining_s = ready_s - clock.now()
            if remaining_s <= 0:
                break
            if self._eos is None:
                self._fetch(min(remaining_s, self.poll_timeout_s), "the window")
                self._admit(math.inf)
            else:
                clock.advance_to(ready_s)
        # Drain what is already there, up to records produced after we started draining.
        drain_from_s = clock.now()
        while self._eos is None and self._fetch(0.0, "the window"):
            self._admit(math.inf)
            if self._horizon_s >= drain_from_s:
                break
        self._admit(math.inf)

    def _wait_until_full(self, clock, count: int, until_s: float) -> float:
        """Admit arrivals until ``count`` samples are there or ``until_s`` has come (then as
        ``_wait_until``); return the time the device is ready."""
        needed = f"{count} samples or t={until_s:.3f}"
        if clock.is_virtual:
            while not self._known_until(clock.now()):
                self._fetch(self.poll_timeout_s, needed)
            self._admit(clock.now())
            while len(self._buf) < count and not self._eos_admitted:
                while not self._pending and self._eos is None:
                    self._fetch(self.poll_timeout_s, needed)
                next_s = self._pending[0][1].event_time_s if self._pending \
                    else self._eos[1].event_time_s
                if next_s > until_s:
                    break
                while not self._known_until(next_s):
                    self._fetch(self.poll_timeout_s, needed)
                clock.advance_to(next_s)
                self._admit(clock.now())
        else:
            while (len(self._buf) < count and self._eos is None
                   and clock.now() < until_s):
                self._fetch(min(until_s - clock.now(), self.poll_timeout_s), needed)
                self._admit(math.inf)
        if len(self._buf) >= count:
            return clock.now()
        self._wait_until(clock, until_s)
        return until_s

    def _wait_for_count(self, clock, count: int) -> None:
        """Wait until ``count`` samples are admitted or the stream has ended."""
        needed = f"{count} samples"
        if clock.is_virtual:
            while len(self._buf) < count and not self._eos_admitted:
                while not self._pending and self._eos is None:
                    self._fetch(self.poll_timeout_s, needed)
                # Next arrival: the oldest pending sample, else the end-of-stream marker.
                next_s = self._pending[0][1].event_time_s if self._pending \
                    else self._eos[1].event_time_s
                while not self._known_until(next_s):  # fetch every record tied at next_s
                    self._fetch(self.poll_timeout_s, needed)
                clock.advance_to(next_s)
                self._admit(clock.now())
            return
        while len(self._buf) < count and not self._eos_admitted:
            self._fetch(self.poll_timeout_s, needed)
            self._admit(math.inf)

    # -- policies -------------------------------------------------------------------------

    def _truncate(self, cutoff_s: float, virtual: bool = True) -> None:
        """Discard admitted samples with event time <= cutoff_s. On a wall clock, keep the
        late arrivals of the last batch's window: records with an event time in that window
        that reached us after its batch was taken (so they were never offered)."""
        buf = self._buf
        n = 0
        if virtual or self._offered is None:
            while buf and buf[0][1].event_time_s <= cutoff_s:
                buf.popleft()
                n += 1
        else:
            window_start_s, taken_s = self._offered
            kept = deque()
            for item in buf:
                t = item[1].event_time_s
                if t <= cutoff_s and not window_start_s < t <= taken_s:
                    n += 1
                else:
                    kept.append(item)
            self._buf = kept
        self.truncated += n

    def _take(self, clock, start: tuple[float, int, int, int], max_bsz: int,
              newest: bool) -> Batch:
        buf = self._buf
        n = min(len(buf), max_bsz)
        if newest:
            discard = len(buf) - n
            for _ in range(discard):
                buf.popleft()
            self.truncated += discard
        taken = [buf.popleft() for _ in range(n)]
        self.trained += n
        start_s, dropped0, truncated0, duplicates0 = start
        samples = [s for _, s in taken]
        if samples:
            images = np.stack([s.pixels for s in samples])
            self._sample_shape = images.shape[1:]
        else:
            images = np.zeros((0, *(self._sample_shape or (0, 0, 0))), dtype=np.uint8)
        return Batch(
            images=images,
            labels=np.fromiter((s.label for s in samples), np.int64, n),
            seqs=np.fromiter((s.seq for s in samples), np.int64, n),
            event_times_s=np.fromiter((s.event_time_s for s in samples), np.float64, n),
            wait_s=clock.now() - start_s,
            buffer_len=len(buf),
            dropped=self.dropped - dropped0,
            truncated=self.truncated - truncated0,
            ended=self.ended,
            buffer_peak=self._call_peak,
            duplicates=self.duplicates - duplicates0,
        )


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per-kind counts of ``a`` and ``b`` together."""
    out = dict(a)
    for kind, n in b.items():
        out[kind] = out.get(kind, 0) + n
    return out
