"""What one rank's gradient exchange has done: running counters, and the run's summary.

``ExchangeStats`` counts every step (``record``) and travels in checkpoints
(``state_dict`` / ``load_state_dict``, so a resumed run's summary counts the whole run).
``ExchangeSummary`` is what both exchangers' ``summary()`` returns: the training loop reads
its fields for the run summary, and ``to_dict()`` is run.json's ``exchanger`` entry.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from scadles.exchange.settings import ExchangeSettings


@dataclass(frozen=True)
class ExchangeSummary:
    """One rank's exchange over the whole run.

    ``cnc_ratio``: compressed-to-dense steps (None while no step has been dense; 0.0 for
    the dense exchanger). ``signal_min`` / ``signal_max``: the range of this rank's finite
    compression signal. ``hint``: one line when adaptive mode never took one of its two
    paths. ``compresses`` False (the dense exchanger): run.json's entry has no signal range
    and no hint.
    """

    steps: int
    compressed_steps: int
    dense_steps: int
    cnc_ratio: float | None
    switches: int
    bytes_sent_total: int
    floats_sent_total: int
    compress_s_total: float
    signal_min: float | None = None
    signal_max: float | None = None
    hint: str | None = None
    compresses: bool = True

    def to_dict(self) -> dict:
        """run.json's ``exchanger`` entry."""
        entry = asdict(self)
        del entry["compresses"]
        if not self.compresses:
            for key in ("signal_min", "signal_max", "hint"):
                del entry[key]
        return entry


@dataclass
class ExchangeStats:
    """Running counters of one rank's exchange (the settings are ``ExchangeSettings``)."""

    steps: int = 0
    compressed_steps: int = 0
    dense_steps: int = 0
    switches: int = 0                       # steps whose choice differs from the previous one
    bytes_sent_total: int = 0               # this rank's payloads (see ``exchange`` stats)
    floats_sent_total: int = 0
    compress_s_total: float = 0.0           # wall seconds outside the collectives
    last_compressed: bool | None = None     # the previous step's choice; None before any
    signal_min: float | None = None         # this rank's signal, finite values only
    signal_max: float | None = None

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

    def summary(self, settings: ExchangeSettings | None = None) -> ExchangeSummary:
        """The run's summary under ``settings`` (None: the dense exchanger, whose every step
        is dense; its counts come from ``steps`` alone, as older checkpoints kept no more)."""
        if settings is None or not settings.compresses:
            return ExchangeSummary(steps=self.steps, compressed_steps=0, dense_steps=self.steps,
                                   cnc_ratio=0.0, switches=0,
                                   bytes_sent_total=self.bytes_sent_total,
                                   floats_sent_total=self.floats_sent_total,
                                   compress_s_total=0.0, compresses=False)
        return ExchangeSummary(
            steps=self.steps, compressed_steps=self.compressed_steps,
            dense_steps=self.dense_steps,
            cnc_ratio=self.compressed_steps / self.dense_steps if self.dense_steps else None,
            switches=self.switches, bytes_sent_total=self.bytes_sent_total,
            floats_sent_total=self.floats_sent_total, compress_s_total=self.compress_s_total,
            signal_min=self.signal_min, signal_max=self.signal_max, hint=self.hint(settings))

    def hint(self, settings: ExchangeSettings) -> str | None:
        """One line for the run summary when adaptive mode never took one of its two paths
        on a threshold signal: the range the signal covered, and what to change."""
        if (settings.compression != "adaptive" or settings.adaptive_signal == "gradnorm-change"
                or not self.steps or self.signal_min is None):
            return None
        seen = (f"rank 0's {settings.adaptive_signal} signal ranged {self.signal_min:.3g} to "
                f"{self.signal_max:.3g} against --delta-threshold {settings.delta_threshold:g}")
        if not self.compressed_steps:
            return (f"adaptive compression never compressed: {seen}; to compress outside "
                    "critical regions raise --delta-threshold or --compression-ratio")
        if not self.dense_steps:
            return (f"adaptive compression never sent dense gradients: {seen}; to send dense "
                    "ones in critical regions lower --delta-threshold")
        return None

    def state_dict(self) -> dict:
        """Every counter, for a checkpoint."""
        return asdict(self)

    def load_state_dict(self, counters: dict) -> None:
        """The counters of a checkpoint; one it lacks (an older version's) starts at its
        default."""
        for f in fields(self):
            setattr(self, f.name, counters.get(f.name, f.default))
