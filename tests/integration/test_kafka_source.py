"""KafkaSource and StreamBuffer against the real embedded broker."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from scadles.buffer import StreamBuffer
from scadles.clock import VirtualClock, WallClock
from scadles.sources import InProcessSource, KafkaSource, SourceError
from streamsim.broker import BrokerUnreachable, create_topics, free_port
from streamsim.datasets import ArrayDataset
from streamsim.produce import produce, topic_name
from streamsim.record import VIRTUAL_EPOCH_S, EndOfStream, encode, encode_eos
from streamsim.schedule import RateSchedule
from streamsim.stream import DeviceStream

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(64, *SHAPE), dtype=np.uint8)
    return ArrayDataset("tiny", np.arange(64) % 10, 10, images)


def device_stream(dataset, rate, device=0, arrivals="even"):
    return DeviceStream(dataset, np.arange(len(dataset)), RateSchedule([(0, rate)]), device,
                        seed=11, arrivals=arrivals)


def kafka_source(broker, topic, group, device=0, **kwargs):
    return KafkaSource(broker, topic, group, device, num_classes=10, sample_shape=SHAPE,
                       **kwargs)


def read_to_end(source, timeout_s=20):
    """Every (offset, record) up to and including the end-of-stream marker."""
    out, deadline = [], time.monotonic() + timeout_s
    while not out or not isinstance(out[-1][1], EndOfStream):
        assert time.monotonic() < deadline, f"no end-of-stream marker after {len(out)} records"
        out += source.poll(0.2)
    return out


def test_round_trip_every_seq_in_order_and_the_marker(broker, unique_name, dataset):
    stream = device_stream(dataset, rate=500, device=2)
    summary = produce(broker, [stream], dataset, 4.0, "virtual", unique_name)
    assert summary["records"] == 2000
    with kafka_source(broker, topic_name(unique_name, 2), unique_name, device=2,
                      start="beginning") as source:
        records = read_to_end(source)
        assert source.highwater() == 2001 and source.position() == 2001
        assert source.malformed == {}
    samples = [r for _, r in records[:-1]]
    assert [o for o, _ in records] == list(range(2001))
    assert [s.seq for s in samples] == list(range(2000))
    eos = records[-1][1]
    assert eos.count == 2000 and eos.event_time_s == VIRTUAL_EPOCH_S + 4.0
    _, offsets, idx = stream.plan(4.0)
    assert [s.label for s in samples] == dataset.labels[idx].tolist()
    np.testing.assert_array_equal(np.stack([s.pixels for s in samples]),
                                  dataset.batch_pixels(idx))
    np.testing.assert_allclose([s.event_time_s for s in samples], VIRTUAL_EPOCH_S + offsets,
                               atol=5e-4, rtol=0)


def test_malformed_records_interleaved_with_good_ones(broker, unique_name):
    from kafka import KafkaProducer

    topic = unique_name + "0"
    create_topics(broker, [topic])
    px = np.full(SHAPE, 7, np.uint8)
    bad = [b"", b"XX" + encode(0, 0, 1, px)[2:], encode(0, 0, 12, px),
           encode(0, 0, 1, np.zeros((1, 8, 8), np.uint8)), encode(3, 0, 1, px),
           encode(0, 0, 1, px)[:-5]]
    producer = KafkaProducer(bootstrap_servers=broker, allow_auto_create_topics=False)
    ts_ms = int(VIRTUAL_EPOCH_S * 1000)
    for seq in range(60):
        producer.send(topic, encode(0, seq, seq % 10, px), partition=0, timestamp_ms=ts_ms + seq)
        if seq % 2:
            producer.send(topic, bad[(seq // 2) % len(bad)], partition=0,
                          timestamp_ms=ts_ms + seq)
    producer.send(topic, encode_eos(0, 60), partition=0, timestamp_ms=ts_ms + 60)
    producer.flush()
    producer.close()

    buf = StreamBuffer(kafka_source(broker, topic, unique_name), capacity=1000)
    batch = buf.next_fixed_batch(VirtualClock(), 1000)
    buf.close()
    assert batch.seqs.tolist() == list(range(60)) and batch.ended
    assert (batch.images == 7).all()
    assert buf.stats()["malformed"] == {"short": 5, "magic": 5, "label": 5, "shape": 5,
                                        "device": 5, "length": 5}


def test_resume_from_the_committed_offset(broker, unique_name, dataset):
    stream = device_stream(dataset, rate=100)
    produce(broker, [stream], dataset, 6.0, "virtual", unique_name)
    topic, trained = topic_name(unique_name, 0), []

    buf, clock = StreamBuffer(kafka_source(broker, topic, unique_name)), VirtualClock()
    for _ in range(3):  # 100/s, at most 50 per step: leftovers remain in the buffer
        trained += buf.next_window_batch(clock, 1, 50, clock.now()).seqs.tolist()
    committed = buf.commit_used()
    assert committed == 150 and len(buf) > 0
    buf.close()

    source = kafka_source(broker, topic, unique_name)  # start="committed"
    assert source.committed() == committed and source.position() == committed
    buf = StreamBuffer(source)
    while True:
        batch = buf.next_window_batch(clock, 1, 50, clock.now())
        trained += batch.seqs.tolist()
        if batch.ended:
            break
    assert buf.commit_used() == 600  # the end-of-stream marker's offset
    buf.close()
    assert trained == list(range(600))  # nothing lost, nothing trained twice


@pytest.mark.parametrize("policy", ["persistence", "truncation"])
def test_virtual_admission_from_kafka_matches_in_process(broker, unique_name, dataset, policy):
    stream = device_stream(dataset, rate=37, device=1, arrivals="poisson")
    produce(broker, [stream], dataset, 8.0, "virtual", unique_name)
    kafka = StreamBuffer(kafka_source(broker, topic_name(unique_name, 1), unique_name,
                                      device=1), policy=policy, capacity=40)
    local = StreamBuffer(InProcessSource(stream, dataset, VIRTUAL_EPOCH_S, 8.0),
                         policy=policy, capacity=40)
    runs = []
    for buf in (kafka, local):
        clock, steps = VirtualClock(), []
        while True:
            step_s = clock.now()
            b = buf.next_window_batch(clock, 4, 16, step_s)
            steps.append((b.seqs.tolist(), b.wait_s, clock.now(), b.dropped, b.truncated))
            clock.advance(0.1 + 0.05 * len(b))  # a modelled compute time
            if b.ended:
                break
        runs.append(steps)
        assert buf.stats()["malformed"] == {}
        buf.close()
    assert runs[0] == runs[1]
    assert len(runs[0]) >= 4


def test_wall_clock_batches_from_a_realtime_stream(broker, unique_name, dataset):
    stream = device_stream(dataset, rate=40)
    topic = topic_name(unique_name, 0)
    create_topics(broker, [topic])
    buf = StreamBuffer(kafka_source(broker, topic, unique_name), window_s=0.25)
    start_s = time.time() + 0.3
    producer = threading.Thread(target=produce, args=(broker, [stream], dataset, 1.5,
                                                      "realtime", unique_name, start_s))
    producer.start()
    clock, seqs, batches, last_step_s = WallClock(), [], 0, start_s
    try:
        while True:
            b = buf.next_window_batch(clock, 0, 100, last_step_s)
            last_step_s = clock.now()
            assert last_step_s >= start_s + 0.25 * (batches + 1) - 0.01
            assert (b.event_times_s <= last_step_s).all()
            seqs += b.seqs.tolist()
            batches += 1
            if b.ended:
                break
    finally:
        producer.join()
        buf.close()
    assert seqs == list(range(60))
    assert 3 <= batches <= 9  # about one per 0.25 s window over 1.5 s (slack for load)


def test_unreachable_broker_is_one_clear_line(unique_name):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as err:
        KafkaSource(address, unique_name + "0", unique_name, 0,
                    consumer_settings={"bootstrap_timeout_ms": 1500})
    assert time.monotonic() - started < 15
    assert address in str(err.value) and "\n" not in str(err.value)


def test_a_broker_that_dies_is_named_not_taken_for_a_quiet_topic(unique_name, dataset):
    """A private broker is killed while a source reads a quiet topic: within a few seconds
    the source says the broker stopped answering (one line, its address), where a quiet
    topic on a live broker only gives empty polls; a commit after that says so too."""
    from streamsim.broker import EmbeddedBroker

    with EmbeddedBroker() as private:
        topic = unique_name + "0"
        create_topics(private.bootstrap, [topic])
        source = kafka_source(private.bootstrap, topic, unique_name, broker_check_s=1.0)
        quiet_until = time.monotonic() + 2.5
        while time.monotonic() < quiet_until:  # alive and quiet: empty polls, no error
            assert source.poll(0.1) == []
        private.process.kill()
        killed = time.monotonic()
        with pytest.raises(BrokerUnreachable) as err:
            while time.monotonic() - killed < 20:
                source.poll(0.1)
        assert time.monotonic() - killed < 5
        message = str(err.value)
        assert private.bootstrap in message and "stopped answering" in message
        assert topic in message and "\n" not in message
        with pytest.raises(BrokerUnreachable, match="committing offset 0"):
            source.commit(0)
        source.close()


def test_missing_topic_is_a_clear_error(broker, unique_name):
    with pytest.raises(SourceError, match="does not exist"):
        KafkaSource(broker, unique_name + "missing", unique_name, 0)


def test_devices_of_one_process_share_one_consumer(broker, unique_name, dataset):
    """Three device topics read through one SharedConsumer (--devices-per-rank): each
    device gets exactly its own stream, every seq once and in order, then its marker, and
    its commits are its own partition's; the consumer closes with the last device."""
    from scadles.sources import SharedConsumer

    streams = [device_stream(dataset, rate=200 * (d + 1), device=d) for d in range(3)]
    produce(broker, streams, dataset, 2.0, "virtual", unique_name)
    shared = SharedConsumer(broker, f"{unique_name}shared")
    sources = [kafka_source(broker, topic_name(unique_name, d), f"{unique_name}{d}", device=d,
                            start="beginning", shared=shared) for d in range(3)]
    assert len(shared.consumer.assignment()) == 3  # one consumer, three partitions
    got = [[] for _ in sources]
    deadline = time.monotonic() + 30
    while not all(g and isinstance(g[-1][1], EndOfStream) for g in got):
        assert time.monotonic() < deadline
        for d in (2, 0, 1):  # any order: a poll for one device queues the others' records
            if not (got[d] and isinstance(got[d][-1][1], EndOfStream)):
                got[d] += sources[d].poll(0.1)
    for d, records in enumerate(got):
        samples = [r for _, r in records[:-1]]
        assert [s.seq for s in samples] == list(range(400 * (d + 1))), d
        assert {s.device for s in samples} == {d}
    sources[1].commit(123)
    assert sources[1].committed() == 123 and sources[0].committed() is None
    for source in sources:
        source.close()
    assert shared.closed
