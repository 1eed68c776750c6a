"""When to compress: per-rank signals, per-rank votes, one group decision.

Every step each rank computes a compression signal and votes to compress when the signal is
at most its threshold; one small allreduce counts the votes and ``decide`` turns the count
into the same choice on every rank. Everything here except the trackers' running state is a
pure function of numbers, so the rules are unit-tested on their own (as Accordion's
``auto_scale.py`` is).

Signals (``--adaptive-signal``); ``paper`` and ``orig`` are measured on this rank's tensor
handed to Top-k (the weighted gradient plus the error-feedback residual), ``gradnorm-change``
on this rank's own local gradient, before weighting:

- ``paper`` (default): EWMA of |‖g‖² − ‖Topk(g)‖²| / ‖g‖², the fraction of the gradient's
  energy Top-k would drop; s_t = alpha x value_t + (1 − alpha) x s_{t−1}, s_1 = value_1
  (``--ewma-alpha``; 1.0 means no smoothing). Vote threshold ``--delta-threshold``.
- ``orig``: as the original code computed it: the mean, since the start of the current
  epoch, of |Σ_l ‖g_l‖ − Σ_l ‖C(g_l)‖| / Σ_l ‖g_l‖ (per-layer norms summed).
  Vote threshold ``--delta-threshold``.
- ``gradnorm-change``: Accordion's critical-regime test on the local (unweighted) gradient
  norm: the mean norm over each interval of ``--gradnorm-interval-steps`` steps is compared
  with the previous interval's; the relative change |prev − cur| / prev is the signal from
  the step that completes an interval until the next interval completes. A change above
  ``--gradnorm-threshold`` marks a critical region (dense). Until two intervals are
  complete there is no signal and the rank votes dense, as Accordion treats its first epoch
  as critical. (Accordion compares norms of gradients accumulated over an epoch; the mean
  of per-step norms needs no model-sized accumulator.)

Vote rule: compress when at least half the ranks vote for it (2 x votes >= world size), as
the original did; a tie therefore compresses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


# -- pure functions --------------------------------------------------------------------------

def energy_loss(total_sq: float, kept_sq: float) -> float:
    """|‖g‖² − ‖Topk(g)‖²| / ‖g‖²; 0.0 for a zero gradient (there is nothing to lose)."""
    if total_sq <= 0.0:
        return 0.0
    return abs(total_sq - kept_sq) / total_sq


def summed_norm_loss(layer_norms: Sequence[float], kept_norms: Sequence[float]) -> float:
    """|Σ‖g_l‖ − Σ‖C(g_l)‖| / Σ‖g_l‖ over layers; 0.0 for a zero gradient."""
    total = float(sum(layer_norms))
    if total <= 0.0:
        return 0.0
    return abs(total - float(sum(kept_norms))) / total


def relative_change(previous: float, current: float) -> float:
    """|previous − current| / previous; inf when only ``previous`` is zero (a norm that
    appears from nothing is as critical as it gets), 0.0 when both are."""
    if previous == 0.0:
        return 0.0 if current == 0.0 else math.inf
    return abs(previous - current) / previous


def ewma(previous: float | None, value: float, alpha: float) -> float:
    """One step of an exponentially weighted moving average; ``alpha`` weights ``value``."""
    if previous is None:
        return value
    return alpha * value + (1.0 - alpha) * previous


def vote(signal: float | None, threshold: float) -> bool:
    """This rank's vote: compress when the signal is at most ``threshold``. No signal yet
    (or a NaN) votes dense, the safe choice."""
    return signal is not None and not math.isnan(signal) and signal <= threshold


def decide(votes_to_compress: int, world_size: int) -> bool:
    """The group's choice from the number of ranks voting to compress: compress when at
    least half of them do (ties compress)."""
    if world_size < 1 or not 0 <= votes_to_compress <= world_size:
        raise ValueError(f"{votes_to_compress} votes to compress in a world of {world_size}")
    return 2 * votes_to_compress >= world_size


# -- signals with running state ---------------------------------------------------------------

@dataclass
class StepNorms:
    """What one step tells the signals: per layer, the squared norm of the tensor handed to
    Top-k and of what Top-k keeps (computed for the signals that set ``needs_topk``); and
    the local gradient's norm before weighting (for those that set ``needs_grad_norm``)."""

    layer_sq: Sequence[float]
    kept_sq: Sequence[float]
    grad_norm: float | None = None


class PaperSignal:
    """EWMA of the fraction of gradient energy Top-k drops."""

    name = "paper"
    needs_topk, needs_grad_norm = True, False

    def __init__(self, threshold: float, ewma_alpha: float):
        self.threshold = threshold
        self.ewma_alpha = ewma_alpha
        self.value: float | None = None

    def update(self, norms: StepNorms, epoch: int | None = None) -> float:
        observed = energy_loss(float(sum(norms.layer_sq)), float(sum(norms.kept_sq)))
        self.value = ewma(self.value, observed, self.ewma_alpha)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class OrigSignal:
    """Mean since the start of the epoch of the relative loss in summed per-layer norms."""

    name = "orig"
    needs_topk, needs_grad_norm = True, False

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.epoch: int | None = None
        self.total = 0.0
        self.count = 0

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None

    def update(self, norms: StepNorms, epoch: int | None = None) -> float:
        if epoch != self.epoch:
            self.epoch, self.total, self.count = epoch, 0.0, 0
        self.total += summed_norm_loss([math.sqrt(x) for x in norms.layer_sq],
                                       [math.sqrt(x) for x in norms.kept_sq])
        self.count += 1
        return self.value

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.total, self.count = state["epoch"], state["total"], state["count"]


class GradNormChangeSignal:
    """Accordion: relative change of the mean gradient norm between consecutive intervals."""

    name = "gradnorm-change"
    needs_topk, needs_grad_norm = False, True

    def __init__(self, threshold: float, interval_steps: int):
        self.threshold = threshold
        self.interval_steps = interval_steps
        self.value: float | None = None
        self.previous_mean: float | None = None
        self.norm_sum = 0.0
        self.count = 0

    def update(self, norms: StepNorms, epoch: int | None = None) -> float | None:
        if norms.grad_norm is None:
            raise ValueError("the gradnorm-change signal needs StepNorms.grad_norm")
        self.norm_sum += norms.grad_norm
        self.count += 1
        if self.count == self.interval_steps:
            mean = self.norm_sum / self.count
            if self.previous_mean is not None:
                self.value = relative_change(self.previous_mean, mean)
            self.previous_mean, self.norm_sum, self.count = mean, 0.0, 0
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "previous_mean": self.previous_mean,
                "norm_sum": self.norm_sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.previous_mean = state["value"], state["previous_mean"]
        self.norm_sum, self.count = state["norm_sum"], state["count"]


SIGNALS = {
    "paper": lambda s: PaperSignal(s.delta_threshold, s.ewma_alpha),
    "orig": lambda s: OrigSignal(s.delta_threshold),
    "gradnorm-change": lambda s: GradNormChangeSignal(s.gradnorm_threshold,
                                                      s.gradnorm_interval_steps),
}


def make_signal(settings):
    """The signal tracker named by ``settings.adaptive_signal``, with its threshold."""
    return SIGNALS[settings.adaptive_signal](settings)
