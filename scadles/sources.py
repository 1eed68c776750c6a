"""Where records come from: one topic's decoded records, from Kafka or generated in-process.

A *source* gives the decoded records of one topic, in order, as ``(offset, record)`` pairs:
``KafkaSource`` reads a real topic; ``InProcessSource`` generates the identical records
from the same ``DeviceStream`` without a broker (offset = sequence number). Records are
decoded by ``RecordDecoder`` (``streamsim.record``'s validating codec): malformed ones are
counted per kind in ``source.malformed``, logged once per kind, and skipped.

Two readers share the sources: the stream buffer (``scadles.buffer``: a device's own topic)
and the data injector (``scadles.inject``: the other devices' topics, or the shared pool).
The injector opens its peers through a *sources factory* ``open_source(key, start)``: ``key``
a device id or ``POOL``, each read under the reader's own Kafka group (``inject_group_id``).
``sources_factory(cfg, ...)`` builds the one a run's config asks for.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable, NamedTuple, Protocol

import numpy as np

from streamsim.pool import POOL_DEVICE
from streamsim.record import EndOfStream, RecordError, Sample, decode, event_time_ms

log = logging.getLogger(__name__)

SOURCES = ("kafka", "inprocess")  # --source: a real broker, or the in-process twin
START_MODES = ("committed", "beginning")
POOL = "pool"  # the peer key of the shared pool topic (--inject-from pool)

Record = Sample | EndOfStream

SourcesFactory = Callable[[object, "str | int"], object]


class SourceError(RuntimeError):
    """A topic that cannot be read (it does not exist, a commit was refused). An unreachable
    broker raises ``streamsim.broker.BrokerUnreachable``."""


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
    """What a reader (``StreamBuffer``, the injector) needs from a source of one topic."""

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
    """One device topic (partition 0) read by a ``KafkaConsumer`` with manual assignment:
    its own, or (``shared``) one that the devices of a process share (``SharedConsumer``).

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
                 consumer_settings: dict | None = None, broker_check_s: float = 3.0,
                 shared: "SharedConsumer | None" = None):
        from kafka import TopicPartition

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
        # Its own consumer, or its partition among those of a consumer the devices of one
        # process share (--devices-per-rank): then every call on it takes the shared lock.
        self._shared = shared
        if shared is None:
            self._consumer = SharedConsumer(bootstrap, group_id, consumer_settings)
            try:
                start = self._consumer.add(self._tp, start)
            except BaseException:
                self._consumer.close()
                raise
        else:
            self._consumer = shared
            start = shared.add(self._tp, start)
        self._position = int(start)

    def poll(self, timeout_s: float | None = None) -> list[tuple[int, Record]]:
        """Decoded records in offset order (malformed ones counted and skipped); raises
        BrokerUnreachable once polls have been empty and the broker is gone."""
        from kafka.errors import KafkaError

        timeout_ms = self.poll_timeout_ms if timeout_s is None else int(timeout_s * 1000)
        try:
            raw = self._consumer.poll(self._tp, max(0, timeout_ms))
        except KafkaError as e:
            self._raise_lost(f"reading topic {self.topic}", e)
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
            with self._consumer.lock:
                self._consumer.consumer.commit(
                    {self._tp: OffsetAndMetadata(int(offset), "", -1)},
                    timeout_ms=self.COMMIT_TIMEOUT_MS)
        except KafkaError as e:
            self._raise_lost(f"committing offset {offset} of topic {self.topic}", e)

    def committed(self) -> int | None:
        from kafka.errors import KafkaError

        try:
            with self._consumer.lock:
                return self._consumer.consumer.committed(self._tp,
                                                         timeout_ms=self.COMMIT_TIMEOUT_MS)
        except KafkaError as e:
            self._raise_lost(f"reading the committed offset of topic {self.topic}", e)

    def malformed_before(self, offset: int) -> dict[str, int]:
        return self._decoder.malformed_before(offset)

    def highwater(self) -> int | None:
        """The partition's high watermark as of the last fetch (None before one)."""
        with self._consumer.lock:
            return self._consumer.consumer.highwater(self._tp)

    def close(self) -> None:
        self._consumer.release(self._tp)

    def __enter__(self) -> "KafkaSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SharedConsumer:
    """One ``KafkaConsumer`` for the device topics of one process, each device's partition
    manually assigned (``KafkaSource(shared=...)``), so K simulated devices in a rank
    (``--devices-per-rank``) read through one consumer, not K. Every call holds ``lock``
    (a consumer is not thread-safe); a poll for one partition hands the records it brings
    for the others to their queues. The consumer closes with its last partition."""

    def __init__(self, bootstrap: str, group_id: str, consumer_settings: dict | None = None):
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        settings = dict(KafkaSource.DEFAULT_SETTINGS)
        settings.update(consumer_settings or {})
        settings.update(bootstrap_servers=bootstrap, group_id=group_id,
                        enable_auto_commit=False, allow_auto_create_topics=False,
                        auto_offset_reset="earliest")
        self.bootstrap = bootstrap
        self.lock = threading.RLock()
        self.closed = False
        self._queues: dict = {}  # TopicPartition -> deque of fetched, unread records
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)  # it logs every refused connection
        try:
            self.consumer = KafkaConsumer(**settings)
        except KafkaError:
            from streamsim.broker import FIX_HINT, BrokerUnreachable

            timeout_s = settings["bootstrap_timeout_ms"] / 1000
            raise BrokerUnreachable(f"Kafka broker at {bootstrap} is unreachable (no answer "
                                    f"within {timeout_s:g} s): {FIX_HINT}") from None
        finally:
            kafka_log.setLevel(level)

    _OF_PROCESS: dict[tuple, "SharedConsumer"] = {}
    _OF_PROCESS_LOCK = threading.Lock()

    @classmethod
    def of_process(cls, bootstrap: str, group_id: str,
                   consumer_settings: dict | None = None) -> "SharedConsumer":
        """This process's open consumer for (``bootstrap``, ``group_id``), made on first use:
        the one its simulated devices read their topics through."""
        with cls._OF_PROCESS_LOCK:
            key = (bootstrap, group_id)
            held = cls._OF_PROCESS.get(key)
            if held is None or held.closed:
                held = cls._OF_PROCESS[key] = cls(bootstrap, group_id, consumer_settings)
            return held

    def add(self, tp, start: str | int) -> int:
        """Assign partition ``tp`` too (the others keep their positions) at ``start``
        ("committed", "beginning" or an offset); returns the offset it starts at."""
        with self.lock:
            partitions = self.consumer.partitions_for_topic(tp.topic)
            if not partitions or tp.partition not in partitions:
                raise SourceError(f"topic {tp.topic!r} does not exist on {self.bootstrap}: "
                                  f"create it (streamsim.broker.create_topics) before "
                                  f"consuming")
            self._queues[tp] = deque()
            self.consumer.assign(list(self._queues))
            if start == "committed":
                committed = self.consumer.committed(tp)
                start = 0 if committed is None else committed
            elif start == "beginning":
                start = 0  # out of range after retention -> auto_offset_reset earliest
            self.consumer.seek(tp, start)
            return int(start)

    def poll(self, tp, timeout_ms: int) -> list:
        """``tp``'s fetched records in offset order; polls the broker (up to
        ``timeout_ms``) only when none are queued."""
        with self.lock:
            queue = self._queues[tp]
            if not queue:
                for part, records in self.consumer.poll(timeout_ms=timeout_ms).items():
                    if part in self._queues:
                        self._queues[part].extend(records)
            out = list(queue)
            queue.clear()
            return out

    def release(self, tp) -> None:
        """``tp`` is done; the last partition closes the consumer."""
        with self.lock:
            if self._queues.pop(tp, None) is None:
                return
            if self._queues:
                self.consumer.assign(list(self._queues))
            else:
                self.close()

    def close(self) -> None:
        with self.lock:
            self._queues.clear()
            self.closed = True
            self.consumer.close()


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
# The injector's peer sources
# --------------------------------------------------------------------------------------------

def inject_group_id(group_prefix: str, reader: int, key) -> str:
    """The Kafka group holding ``reader``'s offsets on peer ``key``'s topic: distinct per
    (reader, peer), so a device's own consumer group is never touched."""
    return f"{group_prefix}inject-{reader}-from-{key}"


def kafka_sources_factory(bootstrap: str, topic_prefix: str, reader: int,
                          num_classes: int | None, sample_shape: tuple[int, int, int] | None,
                          group_prefix: str = "", pool_topic: str | None = None,
                          consumer_settings: dict | None = None) -> SourcesFactory:
    """Sources on the real topics: ``<topic_prefix><device>`` for a device, ``pool_topic``
    for ``POOL``."""

    def open_source(key, start="beginning"):
        if key == POOL:
            if not pool_topic:
                raise ValueError("injection from the pool needs a pool topic (--pool-topic)")
            topic, device = pool_topic, POOL_DEVICE
        else:
            topic, device = f"{topic_prefix}{key}", int(key)
        return KafkaSource(bootstrap, topic, inject_group_id(group_prefix, reader, key), device,
                           num_classes=num_classes, sample_shape=sample_shape, start=start,
                           consumer_settings=consumer_settings)

    return open_source


def inprocess_sources_factory(streams, dataset, start_time_s: float,
                              duration_s: float | None = None,
                              pool_stream=None) -> SourcesFactory:
    """Sources generated in-process from the devices' ``DeviceStream``s (indexed by device)
    and, for ``POOL``, ``pool_stream``: the same records the topics would hold."""

    def open_source(key, start="beginning"):
        stream = pool_stream if key == POOL else streams[int(key)]
        if stream is None:
            raise ValueError("in-process injection from the pool needs a pool stream "
                             "(make_pool_stream)")
        return InProcessSource(stream, dataset, start_time_s, duration_s,
                               start=start if isinstance(start, int) else 0)

    return open_source


def sources_factory(cfg, device: int, dataset, plan, streams,
                    topic_prefix: str | None = None) -> SourcesFactory:
    """The peer sources a run's config asks for (``cfg.source``: kafka or inprocess).

    ``plan``: the run's ``streamsim.plan.StreamPlan`` (in-process runs: its start time,
    duration and pool stream; unused with Kafka); ``streams``: every device's
    ``DeviceStream`` of it (in-process runs); ``topic_prefix``: the run's device-topic
    prefix (default ``cfg.topic_prefix``), also the prefix of the Kafka groups
    ``<prefix>inject-<device>-from-<peer>``. In-process pools stream at
    ``cfg.pool_rate_per_s`` (the launcher's pool producer's rate), arrivals even."""
    prefix = cfg.topic_prefix if topic_prefix is None else topic_prefix
    pooled = cfg.inject_from == "pool"
    if cfg.source == "inprocess":
        pool = plan.pool_stream(dataset, cfg.pool_rate_per_s) if pooled else None
        return inprocess_sources_factory(streams, dataset, plan.stream_start_s,
                                         plan.duration_s, pool)
    from streamsim.kafkaconfig import load_client_config

    return kafka_sources_factory(cfg.bootstrap, prefix, device, dataset.num_classes,
                                 dataset.sample_shape, group_prefix=prefix,
                                 pool_topic=cfg.pool_topic if pooled else None,
                                 consumer_settings=load_client_config(cfg.kafka_config))

