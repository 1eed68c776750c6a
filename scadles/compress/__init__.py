"""Gradient compression: Top-k sparsification with error feedback, static or adaptive.

The training loop calls ``make_exchanger(comm, compression=...)`` once and then, after every
backward, ``exchanger.exchange(named_params, weight, step, epoch=...)``:

- ``none``: ``aggregate.DenseExchanger``, the weighted sum-allreduce;
- ``static``: Top-k every step (``exchange.SparseExchanger``);
- ``adaptive``: Top-k or dense, chosen each step by a vote of all ranks on a compression
  signal (``adaptive.py``).

One algorithm per file: ``identity.py`` and ``topk.py`` (compressors: ``compress(tensor,
name) -> (payload, ctx)``, ``decompress(payload, ctx) -> tensor``), ``memory.py`` (error
feedback), ``adaptive.py`` (signals and the vote), ``exchange.py`` (the exchange itself).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Callable

from scadles.compress.adaptive import SIGNALS
from scadles.compress.identity import IdentityCompressor
from scadles.compress.topk import TopKCompressor

log = logging.getLogger(__name__)

MODES = ("none", "static", "adaptive")

COMPRESSORS: dict[str, Callable[..., object]] = {
    "identity": lambda state: IdentityCompressor(),
    "topk": lambda state: TopKCompressor(state.compression_ratio),
}


@dataclass
class CompressionState:
    """Settings of one run's gradient compression and its running counters.

    Validated on construction (``ValueError`` naming the bad setting); ``describe()`` is
    logged once at start; ``stats()`` is the run summary.
    """

    # What is sent.
    compression: str = "static"            # none | static | adaptive
    compression_ratio: float = 0.01        # fraction of each layer's elements Top-k keeps
    error_feedback: bool = True            # carry what Top-k drops into the next step
    # When to compress (adaptive mode).
    adaptive_signal: str = "paper"         # paper | orig | gradnorm-change
    delta_threshold: float = 0.3           # paper/orig: vote to compress when signal <= it
    ewma_alpha: float = 0.1                # paper: weight of the newest value in the EWMA
    gradnorm_threshold: float = 0.5        # gradnorm-change: relative change above it: dense
    gradnorm_interval_steps: int = 10      # gradnorm-change: steps per interval

    # Running counters (not settings).
    steps: int = field(default=0, init=False)
    compressed_steps: int = field(default=0, init=False)
    dense_steps: int = field(default=0, init=False)
    switches: int = field(default=0, init=False)
    bytes_sent_total: int = field(default=0, init=False)
    floats_sent_total: int = field(default=0, init=False)
    compress_s_total: float = field(default=0.0, init=False)
    last_compressed: bool | None = field(default=None, init=False)
    signal_min: float | None = field(default=None, init=False)  # this rank's, finite ones
    signal_max: float | None = field(default=None, init=False)

    def __post_init__(self):
        def bad(setting: str, value, expected: str):
            raise ValueError(f"compression setting {setting}={value!r}: expected {expected}")

        if self.compression not in MODES:
            bad("compression", self.compression, " | ".join(MODES))
        if not _is_number(self.compression_ratio) or not 0.0 < self.compression_ratio <= 1.0:
            bad("compression_ratio", self.compression_ratio, "a fraction in (0, 1]")
        if not isinstance(self.error_feedback, bool):
            bad("error_feedback", self.error_feedback, "True or False")
        if self.adaptive_signal not in SIGNALS:
            bad("adaptive_signal", self.adaptive_signal, " | ".join(SIGNALS))
        if not _is_number(self.delta_threshold) or self.delta_threshold < 0:
            bad("delta_threshold", self.delta_threshold, "a number >= 0")
        if not _is_number(self.ewma_alpha) or not 0.0 < self.ewma_alpha <= 1.0:
            bad("ewma_alpha", self.ewma_alpha, "a number in (0, 1]")
        if not _is_number(self.gradnorm_threshold) or self.gradnorm_threshold < 0:
            bad("gradnorm_threshold", self.gradnorm_threshold, "a number >= 0")
        if (isinstance(self.gradnorm_interval_steps, bool)
                or not isinstance(self.gradnorm_interval_steps, int)
                or self.gradnorm_interval_steps < 1):
            bad("gradnorm_interval_steps", self.gradnorm_interval_steps, "an integer >= 1")

    def settings(self) -> dict:
        """The settings alone (JSON-able), as they go into run.json."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def describe(self) -> str:
        """One line for the start-of-run log."""
        if self.compression == "none":
            return "gradient compression: none (dense weighted allreduce)"
        text = (f"gradient compression: {self.compression} top-k, ratio "
                f"{self.compression_ratio:g}, error feedback "
                f"{'on' if self.error_feedback else 'off'}")
        if self.compression == "adaptive":
            if self.adaptive_signal == "gradnorm-change":
                text += (f"; signal gradnorm-change, dense when the mean gradient norm changes "
                         f"by more than {self.gradnorm_threshold:g} between intervals of "
                         f"{self.gradnorm_interval_steps} steps")
            else:
                text += (f"; signal {self.adaptive_signal}"
                         + (f" (EWMA alpha {self.ewma_alpha:g})"
                            if self.adaptive_signal == "paper" else "")
                         + f", a rank votes to compress when it is <= {self.delta_threshold:g}")
            text += "; compress when at least half the ranks vote for it (ties compress)"
        return text

    def record(self, compressed: bool, bytes_sent: int, floats_sent: int,
               compress_s: float, signal: float | None = None) -> bool:
        """Count one step (``signal``: this rank's, when it has one); returns whether the
        choice differs from the previous step's."""
        if signal is not None and math.isfinite(signal):
            self.signal_min = signal if self.signal_min is None else min(self.signal_min, signal)
            self.signal_max = signal if self.signal_max is None else max(self.signal_max, signal)
        switched = self.last_compressed is not None and compressed != self.last_compressed
        self.steps += 1
        self.compressed_steps += int(compressed)
        self.dense_steps += int(not compressed)
        self.switches += int(switched)
        self.bytes_sent_total += bytes_sent
        self.floats_sent_total += floats_sent
        self.compress_s_total += compress_s
        self.last_compressed = compressed
        return switched

    def stats(self) -> dict:
        """Cumulative statistics: bytes, step counts and the CNC ratio (compressed-to-dense
        steps; None while no step has been dense)."""
        return {"steps": self.steps, "compressed_steps": self.compressed_steps,
                "dense_steps": self.dense_steps,
                "cnc_ratio": (self.compressed_steps / self.dense_steps
                              if self.dense_steps else None),
                "switches": self.switches, "bytes_sent_total": self.bytes_sent_total,
                "floats_sent_total": self.floats_sent_total,
                "compress_s_total": self.compress_s_total,
                "signal_min": self.signal_min, "signal_max": self.signal_max,
                "hint": self.hint()}

    def hint(self) -> str | None:
        """One line for the run summary when adaptive mode never took one of its two paths
        on a threshold signal: the range the signal covered, and what to change."""
        if (self.compression != "adaptive" or self.adaptive_signal == "gradnorm-change"
                or not self.steps or self.signal_min is None):
            return None
        seen = (f"rank 0's {self.adaptive_signal} signal ranged {self.signal_min:.3g} to "
                f"{self.signal_max:.3g} against --delta-threshold {self.delta_threshold:g}")
        if not self.compressed_steps:
            return (f"adaptive compression never compressed: {seen}; to compress outside "
                    "critical regions raise --delta-threshold or --compression-ratio")
        if not self.dense_steps:
            return (f"adaptive compression never sent dense gradients: {seen}; to send dense "
                    "ones in critical regions lower --delta-threshold")
        return None

    def counters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.init}

    def load_counters(self, counters: dict) -> None:
        for name, value in counters.items():
            setattr(self, name, value)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_exchanger(comm, compression: str = "none", compression_ratio: float = 0.01,
                   error_feedback: bool = True, delta_threshold: float = 0.3,
                   adaptive_signal: str = "paper", ewma_alpha: float = 0.1,
                   gradnorm_threshold: float = 0.5, gradnorm_interval_steps: int = 10,
                   bucket_cap_mb: float = 25.0):
    """The gradient exchanger for ``compression`` (``none`` | ``static`` | ``adaptive``).

    All settings are validated whatever the mode, and logged once (rank 0).
    """
    state = CompressionState(compression=compression, compression_ratio=compression_ratio,
                             error_feedback=error_feedback, adaptive_signal=adaptive_signal,
                             delta_threshold=delta_threshold, ewma_alpha=ewma_alpha,
                             gradnorm_threshold=gradnorm_threshold,
                             gradnorm_interval_steps=gradnorm_interval_steps)
    if comm.rank == 0:
        log.info(state.describe())
    if compression == "none":
        from scadles.aggregate import DenseExchanger

        return DenseExchanger(comm, bucket_cap_mb=bucket_cap_mb)
    from scadles.compress.exchange import SparseExchanger

    return SparseExchanger(comm, state, bucket_cap_mb=bucket_cap_mb)


__all__ = ["COMPRESSORS", "MODES", "CompressionState", "make_exchanger"]
