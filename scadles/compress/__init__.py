"""Gradient compression with error feedback, static or adaptive (Top-k by default).

This package holds what a compressed step sends: the compressors, error feedback, the
adaptive signals and the vote. The exchange that sends it (``make_exchanger``, the modes
``none`` / ``static`` / ``adaptive``, the dense and the compressed exchangers, their
settings and counters) is ``scadles/exchange/``.

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
``memory.py`` (error feedback), ``adaptive.py`` (signals and the vote).
"""
from __future__ import annotations

import inspect

import torch

from scadles.compress.identity import IdentityCompressor
from scadles.compress.qsgd import QSGDCompressor
from scadles.compress.topk import TopKCompressor
from streamsim import plugins

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


__all__ = ["COMPRESSORS", "check_compressor", "compressor_class", "make_compressor",
           "takes_ratio"]
