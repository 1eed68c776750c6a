"""The stream buffer: one device topic in, training batches out.

A *source* gives the decoded records of one device topic, in order, as ``(offset, record)``
pairs: ``KafkaSource`` reads a real topic; ``InProcessSource`` generates the identical records
from the same ``DeviceStream`` without a broker (offset = sequence number). Malformed records
are counted per kind in ``source.malformed``, logged once per kind, and skipped.

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

import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Protocol

import numpy as np

from streamsim.record import EndOfStream, RecordError, Sample, decode, event_time_ms

log = logging.getLogger(__name__)

POLICIES = ("persistence", "truncation")
START_MODES = ("committed", "beginning")

Record = Sample | EndOfStream


class StreamStalled(RuntimeError):
    """No record arrived for ``stall_timeout_s`` while a batch needed data (and the broker,
    if there is one, still answers)."""


class SourceError(RuntimeError):
    """A topic that cannot be read (it does not exist, a commit was refused). An unreachable
    broker raises ``streamsim.broker.BrokerUnreachable``."""


class _Interrupted(Exception):
    """A wait for data ended by the buffer's ``stop_requested``."""


class RawRecord(NamedTuple):
    """An undecoded record: what a Kafka consumer hands over (and what fakes imitate)."""

    offset: int
    value: bytes | None
    timestamp: int  # event time, epoch milliseconds


class RecordDecoder:
    """Validating decode of one topic's raw records, counting malformed ones per kind.

    Each kind of malformation is logged once (with topic and offset); every malformed record
    is counted in ``malformed`` and skipped, so it never crashes a consumer or enters a batch.
    ``malformed_before(offset)`` counts only those below a committed offset: what a
    checkpoint may keep (a resumed run reads the records after it again).
    """

    def __init__(self, topic: str, device: int | None = None, num_classes: int | None = None,
                 sample_shape: tuple[int, int, int] | None = None):
        self.topic = topic
        self.device = device
        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.malformed: dict[str, int] = {}
        self._committed: dict[str, int] = {}
        self._uncommitted: deque[tuple[int, str]] = deque()  # (offset, kind), offset order

    def decode_all(self, raw: Iterable) -> list[tuple[int, Record]]:
        """Decode records with ``offset``, ``value`` and ``timestamp`` (ms) attributes."""
        out = []
        append = out.append
        num_classes, shape, device = self.num_classes, self.sample_shape, self.device
        for r in raw:
            try:
                append((r.offset, decode(r.value, r.timestamp, num_classes, shape, device)))
            except RecordError as e:
                self._count(e, r.offset)
        return out

    def malformed_before(self, offset: int) -> dict[str, int]:
        """Malformed records per kind at offsets below ``offset`` (offsets only grow)."""
        pending, committed = self._uncommitted, self._committed
        while pending and pending[0][0] < offset:
            kind = pending.popleft()[1]
            committed[kind] = committed.get(kind, 0) + 1
        return dict(committed)

    def _count(self, error: RecordError, offset: int) -> None:
        seen = self.malformed.get(error.kind, 0)
        self.malformed[error.kind] = seen + 1
        self._uncommitted.append((offset, error.kind))
        if seen == 0:
            log.warning("malformed record on topic %s at offset %d (%s); skipping it and "
                        "counting further %r records without logging them",
                        self.topic, offset, error, error.kind)


class Source(Protocol):
    """What ``StreamBuffer`` needs from a source of one device topic."""

    topic: str
    sample_shape: tuple[int, int, int] | None
    malformed: dict[str, int]

    def poll(self, timeout_s: float) -> list[tuple[int, Record]]: ...
    def position(self) -> int: ...
    def commit(self, offset: int) -> None: ...
    def committed(self) -> int | None: ...
    def malformed_before(self, offset: int) -> dict[str, int]: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

class KafkaSource:
    """One device topic (partition 0) read by a ``KafkaConsumer`` with manual assignment.

    ``group_id`` is used only to store offsets (OffsetCommit / OffsetFetch): there is no group
    join, auto-commit is off and offsets are committed only by ``commit(offset)``.
    ``start``: ``"committed"`` (the group's committed offset, else the beginning),
    ``"beginning"``, or an explicit offset. ``consumer_settings`` override any client setting.
    Offsets and counts never come from the broker's end-offset or timestamp lookups.

    A dead broker looks like a quiet topic to a consumer (its polls just come back empty), so
    after ``broker_check_s`` of empty polls, and every ``broker_check_s`` after that, the
    source checks that the broker still accepts connections (``streamsim.broker.probe``);
    when it does not, or a commit fails for want of it, ``BrokerUnreachable`` says so in
    one line.
    """

    # Throughput: large fetches (a CIFAR record is ~3 KB), many records per poll, and a short
    # broker-side wait so an idle topic does not delay wall-clock batches. CRC checks stay on.
    DEFAULT_SETTINGS = dict(
        fetch_min_bytes=1,
        fetch_max_wait_ms=100,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        max_poll_records=4096,
        check_crcs=True,
        metrics_enabled=False,
        bootstrap_timeout_ms=10_000,
        request_timeout_ms=30_000,
    )

    COMMIT_TIMEOUT_MS = 10_000  # a commit (or offset fetch) that takes longer has failed

    def __init__(self, bootstrap: str, topic: str, group_id: str, device: int,
                 num_classes: int | None = None,
                 sample_shape: tuple[int, int, int] | None = None,
                 start: str | int = "committed", poll_timeout_ms: int = 100,
                 consumer_settings: dict | None = None, broker_check_s: float = 3.0):
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        if not (start in START_MODES or (isinstance(start, int) and start >= 0)):
            raise ValueError(f"start={start!r}: use 'committed', 'beginning' or an offset >= 0")
        if poll_timeout_ms < 0:
            raise ValueError(f"poll_timeout_ms={poll_timeout_ms} must be >= 0")
        if not broker_check_s > 0:
            raise ValueError(f"broker_check_s={broker_check_s} must be > 0")
        self.bootstrap = bootstrap
        self.broker_check_s = float(broker_check_s)
        self._next_check = time.monotonic() + self.broker_check_s
        self.topic = topic
        self.group_id = group_id
        self.device = device
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.poll_timeout_ms = poll_timeout_ms
        self._decoder = RecordDecoder(topic, device, num_classes, sample_shape)
        self.malformed = self._decoder.malformed
        self._tp = TopicPartition(topic, 0)
        settings = dict(self.DEFAULT_SETTINGS)
        settings.update(consumer_settings or {})
        settings.update(bootstrap_servers=bootstrap, group_id=group_id,
                        enable_auto_commit=False, allow_auto_create_topics=False,
                        auto_offset_reset="earliest")
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)  # it logs every refused connection
        try:
            self._consumer = KafkaConsumer(**settings)
        except KafkaError:
            from streamsim.broker import FIX_HINT, BrokerUnreachable

            timeout_s = settings["bootstrap_timeout_ms"] / 1000
            raise BrokerUnreachable(f"Kafka broker at {bootstrap} is unreachable (no answer "
                                    f"within {timeout_s:g} s): {FIX_HINT}") from None
        finally:
            kafka_log.setLevel(level)
        try:
            partitions = self._consumer.partitions_for_topic(topic)
            if not partitions or 0 not in partitions:
                raise SourceError(f"topic {topic!r} does not exist on {bootstrap}: create it "
                                  f"(streamsim.broker.create_topics) before consuming")
            self._consumer.assign([self._tp])
            if start == "committed":
                committed = self._consumer.committed(self._tp)
                start = 0 if committed is None else committed
            elif start == "beginning":
                start = 0  # out of range after retention -> auto_offset_reset earliest
            self._consumer.seek(self._tp, start)
        except BaseException:
            self._consumer.close()
            raise
        self._position = int(start)

    def poll(self, timeout_s: float | None = None) -> list[tuple[int, Record]]:
        """Decoded records in offset order (malformed ones counted and skipped); raises
        BrokerUnreachable once polls have been empty and the broker is gone."""
        from kafka.errors import KafkaError

        timeout_ms = self.poll_timeout_ms if timeout_s is None else int(timeout_s * 1000)
        try:
            batches = self._consumer.poll(timeout_ms=max(0, timeout_ms))
        except KafkaError as e:
            self._raise_lost(f"reading topic {self.topic}", e)
        raw = batches.get(self._tp)
        if not raw:
            if time.monotonic() >= self._next_check:
                self.check_broker(quick=True)
            return []
        self._next_check = time.monotonic() + self.broker_check_s
        self._position = raw[-1].offset + 1
        return self._decoder.decode_all(raw)

    def check_broker(self, quick: bool = False) -> None:
        """Raise BrokerUnreachable unless the broker accepts a connection (``quick``) or
        answers a metadata request."""
        from streamsim import broker

        reason = broker.probe(self.bootstrap)
        if reason is None and not quick:
            try:
                broker.check_reachable(self.bootstrap, timeout_s=5.0)
            except broker.BrokerUnreachable:
                reason = "it accepts connections but answers no metadata request in 5 s"
        self._next_check = time.monotonic() + self.broker_check_s
        if reason is not None:
            raise broker.BrokerUnreachable(
                broker.lost_message(self.bootstrap, reason, f"reading topic {self.topic}"))

    def _raise_lost(self, doing: str, error: Exception):
        """A client call failed: name the broker when it is gone, else the call."""
        from streamsim import broker

        reason = broker.probe(self.bootstrap)
        if reason is not None:
            raise broker.BrokerUnreachable(
                broker.lost_message(self.bootstrap, reason, doing)) from None
        raise SourceError(f"{doing} on {self.bootstrap} failed: {type(error).__name__}: "
                          f"{error}") from None

    def position(self) -> int:
        """Offset of the next record this source will return."""
        return self._position

    def commit(self, offset: int) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        try:
            self._consumer.commit({self._tp: OffsetAndMetadata(int(offset), "", -1)},
                                  timeout_ms=self.COMMIT_TIMEOUT_MS)
        except KafkaError as e:
            self._raise_lost(f"committing offset {offset} of topic {self.topic}", e)

    def committed(self) -> int | None:
        from kafka.errors import KafkaError

        try:
            return self._consumer.committed(self._tp, timeout_ms=self.COMMIT_TIMEOUT_MS)
        except KafkaError as e:
            self._raise_lost(f"reading the committed offset of topic {self.topic}", e)

    def malformed_before(self, offset: int) -> dict[str, int]:
        return self._decoder.malformed_before(offset)

    def highwater(self) -> int | None:
        """The partition's high watermark as of the last fetch (None before one)."""
        return self._consumer.highwater(self._tp)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> "KafkaSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessSource:
    """The records a producer would write for ``stream``, generated in-process (no broker).

    Identical to what ``KafkaSource`` reads from the produced topic: sample ``seq`` at offset
    ``seq``, event time ``start_time_s + offset_s`` (at the producer's millisecond resolution),
    and with ``duration_s`` the end-of-stream marker at offset = count, event time
    ``start_time_s + duration_s``. A record is released once the wall clock has passed its
    event time, so a stream started at ``time.time()`` is paced in real time, and a virtual
    one (``VIRTUAL_EPOCH_S`` lies in the past) is available at once. ``start`` resumes from an
    offset (a committed one, say); commits are kept in memory.
    """

    CHUNK_BYTES = 16 << 20  # pixels generated per poll at most (4096 records at most)

    def __init__(self, stream, dataset, start_time_s: float, duration_s: float | None = None,
                 start: int = 0, chunk_bytes: int = CHUNK_BYTES):
        if duration_s is not None and duration_s <= 0:
            raise ValueError(f"duration_s={duration_s} must be > 0")
        if start < 0:
            raise ValueError(f"start={start} must be >= 0")
        self.stream = stream
        self.dataset = dataset
        self.device = int(stream.device)
        self.topic = f"inprocess-device-{self.device}"
        self.sample_shape = tuple(dataset.sample_shape)
        self._chunk = int(min(4096, max(16, chunk_bytes // np.prod(self.sample_shape))))
        self.malformed: dict[str, int] = {}
        self.start_time_s = float(start_time_s)
        self.duration_s = duration_s
        self._position = int(start)
        self._committed: int | None = None
        if duration_s is not None:
            seqs, offsets_s, indices = stream.plan(duration_s)
            self._seqs = np.asarray(seqs, dtype=np.int64)
            self._times_s = self._event_times(np.asarray(offsets_s, dtype=np.float64))
            self._indices = np.asarray(indices, dtype=np.int64)
            self._count = len(self._seqs)
            self._eos_time_s = float(_ms_times(self.start_time_s, duration_s))
        else:
            self._iter = itertools.islice(iter(stream), start, None)
            self._count = None
            self._base = start  # seq of the first generated record held below
            self._seqs = np.empty(0, np.int64)
            self._times_s = np.empty(0, np.float64)
            self._indices = np.empty(0, np.int64)
        self._eos_sent = self._count is not None and start > self._count

    def _event_times(self, offsets_s: np.ndarray) -> np.ndarray:
        return _ms_times(self.start_time_s, offsets_s)

    def _window(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``n`` records from the current position: (seqs, event times, indices)."""
        pos = self._position
        if self._count is not None:
            end = min(pos + n, self._count)
            return self._seqs[pos:end], self._times_s[pos:end], self._indices[pos:end]
        # Unbounded: forget what was returned, generate more when needed.
        drop = pos - self._base
        self._seqs, self._times_s, self._indices = (
            self._seqs[drop:], self._times_s[drop:], self._indices[drop:])
        self._base = pos
        if len(self._seqs) < n:
            more = list(itertools.islice(self._iter, n - len(self._seqs) + self._chunk))
            if more:
                seqs, offsets_s, indices = (np.array(col) for col in zip(*more))
                self._seqs = np.concatenate([self._seqs, seqs.astype(np.int64)])
                self._times_s = np.concatenate(
                    [self._times_s, self._event_times(offsets_s.astype(np.float64))])
                self._indices = np.concatenate([self._indices, indices.astype(np.int64)])
        return self._seqs[:n], self._times_s[:n], self._indices[:n]

    def poll(self, timeout_s: float = 0.1) -> list[tuple[int, Record]]:
        # The timeout runs on the monotonic clock; event times are on the wall clock's axis.
        deadline_mono = time.monotonic() + max(0.0, timeout_s)
        while True:
            now = time.time()
            seqs, times_s, indices = self._window(self._chunk)
            if len(seqs):
                n = int(np.searchsorted(times_s, now, side="right"))
                if n:
                    return self._samples(seqs[:n], times_s[:n], indices[:n])
                next_s = float(times_s[0])
            elif self._count is not None and not self._eos_sent:
                if self._eos_time_s <= now:
                    self._eos_sent = True
                    self._position = self._count + 1
                    return [(self._count, EndOfStream(self.device, self._count,
                                                      self._eos_time_s))]
                next_s = self._eos_time_s
            else:
                return []  # the end-of-stream marker was returned: nothing more will come
            left_s = deadline_mono - time.monotonic()
            if left_s <= 0:
                return []
            time.sleep(max(0.0, min(next_s - now, left_s)))

    def _samples(self, seqs, times_s, indices) -> list[tuple[int, Record]]:
        pixels = self.dataset.batch_pixels(indices)
        labels = self.dataset.labels[indices]
        device = self.device
        out = [(int(s), Sample(device, int(s), int(y), p, float(t)))
               for s, y, p, t in zip(seqs, labels, pixels, times_s)]
        self._position = int(seqs[-1]) + 1
        return out

    def position(self) -> int:
        return self._position

    def commit(self, offset: int) -> None:
        self._committed = int(offset)

    def committed(self) -> int | None:
        return self._committed

    def malformed_before(self, offset: int) -> dict[str, int]:
        return {}  # generated records are never malformed

    def close(self) -> None:
        pass


def _ms_times(start_time_s: float, offsets_s):
    """Event times as a produced record carries them (``record.event_time_ms``), in seconds."""
    return event_time_ms(start_time_s * 1000.0, offsets_s) / 1000.0


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
