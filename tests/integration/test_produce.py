"""Producers against the real embedded broker, read back by a plain KafkaConsumer."""
import json
import math
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from streamsim import record
from streamsim.produce import (PACE_PRODUCER_CONFIG, PRODUCER_CONFIG, build_streams, event_ms,
                               produce)
from streamsim.broker import create_topics


def _is_eos(value: bytes) -> bool:
    try:
        return isinstance(record.decode(value, 1), record.EndOfStream)
    except record.RecordError:
        return False


def read_topics(bootstrap: str, topics: list[str], timeout_s: float = 30.0,
                stop: threading.Event | None = None) -> dict[str, list[tuple]]:
    """Every record of ``topics`` from offset 0 up to each one's end-of-stream marker, as
    (offset, timestamp_ms, value, receive_wall_s)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             allow_auto_create_topics=False, fetch_max_wait_ms=20)
    tps = [TopicPartition(t, 0) for t in topics]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    out = {t: [] for t in topics}
    ended: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(ended) < len(topics) and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                break
            for tp, msgs in consumer.poll(timeout_ms=100).items():
                now = time.time()
                for m in msgs:
                    out[tp.topic].append((m.offset, m.timestamp, m.value, now))
                    if _is_eos(m.value):
                        ended.add(tp.topic)
    finally:
        consumer.close()
    assert ended == set(topics), f"no end-of-stream marker on {set(topics) - ended}"
    return out


def _produce_cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "streamsim.produce", *args], env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def test_virtual_round_trip_every_sample_in_order(broker, unique_name, fashion_mnist):
    duration_s, rates = 4.0, [50, 20, 35]
    streams = build_streams(fashion_mnist, "noniid", 3, " ".join(map(str, rates)), seed=3)
    summary = produce(broker, streams, fashion_mnist, duration_s, "virtual", unique_name)
    topics = [f"{unique_name}{d}" for d in range(3)]
    got = read_topics(broker, topics)
    labels_of_device = [set(np.unique(fashion_mnist.labels[s.indices]).tolist())
                        for s in streams]
    for d, stream in enumerate(streams):
        seqs, offsets_s, indices = stream.plan(duration_s)
        records = got[topics[d]]
        assert len(seqs) == math.ceil(rates[d] * duration_s) == len(records) - 1
        assert [r[0] for r in records] == list(range(len(records)))
        for k, (_, ts, value, _) in enumerate(records[:-1]):
            sample = record.decode(value, ts, num_classes=10, expect_shape=(1, 28, 28),
                                   expect_device=d)
            assert sample.seq == seqs[k] == k
            assert sample.label == fashion_mnist.labels[indices[k]]
            assert sample.label in labels_of_device[d]
            np.testing.assert_array_equal(sample.pixels, fashion_mnist.pixels(indices[k]))
            assert ts == event_ms(record.VIRTUAL_EPOCH_S * 1000, offsets_s[k])
        eos = record.decode(records[-1][2], records[-1][1])
        assert isinstance(eos, record.EndOfStream) and eos.count == len(seqs)
        assert eos.event_time_s == record.VIRTUAL_EPOCH_S + duration_s
        row = summary["devices"][d]
        assert row["count"] == row["eos_count"] == len(seqs) and row["failed"] == 0
        assert row["rate_per_s"] == pytest.approx(rates[d])
    assert summary["records"] == sum(math.ceil(r * duration_s) for r in rates)


def _contents(bootstrap, prefix, devices):
    got = read_topics(bootstrap, [f"{prefix}{d}" for d in range(devices)])
    return [[(ts, value) for _, ts, value, _ in got[f"{prefix}{d}"]] for d in range(devices)]


def test_virtual_streams_identical_for_same_seed(broker, unique_name, repo_env, fashion_mnist):
    config = ["--dataset", "fashion-mnist", "--partition", "dirichlet:0.5", "--world-size", "3",
              "--rates", "30,60,90", "--duration", "3", "--pace", "virtual",
              "--arrivals", "poisson"]
    cli = _produce_cli(["--bootstrap", broker, *config, "--seed", "5", "--workers", "2",
                        "--topic-prefix", f"{unique_name}a-", "--json"], repo_env)
    assert cli.returncode == 0, cli.stderr
    summary = json.loads(cli.stdout)
    assert summary["workers"] == 2 and summary["failed"] == 0
    for seed, prefix in ((5, f"{unique_name}b-"), (6, f"{unique_name}c-")):
        streams = build_streams(fashion_mnist, "dirichlet:0.5", 3, "30,60,90", seed,
                                arrivals="poisson")
        produce(broker, streams, fashion_mnist, 3.0, "virtual", prefix, workers=1)
    a, b, c = (_contents(broker, f"{unique_name}{x}-", 3) for x in "abc")
    assert a == b  # same seed: byte-identical records and timestamps, 1 or 2 workers
    assert a != c


def test_realtime_pacing_is_accurate(broker, unique_name, repo_env):
    duration_s, rates = 4.0, [40, 100, 160]
    topics = [f"{unique_name}{d}" for d in range(3)]
    create_topics(broker, topics)
    received = {}
    reader = threading.Thread(target=lambda: received.update(read_topics(broker, topics, 60)))
    reader.start()
    cli = _produce_cli(["--bootstrap", broker, "--dataset", "fashion-mnist", "--world-size",
                        "3", "--rates", " ".join(map(str, rates)), "--duration", str(duration_s),
                        "--pace", "realtime", "--seed", "1", "--topic-prefix", unique_name,
                        "--json"], repo_env)
    reader.join(70)
    assert cli.returncode == 0, cli.stderr
    summary = json.loads(cli.stdout)
    start_s = summary["start_time_s"]
    linger_s = {**PRODUCER_CONFIG, **PACE_PRODUCER_CONFIG["realtime"]}["linger_ms"] / 1000.0
    assert duration_s <= summary["elapsed_s"] < duration_s + 0.5
    assert summary["send_lag_ms"]["p99"] <= 100
    for d, rate in enumerate(rates):
        records = received[topics[d]][:-1]
        assert len(records) == rate * duration_s
        stamps = np.array([ts for _, ts, _, _ in records]) / 1000.0
        recv_s = np.array([t for *_, t in records])
        expected = np.array([event_ms(start_s * 1000, k / rate) for k in range(len(records))])
        np.testing.assert_array_equal(stamps * 1000, expected)
        latency_s = recv_s - stamps
        assert latency_s.min() >= -0.002  # never sent before its event time
        # a record waits up to the realtime linger in the producer's batch, then the fetch
        assert np.median(latency_s) < linger_s + 0.1
        assert np.percentile(latency_s, 99) < linger_s + 0.5
        # records arrive in batches (the linger): the rate is the slope of the count over time
        achieved = np.polyfit(recv_s - recv_s[0], np.arange(len(records)), 1)[0]
        assert achieved == pytest.approx(rate, rel=0.05)


def test_sigterm_stops_cleanly_with_end_markers(broker, unique_name, repo_env):
    topics = [f"{unique_name}{d}" for d in range(2)]
    create_topics(broker, topics)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamsim.produce", "--bootstrap", broker, "--dataset",
         "fashion-mnist", "--world-size", "2", "--rates", "50 80", "--duration", "60",
         "--pace", "realtime", "--topic-prefix", unique_name, "--json"],
        env=repo_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        consumer = KafkaConsumer(bootstrap_servers=broker, group_id=None,
                                 allow_auto_create_topics=False, auto_offset_reset="earliest")
        consumer.assign([TopicPartition(topics[0], 0)])
        consumer.seek(TopicPartition(topics[0], 0), 0)
        deadline = time.monotonic() + 30
        while not consumer.poll(timeout_ms=200) and time.monotonic() < deadline:
            pass  # wait for the first records: the producer is running
        consumer.close()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=15)
        assert time.monotonic() - stopped < 5
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["interrupted"] and 0 < summary["stream_s"] < 30
    got = read_topics(broker, topics)
    for d, topic in enumerate(topics):
        samples = [record.decode(v, ts) for _, ts, v, _ in got[topic][:-1]]
        eos = record.decode(got[topic][-1][2], got[topic][-1][1])
        assert [s.seq for s in samples] == list(range(len(samples)))
        assert eos.count == len(samples) == summary["devices"][d]["count"] > 0
        assert eos.event_time_s >= samples[-1].event_time_s


@pytest.mark.parametrize("bad, message", [
    (["--rates", "10 20 30"], "rate"),
    (["--rates", "10 20", "--devices", "0,5"], "--devices"),
    (["--rates", "10 20", "--duration", "0"], "--duration"),
    (["--rates", "10 20", "--dataset", "no-such-set"], "no-such-set"),
])
def test_bad_config_exits_2_with_one_line(bad, message, repo_env):
    args = ["--bootstrap", "127.0.0.1:9", "--dataset", "synthetic", "--world-size", "2",
            "--duration", "5", "--pace", "virtual"]
    result = _produce_cli(args + bad, repo_env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


class _Future:
    """A completed send, as much of kafka-python's FutureRecordMetadata as produce uses."""

    def __init__(self, ok: bool):
        self.is_done, self.ok = True, ok
        self.exception = None if ok else RuntimeError("broker said no")

    def failed(self):
        return not self.ok

    def get(self, timeout=None):
        if not self.ok:
            raise RuntimeError("broker said no")

    def add_errback(self, fn, *args):
        if not self.ok:
            fn(*args, RuntimeError("broker said no"))
        return self


class _FakeProducer:
    """Records every send; every ``fail_every``-th one fails."""

    config = {"batch_size": 1 << 14}

    def __init__(self, fail_every: int = 0):
        self.fail_every, self.sent = fail_every, []

    def send(self, topic, value, partition=None, timestamp_ms=None):
        self.sent.append((topic, bytes(value), timestamp_ms))
        return _Future(not self.fail_every or len(self.sent) % self.fail_every)

    def flush(self, timeout=None):
        pass


def test_every_item_sent_once_in_order_and_counted_when_acknowledged():
    """The chunked send loop against the plan, without a broker: each device's records in seq
    order with their event times, the devices interleaved by event time, every acknowledged
    send counted (and in the end-of-stream count), small back-pressure limits included."""
    from streamsim.datasets import load_dataset
    from streamsim.produce import _run_streams

    data = load_dataset("synthetic", num_samples=300, shape=(1, 4, 4))
    streams = build_streams(data, "iid", 3, "500 20 3000", seed=2, arrivals="poisson")
    producer = _FakeProducer()
    start_ms = record.VIRTUAL_EPOCH_S * 1000
    result = _run_streams(producer, streams, data, 2.0, "virtual",
                          {s.device: f"x-{s.device}" for s in streams},
                          record.VIRTUAL_EPOCH_S, True, lambda: False, None)
    samples = [(topic, record.decode(value, ts), ts) for topic, value, ts in producer.sent]
    assert [type(s) for _, s, _ in samples[-3:]] == [record.EndOfStream] * 3
    times = [ts for _, s, ts in samples[:-3]]
    assert times == sorted(times)
    for d, (stream, tally) in enumerate(zip(streams, result.devices)):
        seqs, offsets_s, indices = stream.plan(2.0)
        mine = [(s, ts) for topic, s, ts in samples[:-3] if topic == f"x-{d}"]
        assert [s.seq for s, _ in mine] == seqs.tolist()
        assert [ts for _, ts in mine] == event_ms(start_ms, offsets_s).tolist()
        assert [s.label for s, _ in mine] == data.labels[indices].tolist()
        assert tally.count == len(seqs) and tally.last_offset_s == offsets_s[-1]
        assert tally.eos_count == tally.count and tally.failed == 0
    assert not result.interrupted and result.stream_s == 2.0


def test_a_failed_send_stops_the_producer_with_one_line():
    """The 97th send fails: the producer stops at once (a stream with a hole is no stream),
    naming the topic; no end-of-stream marker is written."""
    from streamsim.datasets import load_dataset
    from streamsim.produce import SendFailed, _run_streams

    data = load_dataset("synthetic", num_samples=300, shape=(1, 4, 4))
    streams = build_streams(data, "iid", 3, "500 20 3000", seed=2)
    producer = _FakeProducer(fail_every=97)
    with pytest.raises(SendFailed, match=r"topic x-\d: RuntimeError: broker said no"):
        _run_streams(producer, streams, data, 2.0, "virtual",
                     {s.device: f"x-{s.device}" for s in streams},
                     record.VIRTUAL_EPOCH_S, True, lambda: False, None)
    assert not any(isinstance(record.decode(v, ts), record.EndOfStream)
                   for _, v, ts in producer.sent)


def test_a_stop_ends_the_virtual_stream_between_chunks():
    from streamsim.datasets import load_dataset
    from streamsim.produce import _run_streams

    data = load_dataset("synthetic", num_samples=300, shape=(1, 4, 4))
    streams = build_streams(data, "iid", 2, "4000 4000", seed=0)
    producer = _FakeProducer()
    result = _run_streams(producer, streams, data, 10.0, "virtual",
                          {s.device: f"x-{s.device}" for s in streams},
                          record.VIRTUAL_EPOCH_S, True, lambda: len(producer.sent) > 1000, None)
    sent = len(producer.sent) - 2
    assert result.interrupted and 1000 < sent < 80_000
    assert sum(t.count for t in result.devices) == sent
    assert 0 < result.stream_s < 10.0
    eos = [record.decode(v, ts) for _, v, ts in producer.sent[-2:]]
    assert [e.count for e in eos] == [t.count for t in result.devices]


@pytest.mark.parametrize("topics", [["a"], ["a", "a"]])
def test_explicit_topics_must_be_one_distinct_topic_per_stream(topics):
    from streamsim.datasets import load_dataset
    from streamsim.produce import produce

    data = load_dataset("synthetic", num_samples=100, shape=(1, 4, 4))
    streams = build_streams(data, "iid", 2, "10 10", seed=0)
    with pytest.raises(ValueError, match="one distinct topic per stream"):
        produce("127.0.0.1:1", streams, data, 1.0, "virtual", topics=topics)
