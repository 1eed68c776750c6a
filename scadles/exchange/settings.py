"""What one run's gradient exchange does: the settings, frozen, validated, described once.

``ExchangeSettings`` holds the settings alone (the running counters are ``stats.py``'s). It
is built from the run's configuration (``from_config``) or from keywords, checked on
construction (``ValueError`` naming the bad setting, whatever the mode), logged once at
start (``describe``) and written into every compressed checkpoint (``as_dict``), where a
resume compares it with its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from scadles.compress import COMPRESSORS, compressor_class, takes_ratio
from scadles.compress.adaptive import SIGNALS
from streamsim import plugins

MODES = ("none", "static", "adaptive")


@dataclass(frozen=True)
class ExchangeSettings:
    """Settings of one run's gradient exchange (``none``: the dense weighted allreduce)."""

    # What is sent.
    compression: str = "none"              # none | static | adaptive
    compressor: str = "topk"               # a key of COMPRESSORS or module:Class
    compression_ratio: float = 0.01        # Top-k: fraction kept; ratio= of a plug-in
    error_feedback: bool = True            # carry what Top-k drops into the next step
    # When to compress (adaptive mode).
    adaptive_signal: str = "paper"         # paper | orig | gradnorm-change
    delta_threshold: float = 0.3           # paper/orig: vote to compress when signal <= it
    ewma_alpha: float = 0.1                # paper: weight of the newest value in the EWMA
    gradnorm_threshold: float = 0.5        # gradnorm-change: relative change above it: dense
    gradnorm_interval_steps: int = 10      # gradnorm-change: steps per interval

    def __post_init__(self):
        def bad(setting: str, value, expected: str):
            raise ValueError(f"compression setting {setting}={value!r}: expected {expected}")

        if self.compression not in MODES:
            bad("compression", self.compression, " | ".join(MODES))
        if not isinstance(self.compressor, str) or not (
                self.compressor in COMPRESSORS or plugins.is_import_path(self.compressor)):
            bad("compressor", self.compressor, " | ".join(COMPRESSORS) + " | module:Class")
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

    @classmethod
    def from_config(cls, cfg) -> ExchangeSettings:
        """The settings of a run's ``Config`` (``--compression`` and the flags after it)."""
        return cls(compression=cfg.compression, compressor=cfg.compressor,
                   compression_ratio=cfg.compression_ratio, error_feedback=cfg.error_feedback,
                   adaptive_signal=cfg.adaptive_signal, delta_threshold=cfg.delta_threshold,
                   ewma_alpha=cfg.ewma_alpha, gradnorm_threshold=cfg.gradnorm_threshold,
                   gradnorm_interval_steps=cfg.gradnorm_interval)

    @property
    def compresses(self) -> bool:
        """Whether any step may be compressed (static or adaptive mode)."""
        return self.compression != "none"

    def as_dict(self) -> dict:
        """The settings (JSON-able), as a compressed checkpoint records them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """One line for the start-of-run log."""
        if self.compression == "none":
            return "gradient compression: none (dense weighted allreduce)"
        name = "top-k" if self.compressor == "topk" else self.compressor
        ratio = (f", ratio {self.compression_ratio:g}"
                 if takes_ratio(compressor_class(self.compressor)) else "")
        text = (f"gradient compression: {self.compression} {name}{ratio}, error feedback "
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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
