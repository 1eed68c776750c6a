"""Stream simulator throughput and pacing, end to end through the embedded broker.

    python benchmarks/bench_streams.py [--quick] [--parts 1,2,3] [--bootstrap HOST:PORT]

1. One topic, CIFAR-sized records (3x32x32 uint8 + 24-byte header): samples/s end to end,
   a virtual-paced producer and a consumer process reading the topic at the same time.
2. The paper's 25-device rate list, realtime (60 s; --quick 15 s), consumers on every topic:
   per-device achieved rate against target (the slope of records received against consumer
   wall time), end-to-end latency (consumer wall time - record event time) p50/p99.
3. S2 rates on 16 devices (~4,200 samples/s) and 4x that (~16,900/s), realtime, 30 s each
   (--quick 10 s): aggregate achieved rate, worst per-device error, latency.

``--idempotent`` runs the producers idempotent (``enable_idempotence``, ``acks=all``): the
broker then drops a batch a retry wrote twice. Compare its CPU per record and throughput
with a plain run to see what that costs.

Goals (printed PASS/FAIL): every device within 1% of its target; one topic >= 20,000
samples/s; 4x S2 sustained (all records delivered, achieved within 1%, p99 latency < 1 s).
Consumers: ``--consumers`` processes, each one manually assigned KafkaConsumer
(``CONSUMER_CONFIG``) for its share of the topics, decoding and validating every record as the
trainer does. Every part reports CPU per record of producer, consumers and broker: the wall-clock
rates depend on whatever else the machine runs, the CPU cost much less.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamsim import broker as brokerlib  # noqa: E402
from streamsim import record  # noqa: E402
from streamsim.datasets import load_dataset  # noqa: E402
from streamsim.produce import build_streams, produce  # noqa: E402

PAPER_25_RATES = "92 22 62 42 48 36 18 38 84 60 108 40 58 16 44 78 92 28 30 52 84 20 16 38 66"
CIFAR_SHAPE = (3, 32, 32)
RATE_GOAL_PCT = 1.0
SINGLE_TOPIC_GOAL_PER_S = 20_000
SUSTAINED_P99_S = 1.0
IDEMPOTENT = {"enable_idempotence": True, "acks": "all"}
PRODUCER_CONFIG: dict | None = None  # --idempotent: IDEMPOTENT
CONSUMER_CONFIG = dict(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                       allow_auto_create_topics=False, fetch_max_wait_ms=50,
                       max_partition_fetch_bytes=4 << 20, max_poll_records=2000)


# ------------------------------------------------------------------------------ consumers

def _consume(bootstrap: str, topics: list[str], ready, results, timeout_s: float) -> None:
    """Read ``topics`` from offset 0 to their end-of-stream markers; report per topic."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **CONSUMER_CONFIG)
    tps = [TopicPartition(t, 0) for t in topics]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    stats = {t: {"count": 0, "first_recv": None, "last_recv": None, "eos": None,
                 "seq_errors": 0, "next_seq": 0, "lat": [], "recv": []} for t in topics}
    ended = 0
    ready.set()
    deadline = time.monotonic() + timeout_s
    while ended < len(topics) and time.monotonic() < deadline:
        for tp, msgs in consumer.poll(timeout_ms=100).items():
            now = time.time()
            st = stats[tp.topic]
            lat, recv = st["lat"], st["recv"]
            for m in msgs:
                item = record.decode(m.value, m.timestamp, expect_shape=None)
                if isinstance(item, record.EndOfStream):
                    st["eos"] = item.count
                    ended += 1
                    continue
                if item.seq != st["next_seq"]:
                    st["seq_errors"] += 1
                st["next_seq"] = item.seq + 1
                st["count"] += 1
                if st["first_recv"] is None:
                    st["first_recv"] = now
                st["last_recv"] = now
                lat.append(now - item.event_time_s)
                recv.append(now)
    consumer.close()
    stats["_cpu_s"] = time.process_time()
    for st in (v for k, v in stats.items() if k != "_cpu_s"):
        st["lat"] = np.asarray(st["lat"], dtype=np.float32)
        st["recv"] = np.asarray(st["recv"], dtype=np.float64)
        del st["next_seq"]
    results.put(stats)


class Consumers:
    """``n`` consumer processes sharing ``topics`` round robin."""

    def __init__(self, bootstrap: str, topics: list[str], n: int, timeout_s: float):
        ctx = mp.get_context("fork")
        self.results = ctx.Queue()
        groups = [topics[i::n] for i in range(min(n, len(topics)))]
        self.ready = [ctx.Event() for _ in groups]
        self.procs = [ctx.Process(target=_consume, daemon=True,
                                  args=(bootstrap, g, r, self.results, timeout_s))
                      for g, r in zip(groups, self.ready)]
        for p in self.procs:
            p.start()
        for r in self.ready:
            r.wait(60)

    def collect(self, timeout_s: float) -> dict:
        stats = {}
        for _ in self.procs:
            part = self.results.get(timeout=timeout_s)
            stats["_cpu_s"] = stats.get("_cpu_s", 0.0) + part.pop("_cpu_s")
            stats.update(part)
        for p in self.procs:
            p.join(10)
        return stats


# ------------------------------------------------------------------------------ CPU

def _proc_cpu_s(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds of the producer (this process and its workers), the consumers and the
    embedded broker over one part: what the streams cost, whatever else the machine runs."""

    broker_pid: int | None = None

    def __init__(self):
        self.own0, self.children0 = time.process_time(), _children_cpu_s()
        self.broker0 = _proc_cpu_s(self.broker_pid)

    def stop(self, consumer_cpu_s: float, records: int, wall_s: float) -> dict:
        children = _children_cpu_s() - self.children0  # workers and consumers, joined
        cpu = {"producer": time.process_time() - self.own0 + children - consumer_cpu_s,
               "consumer": consumer_cpu_s,
               "broker": _proc_cpu_s(self.broker_pid) - self.broker0}
        per_record_us = {k: 1e6 * v / max(records, 1) for k, v in cpu.items()}
        total_us = sum(v for v in per_record_us.values() if v == v)
        return {"cores": {k: v / wall_s for k, v in cpu.items()}, "us_per_record": per_record_us,
                "total_us": total_us, "capacity_2_cores": 2e6 / total_us if total_us else 0.0}


def _cpu_line(cpu: dict) -> str:
    us, cores = cpu["us_per_record"], cpu["cores"]
    parts = ", ".join(f"{k} {cores[k]:.2f} cores ({us[k]:.0f} us/record)" for k in us)
    return (f"CPU: {parts}; {cpu['total_us']:.0f} us/record in all -> about "
            f"{cpu['capacity_2_cores']:,.0f} records/s if 2 idle cores were all ours")


# ------------------------------------------------------------------------------ parts

def single_topic(bootstrap: str, dataset, samples: int, consumers: int) -> dict:
    """Part 1: ``samples`` CIFAR-sized records on one topic, produced and consumed at once."""
    prefix = f"bench-single-{os.getpid()}-"
    topic = f"{prefix}0"
    brokerlib.create_topics(bootstrap, [topic])
    duration_s = 10.0
    streams = build_streams(dataset, "iid", 1, str(samples / duration_s), seed=0)
    meter = CpuMeter()
    group = Consumers(bootstrap, [topic], 1, timeout_s=600)
    t0, cpu0 = time.time(), time.process_time()
    summary = produce(bootstrap, streams, dataset, duration_s, "virtual", prefix, workers=1,
                      producer_config=PRODUCER_CONFIG)
    produced_s, produce_cpu_s = time.time() - t0, time.process_time() - cpu0
    stats = group.collect(600)
    st = stats[topic]
    e2e_s = st["last_recv"] - t0
    return {"samples": st["count"], "sent": summary["records"],
            "cpu": meter.stop(stats["_cpu_s"], st["count"], e2e_s),
            "produce_per_s": summary["records"] / produced_s,
            "produce_per_cpu_s": summary["records"] / produce_cpu_s,
            "consume_per_cpu_s": st["count"] / stats["_cpu_s"],
            "e2e_per_s": st["count"] / e2e_s, "e2e_s": e2e_s,
            "complete": st["count"] == summary["records"] == st["eos"]
            and st["seq_errors"] == 0}


def realtime_run(bootstrap: str, dataset, name: str, world_size: int, rates: str,
                 duration_s: float, consumers: int, rate_schedule: str | None = None,
                 seed: int = 0) -> dict:
    """Parts 2 and 3: realtime streams on every device, consumers on every topic."""
    prefix = f"bench-{name.replace(' ', '').lower()}-{os.getpid()}-"
    streams = build_streams(dataset, "iid", world_size, rates, seed, rate_schedule)
    topics = [f"{prefix}{s.device}" for s in streams]
    brokerlib.create_topics(bootstrap, topics)
    meter = CpuMeter()
    group = Consumers(bootstrap, topics, consumers, timeout_s=duration_s + 120)
    summary = produce(bootstrap, streams, dataset, duration_s, "realtime", prefix,
                      workers=None, producer_config=PRODUCER_CONFIG)
    stats = group.collect(duration_s + 150)
    cpu = meter.stop(stats["_cpu_s"], sum(stats[t]["count"] for t in topics), duration_s)
    rows = []
    for s, topic in zip(streams, topics):
        st = stats[topic]
        target = s.schedule.expected_count(0.0, duration_s) / duration_s
        achieved = arrival_rate(st["recv"])
        expected = int(np.ceil(s.schedule.count_limit(duration_s)))
        rows.append({"device": s.device, "target": target, "achieved": achieved,
                     "error_pct": 100.0 * (achieved - target) / target,
                     "count": st["count"], "expected": expected,
                     "complete": st["count"] == expected == st["eos"] and not st["seq_errors"],
                     "p50_ms": _pct(st["lat"], 50), "p99_ms": _pct(st["lat"], 99)})
    lat = np.concatenate([stats[t]["lat"] for t in topics])
    total = sum(r["count"] for r in rows)
    return {"name": name, "duration_s": duration_s, "rows": rows,
            "target_total": sum(r["target"] for r in rows),
            "achieved_total": arrival_rate(np.sort(np.concatenate(
                [stats[t]["recv"] for t in topics]))),
            "records": total, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "max_ms": float(lat.max() * 1000) if len(lat) else float("nan"),
            "worst_error_pct": max(abs(r["error_pct"]) for r in rows),
            "complete": all(r["complete"] for r in rows),
            "workers": summary["workers"], "send_lag_ms": summary["send_lag_ms"], "cpu": cpu}


def arrival_rate(recv_s: np.ndarray) -> float:
    """Records per second as seen by the consumer: the least-squares slope of the record
    index against its receive time (robust to the jitter of single first/last records;
    a consumer falling behind shows as a lower slope)."""
    if len(recv_s) < 2 or recv_s[-1] <= recv_s[0]:
        return 0.0
    t = recv_s - recv_s.mean()
    k = np.arange(len(recv_s), dtype=np.float64)
    return float((t * (k - k.mean())).sum() / (t * t).sum())


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q) * 1000) if len(values) else float("nan")


# ------------------------------------------------------------------------------ tables

def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_single(r: dict) -> bool:
    ok = r["e2e_per_s"] >= SINGLE_TOPIC_GOAL_PER_S and r["complete"]
    print("\n(1) one topic, CIFAR-sized records (3,096 B), produce + consume at once")
    print(f"{'records':>9}  {'produce/s':>10}  {'end-to-end/s':>12}  {'e2e s':>6}  "
          f"{'complete':>8}  {'produce/cpu-s':>13}  {'consume/cpu-s':>13}  "
          f"goal >= {SINGLE_TOPIC_GOAL_PER_S:,}/s")
    print(f"{r['samples']:>9,}  {r['produce_per_s']:>10,.0f}  {r['e2e_per_s']:>12,.0f}  "
          f"{r['e2e_s']:>6.2f}  {str(r['complete']):>8}  {r['produce_per_cpu_s']:>13,.0f}  "
          f"{r['consume_per_cpu_s']:>13,.0f}  {_verdict(ok)}")
    print(_cpu_line(r["cpu"]))
    return ok


def print_devices(r: dict) -> bool:
    ok = r["worst_error_pct"] <= RATE_GOAL_PCT and r["complete"]
    print(f"\n(2) {r['name']}: paper's 25 rates, realtime {r['duration_s']:g} s, "
          f"{r['workers']} producer process(es)")
    half = (len(r["rows"]) + 1) // 2  # two columns of devices, side by side
    head = (f"{'dev':>3} {'target/s':>8} {'achieved/s':>10} {'err%':>6} {'p50ms':>6} "
            f"{'p99ms':>6}")
    print(head + "   |   " + head)
    for i in range(half):
        cells = []
        for r_ in (r["rows"][i], r["rows"][i + half] if i + half < len(r["rows"]) else None):
            cells.append("" if r_ is None else
                         f"{r_['device']:>3} {r_['target']:>8.2f} {r_['achieved']:>10.3f} "
                         f"{r_['error_pct']:>6.2f} {r_['p50_ms']:>6.1f} {r_['p99_ms']:>6.1f}"
                         + ("" if r_["complete"] else " LOST"))
        print("   |   ".join(cells))
    print(f"all devices: worst |error| {r['worst_error_pct']:.3f}% (goal <= {RATE_GOAL_PCT}%), "
          f"latency p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.0f} ms,"
          f" every record delivered: {r['complete']}  {_verdict(ok)}")
    lag = r["send_lag_ms"]
    print(f"producer send lag behind schedule p50 {lag['p50']:g} ms, p99 {lag['p99']:g} ms, "
          f"max {lag['max']:g} ms (deadline pacing: lag never accumulates into drift)")
    print(_cpu_line(r["cpu"]))
    return ok


def print_aggregate(runs: list[dict]) -> list[bool]:
    print("\n(3) S2 rates on 16 devices, realtime")
    print(f"{'setting':<10} {'secs':>5} {'target/s':>9} {'achieved/s':>10} {'worst err%':>10} "
          f"{'p50ms':>6} {'p99ms':>7} {'records':>9} {'workers':>7} {'complete':>8}  goal")
    verdicts = []
    for r in runs:
        ok = (r["worst_error_pct"] <= RATE_GOAL_PCT and r["complete"]
              and r["p99_ms"] < SUSTAINED_P99_S * 1000)
        verdicts.append(ok)
        print(f"{r['name']:<10} {r['duration_s']:>5g} {r['target_total']:>9,.0f} "
              f"{r['achieved_total']:>10,.0f} {r['worst_error_pct']:>10.3f} {r['p50_ms']:>6.1f} "
              f"{r['p99_ms']:>7.1f} {r['records']:>9,} {r['workers']:>7} "
              f"{str(r['complete']):>8}  {_verdict(ok)}")
    for r in runs:
        print(f"{r['name']}: {_cpu_line(r['cpu'])}")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (15 s / 10 s)")
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP"))
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument("--single-samples", type=int, default=None)
    parser.add_argument("--idempotent", action="store_true",
                        help="idempotent producers (enable_idempotence, acks=all)")
    args = parser.parse_args(argv)
    global PRODUCER_CONFIG
    PRODUCER_CONFIG = dict(IDEMPOTENT) if args.idempotent else None
    parts = {int(p) for p in args.parts.split(",")}
    dataset = load_dataset("synthetic", num_samples=2000, shape=CIFAR_SHAPE)
    embedded = None
    if not args.bootstrap:
        embedded = brokerlib.EmbeddedBroker().start()
        args.bootstrap = embedded.bootstrap
        CpuMeter.broker_pid = embedded.process.pid
    load = os.getloadavg()
    print(f"bench_streams: broker {args.bootstrap} ({'embedded' if embedded else 'external'}),"
          f" {os.cpu_count()} cores, load average {load[0]:.1f} at start"
          f"{', quick' if args.quick else ''}{', idempotent producers' if args.idempotent else ''}")
    verdicts = []
    try:
        if 1 in parts:
            samples = args.single_samples or (60_000 if args.quick else 200_000)
            verdicts.append(print_single(single_topic(args.bootstrap, dataset, samples,
                                                      args.consumers)))
        if 2 in parts:
            run = realtime_run(args.bootstrap, dataset, "paper-25", 25, PAPER_25_RATES,
                               15.0 if args.quick else 60.0, args.consumers)
            verdicts.append(print_devices(run))
        if 3 in parts:
            secs = 10.0 if args.quick else 30.0
            runs = [realtime_run(args.bootstrap, dataset, name, 16, "S2", secs, args.consumers,
                                 rate_schedule=schedule)
                    for name, schedule in (("S2", None), ("4x S2", "scale:0:4"))]
            verdicts.extend(print_aggregate(runs))
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; goals: "
          f"{sum(verdicts)}/{len(verdicts)} PASS")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
