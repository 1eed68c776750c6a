"""Clocks (wall and virtual) and compute-time models.

Every time value is in seconds. ``now()`` is on the same axis as record event times: epoch
seconds for wall-clock runs, ``VIRTUAL_EPOCH_S + stream seconds`` for virtual runs, so a
buffer can compare ``event_time_s <= clock.now()`` directly.
"""
from __future__ import annotations

import math
import time

from streamsim.record import VIRTUAL_EPOCH_S

# The paper's testbed (Table II): K80 GPUs on 5 Gbit/s Ethernet; one step at batch 64 takes
# 1.2 s for ResNet152 (60.2M parameters) and 1.6 s for VGG19 (143.7M). A preset is a line
# t = A + B x batch through the paper's batch-64 time whose shape, A / B in samples, is the
# real torchvision model's on this CPU (benchmarks/bench_compute_presets.py over batches
# 8..256, docs/results/compute_fit.json): VGG19-bn 0.053 + 0.0082 x b s, so A / B = 6.5;
# ResNet152 grows faster than its batch on this CPU (memory-bound beyond 64), so its
# intercept fits as 0: a step time proportional to the batch.
def _paper_preset(label: str, params: float, batch64_s: float, a_in_samples: float) -> dict:
    b_s = batch64_s / (64 + a_in_samples)
    return dict(label=label, params=params, batch64_s=batch64_s, hardware="K80",
                a_in_samples=a_in_samples, A_s=a_in_samples * b_s, B_s=b_s)


PAPER_COMPUTE = {
    "resnet152": _paper_preset("ResNet152", 60.2e6, 1.2, a_in_samples=0.0),
    "vgg19": _paper_preset("VGG19", 143.7e6, 1.6, a_in_samples=6.5),
}
# The paper's network: 5 Gbit/s Ethernet. The per-message latency is ours (a switched LAN,
# TCP): the paper does not give one.
PAPER_ETHERNET = dict(gbit_per_s=5.0, latency_s=1e-4)
FLOAT_BYTES = 4


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
    (device r uses entry r modulo the number of entries); ``paper-resnet152`` and
    ``paper-vgg19``: the paper's K80 step times as ``linear`` (see ``PAPER_COMPUTE``), which
    also name the model whose size a ``paper-ethernet`` comm model charges.
    """

    def __init__(self, spec: str = "measured"):
        self.spec = spec
        self.preset: str | None = None  # the paper model a preset stands for
        if spec.startswith("paper-"):
            name = spec[len("paper-"):]
            if name not in PAPER_COMPUTE:
                raise ValueError(f"compute model {spec!r}: the paper presets are "
                                 + ", ".join(f"paper-{m}" for m in PAPER_COMPUTE))
            self.preset = name
            self.kind = "linear"
            self.params = [[PAPER_COMPUTE[name]["A_s"], PAPER_COMPUTE[name]["B_s"]]]
            return
        kind, _, rest = spec.partition(":")
        if kind == "measured" and not rest:
            self.kind, self.params = "measured", []
            return
        if kind not in ("fixed", "linear") or not rest:
            raise ValueError(f"compute model {spec!r}: use measured, fixed:SEC, linear:A,B "
                             "(';' between devices for per-device values), paper-resnet152 "
                             "or paper-vgg19")
        params = []
        for entry in rest.split(";"):
            try:
                values = [float(v) for v in entry.split(",")]
            except ValueError:
                raise ValueError(f"compute model {spec!r}: {entry!r} is not a number list")
            if len(values) != (1 if kind == "fixed" else 2) or not all(
                    math.isfinite(v) and v >= 0 for v in values):
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

    def describe(self) -> dict:
        """What run.json records: the spec, the resolved constants, and what a preset stands
        for (model, its size, hardware)."""
        doc = {"spec": self.spec, "kind": self.kind, "params": self.params}
        if self.preset:
            p = PAPER_COMPUTE[self.preset]
            doc.update(preset=self.spec, model=p["label"], model_params=p["params"],
                       hardware=p["hardware"], batch64_s=p["batch64_s"])
        return doc


class CommModel:
    """Seconds a step's gradient exchange takes on the virtual clock.

    Specs: ``measured``; ``fixed:SEC``; ``link:MBIT_PER_S[,LATENCY_S]`` (latency + bytes this
    rank sent x 8 / bandwidth: an edge uplink); ``ethernet:GBIT_PER_S[,LATENCY_S]`` (a
    switched LAN: a dense step is a ring allreduce, 2(W-1) latencies + 2(W-1)/W x gradient
    bytes / bandwidth; a compressed step a ring allgather of every rank's payload, (W-1)
    latencies + (W-1) x payload / bandwidth); ``paper-ethernet``: the paper's 5 Gbit/s
    (``PAPER_ETHERNET``); ``auto``: measured when the compute time is measured, 0 when it is
    modelled (a modelled compute time then covers the whole step, so a virtual run is
    deterministic for its seed).

    ``ethernet`` charges the gradient of the model a ``paper-*`` compute preset names (its
    parameter count, float32), with a compressed step's payload scaled by the share of the
    dense bytes the real exchange sent; without a preset, the trained model's own gradient.
    """

    def __init__(self, spec: str = "auto"):
        self.spec = spec
        self.model_params: float | None = None  # set by for_compute from a paper preset
        self.model_label: str | None = None
        if spec == "paper-ethernet":
            self.kind = "ethernet"
            self.params = [PAPER_ETHERNET["gbit_per_s"], PAPER_ETHERNET["latency_s"]]
            return
        kind, _, rest = spec.partition(":")
        if kind in ("auto", "measured") and not rest:
            self.kind, self.params = kind, []
            return
        try:
            values = [float(v) for v in rest.split(",")] if rest else []
        except ValueError:
            values = []
        ok = (kind == "fixed" and len(values) == 1) or (
            kind in ("link", "ethernet") and len(values) in (1, 2))
        if not ok or not all(math.isfinite(v) and v >= 0 for v in values) or (
                kind in ("link", "ethernet") and values[0] <= 0):
            raise ValueError(f"comm model {spec!r}: use auto, measured, fixed:SEC, "
                             "link:MBIT_PER_S[,LATENCY_S], ethernet:GBIT_PER_S[,LATENCY_S] or "
                             "paper-ethernet (bandwidth > 0, latency >= 0)")
        self.kind, self.params = kind, values

    def for_compute(self, compute: ComputeModel) -> "CommModel":
        """``auto`` made concrete for a compute model; ``ethernet`` bound to the size of the
        model a paper preset names."""
        if self.kind == "auto":
            return CommModel("measured" if compute.kind == "measured" else "fixed:0")
        if self.kind == "ethernet" and compute.preset:
            bound = CommModel(self.spec)
            bound.model_params = PAPER_COMPUTE[compute.preset]["params"]
            bound.model_label = PAPER_COMPUTE[compute.preset]["label"]
            return bound
        return self

    def seconds(self, measured_s: float, bytes_sent: int, *, compressed: bool = False,
                dense_bytes: int | None = None, world_size: int = 1) -> float:
        """``bytes_sent``: this rank's payload this step; ``dense_bytes``: the trained
        model's dense gradient bytes (``ethernet`` needs it)."""
        if self.kind in ("measured", "auto"):
            return measured_s
        if self.kind == "fixed":
            return self.params[0]
        latency_s = self.params[1] if len(self.params) > 1 else 0.0
        if self.kind == "link":
            return latency_s + bytes_sent * 8 / (self.params[0] * 1e6)
        return ethernet_seconds(self.params[0], latency_s, world_size, bytes_sent,
                                compressed, dense_bytes, self.model_params)

    def describe(self) -> dict:
        doc = {"spec": self.spec, "kind": self.kind, "params": self.params}
        if self.kind == "ethernet":
            doc.update(gbit_per_s=self.params[0],
                       latency_s=self.params[1] if len(self.params) > 1 else 0.0,
                       charged_model=self.model_label or "the trained model",
                       charged_params=self.model_params)
        return doc


def ethernet_seconds(gbit_per_s: float, latency_s: float, world_size: int, bytes_sent: int,
                     compressed: bool, dense_bytes: int | None,
                     model_params: float | None = None) -> float:
    """One exchange on a switched LAN: a ring allreduce of the dense gradient, or a ring
    allgather of every rank's compressed payload. With ``model_params`` the gradient is that
    model's (float32) and a payload keeps its share of the dense bytes."""
    if world_size <= 1:
        return 0.0
    if not dense_bytes or dense_bytes <= 0:
        raise ValueError("an ethernet comm model needs the dense gradient bytes")
    w = world_size
    bytes_per_s = gbit_per_s * 1e9 / 8
    model_bytes = model_params * FLOAT_BYTES if model_params else dense_bytes
    if not compressed:
        return 2 * (w - 1) * latency_s + 2 * (w - 1) / w * model_bytes / bytes_per_s
    payload = bytes_sent / dense_bytes * model_bytes
    return (w - 1) * latency_s + (w - 1) * payload / bytes_per_s
