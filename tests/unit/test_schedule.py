"""Rate specs, schedules and arrival times."""
import math
import time

import numpy as np
import pytest

from streamsim.schedule import (RateSchedule, arrival_times, listed_rates, make_schedules,
                                parse_rates)

PAPER_25 = "92 22 62 42 48 36 18 38 84 60 108 40 58 16 44 78 92 28 30 52 84 20 16 38 66"


def test_explicit_lists():
    assert parse_rates(PAPER_25, 25, seed=0)[:3] == [92.0, 22.0, 62.0]
    assert parse_rates("1.5,2, 3", 3, seed=0) == [1.5, 2.0, 3.0]
    assert parse_rates([4, 5], 2, seed=0) == [4.0, 5.0]
    with pytest.raises(ValueError, match="25 rate.*world size 24"):
        parse_rates(PAPER_25, 24, seed=0)
    with pytest.raises(ValueError, match="> 0"):
        parse_rates("3 0", 2, seed=0)


@pytest.mark.parametrize("spec", ["S3", "fast", "normal:5", "normal:5,-1", "uniform:9,3",
                                  "uniform:a,b", "", "1 2 x"])
def test_bad_rate_specs(spec):
    with pytest.raises(ValueError) as info:
        make_schedules(spec, 3, seed=0)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize("name, dist, mean, sd", [("S1", "uniform", 38, 24),
                                                  ("S2", "uniform", 300, 112),
                                                  ("S10", "normal", 64, 24),
                                                  ("S20", "normal", 256, 28)])
def test_named_distributions_mean_and_spread(name, dist, mean, sd):
    rates = np.array(parse_rates(name, 40000, seed=1))
    assert rates.min() >= 1
    assert rates.mean() == pytest.approx(mean, rel=0.01, abs=0.3)  # S1 clips ~5% at 1
    assert rates.std() == pytest.approx(sd, rel=0.03)
    if dist == "uniform":
        half_width = sd * math.sqrt(3)
        assert rates.max() <= mean + half_width
        assert rates.min() >= max(1.0, mean - half_width)
        if mean - half_width > 1:  # S2: no clipping, flat histogram
            counts, _ = np.histogram(rates, bins=4, range=(mean - half_width, mean + half_width))
            assert counts.min() > 0.9 * counts.max()


def test_parametric_distributions_and_seeds():
    lo_hi = np.array(parse_rates("uniform:10,20", 5000, seed=0))
    assert lo_hi.min() >= 10 and lo_hi.max() <= 20 and lo_hi.mean() == pytest.approx(15, 0.02)
    normal = np.array(parse_rates("normal:100,10", 5000, seed=0))
    assert normal.mean() == pytest.approx(100, rel=0.01)
    assert normal.std() == pytest.approx(10, rel=0.05)
    assert np.all(np.array(parse_rates("normal:-5,1", 50, seed=0)) == 1.0)  # clipped
    assert parse_rates("S10", 16, seed=3) == parse_rates("S10", 16, seed=3)
    assert parse_rates("S10", 16, seed=3) != parse_rates("S10", 16, seed=4)
    state = np.random.get_state()[1].copy()
    parse_rates("S2", 16, seed=0)
    assert np.array_equal(np.random.get_state()[1], state), "global RNG was used"


@pytest.mark.parametrize("rate", [1.0, 7.5, 16.0, 38.3, 64.0, 300.0, 0.37])
def test_even_counts_over_intervals_are_exact(rate):
    schedule = RateSchedule([(0.0, rate)])
    times = arrival_times(schedule, 1000.0)
    assert np.all(np.diff(times) > 0) and times[0] == 0 and times[-1] < 1000
    for t0, t1 in [(0, 20), (0, 1000), (13.3, 77.7), (500, 500.5), (999, 1000)]:
        count = np.count_nonzero((times >= t0) & (times < t1))
        expected = math.ceil(rate * t1 - 1e-9) - math.ceil(rate * t0 - 1e-9)
        assert count == expected
        assert abs(count - schedule.expected_count(t0, t1)) < 1


def test_even_counts_equal_rate_times_duration():
    """The acceptance check: 20 s of each of the paper's 25 rates -> exactly 20 x rate."""
    for schedule, rate in zip(make_schedules(PAPER_25, 25, seed=0), parse_rates(PAPER_25, 25, 0)):
        assert len(arrival_times(schedule, 20.0)) == 20 * rate


def test_sixteen_devices_at_300_per_s_for_1000_s_is_instant():
    start = time.perf_counter()
    total = sum(len(arrival_times(s, 1000.0)) for s in make_schedules("0:300", 16, seed=0))
    assert total == 16 * 300 * 1000
    assert time.perf_counter() - start < 2.0


def test_poisson_mean_and_variance():
    schedule = RateSchedule([(0.0, 50.0)])
    times = arrival_times(schedule, 2000.0, "poisson", np.random.default_rng(0))
    assert np.all(np.diff(times) >= 0) and times.min() >= 0 and times.max() < 2000
    per_second = np.bincount(times.astype(np.int64), minlength=2000)
    assert per_second.mean() == pytest.approx(50, rel=0.01)
    assert per_second.var() == pytest.approx(50, rel=0.1)  # Poisson: variance = mean
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps
    again = arrival_times(schedule, 2000.0, "poisson", np.random.default_rng(0))
    np.testing.assert_array_equal(times, again)
    with pytest.raises(ValueError, match="rng"):
        arrival_times(schedule, 10.0, "poisson")
    with pytest.raises(ValueError, match="even, poisson"):
        arrival_times(schedule, 10.0, "bursty")


def test_poisson_follows_a_time_varying_rate():
    schedule = make_schedules("0:100,50:10", 1, seed=0)[0]
    times = arrival_times(schedule, 100.0, "poisson", np.random.default_rng(1))
    first, second = np.count_nonzero(times < 50), np.count_nonzero(times >= 50)
    assert abs(first - 5000) < 4 * math.sqrt(5000)
    assert abs(second - 500) < 4 * math.sqrt(500)


def test_piecewise_for_every_device():
    schedules = make_schedules("0:64,300:16", 3, seed=0)
    assert all(s.segments == [(0.0, 64.0), (300.0, 16.0)] for s in schedules)
    s = schedules[0]
    assert (s.rate_at(0), s.rate_at(299.99), s.rate_at(300), s.rate_at(1e6)) == (64, 64, 16, 16)
    assert s.expected_count(0, 600) == 64 * 300 + 16 * 300
    times = arrival_times(s, 600.0)
    assert np.count_nonzero(times < 300) == 19200 and np.count_nonzero(times >= 300) == 4800
    with pytest.raises(ValueError, match="start at 0"):
        make_schedules("10:64,300:16", 3, seed=0)
    with pytest.raises(ValueError, match="T:RATE"):
        make_schedules("0:64,300", 3, seed=0)


def test_a_paused_stream_resumes_on_time():
    s = RateSchedule([(0.0, 10.0), (1.0, 0.0), (2.0, 10.0)])
    times = arrival_times(s, 3.0)
    assert len(times) == 20 and not np.any((times >= 1) & (times < 2))
    assert times[10] == 2.0
    stopped = RateSchedule([(0.0, 4.0), (1.0, 0.0)])
    assert len(arrival_times(stopped, 100.0)) == 4


@pytest.mark.parametrize("header", ["t_seconds,device,rate\n", ""])
def test_csv_trace(tmp_path, header):
    path = tmp_path / "trace.csv"
    path.write_text(header + "0,0,10\n0,1,20\n5,0,30\n# a comment\n\n8, 1, 0\n")
    s0, s1 = make_schedules(str(path), 2, seed=0)
    assert s0.segments == [(0.0, 10.0), (5.0, 30.0)]
    assert s1.segments == [(0.0, 20.0), (8.0, 0.0)]
    assert s0.expected_count(0, 10) == 50 + 150
    assert len(arrival_times(s1, 100.0)) == 160


@pytest.mark.parametrize("body, match", [("0,0,10\n", "device 1 has no rate at t=0"),
                                         ("0,0,10\n0,1,5\n0,2,5\n", "device in"),
                                         ("0,0,10\n0,1,5\n0,1,6\n", "twice"),
                                         ("0,0,10\n0,1,5\n3,x\n", "t_seconds,device,rate")])
def test_bad_csv_trace(tmp_path, body, match):
    path = tmp_path / "trace.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        make_schedules(str(path), 2, seed=0)
    with pytest.raises(ValueError, match="no such file"):
        make_schedules(str(tmp_path / "missing.csv"), 2, seed=0)


def test_rotate_keeps_the_aggregate_constant():
    schedules = make_schedules("10 20 30", 3, seed=0, rate_schedule="rotate:60")
    assert [schedules[0].rate_at(t) for t in (0, 59, 60, 125, 180, 245)] == [10, 10, 20, 30,
                                                                            10, 20]
    assert [s.rate_at(70) for s in schedules] == [20, 30, 10]
    for t in np.linspace(0, 1000, 37):
        assert sum(s.rate_at(t) for s in schedules) == 60
    for s in schedules:  # every device gets every base rate for 60 s per 180 s
        assert s.expected_count(0, 180 * 4) == (10 + 20 + 30) * 60 * 4
    times = arrival_times(schedules[0], 360.0)
    assert len(times) == 2 * (10 + 20 + 30) * 60
    assert np.count_nonzero((times >= 60) & (times < 120)) == 20 * 60
    with pytest.raises(ValueError, match="constant base rates"):
        make_schedules("0:10,5:20", 3, seed=0, rate_schedule="rotate:60")


def test_scale_multiplies_base_rates_from_time_t():
    schedules = make_schedules("10 40", 2, seed=0, rate_schedule="scale:100:0.5,200:2")
    assert [schedules[1].rate_at(t) for t in (50, 150, 250)] == [40, 20, 80]
    assert schedules[0].expected_count(0, 300) == 1000 + 500 + 2000
    piecewise = make_schedules("0:64,300:16", 1, seed=0, rate_schedule="scale:150:0.5")[0]
    assert piecewise.segments == [(0.0, 64.0), (150.0, 32.0), (300.0, 8.0)]


@pytest.mark.parametrize("spec", ["rotate", "rotate:0", "rotate:x", "scale:1", "scale:5:-1",
                                  "spiky:3"])
def test_bad_rate_schedules(spec):
    with pytest.raises(ValueError) as info:
        make_schedules("1 2", 2, seed=0, rate_schedule=spec)
    assert repr(spec) in str(info.value)


def test_constant_rate_schedule_is_the_base():
    a = make_schedules("S10", 4, seed=2)
    assert make_schedules("S10", 4, seed=2, rate_schedule="constant") == a
    assert [s.segments[0][1] for s in a] == parse_rates("S10", 4, seed=2)


def test_rate_schedule_validation():
    with pytest.raises(ValueError):
        RateSchedule([])
    with pytest.raises(ValueError):
        RateSchedule([(1.0, 5.0)])
    with pytest.raises(ValueError):
        RateSchedule([(0.0, -1.0)])
    with pytest.raises(ValueError):
        RateSchedule([(0.0, 1.0), (5.0, 2.0)], period_s=5.0)


@pytest.mark.parametrize("spec, items", [
    ("92 22 62", ["92", "22", "62"]), (" 92,22 , 6.5e1 ", ["92", "22", "6.5e1"]),
    ("-1,.5", ["-1", ".5"]), ("S10", None), ("normal:64,24", None), ("0:64,300:16", None),
    ("rates.csv", None), ("1,x", None),
])
def test_listed_rates_tells_a_list_of_numbers_from_the_other_forms(spec, items):
    assert listed_rates(spec) == items


def test_mean_rate_is_the_time_average_over_the_run():
    piecewise = make_schedules("0:64,300:16", 1, seed=0)[0]
    assert piecewise.mean_rate(600.0) == 40.0
    assert piecewise.mean_rate(300.0) == 64.0
    assert piecewise.mean_rate(0.0) == 64.0  # no stream time yet: the rate at 0 s
    rotating = make_schedules("10 20 30 40", 4, seed=0, rate_schedule="rotate:100")
    assert [s.mean_rate(400.0) for s in rotating] == [25.0] * 4  # one full turn
    assert [s.mean_rate(200.0) for s in rotating] == [15.0, 25.0, 35.0, 25.0]
    assert [s.mean_rate(150.0) for s in rotating] == pytest.approx([40 / 3, 70 / 3, 100 / 3,
                                                                    30.0])
    # a constant rate is itself, exactly, over any stretch (float rates included)
    for rate in (0.1, 16.0, 37.3, 64.0):
        for duration_s in (0.0, 0.7, 123.456, 1e6):
            assert make_schedules([rate], 1, seed=0)[0].mean_rate(duration_s) == rate
    assert make_schedules([5.0], 1, seed=0, rate_schedule="rotate:3")[0].mean_rate(7.0) == 5.0
