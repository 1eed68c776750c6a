"""Device streams: determinism, one fresh shuffle per pass, increasing event times."""
import heapq
import itertools

import numpy as np
import pytest

from streamsim.schedule import RateSchedule, arrival_times, make_schedules
from streamsim import stream as stream_module
from streamsim.stream import DeviceStream, merged_blocks

INDICES = np.arange(100, 137)  # 37 indices: passes do not align with the 8192-item blocks


def _stream(seed=0, device=0, rate=50.0, arrivals="even", indices=INDICES):
    return DeviceStream(None, indices, RateSchedule([(0.0, rate)]), device, seed, arrivals)


def test_plan_until_and_iteration_agree():
    stream = _stream()
    seqs, offsets, idx = stream.plan(400.0)  # 20,000 items: several blocks
    assert len(seqs) == 20000
    np.testing.assert_array_equal(seqs, np.arange(20000))
    np.testing.assert_array_equal(offsets, arrival_times(stream.schedule, 400.0))
    assert list(stream.until(400.0)) == list(zip(seqs.tolist(), offsets.tolist(), idx.tolist()))
    assert list(itertools.islice(stream, 20000)) == list(stream.until(400.0))


def test_deterministic_for_the_same_seed_and_distinct_otherwise():
    a, b = _stream(seed=4).plan(20.0), _stream(seed=4).plan(20.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], _stream(seed=5).plan(20.0)[2])
    assert not np.array_equal(a[2], _stream(seed=4, device=1).plan(20.0)[2])


def test_every_index_once_per_pass_in_a_fresh_order():
    n = len(INDICES)
    _, _, idx = _stream().plan(n * 6 / 50.0)
    passes = idx.reshape(6, n)
    for p in passes:
        np.testing.assert_array_equal(np.sort(p), INDICES)
    assert len({tuple(p) for p in passes}) == 6


def test_event_times_increase():
    for arrivals in ("even", "poisson"):
        _, offsets, _ = _stream(arrivals=arrivals).plan(100.0)
        assert offsets[0] >= 0 and offsets[-1] < 100.0
        assert np.all(np.diff(offsets) > 0)
    items = list(itertools.islice(_stream(), 500))
    assert all(a[1] < b[1] and b[0] == a[0] + 1 for a, b in zip(items, items[1:]))


def test_until_is_bounded_in_stream_time():
    stream = DeviceStream(None, INDICES, make_schedules("0:64,300:16", 1, seed=0)[0], 0, 0)
    items = list(stream.until(310.0))
    assert len(items) == 64 * 300 + 16 * 10
    assert items[-1][1] < 310.0
    assert stream.plan(0.0)[0].size == 0


def test_a_stream_whose_schedule_stops_ends():
    stream = DeviceStream(None, INDICES, RateSchedule([(0.0, 5.0), (2.0, 0.0)]), 0, 0)
    assert [seq for seq, _, _ in stream] == list(range(10))


def test_poisson_is_seeded_per_device_and_has_the_right_mean():
    a = _stream(seed=1, arrivals="poisson").plan(200.0)[1]
    b = _stream(seed=1, arrivals="poisson").plan(200.0)[1]
    c = _stream(seed=1, device=2, arrivals="poisson").plan(200.0)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:100], c[:100])
    assert abs(len(a) - 10000) < 4 * 100  # 4 sd of Poisson(10000)
    rng = np.random.default_rng([1, 0, stream_module._ARRIVAL_STREAM])  # its own derivation
    np.testing.assert_array_equal(a, arrival_times(RateSchedule([(0.0, 50.0)]), 200.0,
                                                   "poisson", rng))


def test_the_global_rng_is_never_used():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    _stream(arrivals="poisson").plan(50.0)
    list(itertools.islice(_stream(), 100))
    assert np.array_equal(np.random.get_state()[1], state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        _stream(indices=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="even, poisson"):
        _stream(arrivals="bursty")


def _heap_merged(streams, duration_s):
    def items(slot, stream):
        for seq, offset_s, index in stream.until(duration_s):
            yield offset_s, slot, seq, index

    return list(heapq.merge(*(items(slot, s) for slot, s in enumerate(streams))))


@pytest.mark.parametrize("arrivals", ["even", "poisson"])
def test_merged_blocks_is_the_event_time_merge_of_every_stream(arrivals):
    # very different rates (blocks end at very different times), one stream that stops,
    # one that never starts within the duration, and a rotating schedule
    schedules = make_schedules("92 22 62 42 48 5000 18", 7, seed=0, rate_schedule="rotate:7")
    schedules[2] = RateSchedule([(0.0, 30.0), (3.0, 0.0)])
    schedules[4] = RateSchedule([(0.0, 0.0), (50.0, 10.0)])
    streams = [DeviceStream(None, np.arange(100 * d, 100 * d + 37 + d), sch, d, 3, arrivals)
               for d, sch in enumerate(schedules)]
    blocks = list(merged_blocks(streams, 30.0))
    assert len(blocks) > 1
    got = [item for offsets, slots, seqs, indices in blocks
           for item in zip(offsets.tolist(), slots.tolist(), seqs.tolist(), indices.tolist())]
    assert got == _heap_merged(streams, 30.0)
    assert list(merged_blocks(streams, 0.0)) == []
