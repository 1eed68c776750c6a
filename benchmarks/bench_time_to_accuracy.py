"""Time-to-accuracy of ScaDLES against conventional synchronous SGD (ddp), in stream time.

The paper's claim: with heterogeneous stream rates, ScaDLES (rate-proportional batches,
weighted aggregation, scaled learning rate) converges up to 3.29x faster than synchronous SGD
that waits for a fixed batch on every device (ResNet152 on CIFAR-10). Here: smallcnn on
Fashion-MNIST, rates drawn from the paper's S10 distribution (normal, mean 64, sd 24), the
same seeds, streams, model and base learning rate for both modes, a virtual clock with a
modelled compute time (deterministic), both runs given the same stream-time budget.

Time to accuracy = stream seconds until the first evaluation at or above the target top-1.
Run: ``.venv/bin/python benchmarks/bench_time_to_accuracy.py [--world-size 4 --seeds 0,1]``;
flags it does not know (``--warmup-steps 20``) go to both runs' launcher.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scadles.metrics import read_rows  # noqa: E402
from streamsim.schedule import parse_rates  # noqa: E402


def run(mode: str, args, seed: int, log_dir: Path, eval_steps: int) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "scadles.launch", "--mode", mode, "--backend", "gloo",
           "--model-name", "smallcnn", "--dataset", "fashion-mnist",
           "--world-size", str(args.world_size), "--rates", args.rates, "--seed", str(seed),
           "--lr", str(args.lr), "--clock", "virtual", "--compute-model", args.compute_model,
           "--max-steps", "0", "--max-stream-s", str(args.stream_s),
           "--eval-steps", str(eval_steps), "--eval-samples", str(args.eval_samples),
           "--source", args.source, "--log-dir", str(log_dir),
           "--max-train-bsz", str(args.max_train_bsz)] + args.launcher_args
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return read_rows(log_dir, 0, "eval"), time.monotonic() - started


def time_to(evals: list[dict], target: float) -> float | None:
    return next((e["clock_s"] for e in evals if e["top1"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--rates", default="S10")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--compute-model", default="linear:0.05,0.002")
    parser.add_argument("--stream-s", type=float, default=400.0)
    parser.add_argument("--targets", default="75,80,83")
    parser.add_argument("--eval-every-s", type=float, default=10.0)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--source", default="kafka", choices=["kafka", "inprocess"])
    parser.add_argument("--max-train-bsz", type=int, default=64, help="scadles: b_max")
    args, args.launcher_args = parser.parse_known_args()  # the rest goes to the launcher
    targets = [float(t) for t in args.targets.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rates = parse_rates(args.rates, args.world_size, seed)
            # Evaluate every ~eval_every_s of stream time in both modes: a ddp step lasts
            # about as long as the slowest stream takes to deliver 64 samples.
            ddp_step_s = 64 / min(rates)
            evals = {}
            for mode, eval_steps in (("scadles", max(1, round(args.eval_every_s))),
                                     ("ddp", max(1, round(args.eval_every_s / ddp_step_s)))):
                evals[mode], wall_s = run(mode, args, seed, Path(tmp) / f"{mode}-{seed}",
                                          eval_steps)
                print(f"seed {seed} {mode}: {len(evals[mode])} evals, final top1 "
                      f"{evals[mode][-1]['top1']:.2f}%, {wall_s:.0f} s wall", flush=True)
            for target in targets:
                t_s, t_d = time_to(evals["scadles"], target), time_to(evals["ddp"], target)
                rows.append((seed, ", ".join(f"{r:.0f}" for r in rates), target, t_s, t_d,
                             t_d / t_s if t_s and t_d else None))
            rows.append((seed, "", "final", evals["scadles"][-1]["top1"],
                         evals["ddp"][-1]["top1"], None))

    print()
    print(f"time to accuracy (stream seconds), smallcnn on Fashion-MNIST, {args.world_size} "
          f"devices, rates {args.rates}, compute {args.compute_model}, budget "
          f"{args.stream_s:g} s of stream")
    print(f"| seed | rates (samples/s) | target top1 | scadles | ddp | speedup |")
    print(f"|---:|---|---:|---:|---:|---:|")
    for seed, rates, target, t_s, t_d, speedup in rows:
        if target == "final":
            print(f"| {seed} | | final top1 | {t_s:.2f}% | {t_d:.2f}% | |")
            continue
        fmt = lambda t: "not reached" if t is None else f"{t:.0f} s"  # noqa: E731
        print(f"| {seed} | {rates} | {target:g}% | {fmt(t_s)} | {fmt(t_d)} | "
              f"{'-' if speedup is None else f'{speedup:.2f}x'} |")
    speedups = [r[5] for r in rows if r[5]]
    if speedups:
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        print(f"\ngeometric-mean speedup of scadles over ddp: {geo:.2f}x "
              f"(paper: 3.29x, ResNet152 on CIFAR-10)")


if __name__ == "__main__":
    main()
