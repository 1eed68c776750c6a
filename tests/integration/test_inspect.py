"""``python -m streamsim.inspect`` on topics with known contents, malformed records included."""
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaProducer

from streamsim import record
from streamsim.broker import create_topics
from streamsim.datasets import load_dataset
from streamsim.inspect import inspect_topic
from streamsim.produce import build_streams, produce

START_S = 1_700_000_000.0
H = record.HEADER


def _malformed(device: int) -> dict[str, bytes]:
    """One record per rejection kind of ``record.decode`` (num_classes=10, shape (1,4,4))."""
    pixels = bytes(16)
    return {
        "short": b"SD\x01",
        "magic": H.pack(b"XX", 1, 0, device, 0, 1, 1, 4, 4) + pixels,
        "version": H.pack(b"SD", 9, 0, device, 0, 1, 1, 4, 4) + pixels,
        "device": H.pack(b"SD", 1, 0, device + 1, 0, 1, 1, 4, 4) + pixels,
        "length": H.pack(b"SD", 1, 0, device, 0, 1, 1, 4, 4) + pixels[:-3],
        "kind": H.pack(b"SD", 1, 7, device, 0, 1, 1, 4, 4) + pixels,
        "shape": H.pack(b"SD", 1, 0, device, 0, 1, 2, 2, 4) + pixels,
        "label": H.pack(b"SD", 1, 0, device, 0, 10, 1, 4, 4) + pixels,
    }


def _write(bootstrap, topic, values_and_ms):
    producer = KafkaProducer(bootstrap_servers=bootstrap, allow_auto_create_topics=False,
                             linger_ms=5, acks=1)
    for value, ts_ms in values_and_ms:
        producer.send(topic, value, partition=0, timestamp_ms=ts_ms)
    producer.flush()
    producer.close()


def _good_records(device, n, rng):
    labels = rng.integers(0, 10, size=n)
    values = [record.encode(device, k, int(labels[k]),
                            rng.integers(0, 256, size=(1, 4, 4), dtype=np.uint8))
              for k in range(n)]
    stamps = [int((START_S + 0.1 * k) * 1000) for k in range(n)]
    return values, stamps, labels


def test_malformed_interleaved_are_counted_by_kind(broker, unique_name, repo_env):
    topic = f"{unique_name}0"
    create_topics(broker, [topic])
    rng = np.random.default_rng(0)
    values, stamps, labels = _good_records(0, 40, rng)
    bad = _malformed(0)
    stream = []
    bad_items = iter(bad.items())
    for k, (value, ts) in enumerate(zip(values, stamps)):
        stream.append((value, ts))
        if k % 4 == 1:  # a malformed record after every few good ones
            kind_value = next(bad_items, None)
            if kind_value:
                stream.append((kind_value[1], ts))
    eos_ts = int((START_S + 4.0) * 1000)
    stream.append((record.encode_eos(0, 40), eos_ts))
    _write(broker, topic, stream)

    result = subprocess.run([sys.executable, "-m", "streamsim.inspect", "--bootstrap", broker,
                             "--topic", topic, "--num-classes", "10", "--json"],
                            env=repo_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["records"] == len(stream) and s["samples"] == 40
    assert s["malformed"] == {kind: 1 for kind in bad} and s["malformed_total"] == len(bad)
    assert s["seq_errors"] == 0 and s["devices"] == {"0": 40}
    counts = Counter(labels.tolist())
    assert s["label_histogram"] == [counts.get(k, 0) for k in range(10)]
    assert s["bytes"] == sum(len(v) for v, _ in stream)
    assert s["first_event_time_s"] == pytest.approx(START_S)
    assert s["last_event_time_s"] == pytest.approx(START_S + 3.9)
    assert s["eos_seen"] and s["eos_count"] == 40 and s["eos_matches"] and s["complete"]
    assert s["rate_per_s"] == pytest.approx(10.0)  # 40 samples over 4 s of event time

    text = subprocess.run([sys.executable, "-m", "streamsim.inspect", "--bootstrap", broker,
                           "--topic", topic, "--num-classes", "10"],
                          env=repo_env, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0
    assert "records      49 (40 samples)" in text.stdout
    assert "end marker   yes (count 40, matches)" in text.stdout
    assert "label 1" in text.stdout and "short 1" in text.stdout


def test_without_end_marker_reads_to_highwater(broker, unique_name):
    topic = f"{unique_name}0"
    create_topics(broker, [topic])
    values, stamps, _ = _good_records(3, 25, np.random.default_rng(1))
    _write(broker, topic, zip(values, stamps))
    s = inspect_topic(broker, topic, num_classes=10, idle_s=0.5)
    assert s["complete"] and not s["eos_seen"] and s["eos_matches"] is None
    assert s["samples"] == 25 and s["malformed_total"] == 0
    assert s["rate_per_s"] == pytest.approx(10.0)  # (25 - 1) / 2.4 s


def test_empty_topic_and_missing_topic(broker, unique_name, repo_env):
    create_topics(broker, [f"{unique_name}empty"])
    s = inspect_topic(broker, f"{unique_name}empty", idle_s=0.5)
    assert s["records"] == 0 and s["rate_per_s"] is None and s["complete"]
    result = subprocess.run([sys.executable, "-m", "streamsim.inspect", "--bootstrap", broker,
                             "--topic", f"{unique_name}missing"],
                            env=repo_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_produced_stream_rate_is_the_target(broker, unique_name):
    dataset = load_dataset("synthetic", num_samples=300, shape=(3, 8, 8))
    streams = build_streams(dataset, "iid", 2, "25 40", seed=2)
    produce(broker, streams, dataset, 5.0, "virtual", unique_name)
    for device, rate in enumerate((25, 40)):
        s = inspect_topic(broker, f"{unique_name}{device}", num_classes=10)
        assert s["samples"] == rate * 5 and s["eos_matches"] and s["seq_errors"] == 0
        assert s["rate_per_s"] == pytest.approx(rate)
        assert s["first_event_time_s"] == record.VIRTUAL_EPOCH_S
        assert s["sample_shape"] == [3, 8, 8]
