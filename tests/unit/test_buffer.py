"""Stream buffer policies and batch formation on the in-process source with a virtual clock.

Rates are powers of two so arrival offsets (k / rate) are exact and window edges are sharp.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from scadles.buffer import Batch, StreamBuffer, StreamStalled
from scadles.clock import VirtualClock, WallClock
from scadles.sources import InProcessSource, RawRecord, RecordDecoder
from streamsim.datasets import ArrayDataset
from streamsim.record import VIRTUAL_EPOCH_S, EndOfStream, Sample, encode, encode_eos
from streamsim.schedule import RateSchedule
from streamsim.stream import DeviceStream

T0 = VIRTUAL_EPOCH_S
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, *SHAPE), dtype=np.uint8)
    return ArrayDataset("tiny", np.arange(50) % 10, 10, images)


def make_buffer(dataset, rate, duration_s=None, policy="persistence", capacity=10_000,
                window_s=1.0, start=0, start_time_s=T0, device=0):
    stream = DeviceStream(dataset, np.arange(len(dataset)), RateSchedule([(0, rate)]),
                          device=device, seed=7)
    source = InProcessSource(stream, dataset, start_time_s, duration_s, start=start)
    return StreamBuffer(source, policy=policy, capacity=capacity, window_s=window_s)


def test_in_process_records_follow_the_stream_plan(dataset):
    stream = DeviceStream(dataset, np.arange(len(dataset)), RateSchedule([(0, 8)]), 3, seed=7)
    source = InProcessSource(stream, dataset, T0, duration_s=10)
    records = []
    while True:
        got = source.poll(0)
        if not got:
            break
        records += got
    seqs, offsets, idx = stream.plan(10)
    assert [o for o, _ in records] == list(range(81))  # 80 samples, then EOS at offset 80
    eos = records[-1][1]
    assert isinstance(eos, EndOfStream) and eos.count == 80 and eos.event_time_s == T0 + 10
    samples = [r for _, r in records[:-1]]
    assert [s.seq for s in samples] == seqs.tolist()
    assert [s.label for s in samples] == dataset.labels[idx].tolist()
    assert [s.event_time_s for s in samples] == (T0 + offsets).tolist()
    np.testing.assert_array_equal(np.stack([s.pixels for s in samples]),
                                  dataset.batch_pixels(idx))
    assert {s.device for s in samples} == {3}


def test_persistence_carries_leftovers_over(dataset):
    buf, clock = make_buffer(dataset, rate=8), VirtualClock()
    b1 = buf.next_window_batch(clock, min_bsz=1, max_bsz=4, last_step_s=clock.now())
    # At t = 1 s the arrivals at 0, 1/8, ..., 1 (9 samples) are in; the oldest 4 are taken.
    assert clock.now() == T0 + 1
    assert b1.seqs.tolist() == [0, 1, 2, 3] and b1.buffer_len == 5 and b1.wait_s == 1.0
    assert b1.buffer_peak == 9  # what was held before the batch was taken
    assert b1.images.shape == (4, *SHAPE) and b1.images.dtype == np.uint8
    assert b1.labels.dtype == np.int64 and b1.bytes == 4 * 16
    b2 = buf.next_window_batch(clock, min_bsz=1, max_bsz=4, last_step_s=clock.now())
    assert b2.seqs.tolist() == [4, 5, 6, 7] and b2.buffer_len == 5 + 8 - 4
    assert buf.stats()["trained"] == 8 and buf.stats()["truncated"] == 0


def test_truncation_keeps_only_the_window(dataset):
    buf, clock = make_buffer(dataset, rate=8, policy="truncation"), VirtualClock()
    clock.advance(3.0)  # a long step: by now 25 samples have arrived
    b = buf.next_window_batch(clock, min_bsz=0, max_bsz=100, last_step_s=T0 + 2.5)
    # Ready at 3.5 s; the window (2.5, 3.5] holds the arrivals 2.625 ... 3.5 (seqs 21..28).
    assert clock.now() == T0 + 3.5 and b.wait_s == 0.5
    assert b.seqs.tolist() == list(range(21, 29)) and b.truncated == 21
    # Nothing older than the window entered the buffer: it never held more than one
    # window's arrivals (the 21 older ones were discarded as they were admitted).
    assert b.buffer_peak == 8
    assert (b.event_times_s > T0 + 2.5).all()
    # Max batch: the newest 3 of the next window, the other 5 discarded.
    b = buf.next_window_batch(clock, min_bsz=0, max_bsz=3, last_step_s=clock.now())
    assert b.seqs.tolist() == [34, 35, 36] and b.truncated == 5 and b.buffer_len == 0
    assert buf.stats()["truncated"] == 26


def test_truncation_keeps_what_arrives_while_waiting_for_min_bsz(dataset):
    # rate 2: the window (0, 1] holds 2 samples; b_min = 5 waits until t = 2.5, and what
    # arrived meanwhile belongs to this window however far past its end.
    buf, clock = make_buffer(dataset, rate=2, policy="truncation"), VirtualClock()
    b = buf.next_window_batch(clock, min_bsz=5, max_bsz=64, last_step_s=T0)
    assert clock.now() == T0 + 2.5 and b.seqs.tolist() == [1, 2, 3, 4, 5]
    assert b.truncated == 1  # seq 0, at t = 0


def test_capacity_drops_the_oldest_and_counts(dataset):
    # The 9 arrivals of [0, 1] s into 5 places: the oldest 4 go. Under truncation the one at
    # t = 0 is outside the window (0, 1] and counts as truncated, so 3 are dropped.
    for policy, dropped in (("persistence", 4), ("truncation", 3)):
        buf, clock = make_buffer(dataset, rate=8, policy=policy, capacity=5), VirtualClock()
        b = buf.next_window_batch(clock, min_bsz=0, max_bsz=100, last_step_s=T0)
        assert b.seqs.tolist() == [4, 5, 6, 7, 8] and b.dropped == dropped, policy
        assert b.dropped + b.truncated == 4, policy
        assert buf.stats()["dropped"] == dropped and buf.stats()["peak_buffer_len"] == 5


def test_min_batch_waits_for_the_min_bsz_th_arrival(dataset):
    buf, clock = make_buffer(dataset, rate=2), VirtualClock()
    b = buf.next_window_batch(clock, min_bsz=5, max_bsz=64, last_step_s=T0)
    # At 1 s only 3 samples (0, 0.5, 1); the 5th arrives at 2 s.
    assert clock.now() == T0 + 2.0 and b.wait_s == 2.0 and b.seqs.tolist() == [0, 1, 2, 3, 4]


def test_max_batch_caps_the_batch(dataset):
    buf, clock = make_buffer(dataset, rate=64), VirtualClock()
    b = buf.next_window_batch(clock, min_bsz=8, max_bsz=16, last_step_s=T0)
    assert len(b) == 16 and b.buffer_len == 65 - 16 and b.seqs.tolist() == list(range(16))


def test_step_when_full_does_not_wait_out_the_window(dataset):
    # rate 8: the 4th sample (seq 3) arrives at 3/8 s; b_max = 4 is there by then.
    buf, clock = make_buffer(dataset, rate=8), VirtualClock()
    b = buf.next_window_batch(clock, min_bsz=2, max_bsz=4, last_step_s=T0,
                              step_when_full=True)
    assert clock.now() == T0 + 3 / 8 and b.seqs.tolist() == [0, 1, 2, 3]
    assert b.buffer_len == 0 and b.wait_s == 3 / 8
    # A slow stream never fills b_max within the window: it waits the window out, as without.
    slow, slow_clock = make_buffer(dataset, rate=2), VirtualClock()
    b = slow.next_window_batch(slow_clock, min_bsz=1, max_bsz=4, last_step_s=T0,
                               step_when_full=True)
    assert slow_clock.now() == T0 + 1 and b.seqs.tolist() == [0, 1, 2]
    # A backlog of b_max or more: ready at once.
    clock.advance(2.0)
    b = buf.next_window_batch(clock, min_bsz=2, max_bsz=4, last_step_s=clock.now(),
                              step_when_full=True)
    assert clock.now() == T0 + 3 / 8 + 2 and b.seqs.tolist() == [4, 5, 6, 7]
    assert b.wait_s == 0


def test_step_when_full_under_truncation_keeps_the_current_window(dataset):
    buf, clock = make_buffer(dataset, rate=8, policy="truncation"), VirtualClock()
    b = buf.next_window_batch(clock, min_bsz=2, max_bsz=4, last_step_s=T0,
                              step_when_full=True)
    assert clock.now() == T0 + 3 / 8 and b.seqs.tolist() == [0, 1, 2, 3]
    assert b.truncated == 0


def test_fixed_batch_waits_for_bsz_so_a_slow_stream_waits_longer(dataset):
    fast, slow = make_buffer(dataset, rate=8), make_buffer(dataset, rate=2)
    fast_clock, slow_clock = VirtualClock(), VirtualClock()
    bf = fast.next_fixed_batch(fast_clock, 16)
    bs = slow.next_fixed_batch(slow_clock, 16)
    assert len(bf) == len(bs) == 16
    assert bf.wait_s == 15 / 8 and bs.wait_s == 15 / 2  # the 16th arrival
    assert bs.seqs.tolist() == list(range(16))
    fixed_truncation = make_buffer(dataset, rate=8, policy="truncation")
    clock = VirtualClock()
    clock.advance(5)  # fixed batches keep everything (persistence) whatever the policy
    assert fixed_truncation.next_fixed_batch(clock, 16).seqs.tolist() == list(range(16))


def test_min_bsz_zero_allows_an_empty_batch(dataset):
    buf, clock = make_buffer(dataset, rate=0.25), VirtualClock()  # arrivals at 0, 4, 8 s
    assert buf.next_window_batch(clock, 0, 8, last_step_s=T0).seqs.tolist() == [0]
    b = buf.next_window_batch(clock, 0, 8, last_step_s=clock.now())
    assert len(b) == 0 and b.images.shape == (0, *SHAPE) and not b.ended
    assert clock.now() == T0 + 2 and b.wait_s == 1.0


def test_ended_at_the_end_of_stream_marker(dataset):
    buf, clock = make_buffer(dataset, rate=4, duration_s=2), VirtualClock()  # 8 samples
    assert len(buf.next_fixed_batch(clock, 5)) == 5
    b = buf.next_fixed_batch(clock, 5)  # 3 left: the marker at 2 s says no more will come
    assert b.seqs.tolist() == [5, 6, 7] and b.ended and clock.now() == T0 + 2
    b = buf.next_window_batch(clock, 1, 8, last_step_s=clock.now())
    assert len(b) == 0 and b.ended and b.wait_s == 0

    buf, clock = make_buffer(dataset, rate=4, duration_s=2), VirtualClock()
    b = buf.next_window_batch(clock, min_bsz=1, max_bsz=4, last_step_s=T0 + 1)
    assert b.seqs.tolist() == [0, 1, 2, 3] and not b.ended  # leftovers remain
    b = buf.next_window_batch(clock, min_bsz=1, max_bsz=4, last_step_s=clock.now())
    assert b.seqs.tolist() == [4, 5, 6, 7] and b.ended


def test_commit_used_resumes_without_loss_or_duplicates(dataset):
    buf, clock = make_buffer(dataset, rate=8, duration_s=6), VirtualClock()
    trained = []
    for _ in range(2):
        trained += buf.next_window_batch(clock, 1, 6, last_step_s=clock.now()).seqs.tolist()
    offset = buf.commit_used()
    assert offset == 12 and buf.source.committed() == 12  # seqs 12.. are still buffered
    # A new run resumes from the committed offset and reads to the end of the stream.
    resumed, clock2 = make_buffer(dataset, rate=8, duration_s=6, start=offset), VirtualClock()
    clock2.advance_to(clock.now())
    while True:
        b = resumed.next_window_batch(clock2, 0, 64, last_step_s=clock2.now())
        trained += b.seqs.tolist()
        if b.ended:
            break
    assert trained == list(range(48))
    assert resumed.commit_used() == 48  # the marker: a later resume ends at once

    trunc, clock = make_buffer(dataset, rate=8, policy="truncation"), VirtualClock()
    b = trunc.next_window_batch(clock, 0, 4, last_step_s=T0)
    assert b.seqs.tolist() == [5, 6, 7, 8] and trunc.commit_used() == 9  # 0..8 used up


class ListSource:
    """A fake topic: raw records decoded by the real decoder, all available at once."""

    topic = "fake-topic"
    sample_shape = SHAPE

    def __init__(self, raw, delay_s=0.0):
        self._raw, self._decoder = list(raw), RecordDecoder(self.topic, 0, 10, SHAPE)
        self.malformed = self._decoder.malformed
        self._pos, self._committed = 0, None

    def poll(self, timeout_s):
        raw, self._raw = self._raw, []
        if not raw:
            time.sleep(timeout_s)
            return []
        self._pos = raw[-1].offset + 1
        return self._decoder.decode_all(raw)

    def position(self):
        return self._pos

    def commit(self, offset):
        self._committed = offset

    def committed(self):
        return self._committed

    def close(self):
        pass


def test_malformed_records_are_counted_logged_once_and_never_batched(caplog):
    px = np.full(SHAPE, 9, np.uint8)
    good = encode(0, 0, 1, px)
    bad = {
        "short": good[:10],
        "magic": b"XX" + good[2:],
        "version": good[:2] + bytes([99]) + good[3:],
        "label": encode(0, 0, 10, px),
        "shape": encode(0, 0, 1, np.zeros((3, 4, 4), np.uint8)),
        "length": good + b"\0",
        "device": encode(5, 0, 1, px),
    }
    raw, seq, offset = [], 0, 0
    for kind, value in list(bad.items()) * 2:  # every kind twice, between good records
        raw.append(RawRecord(offset, encode(0, seq, seq % 10, px), int(T0 * 1000) + seq))
        raw.append(RawRecord(offset + 1, value, int(T0 * 1000) + seq))
        seq, offset = seq + 1, offset + 2
    raw.append(RawRecord(offset, encode_eos(0, seq), int(T0 * 1000) + seq))
    buf = StreamBuffer(ListSource(raw), capacity=100)
    with caplog.at_level(logging.WARNING, logger="scadles.sources"):
        b = buf.next_fixed_batch(VirtualClock(), 100)
    assert b.seqs.tolist() == list(range(seq)) and b.ended
    assert buf.stats()["malformed"] == {kind: 2 for kind in bad}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(bad)  # once per kind, naming the topic and the offset
    assert all("fake-topic" in w and "offset" in w for w in warnings)


def test_stall_raises_one_clear_line():
    buf = StreamBuffer(ListSource([]), stall_timeout_s=0.3, poll_timeout_s=0.05)
    with pytest.raises(StreamStalled, match="fake-topic.*producer running"):
        buf.next_window_batch(VirtualClock(), 1, 8, last_step_s=T0)


def test_unbounded_stream_and_resume_offsets(dataset):
    buf, clock = make_buffer(dataset, rate=1000, capacity=100_000), VirtualClock()
    b = buf.next_window_batch(clock, 1, 10_000, last_step_s=T0 + 4)  # > one poll chunk
    assert b.seqs.tolist() == list(range(5001)) and not b.ended
    resumed = make_buffer(dataset, rate=1000, start=5000)
    assert resumed.next_fixed_batch(VirtualClock(), 3).seqs.tolist() == [5000, 5001, 5002]


def test_wall_clock_batches_from_a_realtime_in_process_stream(dataset):
    buf = make_buffer(dataset, rate=50, duration_s=0.6, window_s=0.2,
                      start_time_s=time.time())
    clock, seqs, last = WallClock(), [], time.time()
    while True:
        b = buf.next_window_batch(clock, 0, 100, last_step_s=last)
        last = clock.now()
        seqs += b.seqs.tolist()
        assert (b.event_times_s <= last).all()
        if b.ended:
            break
    assert seqs == list(range(30))


@pytest.mark.parametrize("kwargs", [dict(policy="fifo"), dict(capacity=0),
                                    dict(window_s=0)])
def test_bad_settings_raise(dataset, kwargs):
    with pytest.raises(ValueError):
        make_buffer(dataset, rate=8, **kwargs)


def test_bad_batch_sizes_raise(dataset):
    buf = make_buffer(dataset, rate=8, capacity=10)
    with pytest.raises(ValueError, match="min_bsz"):
        buf.next_window_batch(VirtualClock(), 9, 8, last_step_s=T0)
    with pytest.raises(ValueError, match="capacity"):
        buf.next_fixed_batch(VirtualClock(), 11)
    assert isinstance(buf.next_fixed_batch(VirtualClock(), 10), Batch)


def _raw_samples(seqs, first_offset=0, spacing_s=0.01, eos=True):
    """Raw records of device 0 with the given sequence numbers (event time by seq), then an
    end-of-stream marker."""
    px = np.full(SHAPE, 3, np.uint8)
    raw = [RawRecord(first_offset + i, encode(0, s, s % 10, px), int((T0 + s * spacing_s) * 1000))
           for i, s in enumerate(seqs)]
    if eos:
        last = first_offset + len(raw)
        raw.append(RawRecord(last, encode_eos(0, max(seqs) + 1),
                             int((T0 + (max(seqs) + 1) * spacing_s) * 1000)))
    return raw


def test_duplicates_are_dropped_counted_and_still_known_after_a_resume():
    """A producer retry wrote seqs 5..9 twice: each sample is batched once, the copies are
    counted as duplicates (in the batch and the stats), and a buffer resumed from the
    committed offset with the checkpointed state counts the whole run once and still drops
    the copies of samples trained before the checkpoint."""
    seqs = list(range(10)) + list(range(5, 10)) + list(range(10, 15))
    raw = _raw_samples(seqs)
    first = StreamBuffer(ListSource(raw), capacity=100)
    clock = VirtualClock()
    b = first.next_fixed_batch(clock, 8)  # the fake topic hands over everything at once
    assert b.seqs.tolist() == list(range(8)) and b.duplicates == 5
    offset = first.commit_used()
    state = first.state_dict()
    assert offset == 8 and state["next_seq"] == 8
    assert state["counters"]["duplicates"] == 0  # the copies lie beyond the committed offset
    rest = first.next_fixed_batch(clock, 7)
    assert rest.seqs.tolist() == list(range(8, 15)) and rest.duplicates == 0
    first.commit_used()
    assert first.stats()["duplicates"] == first.state_dict()["counters"]["duplicates"] == 5

    resumed = StreamBuffer(ListSource(raw[offset:]), capacity=100)
    resumed.load_state_dict(state)
    again = resumed.next_fixed_batch(VirtualClock(), 7)
    assert again.seqs.tolist() == list(range(8, 15))
    assert resumed.stats()["duplicates"] == 5 and resumed.stats()["trained"] == 15
    # Copies of samples trained before the checkpoint (seqs 5..7) are duplicates too.
    early = StreamBuffer(ListSource(_raw_samples([8, 5, 6, 7, 9], first_offset=8)))
    early.load_state_dict(state)
    assert early.next_fixed_batch(VirtualClock(), 2).seqs.tolist() == [8, 9]
    assert early.stats()["duplicates"] == 3


def test_resumed_stats_count_the_whole_run(dataset):
    """A checkpointed state carries trained, dropped and peak counts into the resumed run."""
    buf, clock = make_buffer(dataset, rate=8, capacity=6), VirtualClock()
    buf.next_window_batch(clock, min_bsz=1, max_bsz=4, last_step_s=clock.now())
    offset = buf.commit_used()
    state = buf.state_dict()
    assert state["counters"]["trained"] == 4 and state["counters"]["dropped"] == 3
    resumed = make_buffer(dataset, rate=8, capacity=6, start=offset)
    resumed.load_state_dict(state)
    clock2 = VirtualClock()
    clock2.advance_to(clock.now())
    resumed.next_window_batch(clock2, min_bsz=1, max_bsz=4, last_step_s=clock.now())
    stats = resumed.stats()
    assert stats["trained"] == 8 and stats["peak_buffer_len"] == 6
    assert stats["dropped"] == 3 + resumed.dropped
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"version": 0})


class LingeringSource:
    """A realtime topic behind a lingering producer: records of device 0 at ``rate_per_s``
    from ``start_s`` (wall clock), each released at the first multiple of ``linger_s``
    after its event time (as a producer batching for ``linger_s`` delivers them)."""

    topic = "lingering"
    sample_shape = SHAPE

    def __init__(self, rate_per_s, count, linger_s, start_s):
        self.times = start_s + np.arange(count) / rate_per_s
        self.release = start_s + (np.floor((self.times - start_s) / linger_s) + 1) * linger_s
        self.count, self.pos, self.malformed = count, 0, {}
        self.px = np.zeros(SHAPE, np.uint8)

    def poll(self, timeout_s):
        deadline = time.time() + timeout_s
        while True:
            now = time.time()
            n = int(np.searchsorted(self.release, now, side="right"))
            if n > self.pos:
                out = [(k, Sample(0, k, k % 10, self.px, float(self.times[k])))
                       for k in range(self.pos, n)]
                self.pos = n
                return out
            if self.pos == self.count and now >= self.release[-1]:
                self.pos += 1
                return [(self.count, EndOfStream(0, self.count, float(self.release[-1])))]
            if now >= deadline:
                return []
            time.sleep(min(0.01, max(0.0, deadline - now)))

    def position(self):
        return self.pos

    def commit(self, offset):
        pass

    def committed(self):
        return None

    def close(self):
        pass


def test_wall_clock_truncation_keeps_records_that_arrive_late_in_the_linger():
    """Records reach the consumer up to 150 ms after their event time (a lingering
    producer), so each window's tail arrives after its batch was taken. Those were never
    offered: truncation keeps them for the next batch. With room for everything, nothing on
    time is truncated and every record is trained once."""
    start = time.time() + 0.05
    source = LingeringSource(rate_per_s=100, count=120, linger_s=0.15, start_s=start)
    buf = StreamBuffer(source, policy="truncation", window_s=0.25, poll_timeout_s=0.02)
    clock, seqs, last = WallClock(), [], start - 0.01  # the first window holds t = 0
    while True:
        b = buf.next_window_batch(clock, 0, 1000, last_step_s=last)
        last = clock.now()
        seqs += b.seqs.tolist()
        if b.ended:
            break
    assert buf.stats()["truncated"] == 0
    assert sorted(seqs) == list(range(120)) and len(seqs) == 120


def test_truncation_still_discards_what_arrived_while_the_device_was_busy():
    """The late-arrival rule keeps only the last batch's window: records of a window that
    passed while the device computed are truncated, on the wall clock as before."""
    start = time.time() - 2.0  # two seconds of stream are already there
    source = LingeringSource(rate_per_s=100, count=400, linger_s=0.05, start_s=start)
    buf = StreamBuffer(source, policy="truncation", window_s=0.5, poll_timeout_s=0.02)
    clock = WallClock()
    b = buf.next_window_batch(clock, 0, 1000, last_step_s=clock.now() - 0.5)
    assert b.truncated >= 140 and len(b) >= 45  # only the last 0.5 s (~50 records) kept
    assert (b.event_times_s > clock.now() - 0.5 - 0.05).all()


def test_a_stop_request_ends_the_wait_with_an_empty_batch(dataset):
    """SIGINT while waiting for a slow stream: the wait ends at once with nothing taken."""
    flag = {"stop": False}
    buf = StreamBuffer(ListSource([]), poll_timeout_s=0.02,
                       stop_requested=lambda: flag["stop"])
    flag["stop"] = True
    started = time.monotonic()
    b = buf.next_window_batch(VirtualClock(), 8, 8, last_step_s=T0)
    assert len(b) == 0 and not b.ended and time.monotonic() - started < 1.0
    assert len(buf.next_fixed_batch(VirtualClock(), 4)) == 0
