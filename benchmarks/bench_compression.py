"""Top-k compression against the dense weighted allreduce, on ResNet152- and VGG19-sized
gradients (CPU, gloo, 2 ranks by default).

Claim: at ratio r, the bytes a rank sends are at most 2 x r x the dense bytes (float32
values + int32 indices), and Top-k selection plus the sparse exchange is fast next to a
training step. The step is measured in the same run: forward and backward of the model at
batch 64 on 3x32x32 inputs (CIFAR-sized, as in the paper's runs), one thread, on every rank
at once, median of ``--repeats``.

For each model (torchvision, built once for its parameter shapes; random gradients) and each
method (dense, Top-k 0.1, Top-k 0.01, static mode) the ranks run the same exchanges; an
exchange's time is the slowest rank's, from a barrier to the end of ``exchange``, in wall
seconds and in process CPU seconds (the CPU column stays meaningful on a machine shared with
other work, where wall time mostly measures the wait for a core); the table shows medians
and the load average it ran under.

    python benchmarks/bench_compression.py [--world-size 2] [--repeats 3] [--models resnet152,vgg19]

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

from scadles.exchange import make_exchanger  # noqa: E402

# name -> (torchvision constructor, num_classes as in the paper's runs)
MODELS = {"resnet152": ("resnet152", 10), "vgg19": ("vgg19_bn", 100)}
METHODS = [("dense", dict(compression="none")),
           ("topk 0.1", dict(compression="static", compression_ratio=0.1)),
           ("topk 0.01", dict(compression="static", compression_ratio=0.01))]
STEP_BATCH = 64
STEP_INPUT = (3, 32, 32)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--repeats", type=int, default=3, help="timed exchanges per method and model")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: "
                   + ", ".join(MODELS))
    p.add_argument("--link-mbps", type=float, default=100.0,
                   help="edge link rate for the estimated-exchange column, Mbit/s")
    return p.parse_args()


def build_model(name: str) -> torch.nn.Module:
    import torchvision

    builder, num_classes = MODELS[name]
    return getattr(torchvision.models, builder)(num_classes=num_classes)


def step_seconds(model: torch.nn.Module, repeats: int) -> float:
    """Median CPU seconds (this process, one thread) of one forward + backward at batch 64,
    after one warm-up: CPU seconds, like the exchange columns it is compared with."""
    num_classes = model(torch.zeros(2, *STEP_INPUT)).shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEP_BATCH, *STEP_INPUT, generator=gen)
    y = torch.randint(0, num_classes, (STEP_BATCH,), generator=gen)
    took = []
    for repeat in range(repeats + 1):
        model.zero_grad(set_to_none=False)
        started = time.process_time()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if repeat:
            took.append(time.process_time() - started)
    return statistics.median(took)


def run_rank(args: argparse.Namespace) -> None:
    from scadles.comm import make_comm
    from scadles.compress.topk import TopKCompressor

    torch.set_num_threads(1)
    comm = make_comm(args.backend, timeout_s=600)
    rows = []
    for model_name in args.models.split(","):
        model = build_model(model_name)
        shapes = [p.shape for p in model.parameters()]
        step_s = step_seconds(model, args.repeats)
        del model
        numel = sum(s.numel() for s in shapes)
        # Parameters only carry .grad here: a 0-stride view holds no memory.
        named = [(f"p{i}", torch.nn.Parameter(torch.empty(1).expand(s)))
                 for i, s in enumerate(shapes)]
        gen = torch.Generator().manual_seed(comm.rank)
        source = [torch.randn(s, generator=gen) for s in shapes]
        for method, settings in METHODS:
            exchanger = make_exchanger(comm, **settings)
            wall, cpu, select, stats = [], [], [], None
            for repeat in range(args.repeats + 1):  # the first one warms up
                for (_, p), g in zip(named, source):
                    p.grad = g.clone()  # fresh gradients, as autograd hands them over
                comm.barrier()
                wall_start, cpu_start = time.perf_counter(), time.process_time()
                stats = exchanger.exchange(named, 1.0 / comm.world_size, repeat)
                took = torch.tensor([time.perf_counter() - wall_start,
                                     time.process_time() - cpu_start], dtype=torch.float64)
                comm.allreduce_(took, op="max")
                if "compression_ratio" in settings:
                    # Top-k selection alone, over every layer, in CPU seconds.
                    compressor = TopKCompressor(settings["compression_ratio"])
                    for name, g in zip(named, source):
                        compressor.compress(g, name[0])  # warm the scratch buffers
                    cpu_start = time.process_time()
                    for name, g in zip(named, source):
                        compressor.compress(g, name[0])
                    select.append(time.process_time() - cpu_start)
                if repeat:
                    wall.append(float(took[0]))
                    cpu.append(float(took[1]))
            rows.append({"model": model_name, "params": numel, "method": method,
                         "exchange_wall_s": statistics.median(wall),
                         "exchange_cpu_s": statistics.median(cpu),
                         "select_cpu_s": statistics.median(select) if select else 0.0,
                         "bytes_sent": stats["bytes_sent"],
                         "ratio": settings.get("compression_ratio", 1.0),
                         "step_s": step_s})
            del exchanger
        del named, source
    if comm.rank == 0:
        print(format_table(rows, args))
        print("JSON " + json.dumps(rows), flush=True)
    comm.close()


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"Top-k vs dense weighted allreduce: {args.world_size} {args.backend} ranks on CPU "
             f"({os.cpu_count()} cores, load average {load}), median of {args.repeats}; "
             "times are the slowest rank's",
             f"{'model':<10} {'params':>7} {'method':<10} {'wall s':>7} {'cpu s':>6} "
             f"{'cpu vs dense':>12} {'select cpu s':>12} {'MB sent':>8} {'vs dense':>8} "
             f"{'goal 2r':>7} {'ok':>3} {'step cpu s':>10} {'select/step':>11} {'exch/step':>9} "
             f"{'@link s':>7}"]
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        byte_ratio = r["bytes_sent"] / d["bytes_sent"]
        goal = min(1.0, 2 * r["ratio"]) if r["method"] != "dense" else 1.0
        lines.append(
            f"{r['model']:<10} {r['params'] / 1e6:>6.1f}M {r['method']:<10} "
            f"{r['exchange_wall_s']:>7.3f} {r['exchange_cpu_s']:>6.3f} "
            f"{r['exchange_cpu_s'] / d['exchange_cpu_s']:>11.2f}x {r['select_cpu_s']:>12.3f} "
            f"{r['bytes_sent'] / 1e6:>8.1f} {byte_ratio:>8.4f} {goal:>7.3f} "
            f"{'yes' if byte_ratio <= goal + 1e-12 else 'NO':>3} "
            f"{r['step_s']:>10.2f} {r['select_cpu_s'] / r['step_s']:>11.1%} "
            f"{r['exchange_cpu_s'] / r['step_s']:>9.1%} "
            f"{r['exchange_cpu_s'] + r['bytes_sent'] * 8 / (args.link_mbps * 1e6):>7.2f}")
    lines.append("wall s / cpu s: one exchange (Top-k, error feedback, allgather, sum) in wall "
                 "and process CPU seconds; select cpu s: Top-k selection alone; step cpu s: one "
                 f"forward + backward at batch {STEP_BATCH} on 3x32x32, 1 thread, measured in "
                 "this run; select/step and exch/step: select cpu s and cpu s against it; "
                 "@link s: "
                 f"cpu s + MB sent over a {args.link_mbps:g} Mbit/s edge link (estimate)")
    return "\n".join(lines)


def launch(args: argparse.Namespace) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(args.world_size), LOCAL_WORLD_SIZE=str(args.world_size))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, *sys.argv],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE if r else None, text=True)
             for r in range(args.world_size)]
    codes = [p.wait() for p in procs]
    return max(codes)


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        run_rank(arguments)
    else:
        sys.exit(launch(arguments))
