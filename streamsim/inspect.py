"""``python -m streamsim.inspect``: what a device topic holds, read from the beginning.

Reads every partition of the topic from offset 0 until the end-of-stream marker is the last
record read, or until the partition's highwater mark is reached and polls bring nothing
more for ``--idle-s``. Never uses the broker's end offsets (wrong on the embedded broker).
Prints: record count, achieved rate, label histogram, malformed records by kind, sequence
errors, first and last event time, bytes held, and whether the end-of-stream marker was seen.

Achieved rate = samples per second of event time: ``count / (EOS time - first event time)``
when the marker is there (a stream of rate r over D seconds gives exactly r), else
``(count - 1) / (last - first event time)``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from streamsim import record


def _consumer(bootstrap: str, timeout_s: float, client_config: dict | None = None):
    from kafka import KafkaConsumer

    from streamsim.broker import _quiet_kafka_logs

    settings = {**(client_config or {}), "bootstrap_servers": bootstrap, "group_id": None,
                "enable_auto_commit": False, "auto_offset_reset": "earliest",
                "allow_auto_create_topics": False, "check_crcs": True,
                "max_partition_fetch_bytes": 8 << 20, "fetch_max_bytes": 64 << 20,
                "max_poll_records": 5000, "fetch_max_wait_ms": 100,
                "request_timeout_ms": int(max(timeout_s, 5) * 1000) + 1000,
                "bootstrap_timeout_ms": int(timeout_s * 1000)}
    with _quiet_kafka_logs():
        return KafkaConsumer(**settings)


def topic_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0,
                     client_config: dict | None = None) -> list[int]:
    """Partition ids of ``topic``; ValueError when it does not exist."""
    from streamsim.broker import admin_client

    admin = admin_client(bootstrap, timeout_s, client_config)
    try:
        described = admin.describe_topics([topic])
    finally:
        admin.close()
    for t in described:
        if t.get("name") == topic and t.get("error_code", 0) == 0 and t.get("partitions"):
            return sorted(p["partition_index"] for p in t["partitions"])
    raise ValueError(f"topic {topic!r} does not exist on {bootstrap}: check --topic (and the "
                     f"producer's --topic-prefix)")


def inspect_topic(bootstrap: str, topic: str, num_classes: int | None = None,
                  expect_device: int | None = None, idle_s: float = 1.0,
                  timeout_s: float = 600.0, probe_s: float = 10.0,
                  client_config: dict | None = None) -> dict:
    """Read ``topic`` from the beginning and summarize it (see the module docstring).

    ``num_classes`` enables the label-range check; the expected shape and device are those
    of the first valid sample unless ``expect_device`` is given. ``timeout_s`` bounds the
    whole read (``complete`` is False when it ran out); BrokerUnreachable when no broker
    answers within ``probe_s``. ``client_config``: connection settings (SASL/SSL, ...).
    """
    from kafka import TopicPartition

    from streamsim.broker import check_reachable

    check_reachable(bootstrap, timeout_s=probe_s, client_config=client_config)
    parts = topic_partitions(bootstrap, topic, client_config=client_config)
    tps = [TopicPartition(topic, p) for p in parts]
    consumer = _consumer(bootstrap, 10.0, client_config)
    labels: Counter = Counter()
    malformed: Counter = Counter()
    devices: Counter = Counter()
    shape = None
    count = records = value_bytes = eos_markers = seq_errors = 0
    eos_count = eos_time = first_time = last_time = None
    next_seq: dict[int, int] = {}
    last_was_eos = {tp: False for tp in tps}
    try:
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        deadline = time.monotonic() + timeout_s
        idle_since = time.monotonic()
        complete = False
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=200)
            got = False
            for tp, msgs in batches.items():
                for m in msgs:
                    got = True
                    records += 1
                    value_bytes += len(m.value or b"")
                    try:
                        item = record.decode(m.value, m.timestamp, num_classes, shape,
                                             expect_device)
                    except record.RecordError as e:
                        malformed[e.kind] += 1
                        last_was_eos[tp] = False
                        continue
                    if isinstance(item, record.EndOfStream):
                        eos_markers += 1
                        eos_count, eos_time = item.count, item.event_time_s
                        last_was_eos[tp] = True
                        continue
                    last_was_eos[tp] = False
                    if shape is None:
                        shape = item.pixels.shape
                    if expect_device is None:
                        expect_device = item.device
                    count += 1
                    labels[item.label] += 1
                    devices[item.device] += 1
                    if item.seq != next_seq.get(item.device, 0):
                        seq_errors += 1
                    next_seq[item.device] = item.seq + 1
                    t = item.event_time_s
                    first_time = t if first_time is None else min(first_time, t)
                    last_time = t if last_time is None else max(last_time, t)
            at_end = all(_at_highwater(consumer, tp) for tp in tps)
            if got:
                idle_since = time.monotonic()
            if at_end and all(last_was_eos.values()):
                complete = True
                break
            if at_end and time.monotonic() - idle_since >= idle_s:
                complete = True
                break
            if not got and not at_end and all(consumer.highwater(tp) is None for tp in tps) \
                    and time.monotonic() - idle_since >= max(idle_s, 2.0):
                complete = True  # nothing ever fetched: an empty topic
                break
    finally:
        consumer.close()
    return _summary(topic, parts, count, records, value_bytes, labels, malformed, devices,
                    seq_errors, eos_markers, eos_count, eos_time, first_time, last_time,
                    num_classes, shape, complete)


def _at_highwater(consumer, tp) -> bool:
    high = consumer.highwater(tp)
    return high is not None and consumer.position(tp) >= high


def _summary(topic, parts, count, records, value_bytes, labels, malformed, devices,
             seq_errors, eos_markers, eos_count, eos_time, first_time, last_time,
             num_classes, shape, complete) -> dict:
    if eos_time is not None and first_time is not None and eos_time > first_time:
        rate = count / (eos_time - first_time)
    elif count >= 2 and last_time > first_time:
        rate = (count - 1) / (last_time - first_time)
    else:
        rate = None
    classes = num_classes or (max(labels) + 1 if labels else 0)
    return {
        "topic": topic, "partitions": len(parts), "records": records, "samples": count,
        "rate_per_s": None if rate is None else round(rate, 6),
        "label_histogram": [labels.get(k, 0) for k in range(classes)],
        "malformed": dict(sorted(malformed.items())), "malformed_total": sum(malformed.values()),
        "seq_errors": seq_errors, "devices": {str(d): n for d, n in sorted(devices.items())},
        "sample_shape": list(shape) if shape is not None else None,
        "first_event_time_s": first_time, "last_event_time_s": last_time,
        "bytes": value_bytes, "eos_seen": eos_markers > 0, "eos_markers": eos_markers,
        "eos_count": eos_count, "eos_time_s": eos_time,
        "eos_matches": eos_count == count if eos_count is not None else None,
        "complete": complete,
    }


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1.5 * record.VIRTUAL_EPOCH_S:  # virtual stream time: show seconds from its origin
        return f"virtual +{t - record.VIRTUAL_EPOCH_S:.3f} s"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def format_summary(s: dict) -> str:
    """The human-readable report."""
    rate = "-" if s["rate_per_s"] is None else f"{s['rate_per_s']:.3f}/s"
    hist = " ".join(f"{k}:{n}" for k, n in enumerate(s["label_histogram"]))
    bad = ", ".join(f"{k} {n}" for k, n in s["malformed"].items()) or "none"
    eos = (f"yes (count {s['eos_count']}, {'matches' if s['eos_matches'] else 'MISMATCH'})"
           if s["eos_seen"] else "no")
    return "\n".join([
        f"topic        {s['topic']} ({s['partitions']} partition(s))",
        f"records      {s['records']:,} ({s['samples']:,} samples)",
        f"rate         {rate}",
        f"labels       {hist or '-'}",
        f"malformed    {bad}",
        f"seq errors   {s['seq_errors']}",
        f"first event  {_fmt_time(s['first_event_time_s'])}",
        f"last event   {_fmt_time(s['last_event_time_s'])}",
        f"bytes        {s['bytes']:,}",
        f"end marker   {eos}",
    ] + ([] if s["complete"] else ["(incomplete: timed out before the end of the topic)"]))


def main(argv: list[str] | None = None) -> int:
    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter

    logsetup.configure("inspect")
    parser = argparse.ArgumentParser(prog="python -m streamsim.inspect",
                                     description="Summarize what a device topic holds.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP"),
                        help="HOST:PORT of the broker (default $KAFKA_BOOTSTRAP)")
    parser.add_argument("--kafka-config", default=os.environ.get("KAFKA_CONFIG") or None,
                        metavar="FILE", help="Kafka client settings, key=value per line "
                        "(SASL/SSL: streamsim.kafkaconfig; default $KAFKA_CONFIG)")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="check labels are in [0, N)")
    parser.add_argument("--device", type=int, default=None,
                        help="expected device id (default: the first sample's)")
    parser.add_argument("--idle-s", type=float, default=1.0,
                        help="stop after this long at the highwater mark with nothing new")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="give up (an incomplete summary) after this long")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from streamsim.broker import CLI_PROBE_S, BrokerUnreachable

    if not args.bootstrap:
        print("inspect: no broker address: pass --bootstrap HOST:PORT or set KAFKA_BOOTSTRAP",
              file=sys.stderr)
        return 2
    from streamsim.kafkaconfig import load_client_config

    try:
        client_config = load_client_config(args.kafka_config)
    except ValueError as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    try:
        summary = inspect_topic(args.bootstrap, args.topic, args.num_classes, args.device,
                                args.idle_s, args.timeout_s, probe_s=CLI_PROBE_S,
                                client_config=client_config)
    except BrokerUnreachable as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2 if "bootstrap" in str(e) else 1
    print(json.dumps(summary) if args.json else format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
