"""Clocks (wall and virtual) and compute-time models.

Every time value is in seconds. ``now()`` is on the same axis as record event times: epoch
seconds for wall-clock runs, ``VIRTUAL_EPOCH_S + stream seconds`` for virtual runs, so a
buffer can compare ``event_time_s <= clock.now()`` directly.
"""
from __future__ import annotations

import time

from streamsim.record import VIRTUAL_EPOCH_S


class WallClock:
    """Real time. Waiting means sleeping; ``advance`` is a no-op (time passes by itself)."""

    is_virtual = False

    def now(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        pass

    def advance_to(self, t_s: float) -> None:
        """Sleep until ``t_s`` (no-op if it has passed)."""
        delay = t_s - time.time()
        if delay > 0:
            time.sleep(delay)

    def stream_seconds(self, start_s: float) -> float:
        return self.now() - start_s


class VirtualClock:
    """Simulated stream time: moves only when told to, so runs are deterministic."""

    is_virtual = True

    def __init__(self, start_s: float = VIRTUAL_EPOCH_S):
        self._now_s = float(start_s)
        self.start_s = float(start_s)

    def now(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds} s")
        self._now_s += seconds

    def advance_to(self, t_s: float) -> None:
        """Move to ``t_s`` if it is later than now (never backwards)."""
        self._now_s = max(self._now_s, float(t_s))

    def stream_seconds(self, start_s: float | None = None) -> float:
        return self._now_s - (self.start_s if start_s is None else start_s)


class ComputeModel:
    """Seconds a training step takes: measured, or modelled for deterministic virtual runs.

    Specs: ``measured``; ``fixed:SEC``; ``linear:A,B`` (A + B x batch); per device
    heterogeneous hardware with ``;`` between devices, e.g. ``linear:0.1,0.01;0.2,0.02``
    (device r uses entry r modulo the number of entries).
    """

    def __init__(self, spec: str = "measured"):
        self.spec = spec
        kind, _, rest = spec.partition(":")
        if kind == "measured" and not rest:
            self.kind, self.params = "measured", []
            return
        if kind not in ("fixed", "linear") or not rest:
            raise ValueError(f"compute model {spec!r}: use measured, fixed:SEC or linear:A,B "
                             "(';' between devices for per-device values)")
        params = []
        for entry in rest.split(";"):
            try:
                values = [float(v) for v in entry.split(",")]
            except ValueError:
                raise ValueError(f"compute model {spec!r}: {entry!r} is not a number list")
            if len(values) != (1 if kind == "fixed" else 2) or min(values) < 0:
                raise ValueError(f"compute model {spec!r}: {kind} takes "
                                 f"{'SEC' if kind == 'fixed' else 'A,B'} >= 0 per device")
            params.append(values)
        self.kind, self.params = kind, params

    @property
    def deterministic(self) -> bool:
        return self.kind != "measured"

    def seconds(self, measured_s: float, batch_size: int, rank: int) -> float:
        if self.kind == "measured":
            return measured_s
        values = self.params[rank % len(self.params)]
        if self.kind == "fixed":
            return values[0]
        return values[0] + values[1] * batch_size


class CommModel:
    """Seconds a step's gradient exchange takes on the virtual clock.

    Specs: ``measured``; ``fixed:SEC``; ``link:MBIT_PER_S[,LATENCY_S]`` (latency + bytes this
    rank sent x 8 / bandwidth: an edge uplink); ``auto``: measured when the compute time is
    measured, 0 when it is modelled (a modelled compute time then covers the whole step, so a
    virtual run is deterministic for its seed).
    """

    def __init__(self, spec: str = "auto"):
        self.spec = spec
        kind, _, rest = spec.partition(":")
        if kind in ("auto", "measured") and not rest:
            self.kind, self.params = kind, []
            return
        try:
            values = [float(v) for v in rest.split(",")] if rest else []
        except ValueError:
            values = []
        ok = (kind == "fixed" and len(values) == 1) or (kind == "link" and len(values) in (1, 2))
        if not ok or min(values) < 0 or (kind == "link" and values[0] <= 0):
            raise ValueError(f"comm model {spec!r}: use auto, measured, fixed:SEC or "
                             "link:MBIT_PER_S[,LATENCY_S] (bandwidth > 0, latency >= 0)")
        self.kind, self.params = kind, values

    def for_compute(self, compute: ComputeModel) -> "CommModel":
        """``auto`` made concrete for a compute model."""
        if self.kind != "auto":
            return self
        return CommModel("measured" if compute.kind == "measured" else "fixed:0")

    def seconds(self, measured_s: float, bytes_sent: int) -> float:
        if self.kind in ("measured", "auto"):
            return measured_s
        if self.kind == "fixed":
            return self.params[0]
        latency_s = self.params[1] if len(self.params) > 1 else 0.0
        return latency_s + bytes_sent * 8 / (self.params[0] * 1e6)
