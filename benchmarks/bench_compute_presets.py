"""The shape of the paper's compute presets: real ResNet152 / VGG19-bn step time against batch.

Claim checked: a training step's time is close to linear in the batch, t(b) = A + B x b, and
the presets ``--compute-model paper-resnet152`` / ``paper-vgg19`` (``scadles/clock.py``) have
the shape A : B measured here, scaled so that batch 64 takes the paper's 1.2 s / 1.6 s
(Table II, K80 GPUs).

For each model (built by ``scadles.models`` as the runs build it: CIFAR-style, 3x32x32 inputs,
10 classes for ResNet152 and 100 for VGG19 as in the paper) and each batch in ``--batches``:
one untimed step, then the median of ``--repeats`` timed steps (forward, backward, SGD step)
on all of this machine's cores (or ``--threads``). A line through the points (least squares
on the relative error, A >= 0) gives A and B; the table shows measured and fitted time side by side, the fit's relative
error, A : B as "A is worth A / B samples", the line scaled to the paper's batch-64 time, and
the constants the presets hold now, so a drift between the two shows.

    python benchmarks/bench_compute_presets.py [--models resnet152,vgg19] [--batches 8,16,...]
        [--repeats 3] [--json docs/results/compute_fit.json]

On a GPU (``--device cuda``) it times the same steps there, synchronizing after each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from scadles.clock import PAPER_COMPUTE  # noqa: E402
from scadles.models import build_model  # noqa: E402

CLASSES = {"resnet152": 10, "vgg19": 100}  # the paper: CIFAR-10 / CIFAR-100


def step_seconds(model, batch: int, classes: int, repeats: int, device: torch.device) -> float:
    """Median wall seconds of a forward + backward + SGD step at ``batch`` (after one warm-up)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms caches and allocators
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def fit_line(batches: list[int], seconds: list[float]) -> tuple[float, float]:
    """A >= 0 and B of seconds = A + B x batch, least squares on the relative error (the
    times span two orders of magnitude; plain least squares would fit the largest batch
    only). A negative intercept (a time growing faster than the batch) is set to 0."""
    b = np.asarray(batches, float)
    t = np.asarray(seconds, float)
    (a, slope), *_ = np.linalg.lstsq(np.stack([1 / t, b / t], axis=1), np.ones_like(t),
                                     rcond=None)
    if a < 0:
        a, slope = 0.0, float(np.sum(b / t) / np.sum((b / t) ** 2))
    return float(a), float(slope)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet152,vgg19")
    p.add_argument("--batches", default="8,16,32,64,128,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the fit here")
    args = p.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"step time against batch, {where}, torch {torch.__version__}, median of "
          f"{args.repeats}, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results = {}
    for name in args.models.split(","):
        model = build_model(name, CLASSES[name], 3, 32, seed=0).to(device)
        params = sum(p.numel() for p in model.parameters())
        seconds = []
        for b in batches:
            seconds.append(step_seconds(model, b, CLASSES[name], args.repeats, device))
            print(f"  {name} batch {b}: {seconds[-1]:.3f} s", flush=True)
        a, b_per = fit_line(batches, seconds)
        preset = PAPER_COMPUTE[name]
        scale = preset["batch64_s"] / (a + 64 * b_per)
        results[name] = {"params": params, "batches": batches, "seconds": seconds,
                         "A_s": a, "B_s": b_per, "A_in_samples": a / b_per,
                         "scaled_A_s": a * scale, "scaled_B_s": b_per * scale,
                         "preset": preset}
        del model

    print()
    print("| model | batch | measured (s) | fit A + B x b (s) | fit error |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        for b, t in zip(r["batches"], r["seconds"]):
            fit = r["A_s"] + r["B_s"] * b
            print(f"| {name} | {b} | {t:.3f} | {fit:.3f} | {100 * (fit - t) / t:+.1f}% |")
    print()
    print("| model | params (CIFAR variant) | A (s) | B (s/sample) | A / B (samples) | "
          "scaled to batch 64 = paper | preset now | preset A / B |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for name, r in results.items():
        pr = r["preset"]
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['A_s']:.4f} | {r['B_s']:.5f} | "
              f"{r['A_in_samples']:.1f} | {r['scaled_A_s']:.3f} + {r['scaled_B_s']:.5f} x b "
              f"(64: {pr['batch64_s']} s) | {pr['A_s']:.3f} + {pr['B_s']:.5f} x b | "
              f"{pr['A_s'] / pr['B_s']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"device": where, "torch": torch.__version__, "repeats": args.repeats,
               "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "models": results}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nfit written to {args.json}")


if __name__ == "__main__":
    main()
