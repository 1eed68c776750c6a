"""Randomized data injection on non-IID streams: test accuracy against bytes moved.

Claim (ScaDLES): injection counters non-IID label skew. Setting: Fashion-MNIST, 10 devices
with one label each (``--partition noniid``), a small model, virtual clock with a modelled
compute time (deterministic), equal rates, equal sample budget: every configuration trains
about ``--budget`` samples in all (its step count is the budget over its expected global
batch, local plus injected). Rows: no injection, then alpha = beta in {0.05, 0.1, 0.25, 0.5}
(the paper's grid), each with the injected samples and bytes moved (``injected_bytes``: the
records injected, what a push would send; ``read``: what the pull form read to get them,
rank 0's count times the world size).

Each configuration is one ``python -m scadles.launch`` run (gloo ranks on this machine);
``--source inprocess`` (default) generates the same streams without a broker, ``kafka``
produces them through the embedded broker (slower).

    python benchmarks/bench_injection.py [--budget 60000] [--model smallcnn] [--source ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scadles import metrics  # noqa: E402
from scadles.inject import num_peers  # noqa: E402

GRID = [0.0, 0.05, 0.1, 0.25, 0.5]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=60_000, help="samples trained per run")
    p.add_argument("--world-size", type=int, default=10)
    p.add_argument("--rate", type=float, default=64.0, help="samples/s of every device")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--fixed-lr", action="store_true",
                   help="keep the learning rate at --lr (--global-bsz = the expected global "
                        "batch) instead of the paper's linear scaling with the injected batch")
    p.add_argument("--source", default="inprocess", choices=("inprocess", "kafka"))
    p.add_argument("--grid", default=",".join(map(str, GRID)),
                   help="alpha = beta values (0: no injection)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-root", default=str(REPO / "logs" / "bench_injection"))
    return p.parse_args()


def expected_global_batch(world_size: int, rate: float, share: float) -> float:
    """Local window (rate x 1 s) plus, per chosen peer, beta of its window."""
    local = rate
    return world_size * (local + num_peers(share, world_size) * share * local)


def run(args, share: float) -> dict:
    global_bsz = expected_global_batch(args.world_size, args.rate, share)
    steps = max(1, round(args.budget / global_bsz))
    lr_rule = "fixed" if args.fixed_lr else "scaled"
    log_dir = Path(args.log_root) / f"{args.model}-{lr_rule}-a{share:g}-b{share:g}"
    cmd = [sys.executable, "-m", "scadles.launch", "--backend", "gloo",
           "--world-size", str(args.world_size), "--dataset", "fashion-mnist",
           "--partition", "noniid", "--model-name", args.model, "--clock", "virtual",
           "--source", args.source, "--rates", ",".join([f"{args.rate:g}"] * args.world_size),
           "--max-train-bsz", str(int(args.rate)), "--min-train-bsz", "1",
           "--compute-model", "fixed:0.1", "--comm-model", "fixed:0",
           "--lr", str(args.lr), "--max-steps", str(steps), "--eval-steps", "0",
           "--eval-samples", "0", "--seed", str(args.seed), "--log-dir", str(log_dir),
           "--alpha", str(share), "--beta", str(share)]
    if args.fixed_lr:
        cmd += ["--global-bsz", str(round(global_bsz))]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run alpha=beta={share} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = metrics.read_run_json(log_dir)["summary"]
    injected = injected_bytes = 0
    for rank in range(args.world_size):
        rows = metrics.read_rows(log_dir, rank, "train")
        injected += sum(r.get("injected", 0) for r in rows)
        injected_bytes += sum(r.get("injected_bytes", 0) for r in rows)
    inj = summary.get("injection") or {}
    read_bytes = inj.get("read_bytes", 0)  # rank 0's; scaled below
    return dict(share=share, steps=summary["steps"], samples=summary["samples"],
                top1=summary["final_top1"], top5=summary["final_top5"], injected=injected,
                injected_bytes=injected_bytes,
                read_bytes_est=read_bytes * args.world_size,
                wall_s=time.time() - started, log_dir=str(log_dir))


def main() -> int:
    args = parse_args()
    rows = []
    for share in (float(v) for v in args.grid.split(",")):
        print(f"== alpha = beta = {share:g}", flush=True)
        rows.append(run(args, share))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nNon-IID Fashion-MNIST, {args.world_size} devices x 1 label, {args.model}, "
          f"{args.rate:g} samples/s each, virtual clock, budget {args.budget} samples, "
          f"source {args.source}, lr {args.lr:g} "
          f"{'fixed' if args.fixed_lr else 'scaled linearly with the global batch'}")
    print(f"| alpha = beta | steps | samples trained | injected | injected MB | "
          f"pull read MB (est.) | test top-1 | test top-5 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = "off" if r["share"] == 0 else f"{r['share']:g}"
        print(f"| {label} | {r['steps']} | {r['samples']} | {r['injected']} | "
              f"{r['injected_bytes'] / 1e6:.2f} | {r['read_bytes_est'] / 1e6:.2f} | "
              f"{r['top1']:.2f}% | {r['top5']:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
