"""Gradient compression in training: accuracy, bytes and stream time for none / static / adaptive.

Claim (ScaDLES): Top-k compression cuts the bytes devices send, and adaptive compression
(dense in critical regions, Top-k elsewhere) keeps more of the accuracy than static Top-k
while still sending far fewer bytes than dense training.

Setting: Fashion-MNIST (IID), ``--world-size`` devices (4) streaming ``--rate`` samples/s
each, a small model, virtual clock with a modelled compute time and a link comm model
(``--comm-model link:MBIT_PER_S,LATENCY_S``: a step's sync time is latency + the bytes this
rank sent over the link), so bytes cost stream time. Every method trains the same number of
steps (``--steps``) from the same seed; the settings are those of the paper's scripts:
static Top-k at ratio 0.01 (``staticcompression_*.sh``), adaptive at ratio 0.1 with
threshold 0.3 and the paper's signal (``adapcomp_*.sh``).

Columns: final test top-1 on the whole test split, total bytes sent by all ranks, stream time
to finish the steps, steps sent compressed / dense and the CNC ratio (compressed-to-dense
steps); then the same against ``none`` (bytes and stream time as ratios, accuracy as the
difference in points).

Each method is one ``python -m scadles.launch`` run (gloo ranks on this machine);
``--source inprocess`` (default) generates the same streams without a broker, ``kafka``
produces them through the embedded broker (slower).

    python benchmarks/bench_compression_training.py [--steps 150] [--world-size 4]
        [--comm-model link:2,0.01] [--methods none,static,adaptive] [--source inprocess]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scadles import metrics  # noqa: E402

METHODS = ("none", "static", "adaptive")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps of every run")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--rate", type=float, default=64.0, help="samples/s of every device")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--compute-model", default="fixed:0.1")
    p.add_argument("--comm-model", default="link:2,0.01",
                   help="sync time of a step: link:MBIT_PER_S,LATENCY_S (an edge uplink)")
    p.add_argument("--static-ratio", type=float, default=0.01)
    p.add_argument("--adaptive-ratio", type=float, default=0.1)
    p.add_argument("--delta-threshold", type=float, default=0.3)
    p.add_argument("--adaptive-signal", default="paper",
                   choices=("paper", "orig", "gradnorm-change"))
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated: none, static, adaptive")
    p.add_argument("--source", default="inprocess", choices=("inprocess", "kafka"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-root", default=str(REPO / "logs" / "bench_compression_training"))
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {', '.join(sorted(unknown))}: use {', '.join(METHODS)}")
    return args


def method_flags(args, method: str) -> list[str]:
    if method == "static":
        return ["--compression", "static", "--compression-ratio", str(args.static_ratio)]
    if method == "adaptive":
        return ["--compression", "adaptive", "--compression-ratio", str(args.adaptive_ratio),
                "--delta-threshold", str(args.delta_threshold),
                "--adaptive-signal", args.adaptive_signal]
    return ["--compression", "none"]


def run(args, method: str) -> dict:
    log_dir = Path(args.log_root) / f"{args.model}-w{args.world_size}-{method}"
    cmd = [sys.executable, "-m", "scadles.launch", "--backend", "gloo",
           "--world-size", str(args.world_size), "--dataset", "fashion-mnist",
           "--partition", "iid", "--model-name", args.model, "--clock", "virtual",
           "--source", args.source, "--rates", ",".join([f"{args.rate:g}"] * args.world_size),
           "--max-train-bsz", str(int(args.rate)), "--min-train-bsz", "1",
           "--compute-model", args.compute_model, "--comm-model", args.comm_model,
           "--lr", str(args.lr), "--max-steps", str(args.steps), "--eval-steps", "0",
           "--eval-samples", "0", "--seed", str(args.seed), "--log-dir", str(log_dir),
           *method_flags(args, method)]
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run {method} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run_json = metrics.read_run_json(log_dir)
    summary, exchanger = run_json["summary"], run_json.get("exchanger", {})
    compressed = exchanger.get("compressed_steps", 0)
    dense = exchanger.get("dense_steps", 0)
    rows = metrics.read_rows(log_dir, 0, "train")
    return dict(method=method, steps=summary["steps"], samples=summary["samples"],
                top1=summary["final_top1"], top5=summary["final_top5"],
                bytes=summary["bytes_sent_total"], stream_s=summary["stream_s"],
                compressed_steps=compressed, dense_steps=dense,
                cnc=(compressed / dense) if dense else (math.inf if compressed else None),
                sync_s=sum(r["sync_s"] for r in rows), wall_s=time.time() - started,
                log_dir=str(log_dir))


def _cnc(x) -> str:
    return "n/a" if x is None else ("inf (all)" if math.isinf(x) else f"{x:.2f}")


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def label(args, method: str) -> str:
    if method == "static":
        return f"static (Top-k {args.static_ratio:g})"
    if method == "adaptive":
        return (f"adaptive (Top-k {args.adaptive_ratio:g}, {args.adaptive_signal} <= "
                f"{args.delta_threshold:g})")
    return "none (dense)"


def main() -> int:
    args = parse_args()
    results = []
    for method in args.methods:
        print(f"== {method}", flush=True)
        results.append(run(args, method))
        print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if r["method"] == "none"), None)

    try:
        load = "load average {:.1f}".format(os.getloadavg()[0])
    except OSError:
        load = "load average n/a"
    print(f"\nFashion-MNIST IID, {args.world_size} devices x {args.rate:g} samples/s, "
          f"{args.model}, {args.steps} steps, virtual clock (compute {args.compute_model}, "
          f"comm {args.comm_model}), lr {args.lr:g}, seed {args.seed}, source {args.source}; "
          f"{load}")
    print("| method | top-1 | bytes sent (MB, all ranks) | stream time (s) | sync time (s, "
          "rank 0) | compressed / dense steps | CNC ratio | top-1 vs none | bytes vs none "
          "| stream time vs none |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if base is not None:
            vs = (f"{r['top1'] - base['top1']:+.2f} pt",
                  f"{r['bytes'] / base['bytes']:.4f}x" if base["bytes"] else "n/a",
                  f"{r['stream_s'] / base['stream_s']:.3f}x" if base["stream_s"] else "n/a")
        else:
            vs = ("n/a",) * 3
        print(f"| {label(args, r['method'])} | {r['top1']:.2f}% | {_mb(r['bytes'])} | "
              f"{r['stream_s']:.1f} | {r['sync_s']:.1f} | {r['compressed_steps']} / "
              f"{r['dense_steps']} | {_cnc(r['cnc'])} | {vs[0]} | {vs[1]} | {vs[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
