"""Gradient compression with error feedback, static or adaptive (Top-k by default).

The training loop calls ``make_exchanger(comm, compression=..., compressor=...)`` once and
then, after every backward, ``exchanger.exchange(named_params, weight, step, epoch=...)``:

- ``none``: ``aggregate.DenseExchanger``, the weighted sum-allreduce;
- ``static``: the compressor every step (``exchange.SparseExchanger``);
- ``adaptive``: compressed or dense, chosen each step by a vote of all ranks on a
  compression signal (``adaptive.py``).

The compressor contract (GRACE's), which every built-in and every ``--compressor
module:Class`` plug-in follows:

- ``compress(tensor, name) -> (payload, ctx)``: ``payload`` a list (or tuple) of tensors,
  the only thing that crosses the network; ``ctx`` anything, it stays on this rank;
- ``decompress(payload, ctx) -> tensor``: one rank's payload back to a dense tensor of the
  compressed tensor's shape and dtype; the exchanger allgathers every rank's payload and
  sums the decompressed results (a remote payload is decompressed with the local ``ctx``);
- optional fast paths: ``decompress_add_(out, payload, ctx, alpha=1.0)`` adds
  ``alpha x decompress(payload, ctx)`` into ``out`` in place (no dense temporary); a class
  attribute ``sparse_payload = True`` says the payload is (values, indices into the
  flattened tensor), which the exchanger then merges over all layers into one flat
  ``index_add_`` (what Top-k uses);
- constructed with no arguments, except ``ratio=--compression-ratio`` when the constructor
  takes a ``ratio`` keyword.

Error feedback is not the compressor's business: ``memory.py`` keeps the residual
(compensated gradient minus what ``decompress`` gives back) per parameter name.

One algorithm per file: ``identity.py``, ``topk.py``, ``qsgd.py`` (compressors),
``memory.py`` (error feedback), ``adaptive.py`` (signals and the vote), ``exchange.py`` (the
exchange itself).
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field, fields

import torch

from scadles.compress.adaptive import SIGNALS
from scadles.compress.identity import IdentityCompressor
from scadles.compress.qsgd import QSGDCompressor
from scadles.compress.topk import TopKCompressor
from streamsim import plugins

log = logging.getLogger(__name__)

MODES = ("none", "static", "adaptive")

# name -> class; a ``module:Class`` plug-in is looked up by ``compressor_class``.
COMPRESSORS: dict[str, type] = {
    "topk": TopKCompressor,
    "qsgd": QSGDCompressor,
    "identity": IdentityCompressor,
}


def compressor_class(spec: str) -> type:
    """The class ``spec`` names: a key of ``COMPRESSORS`` or ``module:Class`` (imported;
    ``plugins.PluginError``, a ValueError, when it cannot be)."""
    return plugins.resolve(spec, COMPRESSORS, "--compressor", "unknown --compressor",
                           "MODULE:CLASS")


def takes_ratio(cls) -> bool:
    """Whether ``cls``'s constructor takes a ``ratio`` keyword (--compression-ratio)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    ratio = params.get("ratio")
    return ratio is not None and ratio.kind in (ratio.POSITIONAL_OR_KEYWORD, ratio.KEYWORD_ONLY)


def make_compressor(spec: str, ratio: float):
    """A new compressor ``spec``: ``cls(ratio=ratio)`` when it takes ``ratio``, else
    ``cls()``; a plug-in that fails or lacks ``compress``/``decompress`` is a PluginError."""
    cls = compressor_class(spec)
    kwargs = {"ratio": ratio} if takes_ratio(cls) else {}
    compressor = plugins.call(cls, spec, "--compressor", **kwargs)
    for method in ("compress", "decompress"):
        if not callable(getattr(compressor, method, None)):
            raise plugins.PluginError(f"--compressor {spec!r} has no {method}() method: a "
                                      f"compressor offers compress(tensor, name) -> "
                                      f"(payload, ctx) and decompress(payload, ctx) -> tensor")
    return compressor


def check_compressor(spec: str, ratio: float) -> None:
    """Build compressor ``spec`` and round-trip a small float32 tensor through it, as the
    exchanger will: a plug-in that breaks the contract is a one-line PluginError (checked
    at configuration time, before any process starts)."""
    compressor = make_compressor(spec, ratio)
    tensor = torch.linspace(-1.0, 1.0, 48).view(6, 8)
    result = plugins.call(compressor.compress, spec, "--compressor", tensor.clone(), "check")
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise plugins.PluginError(f"--compressor {spec!r}: compress() returned a "
                                  f"{type(result).__name__}, not (payload, ctx)")
    payload, ctx = result
    if not (isinstance(payload, (tuple, list)) and payload
            and all(isinstance(t, torch.Tensor) for t in payload)):
        raise plugins.PluginError(f"--compressor {spec!r}: compress() must return a payload "
                                  f"that is a list of tensors, got {_describe(payload)}")
    dense = plugins.call(compressor.decompress, spec, "--compressor", payload, ctx)
    if not isinstance(dense, torch.Tensor) or dense.shape != tensor.shape \
            or dense.dtype != tensor.dtype:
        raise plugins.PluginError(f"--compressor {spec!r}: decompress() must return a tensor "
                                  f"of the compressed one's shape and dtype ({tuple(tensor.shape)}"
                                  f", {tensor.dtype}), got {_describe(dense)}")


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {', '.join(type(x).__name__ for x in obj) or 'nothing'}"
    return f"a {type(obj).__name__}"


@dataclass
class CompressionState:
    """Settings of one run's gradient compression and its running counters.

    Validated on construction (``ValueError`` naming the bad setting); ``describe()`` is
    logged once at start; ``stats()`` is the run summary.
    """

    # What is sent.
    compression: str = "static"            # none | static | adaptive
    compressor: str = "topk"               # a key of COMPRESSORS or module:Class
    compression_ratio: float = 0.01        # Top-k: fraction kept; ratio= of a plug-in
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

    def settings(self) -> dict:
        """The settings alone (JSON-able), as they go into run.json."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

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
                   bucket_cap_mb: float = 25.0, compressor: str = "topk"):
    """The gradient exchanger for ``compression`` (``none`` | ``static`` | ``adaptive``)
    with ``compressor`` (a key of ``COMPRESSORS`` or ``module:Class``).

    All settings are validated whatever the mode, and logged once (rank 0).
    """
    state = CompressionState(compression=compression, compressor=compressor,
                             compression_ratio=compression_ratio,
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

    return SparseExchanger(comm, state, make_compressor(compressor, compression_ratio),
                           bucket_cap_mb=bucket_cap_mb)


__all__ = ["COMPRESSORS", "MODES", "CompressionState", "check_compressor", "compressor_class",
           "make_compressor", "make_exchanger", "takes_ratio"]
