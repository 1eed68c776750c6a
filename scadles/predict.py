"""Closed-form predictions of a run's pace: step time, global batch, and ScaDLES's speedup.

Steady state of the virtual clock's rules (``train.py``, ``buffer.py``) for constant stream
rates r_i, written out so that a result can be predicted before it is run:

- ddp: a step starts when the slowest stream has delivered ``train_bsz`` samples, and lasts
  at least the compute and the exchange: T = max(train_bsz / r_min, c(train_bsz) + x);
  B = W x train_bsz.
- scadles: device i is ready after the window (or, with ``step_when_full``, once its buffer
  holds b_max), and not before it holds b_min: ready_i = max(b_min / r_i, window or
  min(window, b_max / r_i)). The group's step lasts T = max(max_i ready_i,
  max_i c(b_i) + x). A device trains what arrived since its last step, capped at b_max:
  b_i = clip(r_i x T, b_min, b_max) under persistence (a backlog carries over), and
  clip(r_i x min(T, window), b_min, b_max) under truncation (only the current window is
  kept). T and b_i depend on each other; iterating from T = window converges (both grow
  monotonically and b_i is bounded).

c(b) is the compute model's step time of the slowest device, x the exchange time of the comm
model (dense allreduce, or the compressed payload's allgather).

A speedup needs how many steps each mode takes to the target, which the pace alone does not
give. Two bounds bracket it:
- *step-bound*: both modes need the same number of steps (large batches beyond the point
  where a bigger batch still helps): speedup = T_ddp / T_scadles;
- *sample-bound*: both need the same number of samples (a bigger batch with a linearly
  scaled lr is worth its size): speedup = (B_s / T_s) / (B_ddp / T_ddp).
A measured speedup outside [min, max] of the two says the model misses something.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from scadles.clock import CommModel, ComputeModel

_ITERATIONS = 200


@dataclass(frozen=True)
class Pace:
    """A mode's steady state: step seconds, global batch, samples per stream second."""

    step_s: float
    global_bsz: float
    local_bsz: tuple[float, ...]

    @property
    def samples_per_s(self) -> float:
        return self.global_bsz / self.step_s


def exchange_seconds(comm: CommModel, world_size: int, compressed: bool = False,
                     payload_share: float = 1.0, dense_bytes: int = 1 << 20) -> float:
    """The modelled seconds of one exchange (``payload_share``: a compressed payload's bytes
    over the dense gradient's, e.g. 2 x ratio for Top-k values + indices)."""
    if comm.kind in ("auto", "measured"):
        return 0.0
    sent = dense_bytes * (payload_share if compressed else 1.0)
    return comm.seconds(0.0, sent, compressed=compressed, dense_bytes=dense_bytes,
                        world_size=world_size)


def ddp_pace(rates: Sequence[float], train_bsz: int, compute: Callable[[float], float],
             exchange_s: float) -> Pace:
    """Conventional synchronous SGD: every device waits for ``train_bsz`` samples."""
    step_s = max(train_bsz / min(rates), compute(train_bsz) + exchange_s)
    return Pace(step_s, float(train_bsz * len(rates)), tuple(float(train_bsz) for _ in rates))


def scadles_pace(rates: Sequence[float], b_min: int, b_max: int, window_s: float,
                 compute: Callable[[float], float], exchange_s: float,
                 policy: str = "persistence", step_when_full: bool = False) -> Pace:
    """ScaDLES's steady state (see the module docstring)."""
    if policy not in ("persistence", "truncation"):
        raise ValueError(f"unknown policy {policy!r}")
    ready_s = max(max(b_min / r for r in rates),
                  max((min(window_s, b_max / r) if step_when_full else window_s)
                      for r in rates))
    step_s = ready_s
    local: list[float] = []
    for _ in range(_ITERATIONS):
        span_s = step_s if policy == "persistence" else min(step_s, window_s)
        local = [min(float(b_max), max(float(b_min), r * span_s)) for r in rates]
        new_step_s = max(ready_s, max(compute(b) for b in local) + exchange_s)
        if abs(new_step_s - step_s) <= 1e-12 * max(1.0, step_s):
            step_s = new_step_s
            break
        step_s = new_step_s
    return Pace(step_s, float(sum(local)), tuple(local))


@dataclass(frozen=True)
class Prediction:
    ddp: Pace
    scadles: Pace

    @property
    def step_bound(self) -> float:
        return self.ddp.step_s / self.scadles.step_s

    @property
    def sample_bound(self) -> float:
        return self.scadles.samples_per_s / self.ddp.samples_per_s

    @property
    def low(self) -> float:
        return min(self.step_bound, self.sample_bound)

    @property
    def high(self) -> float:
        return max(self.step_bound, self.sample_bound)


def predict(rates: Sequence[float], *, compute_model: str, comm_model: str = "auto",
            b_min: int = 8, b_max: int = 64, window_s: float = 1.0, train_bsz: int = 64,
            policy: str = "persistence", compression_ratio: float | None = None,
            step_when_full: bool = False, dense_bytes: int = 1 << 20) -> Prediction:
    """ScaDLES (``policy``, compressed exchanges at ``compression_ratio`` if given) against
    ddp (dense, persistence) on the same streams and time model. ``dense_bytes``: the
    trained model's gradient bytes (only used when no paper preset names the model's size)."""
    compute = ComputeModel(compute_model)
    comm = CommModel(comm_model).for_compute(compute)
    world = len(rates)

    def slowest_compute(b: float) -> float:
        return max(compute.seconds(0.0, b, r) for r in range(world))

    dense_x = exchange_seconds(comm, world, dense_bytes=dense_bytes)
    scadles_x = dense_x if compression_ratio is None else exchange_seconds(
        comm, world, compressed=True, payload_share=2 * compression_ratio,
        dense_bytes=dense_bytes)
    return Prediction(
        ddp=ddp_pace(rates, train_bsz, slowest_compute, dense_x),
        scadles=scadles_pace(rates, b_min, b_max, window_s, slowest_compute, scadles_x,
                             policy, step_when_full))


def main(argv: list[str] | None = None) -> int:
    """``python -m scadles.predict``: the predicted pace of one configuration's streams."""
    import argparse
    import json

    from streamsim import logsetup
    from streamsim.cli import DefaultsHelpFormatter
    from streamsim.schedule import parse_rates

    logsetup.configure("predict")

    p = argparse.ArgumentParser(prog="python -m scadles.predict", description=(
        "Predicted step time, global batch and speedup bounds of ScaDLES against ddp "
        "(closed form, constant rates)."), formatter_class=DefaultsHelpFormatter)
    p.add_argument("--rates", required=True, help="as the launcher takes them (S10, 10,20,..)")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of sampled rates (S10, normal:..)")
    p.add_argument("--compute-model", required=True)
    p.add_argument("--comm-model", default="auto",
                   help="sync seconds per step, as the launcher takes it")
    p.add_argument("--min-train-bsz", type=int, default=8, help="scadles: b_min")
    p.add_argument("--max-train-bsz", type=int, default=64, help="scadles: b_max")
    p.add_argument("--window-s", type=float, default=1.0,
                   help="scadles: stream seconds between steps")
    p.add_argument("--train-bsz", type=int, default=64, help="ddp: fixed batch per device")
    p.add_argument("--policy", default="persistence", choices=["persistence", "truncation"],
                   help="scadles: buffer policy")
    p.add_argument("--compression-ratio", type=float, default=None,
                   help="ScaDLES's exchanges compressed at this Top-k ratio")
    p.add_argument("--step-when-full", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object")
    args = p.parse_args(argv)
    try:
        rates = parse_rates(args.rates, args.world_size, args.seed)
        pred = predict(rates, compute_model=args.compute_model, comm_model=args.comm_model,
                       b_min=args.min_train_bsz, b_max=args.max_train_bsz,
                       window_s=args.window_s, train_bsz=args.train_bsz, policy=args.policy,
                       compression_ratio=args.compression_ratio,
                       step_when_full=args.step_when_full)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc = {"slowest_rate": min(rates),
           "ddp": {"step_s": pred.ddp.step_s, "global_bsz": pred.ddp.global_bsz},
           "scadles": {"step_s": pred.scadles.step_s, "global_bsz": pred.scadles.global_bsz},
           "step_bound": pred.step_bound, "sample_bound": pred.sample_bound}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"slowest stream {min(rates):.1f} samples/s; ddp: {pred.ddp.step_s:.2f} s a "
              f"step, B {pred.ddp.global_bsz:.0f}; scadles: {pred.scadles.step_s:.2f} s a step, "
              f"B {pred.scadles.global_bsz:.0f}; speedup {pred.low:.2f}x to {pred.high:.2f}x "
              f"(step-bound {pred.step_bound:.2f}x, sample-bound {pred.sample_bound:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
