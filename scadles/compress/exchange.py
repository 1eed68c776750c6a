"""The compressed gradient exchange: weight, compensate, Top-k, allgather, sum.

Per step, on every rank i (``SparseExchanger.exchange``):

1. g_l <- w_i x grad_l + residual_l for every layer l (w_i = b_i / B: the stream-rate weight
   is applied *before* compression, so what is dropped is measured in aggregate units);
2. Top-k of each layer, and the signal (``adaptive.py``) from the layer norms (the
   ``gradnorm-change`` signal needs no Top-k, so adaptive mode then selects after the vote);
3. static mode compresses; adaptive mode allreduces one vote per rank and ``decide``s, so
   every rank takes the same path;
4. compressed: the residual keeps what Top-k dropped; the kept values of all layers go out in
   one buffer with their flat indices (one ``allgather_varlen``: float32 values and int32
   indices share a width, so they travel together as int32 words; two collectives
   otherwise), and every rank sums everyone's (values, indices) into a flat buffer and
   copies it into ``.grad``;
   dense: the residual rides along in g, the memory is cleared and g is sum-allreduced
   (``aggregate.weighted_allreduce_``).

With ratio 1.0 the result equals the dense weighted aggregation sum_i w_i grad_i.

Step stats: ``compressed``; ``ratio`` (values sent / elements, 1.0 on dense steps);
``signal`` (this rank's, None while it has none); ``bytes_sent`` (this rank's payload:
values + indices, or the dense buckets; not the vote, not gloo's padding); ``floats_sent``
(values sent); ``compress_s`` (wall seconds of the exchanger's own work outside the
collectives); ``votes`` (adaptive mode: ranks that voted to compress).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch

from scadles.aggregate import unflatten_into, weighted_allreduce_
from scadles.compress import COMPRESSORS, CompressionState
from scadles.compress.adaptive import StepNorms, decide, make_signal, vote
from scadles.compress.memory import NoMemory, ResidualMemory
from scadles.compress.topk import index_dtype

log = logging.getLogger(__name__)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat.dot(flat)


class SparseExchanger:
    """Top-k exchange with error feedback, every step (``static``) or by vote (``adaptive``).

    ``exchange`` replaces every ``.grad`` with the aggregate and returns the step's stats;
    ``summary()`` the run's; ``state_dict()`` holds this rank's residuals, signal state and
    counters (residuals differ per rank: each rank checkpoints its own).
    """

    def __init__(self, comm, state: CompressionState, compressor=None, memory=None,
                 bucket_cap_mb: float = 25.0):
        if state.compression not in ("static", "adaptive"):
            raise ValueError(f"SparseExchanger runs static or adaptive compression, "
                             f"not {state.compression!r}")
        self.comm = comm
        self.state = state
        self.compressor = compressor if compressor is not None else COMPRESSORS["topk"](state)
        if memory is None:
            memory = ResidualMemory() if state.error_feedback else NoMemory()
        self.memory = memory
        self.signal = make_signal(state)
        self.bucket_cap_mb = bucket_cap_mb
        self._dense: torch.Tensor | None = None  # receive buffer, one model's worth

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def exchange(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], weight: float,
                 step: int, epoch: int | None = None) -> dict:
        """Aggregate the gradients of ``named_params`` in place with this rank's ``weight``;
        ``epoch`` (the group's epoch) resets the ``orig`` signal's running mean."""
        named_params = list(named_params)
        if not named_params:
            raise ValueError("exchange needs at least one parameter")
        started = time.perf_counter()
        for _, p in named_params:
            if p.grad is None:  # a rank with an empty batch: zeros, weight 0
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        grads = [p.grad for _, p in named_params]
        grad_norm = None
        if self.signal.needs_grad_norm:
            grad_norm = math.sqrt(float(torch.stack([_sq_norm(g) for g in grads]).sum()))

        # 1-2: weight and compensate in .grad itself (it is overwritten below); select now
        # when the step will surely be sparse or the signal needs what Top-k keeps.
        for (name, _), g in zip(named_params, grads):
            g.mul_(weight)
            self.memory.compensate_(g, name)
        payloads = None
        layer_sq: list[float] = []
        kept_sq: list[float] = []
        if self.state.compression == "static" or self.signal.needs_topk:
            payloads = self._compress(named_params)
            layer_sq = torch.stack([_sq_norm(g) for g in grads]).tolist()
            kept_sq = torch.stack([_sq_norm(values) for (values, _), _ in payloads]).tolist()
        signal = self.signal.update(StepNorms(layer_sq, kept_sq, grad_norm), epoch)
        compress_s = time.perf_counter() - started

        # 3: the group's choice.
        votes = None
        if self.state.compression == "static":
            compressed = True
        else:
            ballot = torch.tensor([float(vote(signal, self.signal.threshold))],
                                  device=grads[0].device)
            votes = int(round(float(self.comm.allreduce_(ballot, op="sum").item())))
            compressed = decide(votes, self.comm.world_size)

        # 4: send.
        numel = sum(g.numel() for g in grads)
        if compressed:
            started = time.perf_counter()
            if payloads is None:
                payloads = self._compress(named_params)
            compress_s += time.perf_counter() - started
            bytes_sent, floats_sent, spent_s = self._sparse_exchange(named_params, payloads)
            compress_s += spent_s
        else:
            self.memory.clear()
            bytes_sent = weighted_allreduce_(self.comm, [p for _, p in named_params], 1.0,
                                             self.bucket_cap_mb)
            floats_sent = numel

        switched = self.state.record(compressed, bytes_sent, floats_sent, compress_s)
        if switched and self.comm.rank == 0:
            log.info("step %d: %s -> %s (signal %s, %s of %d ranks voted to compress)", step,
                     "dense" if compressed else "compressed",
                     "compressed" if compressed else "dense", _fmt(signal), votes,
                     self.comm.world_size)
        stats = {"compressed": compressed, "ratio": floats_sent / numel,
                 "signal": signal if signal is not None and math.isfinite(signal) else None,
                 "bytes_sent": bytes_sent, "floats_sent": floats_sent, "compress_s": compress_s}
        if votes is not None:
            stats["votes"] = votes
        return stats

    def _compress(self, named_params) -> list:
        return [self.compressor.compress(p.grad, name) for name, p in named_params]

    def _sparse_exchange(self, named_params, payloads) -> tuple[int, int, float]:
        """Residuals, one allgather of every layer's (values, flat indices), sum into .grad.
        Returns (bytes sent, values sent, seconds spent outside the collective)."""
        started = time.perf_counter()
        grads = [p.grad for _, p in named_params]
        starts = [0]
        for g in grads:
            starts.append(starts[-1] + g.numel())
        flat_index = index_dtype(starts[-1])
        values, indices = [], []
        for (name, _), g, start, (payload, ctx) in zip(named_params, grads, starts, payloads):
            self.memory.update(g, name, self.compressor, payload, ctx)
            layer_values, layer_indices = payload
            values.append(layer_values)
            indices.append(layer_indices.to(flat_index) + start)
        values = torch.cat(values)
        indices = torch.cat(indices)
        bytes_sent = (values.numel() * values.element_size()
                      + indices.numel() * indices.element_size())
        spent_s = time.perf_counter() - started

        if values.element_size() == indices.element_size():
            # One collective: the values' bits travel as integers beside the indices.
            words = torch.cat([values.view(indices.dtype), indices])
            pieces = []
            for got in self.comm.allgather_varlen(words):
                half = got.numel() // 2
                pieces.append((got[:half].view(values.dtype), got[half:]))
        else:
            pieces = list(zip(self.comm.allgather_varlen(values),
                              self.comm.allgather_varlen(indices)))

        # Sum every rank's entries into one flat buffer (kept between steps: allocating a
        # model-sized tensor every step costs more than filling it), then into .grad.
        started = time.perf_counter()
        if (self._dense is None or self._dense.numel() != starts[-1]
                or self._dense.dtype != values.dtype or self._dense.device != values.device):
            self._dense = torch.empty(starts[-1], dtype=values.dtype, device=values.device)
        dense = self._dense.zero_()
        for rank_values, rank_indices in pieces:
            dense.index_add_(0, rank_indices, rank_values)
        unflatten_into(dense, [p for _, p in named_params])
        spent_s += time.perf_counter() - started
        return bytes_sent, values.numel(), spent_s

    # -- run summary and checkpoints ---------------------------------------------------------

    def summary(self) -> dict:
        return self.state.stats()

    def state_dict(self) -> dict:
        return {"settings": self.state.settings(), "counters": self.state.counters(),
                "memory": self.memory.state_dict(), "signal": self.signal.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "settings" not in state:
            raise ValueError("checkpoint holds no compression state (was it written with "
                             f"compression='none'?); this run has "
                             f"compression={self.state.compression!r}")
        saved = state["settings"]
        for key in ("compression", "adaptive_signal", "error_feedback"):
            if key in saved and saved[key] != getattr(self.state, key):
                raise ValueError(f"checkpoint was written with {key}={saved[key]!r}, this run "
                                 f"has {key}={getattr(self.state, key)!r}")
        self.state.load_counters(state["counters"])
        device = self.comm.device
        self.memory.load_state_dict(state["memory"], device=device)
        self.signal.load_state_dict(state["signal"])


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"
