"""Step time of ScaDLES's weighted aggregation against torch DistributedDataParallel.

Claim: the weighted step (one small allreduce for the global batch, then a sum-allreduce of
weighted flat gradient buckets) costs at most 5% more than DDP's step at the same model,
batch and backend. Both run side by side in the same ranks, alternating step by step (ABBA),
so machine noise falls on both alike. A step's time is the slowest rank's, from a barrier to
the end of the optimizer step; the table shows medians, and the median ratio of adjacent
steps (robust when other work on the machine comes and goes). DDP runs with its defaults
(25 MB buckets overlapped with backward, buffers broadcast every forward).

    python benchmarks/bench_step_overhead.py [--world-size 2] [--steps 10] [--backend gloo]

Run without rank variables it starts the ranks itself (loopback rendezvous) and prints the
table from rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from scadles.aggregate import aggregation_weight, global_batch  # noqa: E402
from scadles.comm import Comm, make_comm, share_cpu_threads  # noqa: E402
from scadles.exchange import DenseExchanger  # noqa: E402
from scadles.models import build_model  # noqa: E402

# model, input channels, image size, per-rank batch, timed steps (a few seconds of each)
CASES = [("resnet18", 3, 32, 32, 12), ("smallcnn", 1, 28, 64, 300)]
NUM_CLASSES = 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per method, for every case (default: per case)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--cases", default=",".join(c[0] for c in CASES),
                   help="comma-separated models from: " + ", ".join(c[0] for c in CASES))
    return p.parse_args()


def timed(comm: Comm, step) -> float:
    """Seconds from a barrier to the end of ``step()``, on this rank."""
    comm.barrier()
    start_s = time.perf_counter()
    step()
    return time.perf_counter() - start_s


def bench_case(comm: Comm, case: tuple, steps: int | None, warmup_steps: int) -> dict:
    name, channels, size, bsz, case_steps = case
    steps = steps or case_steps
    gen = torch.Generator().manual_seed(comm.rank)
    images = torch.randn(bsz, channels, size, size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (bsz,), generator=gen)

    ours = build_model(name, NUM_CLASSES, channels, size, seed=0)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    exchanger = DenseExchanger(comm)
    named = list(ours.named_parameters())

    ddp = DistributedDataParallel(build_model(name, NUM_CLASSES, channels, size, seed=0))
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

    def ours_step() -> None:
        ours_opt.zero_grad(set_to_none=True)
        total_bsz = global_batch(comm, bsz)
        F.cross_entropy(ours(images), labels).backward()
        exchanger.exchange(named, weight=aggregation_weight(bsz, total_bsz), step=0)
        ours_opt.step()

    def ddp_step() -> None:
        ddp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(images), labels).backward()
        ddp_opt.step()

    def global_batch_only() -> None:
        global_batch(comm, bsz)

    times = {"ours": [], "ddp": [], "global_bsz": []}
    for i in range(warmup_steps + steps):
        order = [("ours", ours_step), ("ddp", ddp_step), ("global_bsz", global_batch_only)]
        if i % 2:
            order.reverse()
        for key, step in order:
            seconds = timed(comm, step)
            if i >= warmup_steps:
                times[key].append(seconds)
    slowest = {}
    for key, values in times.items():
        t = torch.tensor(values, dtype=torch.float64)
        comm.allreduce_(t, op="max")
        slowest[key] = t.tolist()
    return {"model": name, "input": f"{channels}x{size}x{size}", "batch": bsz,
            "params": sum(p.numel() for p in ours.parameters()),
            "paired_ratio": statistics.median(a / b for a, b in zip(slowest["ours"],
                                                                    slowest["ddp"])),
            "ours_ms": 1e3 * statistics.median(slowest["ours"]),
            "ddp_ms": 1e3 * statistics.median(slowest["ddp"]),
            "global_bsz_ms": 1e3 * statistics.median(slowest["global_bsz"])}


def run_rank(args: argparse.Namespace) -> None:
    comm = make_comm(args.backend)
    threads = share_cpu_threads(comm)
    wanted = args.cases.split(",")
    rows = [bench_case(comm, c, args.steps, args.warmup_steps) for c in CASES if c[0] in wanted]
    if comm.rank == 0:
        print("RESULT " + json.dumps({"rows": rows, "threads_per_rank": threads,
                                      "load_avg_1min": os.getloadavg()[0],
                                      "world_size": comm.world_size, "backend": args.backend}))
    comm.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(args.world_size), LOCAL_WORLD_SIZE=str(args.world_size))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, __file__] + sys.argv[1:],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, text=True)
             for r in range(args.world_size)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def print_table(result: dict) -> None:
    print(f"step time, {result['backend']}, {result['world_size']} ranks, CPU, "
          f"{result['threads_per_rank']} thread(s) per rank, {os.cpu_count()} cores, "
          f"load average {result['load_avg_1min']:.1f}\nmedian of the slowest rank's step")
    header = (f"{'model':<10} {'input':<9} {'batch':>5} {'params':>10} {'ours ms':>9} "
              f"{'DDP ms':>9} {'ratio':>6} {'overhead':>8} {'paired':>6} {'B ms':>6}")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        ratio = r["ours_ms"] / r["ddp_ms"]
        print(f"{r['model']:<10} {r['input']:<9} {r['batch']:>5} {r['params']:>10,} "
              f"{r['ours_ms']:>9.1f} {r['ddp_ms']:>9.1f} {ratio:>6.3f} "
              f"{100 * (ratio - 1):>+7.1f}% {r['paired_ratio']:>6.3f} {r['global_bsz_ms']:>6.2f}")
    print("ratio: of the medians; paired: median of ours/DDP over adjacent step pairs;\n"
          "B ms: the global-batch allreduce alone (part of ours: ScaDLES needs B every step)")
    print("goal: overhead <= 5% (ratio <= 1.05)")


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        run_rank(arguments)
    else:
        print_table(launch(arguments))
