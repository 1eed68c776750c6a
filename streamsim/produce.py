"""Paced producers: every device's stream onto its own Kafka topic, realtime or virtual.

One record per sample (``streamsim.record.encode``) on topic ``<prefix><device>``; the record
timestamp is the sample's event time, ``start_time_s + offset_s`` (realtime: wall time at
start or ``--start-time``; virtual: ``record.VIRTUAL_EPOCH_S``). The offsets come from each
device's ``DeviceStream``; all devices' items are merged by event time (``merged_blocks``),
encoded in bulk (``record.encode_many``, a chunk at a time) and sent when due.

Pacing is by deadline: ``realtime`` sleeps until the next item's event time, then sends
everything due (never a sleep per message, so no drift however long it runs; at most one
wake-up per ``PACE_QUANTUM_S``, so a record leaves at most 2 ms late, never early); ``virtual``
sends as fast as the broker takes it, identical content for the same seed. When done (or on
SIGINT/SIGTERM) it flushes and writes an end-of-stream marker with the count sent on every
topic. ``--workers K`` splits the devices over K processes for high aggregate rates.

A record counts as sent once the broker acknowledged it. A send that fails stops the
producer with one line (``SendFailed``), and so does a broker that stops acknowledging and no
longer accepts connections (``BrokerUnreachable``, within ``ACK_SILENCE_S`` plus a probe):
a stream with a hole in it is no stream to train on.

    python -m streamsim.produce --bootstrap 127.0.0.1:9092 --dataset fashion-mnist \\
        --partition iid --world-size 4 --rates "92 22 62 42" --duration 60 \\
        --pace realtime --seed 0
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from streamsim import record
from streamsim.plan import StreamPlan, default_stream_start_s

PACES = ("realtime", "virtual")
DEFAULT_TOPIC_PREFIX = "trainer-"
PRODUCER_CONFIG = {  # the base; PACE_PRODUCER_CONFIG on top
    "acks": 1,
    # Not idempotent: a retry may write a batch twice, and the trainer's buffer drops and
    # counts the repeated sequence numbers. Measured with bench_streams.py --idempotent
    # (Tansu 0.6, acks=all): 1-4% more CPU per record in back-to-back runs, no better
    # latency or rate accuracy, and no gain the buffer's dedupe does not already give.
    "enable_idempotence": False,
    "max_in_flight_requests_per_connection": 1,  # a retried batch never overtakes a later one
    "retries": 3,
    "linger_ms": 5,
    "batch_size": 1 << 20,
    "max_request_size": 8 << 20,
    "compression_type": None,
    "allow_auto_create_topics": False,
}
# Per pace, on top of PRODUCER_CONFIG (measured on Tansu 0.6, see benchmarks/bench_streams.py):
# - realtime: the embedded broker keeps one object per batch and every fetch walks a
#   partition's objects, so its CPU per fetch grows with the batches stored, without bound
#   in a long run (16 topics at 150/s with a consumer polling all the time: 13% -> 58% of a
#   core over 120 s at a 50 ms linger, 11% -> 16% at 200 ms). A 200 ms linger makes a
#   quarter of the batches of 50 ms (a fortieth of 5 ms) for up to 200 ms more latency:
#   a sample reaches the trainer's wall-clock buffer that much later, well inside the
#   paper's 1 s window.
# - virtual: 4 MB batches, so one request in flight carries more (fewer round trips, less
#   per-batch work in all three processes); latency does not matter there.
PACE_PRODUCER_CONFIG = {
    "realtime": {"linger_ms": 200},
    "virtual": {"batch_size": 4 << 20, "linger_ms": 20},
}
# Sends unacknowledged this long make the producer check the broker (a TCP connect): a dead
# broker is named within seconds instead of after the client's delivery timeout.
ACK_SILENCE_S = 5.0
# Aggregate bytes/s one producer process sustains comfortably on a shared 2-core machine
# (measured ~57,000 x 3 KB records/s flat out); above it --workers defaults to 2 or more.
WORKER_BYTES_PER_S = 24e6
# realtime: the producer wakes at most once per quantum and sends everything due, so a
# record leaves at most this late (and never early); far fewer wake-ups at high rates.
PACE_QUANTUM_S = 0.002
# Unacknowledged bytes one producer holds before it waits for the broker (kafka-python 3 has
# no buffer_memory bound: a virtual stream would otherwise queue without limit).
MAX_PENDING_BYTES = 64 << 20
# Items encoded at once (numpy, one chunk of the merged streams); realtime also cuts a chunk
# at this much stream time, so it never encodes far ahead of the records due.
VIRTUAL_CHUNK = 2048
REALTIME_CHUNK = 1024
REALTIME_CHUNK_SPAN_S = 0.05
REALTIME_GROUP = 64
_LAG_BINS_MS = 1000  # send-lag histogram: 1 ms bins, the last one holds everything later


class SendFailed(RuntimeError):
    """The broker did not take a record (after the client's retries)."""


@dataclass
class _DeviceTally:
    device: int
    topic: str
    target_rate_per_s: float
    count: int = 0  # acknowledged by the broker
    failed: int = 0
    last_offset_s: float | None = None
    eos_count: int | None = None
    eos_failed: bool = False


@dataclass
class _RunResult:
    devices: list[_DeviceTally]
    stream_s: float  # stream time covered
    elapsed_s: float  # wall time from the first send to the last flush
    interrupted: bool
    lag_hist: list[int] = field(default_factory=lambda: [0] * _LAG_BINS_MS)
    max_lag_s: float = 0.0


event_ms = record.event_time_ms  # Kafka timestamp of an item (see streamsim.record)


def topic_name(prefix: str, device: int) -> str:
    """The topic of ``device``'s stream."""
    return f"{prefix}{device}"


def default_workers(streams: Sequence, duration_s: float, sample_bytes: int) -> int:
    """Producer processes for this load: 1 unless the aggregate byte rate needs more."""
    rate_per_s = sum(s.schedule.expected_count(0.0, duration_s) for s in streams) / duration_s
    need = math.ceil(rate_per_s * (sample_bytes + record.HEADER_BYTES) / WORKER_BYTES_PER_S)
    return max(1, min(need, os.cpu_count() or 1, 4, len(streams)))


def _chunks(streams: Sequence, dataset, duration_s: float, start_ms: float, max_items: int,
            max_span_s: float) -> Iterator[tuple[list, list, list, list]]:
    """All devices' items in event-time order, encoded in bulk: chunks of at most
    ``max_items`` items spanning at most ``max_span_s`` of stream time, each as lists
    ``(offsets_s, slots, timestamps_ms, values)`` (a value is a memoryview of one record)."""
    from streamsim.stream import merged_blocks

    devices = np.array([s.device for s in streams], dtype=np.int64)
    labels = dataset.labels
    for offsets, slots, seqs, indices in merged_blocks(streams, duration_s):
        lo, n = 0, len(offsets)
        while lo < n:
            hi = min(n, lo + max_items)
            if offsets[hi - 1] - offsets[lo] > max_span_s:  # realtime: only what is due soon
                hi = max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + max_span_s,
                                                     side="right")))
                hi = min(hi, lo + max_items)
            idx = indices[lo:hi]
            values = record.encode_many(devices[slots[lo:hi]], seqs[lo:hi], labels[idx],
                                        dataset.batch_pixels(idx))
            size = values.shape[1]
            flat = memoryview(values.reshape(-1))
            yield (offsets[lo:hi].tolist(), slots[lo:hi].tolist(),
                   event_ms(start_ms, offsets[lo:hi]).tolist(),
                   [flat[k:k + size] for k in range(0, len(flat), size)])
            lo = hi


def _make_producer(bootstrap: str, producer_config: dict | None, pace: str = "realtime",
                   topics: Sequence[str] = ()):
    """A connected KafkaProducer configured for ``pace``, its metadata narrowed to ``topics``
    (before the stream starts: it takes a round trip)."""
    from kafka import KafkaProducer

    from streamsim.broker import _quiet_kafka_logs

    config = {**PRODUCER_CONFIG, **PACE_PRODUCER_CONFIG.get(pace, {}), **(producer_config or {})}
    with _quiet_kafka_logs():
        producer = KafkaProducer(bootstrap_servers=bootstrap, bootstrap_timeout_ms=10_000,
                                 **config)
    if topics:
        _track_only(producer, list(topics))
    return producer


def _track_only(producer, topics: list[str], timeout_s: float = 2.0) -> None:
    """Narrow the producer's metadata to ``topics`` (best effort, on kafka-python internals).

    kafka-python checks each send's topic against a set it rebuilds per send from every topic
    in its metadata, and a producer bootstraps with all the broker's topics: on a long-lived
    broker (hundreds of topics from earlier runs) that costs more per record than the rest of
    the send (7 us with 138 topics). A metadata update for just our topics replaces the map."""
    metadata = getattr(producer, "_metadata", None)
    try:
        if metadata is None or len(metadata.topics()) <= len(set(topics)):
            return
        future = metadata.set_topics(list(topics))
        wakeup = getattr(getattr(producer, "_sender", None), "wakeup", None)
        if wakeup is not None:
            wakeup()
        deadline = time.monotonic() + timeout_s
        while not future.is_done and time.monotonic() < deadline:
            time.sleep(0.005)
    except Exception:  # an optimisation only: the producer works either way
        pass


def _pending_limit(producer, pace: str, record_bytes: int) -> int:
    """Unacknowledged records before the producer waits for the broker. Virtual pace: two
    batches (one in flight, one filling): a producer further ahead gains nothing, and
    kafka-python then wakes its I/O thread on every send (one more queued batch per
    partition), a CPU storm. Realtime: ``MAX_PENDING_BYTES`` (it only matters when the broker
    stalls)."""
    if pace == "virtual":
        batch_size = int(getattr(producer, "config", {}).get("batch_size", 0) or 0)
        if batch_size >= record_bytes:
            return max(2, 2 * (batch_size // (record_bytes + 16)))
    return max(1000, MAX_PENDING_BYTES // record_bytes)


class _Acks:
    """Sends the broker has not acknowledged yet. ``settle`` counts the acknowledged ones
    per device (only they count as sent), raises ``SendFailed`` on a failed one, and, when
    nothing was acknowledged for ``ACK_SILENCE_S`` while sends wait, checks that the broker
    is still there (``BrokerUnreachable`` naming it when not)."""

    def __init__(self, tallies: list[_DeviceTally], bootstrap: str | None,
                 silence_s: float = ACK_SILENCE_S):
        self.tallies = tallies
        self.bootstrap = bootstrap
        self.silence_s = silence_s
        self.pending: list = []  # (slot, future), in send order
        self.last_ack = time.monotonic()
        self._next_check = self.last_ack + silence_s

    def __len__(self) -> int:
        return len(self.pending)

    def settle(self) -> None:
        still = []
        acked = False
        tallies = self.tallies
        for slot, future in self.pending:
            if not future.is_done:
                still.append((slot, future))
            elif future.failed():
                self.pending = still
                self._failed(slot, future.exception)
            else:
                tallies[slot].count += 1
                acked = True
        self.pending = still
        now = time.monotonic()
        if acked or not still:
            self.last_ack = now
            self._next_check = now + self.silence_s
        elif now >= self._next_check:
            self._next_check = now + self.silence_s
            self.check_broker(f"no acknowledgement for {now - self.last_ack:.0f} s")

    def wait(self, keep: int) -> None:
        """Block until at most ``keep`` sends are unacknowledged (back-pressure)."""
        self.settle()
        while len(self.pending) > keep:
            try:  # acks come about in send order: wait for the one that leaves ``keep``
                self.pending[-keep - 1][1].get(timeout=1.0)
            except Exception:  # a timeout, or a failure settle() reports
                pass
            self.settle()

    def flush(self, producer) -> None:
        """``producer.flush()``, watching the broker while it waits."""
        while True:
            try:
                producer.flush(timeout=1.0)
                break
            except Exception as e:  # kafka-python: KafkaTimeoutError when not done in time
                if "Timeout" not in type(e).__name__:
                    raise
                self.settle()
        self.settle()

    def check_broker(self, why: str) -> None:
        if self.bootstrap is None:
            return
        from streamsim import broker

        reason = broker.probe(self.bootstrap)
        if reason is not None:
            raise broker.BrokerUnreachable(broker.lost_message(
                self.bootstrap, reason, f"producing ({why})"))

    def _failed(self, slot: int, error) -> None:
        self.tallies[slot].failed += 1
        self.check_broker("a send failed")
        raise SendFailed(f"the broker{' at ' + self.bootstrap if self.bootstrap else ''} did "
                         f"not take a record of topic {self.tallies[slot].topic}: "
                         f"{type(error).__name__}: {error}; the stream would have a hole, so "
                         f"the producer stops")


def _run_streams(producer, streams: Sequence, dataset, duration_s: float, pace: str,
                 topic_of: dict[int, str], start_time_s: float, eos: bool,
                 should_stop: Callable[[], bool],
                 on_tick: Callable[[list[_DeviceTally], float], None] | None,
                 tick_s: float = 1.0, quantum_s: float | None = None,
                 bootstrap: str | None = None) -> _RunResult:
    """Send every stream's items in [0, duration_s) when due; flush; write EOS markers.
    Raises SendFailed or BrokerUnreachable (``bootstrap``: the broker to check)."""
    tallies = [_DeviceTally(s.device, topic_of[s.device],
                            s.schedule.expected_count(0.0, duration_s) / duration_s)
               for s in streams]
    topics = [t.topic for t in tallies]
    lag_hist = [0] * _LAG_BINS_MS
    max_lag_s = 0.0
    realtime = pace == "realtime"
    quantum_s = PACE_QUANTUM_S if quantum_s is None else quantum_s
    # deadlines on the monotonic clock: immune to wall-clock steps while we run
    mono_minus_wall = time.monotonic() - time.time()
    start_mono = start_time_s + mono_minus_wall
    run_t0 = time.monotonic()
    next_tick = run_t0 + tick_s
    last_wake = -math.inf
    interrupted = False
    send = producer.send
    start_ms = start_time_s * 1000.0
    last_offsets: list[float | None] = [None] * len(streams)

    def settle(offsets: list, slots: list) -> None:
        """The last offset handed to the client, per device (the end marker's time)."""
        for offset_s, slot in zip(offsets, slots):
            last_offsets[slot] = offset_s
        for slot, tally in enumerate(tallies):
            tally.last_offset_s = last_offsets[slot]

    stream_s = duration_s
    acks = _Acks(tallies, bootstrap)
    record_bytes = record.HEADER_BYTES + int(np.prod(dataset.sample_shape))
    max_pending = _pending_limit(producer, pace, record_bytes)
    # virtual: a chunk at most half the pending limit, so back-pressure between chunks holds
    chunk_items = REALTIME_CHUNK if realtime else max(1, min(VIRTUAL_CHUNK, max_pending // 2))
    span_s = REALTIME_CHUNK_SPAN_S if realtime else math.inf
    for offsets, slots, stamps, values in _chunks(streams, dataset, duration_s, start_ms,
                                                  chunk_items, span_s):
        n, i, settled = len(offsets), 0, 0
        while i < n:
            now = time.monotonic()
            if realtime:
                deadline = start_mono + offsets[i]
                if now < deadline:
                    # wake at most once per quantum, then send everything due: fewer wake-ups
                    # (ours and the client's I/O thread's), never an early record
                    wake = max(deadline, last_wake + quantum_s)
                    while now < wake:  # sleep in slices so a signal stops us promptly
                        if should_stop():
                            break
                        time.sleep(min(wake - now, 0.1))
                        now = time.monotonic()
                    last_wake = now
                # the items due by now leave as one group (at most REALTIME_GROUP, so the lag,
                # taken at the group's release, stays within a millisecond of each send)
                j = max(i + 1, bisect.bisect_right(offsets, now - start_mono, i,
                                                   min(n, i + REALTIME_GROUP)))
                for offset_s in offsets[i:j]:
                    lag_s = now - (start_mono + offset_s)
                    if lag_s > max_lag_s:
                        max_lag_s = lag_s
                    lag_hist[min(int(lag_s * 1000.0), _LAG_BINS_MS - 1) if lag_s > 0 else 0] += 1
            else:  # virtual: the whole chunk at once
                j = n
            if now >= next_tick:
                next_tick = now + tick_s
                settle(offsets[settled:i], slots[settled:i])
                settled = i
                acks.settle()
                if on_tick is not None:
                    on_tick(tallies, now - run_t0)
            if should_stop():
                interrupted = True
                stream_s = (max(0.0, min(duration_s, now - start_mono)) if realtime
                            else offsets[i])
                break
            if len(acks) >= max_pending:
                acks.wait(max_pending // 2)
            group = slots[i:j]
            acks.pending.extend(zip(group, [send(topics[slot], value, partition=0,
                                                 timestamp_ms=stamp)
                                            for slot, value, stamp in zip(group, values[i:j],
                                                                          stamps[i:j])]))
            i = j
        settle(offsets[settled:i], slots[settled:i])
        if interrupted:
            break
    else:
        if realtime and not should_stop():  # the stream lasts until duration_s, not its last item
            end_mono = start_mono + duration_s
            while time.monotonic() < end_mono and not should_stop():
                time.sleep(min(end_mono - time.monotonic(), 0.1))
            if should_stop() and time.monotonic() < end_mono:
                interrupted = True
                stream_s = max(0.0, time.monotonic() - start_mono)
    acks.flush(producer)
    if eos:
        end_ms = event_ms(start_ms, stream_s)
        markers = []
        for slot, tally in enumerate(tallies):
            last_ms = (event_ms(start_ms, tally.last_offset_s)
                       if tally.last_offset_s is not None else end_ms)
            tally.eos_count = tally.count
            markers.append((slot, send(tally.topic, record.encode_eos(tally.device,
                                                                      tally.eos_count),
                                       partition=0, timestamp_ms=max(end_ms, last_ms))))
        acks.flush(producer)
        for slot, future in markers:
            if future.failed():
                tallies[slot].eos_failed = True
    if on_tick is not None:
        on_tick(tallies, time.monotonic() - run_t0)
    return _RunResult(tallies, stream_s, time.monotonic() - run_t0, interrupted, lag_hist,
                      max_lag_s)


class _StopFlag:
    """Set by SIGINT/SIGTERM (or by the caller's ``stop`` event)."""

    def __init__(self, event: threading.Event | None = None):
        self.flag = False
        self.event = event

    def set(self, *_args) -> None:
        self.flag = True

    def __call__(self) -> bool:
        return self.flag or (self.event is not None and self.event.is_set())


def _install_handlers(handler) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _Progress:
    """The per-second progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool, total_expected: int, pace: str):
        self.enabled = enabled
        self.total_expected = total_expected
        self.pace = pace
        self.tty = sys.stderr.isatty()
        self.last = (0.0, 0)

    def show(self, sent: int, elapsed_s: float) -> None:
        if not self.enabled:
            return
        t_prev, n_prev = self.last
        rate = (sent - n_prev) / (elapsed_s - t_prev) if elapsed_s > t_prev else 0.0
        self.last = (elapsed_s, sent)
        line = (f"[produce {self.pace}] {elapsed_s:7.1f} s  sent {sent:,}/{self.total_expected:,}"
                f"  {rate:,.0f} records/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def _percentile_ms(hist: list[int], q: float) -> float:
    total = sum(hist)
    if total == 0:
        return 0.0
    rank, seen = q * total, 0
    for ms, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return float(ms + 1)  # upper edge of the 1 ms bin
    return float(len(hist))


def _summary(results: list[_RunResult], pace: str, duration_s: float, start_time_s: float,
             workers: int) -> dict:
    tallies = sorted((t for r in results for t in r.devices), key=lambda t: t.device)
    stream_s = min(r.stream_s for r in results) if results else 0.0
    lag_hist = [sum(col) for col in zip(*(r.lag_hist for r in results))] if results else []
    devices = []
    for t in tallies:
        rate = t.count / stream_s if stream_s > 0 else 0.0
        devices.append({
            "device": t.device, "topic": t.topic, "count": t.count, "failed": t.failed,
            "target_rate_per_s": round(t.target_rate_per_s, 6),
            "rate_per_s": round(rate, 6),
            "error_pct": round(100.0 * (rate - t.target_rate_per_s) / t.target_rate_per_s, 4)
            if t.target_rate_per_s > 0 else 0.0,
            "eos_count": t.eos_count,
        })
    total = sum(t.count for t in tallies)
    elapsed_s = max((r.elapsed_s for r in results), default=0.0)
    summary = {
        "pace": pace, "duration_s": duration_s, "stream_s": round(stream_s, 6),
        "start_time_s": start_time_s, "elapsed_s": round(elapsed_s, 3), "workers": workers,
        "interrupted": any(r.interrupted for r in results),
        "records": total,
        "failed": sum(t.failed for t in tallies) + sum(t.eos_failed for t in tallies),
        "send_rate_per_s": round(total / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "devices": devices,
    }
    if pace == "realtime":
        summary["send_lag_ms"] = {"p50": _percentile_ms(lag_hist, 0.5),
                                  "p99": _percentile_ms(lag_hist, 0.99),
                                  "max": round(max(r.max_lag_s for r in results) * 1000, 3)}
    return summary


def produce(bootstrap: str, streams: Sequence, dataset, duration_s: float, pace: str,
            topic_prefix: str = DEFAULT_TOPIC_PREFIX, start_time_s: float | None = None, *,
            eos: bool = True, workers: int | None = 1, create: bool = True,
            stop: threading.Event | None = None, progress: bool = False,
            producer_config: dict | None = None, topics: Sequence[str] | None = None,
            client_config: dict | None = None, replication_factor: int = 1) -> dict:
    """Produce ``streams`` (``DeviceStream``s) for ``duration_s`` of stream time; a summary.

    ``pace``: ``realtime`` (sleep to the wall clock) or ``virtual`` (as fast as possible).
    ``start_time_s``: event-time origin (default: now for realtime, ``VIRTUAL_EPOCH_S``
    for virtual). ``workers``: producer processes (None: by aggregate rate). ``stop``: an
    event that ends the run early (SIGINT/SIGTERM do too, in the main thread); EOS markers
    are written either way unless ``eos`` is False. ``topics``: one topic per stream, in
    place of ``<topic_prefix><device>``. ``client_config``: connection settings for every
    client (``streamsim.kafkaconfig``: SASL/SSL, ...); ``replication_factor``: of the topics
    it creates. Raises BrokerUnreachable.
    """
    if pace not in PACES:
        raise ValueError(f"pace {pace!r}: use one of {', '.join(PACES)}")
    if not duration_s > 0:
        raise ValueError(f"duration_s {duration_s}: must be > 0")
    if not streams:
        raise ValueError("no streams to produce")
    if len({s.device for s in streams}) != len(streams):
        raise ValueError("two streams for the same device")
    if topics is not None and (len(topics) != len(streams) or len(set(topics)) != len(topics)):
        raise ValueError(f"{len(topics)} topics for {len(streams)} streams: give one distinct "
                         "topic per stream")
    topic_of = {s.device: topics[i] if topics is not None else topic_name(topic_prefix, s.device)
                for i, s in enumerate(streams)}
    from streamsim import broker

    broker.check_reachable(bootstrap, timeout_s=10, client_config=client_config)
    if create:
        broker.create_topics(bootstrap, list(topic_of.values()),
                             replication_factor=replication_factor, client_config=client_config)
    producer_config = {**(client_config or {}), **(producer_config or {})}
    sample_bytes = int(np.prod(dataset.sample_shape))
    if workers is None:
        workers = default_workers(streams, duration_s, sample_bytes)
    workers = max(1, min(int(workers), len(streams)))
    expected = sum(math.ceil(s.schedule.count_limit(duration_s)) for s in streams)
    show = _Progress(progress, expected, pace)
    stop_flag = _StopFlag(stop)
    previous = _install_handlers(stop_flag.set)
    try:
        if workers == 1:
            results = [_produce_here(bootstrap, streams, dataset, duration_s, pace,
                                     topic_of, start_time_s, eos, stop_flag, show,
                                     producer_config)]
        else:
            results = _produce_in_workers(bootstrap, streams, dataset, duration_s, pace,
                                          topic_of, start_time_s, eos, stop_flag, show,
                                          producer_config, workers)
    finally:
        _restore_handlers(previous)
        show.close()
    return _summary([r for r, _ in results], pace, duration_s, results[0][1], workers)


def _resolve_start(pace: str, start_time_s: float | None) -> float:
    if start_time_s is not None:
        return float(start_time_s)
    return default_stream_start_s(virtual=pace != "realtime")


def _produce_here(bootstrap, streams, dataset, duration_s, pace, topic_of, start_time_s,
                  eos, stop_flag, show, producer_config) -> tuple[_RunResult, float]:
    producer = _make_producer(bootstrap, producer_config, pace,
                              [topic_of[s.device] for s in streams])
    ok = False
    try:
        start = _resolve_start(pace, start_time_s)
        result = _run_streams(producer, streams, dataset, duration_s, pace, topic_of,
                              start, eos, stop_flag,
                              lambda tallies, t: show.show(sum(x.count for x in tallies), t),
                              bootstrap=bootstrap)
        ok = True
    finally:
        _close(producer, ok)
    return result, start


def _close(producer, ok: bool) -> None:
    """Close the client; after a failure without waiting for sends the broker will never
    take (kafka-python's ``close`` flushes first and raises when that times out, and its
    destructor would try again)."""
    if ok:
        producer.close(timeout=10)
        return
    sender = getattr(producer, "_sender", None)
    if sender is not None and hasattr(sender, "force_close"):
        sender.force_close()
    producer._closed = True


def _worker_main(worker, bootstrap, streams, dataset, duration_s, pace, topic_of, eos,
                 producer_config, counts, queue, go, start_value) -> None:
    """One producer process: connect, report ready, wait for the start time, run."""
    stop_flag = _StopFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_flag.set)
    try:
        producer = _make_producer(bootstrap, producer_config, pace,
                                  [topic_of[s.device] for s in streams])
    except Exception as e:  # reported by the parent as one line
        queue.put(("error", worker, f"{type(e).__name__}: {e}"))
        return
    ok = False
    try:
        queue.put(("ready", worker, None))
        while not go.wait(0.1):
            if stop_flag():
                break
        slots = [s.device for s in streams]

        def tick(tallies, _t):
            for device, tally in zip(slots, tallies):
                counts[device] = tally.count

        start = start_value.value if go.is_set() else _resolve_start(pace, None)
        result = _run_streams(producer, streams, dataset, duration_s, pace, topic_of,
                              start, eos, stop_flag, tick, tick_s=0.2, bootstrap=bootstrap)
        queue.put(("done", worker, result))
        ok = True
    except Exception as e:
        from streamsim.broker import BrokerUnreachable

        known = isinstance(e, (SendFailed, BrokerUnreachable))
        queue.put(("error", worker, str(e) if known else f"{type(e).__name__}: {e}"))
    finally:
        _close(producer, ok)


def _produce_in_workers(bootstrap, streams, dataset, duration_s, pace, topic_of,
                        start_time_s, eos, stop_flag, show, producer_config, workers
                        ) -> list[tuple[_RunResult, float]]:
    """Split the devices over ``workers`` forked processes that share one start time."""
    ctx = mp.get_context("fork")  # children share the loaded dataset, copy-on-write
    groups = _balanced_groups(streams, duration_s, workers)
    counts = ctx.Array("q", max(s.device for s in streams) + 1, lock=False)
    queue, go, start_value = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0, lock=False)
    procs = [ctx.Process(target=_worker_main, name=f"produce-{w}", daemon=True,
                         args=(w, bootstrap, group, dataset, duration_s, pace, topic_of,
                               eos, producer_config, counts, queue, go, start_value))
             for w, group in enumerate(groups)]
    for p in procs:
        p.start()
    results: dict[int, _RunResult] = {}
    errors: list[str] = []
    ready = 0
    start = None
    go_mono = 0.0
    forwarded = False
    next_show = 0.0
    try:
        while len(results) + len(errors) < len(procs):
            if stop_flag() and not forwarded:
                forwarded = True
                for p in procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
            try:
                kind, worker, payload = queue.get(timeout=0.1)
            except queue_lib.Empty:
                if not any(p.is_alive() for p in procs) and queue.empty():
                    errors.append("a producer worker died without a result")
                    break
                kind = None
            if kind == "ready":
                ready += 1
                if ready == len(procs):
                    start = _resolve_start(pace, start_time_s)
                    start_value.value = start
                    go.set()
                    go_mono = time.monotonic()
                    next_show = go_mono + 1.0
            elif kind == "done":
                results[worker] = payload
            elif kind == "error":
                errors.append(f"worker {worker}: {payload}")
                go.set()
                stop_flag.set()
            if start is not None and time.monotonic() >= next_show:
                next_show += 1.0
                show.show(sum(counts), time.monotonic() - go_mono)
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(errors[0])
    return [(results[w], start) for w in sorted(results)]


def _balanced_groups(streams: Sequence, duration_s: float, workers: int) -> list[list]:
    """Devices split over ``workers`` with about equal expected record counts each."""
    groups: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for s in sorted(streams, key=lambda s: -s.schedule.expected_count(0.0, duration_s)):
        w = loads.index(min(loads))
        groups[w].append(s)
        loads[w] += s.schedule.expected_count(0.0, duration_s)
    return [sorted(g, key=lambda s: s.device) for g in groups if g]


# ------------------------------------------------------------------------------ CLI

def build_streams(dataset, partition: str, world_size: int, rates: str, seed: int,
                  rate_schedule: str | None = None, arrivals: str = "even",
                  devices: Sequence[int] | None = None) -> list:
    """The ``DeviceStream`` of each device in ``devices`` (default all) of the
    ``StreamPlan`` these settings make (``streamsim.plan``), as the CLI builds them."""
    plan = StreamPlan(devices=world_size, rates=rates, partition=partition,
                      rate_schedule=rate_schedule, arrivals=arrivals, seed=seed)
    return plan.streams(dataset, devices)


def _parse_devices(text: str | None, world_size: int) -> list[int] | None:
    if text is None or text.strip() == "":
        return None
    try:
        devices = sorted({int(x) for x in text.replace(" ", ",").split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--devices {text!r}: expected a comma-separated list like 0,1,2")
    bad = [d for d in devices if not 0 <= d < world_size]
    if bad or not devices:
        raise ValueError(f"--devices {text!r}: devices must be in [0, {world_size - 1}]")
    return devices


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{flag} {text!r}: must be a whole number >= 1 or 'auto'")
    return value


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none") else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from streamsim.cli import DefaultsHelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m streamsim.produce",
        description="Stream every device's data onto its Kafka topic, paced by schedule.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP"),
                        help="HOST:PORT of the broker (default $KAFKA_BOOTSTRAP)")
    parser.add_argument("--kafka-config", default=os.environ.get("KAFKA_CONFIG") or None,
                        metavar="FILE", help="Kafka client settings, key=value per line "
                        "(SASL/SSL: streamsim.kafkaconfig; default $KAFKA_CONFIG)")
    parser.add_argument("--replication-factor", type=int, default=1,
                        help="replicas of each topic it creates")
    parser.add_argument("--dataset", required=True,
                        help="cifar10, cifar100, fashion-mnist, imagefolder, synthetic or "
                             "MODULE:CALLABLE (a plug-in on PYTHONPATH)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--image-size", type=int, default=224, help="imagefolder only")
    parser.add_argument("--partition", default="iid", help="iid, noniid or dirichlet:ALPHA")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--rates", required=True,
                        help="per-device samples/s: '92 22 62', S1, S2, S10, S20, "
                             "normal:M,SD, uniform:LO,HI, piecewise T:R,T:R, or a CSV trace")
    parser.add_argument("--rate-schedule", default=None,
                        help="constant, rotate:SEC or scale:T:F,T:F")
    parser.add_argument("--duration", type=float, required=True, help="stream seconds")
    parser.add_argument("--pace", choices=PACES, required=True)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the partition, rates and streams")
    parser.add_argument("--arrivals", choices=("even", "poisson"), default="even",
                        help="even: exact counts; poisson: random arrivals at the same rate")
    parser.add_argument("--topic-prefix", default=DEFAULT_TOPIC_PREFIX,
                        help="device d's topic is PREFIX<d>")
    parser.add_argument("--start-time", type=_optional_float, default=None,
                        help="event-time origin, epoch seconds (default: now for realtime, "
                             "record.VIRTUAL_EPOCH_S for virtual)")
    parser.add_argument("--devices", default=None, help="produce only these, e.g. 0,1,2")
    parser.add_argument("--workers", default="auto",
                        help="producer processes, or 'auto' (by aggregate rate)")
    parser.add_argument("--no-eos", action="store_true", help="write no end-of-stream markers")
    parser.add_argument("--json", action="store_true", help="summary as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def format_summary(summary: dict) -> str:
    """The per-device table printed at the end."""
    lines = [f"{'device':>6}  {'topic':<20} {'count':>9}  {'target/s':>9}  {'achieved/s':>10}"
             f"  {'error%':>7}"]
    for d in summary["devices"]:
        lines.append(f"{d['device']:>6}  {d['topic']:<20} {d['count']:>9,}  "
                     f"{d['target_rate_per_s']:>9.2f}  {d['rate_per_s']:>10.2f}  "
                     f"{d['error_pct']:>7.2f}")
    lag = summary.get("send_lag_ms")
    lines.append(f"total {summary['records']:,} records over {summary['stream_s']:g} s of "
                 f"stream in {summary['elapsed_s']:g} s wall ({summary['send_rate_per_s']:,.0f}"
                 f" records/s), {summary['workers']} worker(s)"
                 + (f", send lag p50/p99/max {lag['p50']:g}/{lag['p99']:g}/{lag['max']:g} ms"
                    if lag else "")
                 + (", INTERRUPTED" if summary["interrupted"] else "")
                 + (f", {summary['failed']} FAILED sends" if summary["failed"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from streamsim import logsetup
    from streamsim.broker import (CLI_PROBE_S, BrokerError, BrokerUnreachable,
                                  check_reachable, parse_bootstrap)
    from streamsim.datasets import DatasetError, dataset_loader, load_dataset
    from streamsim.kafkaconfig import load_client_config

    logsetup.configure("produce")

    try:
        if not args.bootstrap:
            raise ValueError("no broker address: pass --bootstrap HOST:PORT or set "
                             "KAFKA_BOOTSTRAP (start one with `python -m streamsim.broker start`)")
        parse_bootstrap(args.bootstrap)
        if not args.duration > 0:
            raise ValueError(f"--duration {args.duration}: must be > 0 seconds")
        if args.world_size < 1:
            raise ValueError(f"--world-size {args.world_size}: must be >= 1")
        workers = None if args.workers == "auto" else _positive_int(args.workers, "--workers")
        plan = StreamPlan(devices=args.world_size, rates=args.rates, partition=args.partition,
                          rate_schedule=args.rate_schedule, arrivals=args.arrivals,
                          seed=args.seed, stream_start_s=args.start_time,
                          duration_s=args.duration)
        devices = _parse_devices(args.devices, args.world_size)
        client_config = load_client_config(args.kafka_config)
        if args.replication_factor < 1:
            raise ValueError(f"--replication-factor {args.replication_factor}: must be >= 1")
        dataset_loader(args.dataset)  # a built-in name or an importable module:callable
    except ValueError as e:
        print(f"produce: {e}", file=sys.stderr)
        return 2
    try:  # before loading data, so an unreachable broker is reported promptly
        check_reachable(args.bootstrap, timeout_s=CLI_PROBE_S, client_config=client_config)
    except BrokerUnreachable as e:
        print(f"produce: {e}", file=sys.stderr)
        return 1
    try:
        dataset = load_dataset(args.dataset, "train", args.data_dir, args.download,
                               args.image_size, args.seed)
        streams = plan.streams(dataset, devices)
    except (ValueError, DatasetError) as e:
        print(f"produce: {e}", file=sys.stderr)
        return 2
    try:
        summary = produce(args.bootstrap, streams, dataset, plan.duration_s, args.pace,
                          args.topic_prefix, plan.stream_start_s, eos=not args.no_eos,
                          workers=workers, progress=not args.quiet and not args.json,
                          client_config=client_config,
                          replication_factor=args.replication_factor)
    except (BrokerUnreachable, BrokerError, RuntimeError) as e:  # SendFailed included
        print(f"produce: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary) if args.json else format_summary(summary), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
