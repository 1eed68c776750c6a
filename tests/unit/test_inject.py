"""Randomized data injection: the pure choices, and injection from in-process sources on a
virtual clock (deterministic per seed, no duplicates in a step, never moves the clock)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from scadles.buffer import Batch, StreamBuffer
from scadles.clock import VirtualClock, WallClock
from scadles.inject import (Injector, choose_peers, make_injector, num_peers, pick, share_count,
                            step_rng)
from scadles.sources import POOL, InProcessSource, inprocess_sources_factory
from streamsim.datasets import ArrayDataset
from streamsim.partition import make_partition
from streamsim.pool import POOL_DEVICE, make_pool_stream
from streamsim.record import VIRTUAL_EPOCH_S
from streamsim.schedule import RateSchedule
from streamsim.stream import DeviceStream

T0 = VIRTUAL_EPOCH_S
SHAPE = (1, 4, 4)
DURATION_S = 30.0


# --------------------------------------------------------------------------------------------
# Pure choices
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, world_size, expected", [
    (0.0, 10, 0), (0.05, 10, 1), (0.1, 10, 1), (0.25, 10, 3), (0.5, 10, 5), (1.0, 10, 9),
    (0.1, 11, 1), (0.7, 11, 7), (0.3, 11, 3), (0.25, 25, 6), (0.5, 4, 2), (1.0, 1, 0),
    (0.5, 1, 0), (0.34, 4, 2), (1 / 3, 4, 1),
])
def test_num_peers_is_ceil_alpha_times_others(alpha, world_size, expected):
    assert num_peers(alpha, world_size) == expected


@pytest.mark.parametrize("alpha, world_size", [(-0.1, 4), (1.5, 4), (0.5, 0)])
def test_num_peers_rejects_bad_settings(alpha, world_size):
    with pytest.raises(ValueError):
        num_peers(alpha, world_size)


@pytest.mark.parametrize("alpha, world_size", [(0.05, 10), (0.25, 10), (0.5, 10), (1.0, 10),
                                               (0.25, 25), (0.5, 2)])
def test_choose_peers_count_never_self_distinct(alpha, world_size):
    k = math.ceil(alpha * (world_size - 1) - 1e-9)
    for device in range(world_size):
        for step in range(20):
            peers = choose_peers(step_rng(5, device, step), device, world_size, alpha)
            assert len(peers) == k == len(set(peers))
            assert device not in peers
            assert peers == sorted(peers) and all(0 <= p < world_size for p in peers)


def test_choose_peers_deterministic_per_seed_and_different_across_devices():
    def seq(seed, device):
        return [choose_peers(step_rng(seed, device, s), device, 10, 0.25) for s in range(50)]

    assert seq(1, 3) == seq(1, 3)
    assert seq(1, 3) != seq(2, 3)
    # Devices draw independently: their choices (as sets of "others") differ.
    assert seq(1, 3) != seq(1, 4)
    assert len({tuple(map(tuple, seq(1, d))) for d in range(10)}) == 10


def test_choose_peers_is_uniform_over_the_others():
    world_size, alpha, steps = 6, 0.4, 4000  # k = 2 of 5
    counts = np.zeros(world_size)
    for s in range(steps):
        counts[choose_peers(step_rng(0, 2, s), 2, world_size, alpha)] += 1
    assert counts[2] == 0
    expected = steps * 2 / 5
    others = np.delete(counts, 2)
    assert np.all(np.abs(others - expected) < 5 * math.sqrt(expected))


def test_choose_peers_never_uses_the_global_rng():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    choose_peers(step_rng(0, 0, 0), 0, 10, 0.5)
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.mark.parametrize("beta, base", [(0.25, 17), (0.05, 10), (0.5, 3), (0.1, 30), (0.3, 7),
                                        (1.0, 9), (0.0, 50), (0.25, 0)])
def test_share_count_is_floor_or_ceil_with_exact_expectation(beta, base):
    us = (np.arange(10_000) + 0.5) / 10_000  # a uniform grid over [0, 1)
    counts = np.array([share_count(beta, base, u) for u in us])
    x = beta * base
    assert set(counts.tolist()) <= {math.floor(x + 1e-9), math.ceil(x - 1e-9)}
    assert counts.mean() == pytest.approx(x, abs=1e-3)
    assert counts.max() <= base


def test_share_count_exact_products_are_not_rounded_up():
    assert share_count(0.1, 30, 0.0) == 3      # 0.1 x 30 = 3.0000000000000004
    assert share_count(0.25, 8, 0.0) == 2
    assert share_count(1.0, 9, 0.999) == 9


def test_share_count_rejects_bad_settings():
    with pytest.raises(ValueError):
        share_count(1.5, 4, 0.5)
    with pytest.raises(ValueError):
        share_count(0.5, -1, 0.5)
    with pytest.raises(ValueError):
        share_count(0.5, 4, 1.0)


def test_pick_gives_distinct_sorted_positions():
    rng = np.random.default_rng(0)
    for available, count in [(10, 3), (10, 10), (5, 0), (0, 0), (3, 7)]:
        p = pick(rng, available, count)
        assert len(p) == min(available, count) == len(set(p.tolist()))
        assert np.all(np.diff(p) > 0) and np.all((p >= 0) & (p < available))


# --------------------------------------------------------------------------------------------
# In-process injection on a virtual clock
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(400, *SHAPE), dtype=np.uint8)
    return ArrayDataset("tiny", np.arange(400) % 8, 8, images)


@pytest.fixture(scope="module")
def world(dataset):
    """4 devices, two labels each (noniid), at 16, 8, 32 and 16 samples/s."""
    partition = make_partition(dataset.labels, 4, "noniid", seed=0)
    rates = [16, 8, 32, 16]
    streams = [DeviceStream(dataset, partition.indices[d], RateSchedule([(0, rates[d])]), d,
                            seed=3) for d in range(4)]
    return SimpleNamespace(partition=partition, streams=streams, rates=rates)


def run_injection(dataset, world, device=0, seed=11, alpha=0.5, beta=0.25, steps=12,
                  policy="persistence", compute_s=0.25, inject_from="devices",
                  inject_weight="all", state=None, first_step=0, clock=None, local=None,
                  last_step_s=None):
    """Train-loop stand-in: local window batch, injection, a modelled compute time."""
    clock = clock or VirtualClock()
    if local is None:
        source = InProcessSource(world.streams[device], dataset, T0, DURATION_S)
        local = StreamBuffer(source, policy=policy, window_s=1.0)
    pool = make_pool_stream(dataset, 64, seed=seed) if inject_from == "pool" else None
    factory = inprocess_sources_factory(world.streams, dataset, T0, DURATION_S, pool)
    injector = Injector(device, 4, alpha, beta, 1.0, seed, factory, inject_from=inject_from,
                        inject_weight=inject_weight)
    if state is not None:
        injector.load_state_dict(state)
    rows = []
    last_step_s = clock.now() if last_step_s is None else last_step_s
    for step in range(first_step, first_step + steps):
        batch = local.next_window_batch(clock, 1, 64, last_step_s)
        last_step_s = clock.now()
        before = clock.now()
        local_ids = [(device, int(s)) for s in batch.seqs]
        local_labels = batch.labels.tolist()
        out, stats = injector.augment(batch, clock, step)
        rows.append(SimpleNamespace(step=step, now=before, after=clock.now(), stats=stats,
                                    local_ids=local_ids, local_labels=local_labels,
                                    injected_ids=list(injector.last_ids), batch=out))
        clock.advance(compute_s)
    return injector, rows


def peer_times(world, device, duration_s=DURATION_S):
    _, offsets, _ = world.streams[device].plan(duration_s)
    return np.round((T0 + offsets) * 1000) / 1000


@pytest.mark.parametrize("policy", ["persistence", "truncation"])
def test_injection_takes_beta_of_each_chosen_peers_window(dataset, world, policy):
    beta = 0.25
    injector, rows = run_injection(dataset, world, policy=policy, beta=beta)
    last_read = {}
    total = 0
    for row in rows:
        stats = row.stats
        assert len(stats["injected_from"]) == 2 and 0 not in stats["injected_from"]
        for peer, n in zip(stats["injected_from"], stats["injected_counts"]):
            times = peer_times(world, peer)
            lower = max(last_read.get(peer, -math.inf), row.now - 1.0)
            available = int(np.sum((times > lower) & (times <= row.now)))
            assert n in (math.floor(beta * available), math.ceil(beta * available))
            last_read[peer] = row.now
        assert stats["injected"] == sum(stats["injected_counts"]) == len(row.injected_ids)
        assert stats["injected_bytes"] == stats["injected"] * (24 + int(np.prod(SHAPE)))
        total += stats["injected"]
        # Injected samples come from the chosen peers, with their labels.
        injected_labels = row.batch.labels[len(row.local_ids):].tolist()
        assert row.batch.labels[:len(row.local_ids)].tolist() == row.local_labels
        for (dev, _), label in zip(row.injected_ids, injected_labels):
            assert dev in stats["injected_from"]
            assert label in world.partition.labels_per_device[dev]
        assert stats["weight_bsz"] == len(row.batch)
    assert total > 0
    assert injector.summary()["injected"] == total


def test_injected_labels_are_ones_the_device_lacks(dataset, world):
    _, rows = run_injection(dataset, world, beta=0.5)
    own = set(world.partition.labels_per_device[0])
    trained = {label for row in rows for label in row.batch.labels.tolist()}
    assert own < trained  # local labels plus labels device 0 does not have


def test_no_sample_twice_in_a_step_and_the_clock_never_moves(dataset, world):
    _, rows = run_injection(dataset, world, alpha=1.0, beta=1.0)
    for row in rows:
        ids = row.local_ids + row.injected_ids
        assert len(ids) == len(set(ids))
        assert row.after == row.now
        assert len(row.batch) == len(row.local_ids) + row.stats["injected"]
        assert row.batch.images.shape == (len(row.batch), *SHAPE)
    # beta = 1 takes each chosen peer's whole window: nothing is taken twice across steps.
    injected = [i for row in rows for i in row.injected_ids]
    assert len(injected) == len(set(injected))


def test_injection_is_deterministic_per_seed_and_differs_across_seeds(dataset, world):
    def trace(seed):
        _, rows = run_injection(dataset, world, seed=seed)
        return [(r.stats["injected_from"], r.injected_ids) for r in rows]

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)


def test_devices_draw_differently(dataset, world):
    _, rows0 = run_injection(dataset, world, device=0)
    _, rows1 = run_injection(dataset, world, device=1)
    assert [r.stats["injected_from"] for r in rows0] != [r.stats["injected_from"] for r in rows1]
    assert all(1 not in r.stats["injected_from"] for r in rows1)


def test_long_steps_expire_what_is_older_than_the_window(dataset, world):
    injector, rows = run_injection(dataset, world, alpha=1.0, beta=1.0, compute_s=2.0, steps=5)
    summary = injector.summary()
    assert summary["expired"] > 0 and summary["discarded"] == 0
    for row in rows[1:]:
        times = row.batch.event_times_s[len(row.local_ids):]
        assert np.all(times > row.now - 1.0) and np.all(times <= row.now)


def test_resume_from_state_dict_repeats_the_same_injection(dataset, world):
    _, full = run_injection(dataset, world, steps=10)
    # Run 4 steps, checkpoint, and continue in a fresh injector from the state.
    clock = VirtualClock()
    source = InProcessSource(world.streams[0], dataset, T0, DURATION_S)
    local = StreamBuffer(source, window_s=1.0)
    first, head = run_injection(dataset, world, steps=4, clock=clock, local=local)
    state = first.state_dict()
    first.close()
    second, tail = run_injection(dataset, world, steps=6, clock=clock, local=local,
                                 state=state, first_step=4, last_step_s=head[-1].now)
    resumed = head + tail
    assert [r.injected_ids for r in resumed] == [r.injected_ids for r in full]
    assert second.summary()["steps"] == second.state_dict()["totals"]["steps"] == 10


def test_pool_takes_beta_of_the_local_batch_from_an_iid_pool(dataset, world):
    beta = 0.5
    _, rows = run_injection(dataset, world, inject_from="pool", beta=beta)
    labels = set()
    for row in rows:
        local = len(row.local_ids)
        assert row.stats["injected_from"] == [POOL]
        assert row.stats["injected"] in (math.floor(beta * local), math.ceil(beta * local))
        assert all(dev == POOL_DEVICE for dev, _ in row.injected_ids)
        labels |= set(row.batch.labels[local:].tolist())
        assert len(set(row.injected_ids)) == len(row.injected_ids)
        assert row.after == row.now
    assert len(labels) >= 6  # an IID sample: most labels show up


def test_inject_weight_local_keeps_b_i_to_local_samples(dataset, world):
    _, rows = run_injection(dataset, world, inject_weight="local", steps=4)
    for row in rows:
        assert row.stats["weight_bsz"] == len(row.local_ids) < len(row.batch)


def test_make_injector_off_when_alpha_or_beta_is_zero(dataset, world):
    factory = inprocess_sources_factory(world.streams, dataset, T0, DURATION_S)
    cfg = SimpleNamespace(alpha=0.0, beta=0.25, inject_from="devices", inject_weight="all",
                          window_s=1.0, seed=0, world_size=4)
    assert make_injector(cfg, 0, factory) is None
    cfg.alpha, cfg.beta = 0.25, 0.0
    assert make_injector(cfg, 0, factory) is None
    cfg.beta = 0.25
    injector = make_injector(cfg, 0, factory)
    assert isinstance(injector, Injector) and injector.inject_weight == "all"
    assert make_injector(cfg, 0, factory, world_size=1) is None  # nobody to inject from


@pytest.mark.parametrize("kwargs", [dict(alpha=0.0), dict(alpha=1.5), dict(beta=-0.1),
                                    dict(inject_from="everyone"), dict(inject_weight="half"),
                                    dict(device=4), dict(window_s=0.0)])
def test_injector_rejects_bad_settings(kwargs):
    args = dict(device=0, world_size=4, alpha=0.5, beta=0.5, window_s=1.0, seed=0,
                sources_factory=lambda key, start: None)
    args.update(kwargs)
    with pytest.raises(ValueError):
        Injector(**args)


def test_wall_clock_injection_takes_what_has_arrived_without_waiting(dataset, world):
    clock = WallClock()
    start_s = clock.now() - 2.0  # two seconds of every stream have arrived
    factory = inprocess_sources_factory(world.streams, dataset, start_s, DURATION_S)
    injector = Injector(0, 4, 1.0, 1.0, 1.0, 0, factory)
    empty = Batch(np.zeros((0, *SHAPE), np.uint8), np.zeros(0, np.int64),
                  np.zeros(0, np.int64), np.zeros(0), 0.0, 0, 0, 0, False)
    t0 = clock.now()
    out, stats = injector.augment(empty, clock, 0)
    assert clock.now() - t0 < 0.5
    assert stats["injected"] == len(out) > 0
    assert np.all(out.event_times_s <= clock.now())
    assert np.all(out.event_times_s > t0 - 1.0 - 0.01)  # only the last window
    injector.close()
