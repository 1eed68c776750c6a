"""Randomized data injection through a real broker.

Four devices with one label group each (noniid Fashion-MNIST), produced in virtual pace;
all four train in lockstep on a virtual clock, each reading its own topic with its own
group and injecting from the others' topics with its own (reader, peer) groups.
"""
from __future__ import annotations

import math
import subprocess
import sys
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

from scadles.buffer import StreamBuffer
from scadles.clock import VirtualClock
from scadles.inject import Injector
from scadles.sources import POOL, KafkaSource, inject_group_id, kafka_sources_factory
from streamsim.partition import make_partition
from streamsim.pool import POOL_DEVICE
from streamsim.produce import build_streams, produce
from streamsim.record import EndOfStream

WORLD_SIZE = 4
RATES = "16,32,16,8"
DURATION_S = 12.0
STEPS = 8
ALPHA, BETA = 0.5, 0.5  # two peers per step, half of each one's window
COMPUTE_S = 0.25


def read_topic(bootstrap, topic, device, group, start="beginning"):
    """Every record of a topic up to its end-of-stream marker: (seqs, event times, eos)."""
    seqs, times = [], []
    with KafkaSource(bootstrap, topic, group, device, start=start) as source:
        while True:
            records = source.poll(1.0)
            assert records or seqs or start != "beginning", f"nothing on {topic}"
            for _, r in records:
                if isinstance(r, EndOfStream):
                    return seqs, np.array(times), r
                seqs.append(r.seq)
                times.append(r.event_time_s)


@pytest.fixture(scope="module")
def produced(broker, fashion_mnist):
    prefix = f"t-inject-{uuid.uuid4().hex[:8]}-"
    streams = build_streams(fashion_mnist, "noniid", WORLD_SIZE, RATES, seed=0)
    summary = produce(broker, streams, fashion_mnist, DURATION_S, "virtual", prefix)
    assert summary["failed"] == 0
    partition = make_partition(fashion_mnist.labels, WORLD_SIZE, "noniid", 0)
    times = {}
    for d in range(WORLD_SIZE):
        seqs, t, eos = read_topic(broker, f"{prefix}{d}", d, f"{prefix}check-{d}")
        assert seqs == list(range(eos.count))
        times[d] = t
    return SimpleNamespace(bootstrap=broker, prefix=prefix, times=times,
                           labels=[set(ls) for ls in partition.labels_per_device],
                           shape=fashion_mnist.sample_shape)


def train_in_lockstep(p, policy, seed, tag):
    """Every device: own window batch, injection, commit, modelled compute; the rows."""
    own, injectors, clocks, last = [], [], [], []
    for d in range(WORLD_SIZE):
        source = KafkaSource(p.bootstrap, f"{p.prefix}{d}", f"{tag}own-{d}", d, 10, p.shape)
        own.append(StreamBuffer(source, policy=policy, window_s=1.0))
        factory = kafka_sources_factory(p.bootstrap, p.prefix, d, 10, p.shape, group_prefix=tag)
        injectors.append(Injector(d, WORLD_SIZE, ALPHA, BETA, 1.0, seed, factory))
        clocks.append(VirtualClock())
        last.append(clocks[d].now())
    rows = {d: [] for d in range(WORLD_SIZE)}
    try:
        for step in range(STEPS):
            for d in range(WORLD_SIZE):
                clock = clocks[d]
                batch = own[d].next_window_batch(clock, 1, 64, last[d])
                last[d] = now = clock.now()
                local = [(d, int(s)) for s in batch.seqs]
                out, stats = injectors[d].augment(batch, clock, step)
                rows[d].append(SimpleNamespace(now=now, after=clock.now(), local=local,
                                               injected=list(injectors[d].last_ids),
                                               labels=out.labels.tolist(), stats=stats))
                own[d].commit_used()
                clock.advance(COMPUTE_S)
    finally:
        for d in range(WORLD_SIZE):
            own[d].close()
            injectors[d].close()
    return rows


@pytest.mark.parametrize("policy", ["persistence", "truncation"])
def test_injected_batches_mix_in_labels_the_device_lacks(produced, policy, unique_name):
    p = produced
    rows = train_in_lockstep(p, policy, seed=5, tag=unique_name)
    for d in range(WORLD_SIZE):
        last_read = {}
        for row in rows[d]:
            stats = row.stats
            n_local = len(row.local)
            local_labels, injected_labels = set(row.labels[:n_local]), set(row.labels[n_local:])
            # Local labels plus labels the device lacks, from the chosen peers.
            assert local_labels and local_labels <= p.labels[d]
            assert injected_labels and not injected_labels & p.labels[d]
            assert injected_labels <= set().union(*(p.labels[j] for j in stats["injected_from"]))
            # The expected share: beta of each chosen peer's window.
            assert len(stats["injected_from"]) == 2 and d not in stats["injected_from"]
            for j, n in zip(stats["injected_from"], stats["injected_counts"]):
                lower = max(last_read.get(j, -math.inf), row.now - 1.0)
                available = int(np.sum((p.times[j] > lower) & (p.times[j] <= row.now)))
                assert available > 0
                assert n in (math.floor(BETA * available), math.ceil(BETA * available))
                last_read[j] = row.now
            # No sample twice in a step; injection never moves the clock.
            ids = row.local + row.injected
            assert len(ids) == len(set(ids))
            assert row.after == row.now
            assert stats["injected"] == len(row.injected) == len(row.labels) - n_local

    # The devices' own consumption is unaffected: each own group committed exactly past what
    # its buffer used, and resuming there yields the rest of its sequence numbers, complete.
    for d in range(WORLD_SIZE):
        trained = [s for row in rows[d] for _, s in row.local]
        assert trained == sorted(set(trained))
        if policy == "persistence":
            assert trained == list(range(len(trained)))
        rest, _, eos = read_topic(p.bootstrap, f"{p.prefix}{d}", d, f"{unique_name}own-{d}",
                                  start="committed")
        assert rest == list(range(trained[-1] + 1, eos.count))
        # The injector's offsets live in groups of their own.
        peer = rows[d][0].stats["injected_from"][0]
        with KafkaSource(p.bootstrap, f"{p.prefix}{peer}",
                         inject_group_id(unique_name, d, peer), peer) as source:
            assert source.committed() is not None


def test_injection_is_deterministic_per_seed_in_virtual_time(produced, unique_name):
    def trace(seed, tag):
        rows = train_in_lockstep(produced, "persistence", seed, tag)
        return {d: [(r.stats["injected_from"], r.injected) for r in rows[d]] for d in rows}

    first = trace(9, unique_name + "a-")
    assert trace(9, unique_name + "b-") == first
    assert trace(10, unique_name + "c-") != first


def test_pool_injection_from_a_filled_pool_topic(produced, repo_env, unique_name):
    p = produced
    topic = f"{unique_name}pool"
    done = subprocess.run(
        [sys.executable, "-m", "streamsim.pool", "--bootstrap", p.bootstrap,
         "--dataset", "fashion-mnist", "--topic", topic, "--rate", "64", "--duration",
         str(DURATION_S), "--pace", "virtual", "--seed", "3"],
        env=repo_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"pool {topic}: {int(64 * DURATION_S)} records" in done.stdout
    seqs, _, eos = read_topic(p.bootstrap, topic, POOL_DEVICE, f"{unique_name}check")
    assert seqs == list(range(int(64 * DURATION_S))) and eos.count == len(seqs)

    clock = VirtualClock()
    source = KafkaSource(p.bootstrap, f"{p.prefix}0", f"{unique_name}own-0", 0, 10, p.shape)
    own = StreamBuffer(source, window_s=1.0)
    factory = kafka_sources_factory(p.bootstrap, p.prefix, 0, 10, p.shape,
                                    group_prefix=unique_name, pool_topic=topic)
    injector = Injector(0, WORLD_SIZE, 1.0, BETA, 1.0, 3, factory, inject_from="pool")
    pool_labels, last_s = set(), clock.now()
    try:
        for step in range(STEPS):
            batch = own.next_window_batch(clock, 1, 64, last_s)
            last_s = clock.now()
            n_local = len(batch)
            out, stats = injector.augment(batch, clock, step)
            assert stats["injected_from"] == [POOL]
            assert stats["injected"] in (math.floor(BETA * n_local), math.ceil(BETA * n_local))
            assert all(dev == POOL_DEVICE for dev, _ in injector.last_ids)
            assert len(set(injector.last_ids)) == len(injector.last_ids)
            assert clock.now() == last_s
            pool_labels |= set(out.labels[n_local:].tolist())
            clock.advance(COMPUTE_S)
    finally:
        own.close()
        injector.close()
    assert len(pool_labels) >= 8  # an IID sample of all ten labels
