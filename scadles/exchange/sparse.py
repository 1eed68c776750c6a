"""The compressed gradient exchange: weight, compensate, compress, allgather, sum.

Per step, on every rank i (``SparseExchanger.exchange``):

1. g_l <- w_i x grad_l + residual_l for every layer l (w_i = b_i / B: the stream-rate weight
   is applied *before* compression, so what is dropped is measured in aggregate units), in
   one pass into a flat model-sized buffer whose views become the ``.grad``;
2. compress each layer (Top-k by default), and the signal (``compress/adaptive.py``) from
   the layer norms and what the payloads keep of them (the ``gradnorm-change`` signal reads
   the local gradient's norm before step 1 and needs no compression, so adaptive mode then
   compresses after the vote);
3. static mode compresses; adaptive mode allreduces one vote per rank and ``decide``s, so
   every rank takes the same path;
4. compressed: one ``allgather_varlen`` of this rank's payloads, then every rank's payloads
   summed into a second flat buffer, whose views become the ``.grad``; g itself, minus what
   this rank sent, becomes the residual. The two buffers swap roles every compressed step,
   so a step makes no model-sized copy or allocation beyond the weighting pass and one
   ``zero_``. Two ways to send:
   - ``sparse_payload`` compressors (Top-k: (values, indices)): the kept values of all
     layers go out in one buffer with their flat indices (float32 values and int32 indices
     share a width, so they travel together as int32 words; two collectives otherwise); the
     sent entries are taken out of g (k writes) and the sum is one ``index_add_`` per rank;
   - any other payload: every layer's tensors packed into one byte buffer behind a header of
     their lengths; each rank's payload decompressed (``decompress_add_`` in place when the
     compressor offers it) and summed; g minus this rank's decompressed payload is the
     residual;
   dense: the residual rides along in g, the memory is cleared and g is sum-allreduced
   (``dense.weighted_allreduce_``).

With ratio 1.0 the result equals the dense weighted aggregation sum_i w_i grad_i.

Step stats: ``compressed``; ``ratio`` (values sent / elements, 1.0 on dense steps);
``signal`` (this rank's, None while it has none); ``bytes_sent`` (this rank's payload:
values + indices, the packed payload with its header, or the dense buckets; not the vote,
not gloo's padding); ``floats_sent`` (values sent; for a packed payload, its bytes in
gradient elements); ``compress_s`` (wall seconds of the exchanger's own work outside the
collectives); ``votes`` (adaptive mode: ranks that voted to compress).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch

from scadles.compress import make_compressor
from scadles.compress.adaptive import StepNorms, decide, make_signal, vote
from scadles.compress.memory import NoMemory, ResidualMemory
from scadles.compress.topk import index_dtype
from scadles.exchange.dense import weighted_allreduce_
from scadles.exchange.settings import ExchangeSettings
from scadles.exchange.stats import ExchangeStats, ExchangeSummary

log = logging.getLogger(__name__)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat.dot(flat)


class SparseExchanger:
    """Compressed exchange with error feedback, every step (``static``) or by vote
    (``adaptive``), with any compressor of the contract in ``scadles/compress/__init__.py``.

    ``exchange`` replaces every ``.grad`` with the aggregate and returns the step's stats;
    ``summary()`` the run's; ``state_dict()`` holds the settings and this rank's residuals,
    signal state and counters (residuals differ per rank: each rank checkpoints its own).
    """

    def __init__(self, comm, settings: ExchangeSettings, compressor=None, memory=None,
                 bucket_cap_mb: float = 25.0):
        if settings.compression not in ("static", "adaptive"):
            raise ValueError(f"SparseExchanger runs static or adaptive compression, "
                             f"not {settings.compression!r}")
        self.comm = comm
        self.settings = settings
        self.stats = ExchangeStats()
        if compressor is None:
            compressor = make_compressor(settings.compressor, settings.compression_ratio)
        self.compressor = compressor
        # (values, flat indices) payloads merge into one index_add_; others are packed.
        self._sparse_payload = bool(getattr(compressor, "sparse_payload", False))
        self._decompress_add = getattr(compressor, "decompress_add_", None)
        if memory is None:
            memory = ResidualMemory() if settings.error_feedback else NoMemory()
        self.memory = memory
        self.signal = make_signal(settings)
        self.bucket_cap_mb = bucket_cap_mb
        # Two flat model-sized buffers that swap roles every sparse step: the gradients
        # are weighted and compensated in one (which then keeps what Top-k left out, as the
        # residuals), the sum of all ranks arrives in the other (whose views become the
        # .grad, so the next backward accumulates straight into it). No model-sized copy
        # or allocation per step.
        self._buffers: list[torch.Tensor] = []
        self._layout: list | None = None
        self._offsets: list[int] = []
        self._grad_buffer = 0

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
        # The gradnorm-change signal watches this rank's own local gradient (its mean over
        # the local batch), before weighting: a change of b_i / B alone is no critical region.
        grad_norm = None
        if self.signal.needs_grad_norm:
            grad_norm = math.sqrt(float(torch.stack(
                [_sq_norm(p.grad) for _, p in named_params if p.grad is not None]).sum()))
        # 1: w_i x grad + residual, in one pass, into this step's gradient buffer; every
        # .grad becomes a view of it (in place when it already is one).
        grads = self._weigh_into_buffer(named_params, weight)

        # 2: select now when the step will surely be sparse or the signal needs what Top-k
        # keeps.
        payloads = None
        layer_sq: list[float] = []
        kept_sq: list[float] = []
        if self.settings.compression == "static" or self.signal.needs_topk:
            payloads = self._compress(named_params)
            layer_sq = torch.stack([_sq_norm(g) for g in grads]).tolist()
            kept_sq = torch.stack([_sq_norm(self._kept(payload, ctx))
                                   for payload, ctx in payloads]).tolist()
        signal = self.signal.update(StepNorms(layer_sq, kept_sq, grad_norm), epoch)
        compress_s = time.perf_counter() - started

        # 3: the group's choice.
        votes = None
        if self.settings.compression == "static":
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
            send = self._sparse_exchange if self._sparse_payload else self._payload_exchange
            bytes_sent, floats_sent, spent_s = send(named_params, payloads)
            compress_s += spent_s
        else:
            self.memory.clear()
            bytes_sent = weighted_allreduce_(self.comm, [p for _, p in named_params], 1.0,
                                             self.bucket_cap_mb)
            floats_sent = numel

        switched = self.stats.record(compressed, bytes_sent, floats_sent, compress_s, signal)
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

    # -- the two model-sized buffers --------------------------------------------------------

    def _ensure_buffers(self, named_params) -> list[int]:
        """Offsets of every parameter in the flat buffers (allocated on first use and again
        when the parameters change)."""
        params = [p for _, p in named_params]
        layout = [(p.shape, p.dtype, p.device) for p in params]
        if layout != self._layout:
            dtypes = {p.dtype for p in params}
            devices = {p.device for p in params}
            if len(dtypes) != 1 or len(devices) != 1:
                raise ValueError(f"compressed exchange needs parameters of one dtype on one "
                                 f"device, got dtypes {sorted(map(str, dtypes))} on "
                                 f"{sorted(map(str, devices))}")
            total = sum(p.numel() for p in params)
            self._buffers = [torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
                             for _ in range(2)]
            self._layout = layout
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            self._offsets = offsets
        return self._offsets

    def _views(self, buffer: torch.Tensor, named_params, offsets) -> list[torch.Tensor]:
        return [buffer[start:start + p.numel()].view_as(p)
                for (_, p), start in zip(named_params, offsets)]

    def _holds_grads(self, index: int, named_params, offsets) -> bool:
        """Whether every ``.grad`` is already the view of buffer ``index`` at its offset."""
        buffer = self._buffers[index]
        base, item = buffer.data_ptr(), buffer.element_size()
        for (_, p), start in zip(named_params, offsets):
            g = p.grad
            if (g is None or g.data_ptr() != base + start * item or g.shape != p.shape
                    or not g.is_contiguous()):
                return False
        return True

    def _weigh_into_buffer(self, named_params, weight: float) -> list[torch.Tensor]:
        """Step 1: every ``.grad`` becomes w x grad + residual, as a view of the buffer it
        already is a view of (in place), else of buffer 0. The residuals, when they are views
        of a buffer, are views of that one (then added into themselves: still one pass) or
        of the other, which the sum overwrites only after they were added here."""
        offsets = self._ensure_buffers(named_params)
        index = 1 if self._holds_grads(1, named_params, offsets) else 0
        self._grad_buffer = index
        views = self._views(self._buffers[index], named_params, offsets)
        for (name, p), view in zip(named_params, views):
            self.memory.compensate_into_(view, p.grad, weight, name)
            if p.grad is not view:
                p.grad = view
        return views

    def _compress(self, named_params) -> list:
        payloads = [self.compressor.compress(p.grad, name) for name, p in named_params]
        payload = payloads[0][0]
        if not (isinstance(payload, (list, tuple)) and payload
                and all(isinstance(t, torch.Tensor) for t in payload)):
            raise TypeError(f"compressor {type(self.compressor).__name__}: compress() must "
                            f"return (payload, ctx) with a payload that is a list of tensors")
        return payloads

    def _kept(self, payload, ctx) -> torch.Tensor:
        """What this rank's payload carries of a layer (for the signals' kept norms)."""
        if self._sparse_payload:
            return payload[0]
        return self.compressor.decompress(payload, ctx)

    def _payload_exchange(self, named_params, payloads) -> tuple[int, int, float]:
        """Any payload: every layer's tensors packed into one byte buffer behind a header of
        their lengths, one allgather, then each rank's payloads decompressed and summed
        (``decompress_add_`` in place when the compressor has it) into the other buffer,
        whose views become the ``.grad``. Error feedback: the gradient buffer, minus what
        this rank's payload decompresses to, keeps the residuals. Returns (bytes sent,
        gradient-sized elements those bytes amount to, seconds spent outside the
        collective)."""
        started = time.perf_counter()
        offsets = self._offsets
        device = self._buffers[0].device
        local = [t for payload, _ in payloads for t in payload]
        packed = _pack(local, device)
        # Error feedback, from the packed copy (a payload may alias the gradient itself).
        if self.memory.keeps_residuals:
            mine = _unpack(packed, local, [len(p) for p, _ in payloads])
            for (name, p), payload, (_, ctx) in zip(named_params, mine, payloads):
                self._add_decompressed(p.grad, payload, ctx, alpha=-1.0)
                self.memory.adopt_(name, p.grad)
        bytes_sent = packed.numel()
        spent_s = time.perf_counter() - started

        gathered = self.comm.allgather_varlen(packed)

        started = time.perf_counter()
        receive = 1 - self._grad_buffer
        dense = self._buffers[receive].zero_()
        views = self._views(dense, named_params, offsets)
        counts = [len(p) for p, _ in payloads]
        for got in gathered:
            for view, payload, (_, ctx) in zip(views, _unpack(got, local, counts), payloads):
                self._add_decompressed(view, payload, ctx)
        for (_, p), view in zip(named_params, views):
            p.grad = view
        spent_s += time.perf_counter() - started
        return bytes_sent, bytes_sent // dense.element_size(), spent_s

    def _add_decompressed(self, out: torch.Tensor, payload, ctx, alpha: float = 1.0) -> None:
        if self._decompress_add is not None:
            self._decompress_add(out, payload, ctx, alpha=alpha)
        else:
            out.add_(self.compressor.decompress(payload, ctx).view_as(out), alpha=alpha)

    def _sparse_exchange(self, named_params, payloads) -> tuple[int, int, float]:
        """One allgather of every layer's (values, flat indices); the gradient buffer keeps
        what was not sent as the new residuals; the other buffer receives the sum and every
        ``.grad`` becomes a view of it. Returns (bytes sent, values sent, seconds spent
        outside the collective)."""
        started = time.perf_counter()
        offsets = self._offsets
        flat_index = index_dtype(offsets[-1])
        value_dtype = payloads[0][0][0].dtype
        total = sum(payload[0].numel() for payload, _ in payloads)
        # One buffer for everything sent, filled layer by layer (a copy: the payloads may
        # alias the gradients). float32 values and int32 indices share a width, so they
        # travel as one run of integer words, the values' bits first; two buffers otherwise.
        shared = torch.empty((), dtype=value_dtype).element_size() == \
            torch.empty((), dtype=flat_index).element_size()
        device = self._buffers[0].device
        if shared:
            words = torch.empty(2 * total, dtype=flat_index, device=device)
            values, indices = words[:total].view(value_dtype), words[total:]
        else:
            values = torch.empty(total, dtype=value_dtype, device=device)
            indices = torch.empty(total, dtype=flat_index, device=device)
        at = 0
        for start, (payload, _) in zip(offsets, payloads):
            layer_values, layer_indices = payload
            n = layer_values.numel()
            values[at:at + n].copy_(layer_values)
            torch.add(layer_indices, start, out=indices[at:at + n])
            at += n
        if self.memory.keeps_residuals:
            # Error feedback: what was sent leaves the gradient buffer (k writes, one call),
            # and what stays is the residual.
            self._buffers[self._grad_buffer].index_add_(0, indices, values, alpha=-1.0)
            for name, p in named_params:
                self.memory.adopt_(name, p.grad)
        bytes_sent = (values.numel() * values.element_size()
                      + indices.numel() * indices.element_size())
        spent_s = time.perf_counter() - started

        if shared:
            pieces = []
            for got in self.comm.allgather_varlen(words):
                half = got.numel() // 2
                pieces.append((got[:half].view(value_dtype), got[half:]))
        else:
            pieces = list(zip(self.comm.allgather_varlen(values),
                              self.comm.allgather_varlen(indices)))

        # Sum every rank's entries into the other buffer (its old residuals were added to
        # the gradients in step 1), whose views become the .grad.
        started = time.perf_counter()
        receive = 1 - self._grad_buffer
        dense = self._buffers[receive].zero_()
        for rank_values, rank_indices in pieces:
            dense.index_add_(0, rank_indices, rank_values)
        for (_, p), view in zip(named_params, self._views(dense, named_params, offsets)):
            p.grad = view
        spent_s += time.perf_counter() - started
        return bytes_sent, values.numel(), spent_s

    # -- run summary and checkpoints ---------------------------------------------------------

    def summary(self) -> ExchangeSummary:
        return self.stats.summary(self.settings)

    def state_dict(self) -> dict:
        return {"settings": self.settings.as_dict(), "counters": self.stats.state_dict(),
                "memory": self.memory.state_dict(), "signal": self.signal.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "settings" not in state:
            raise ValueError("checkpoint holds no compression state (was it written with "
                             f"compression='none'?); this run has "
                             f"compression={self.settings.compression!r}")
        saved = state["settings"]
        for key in ("compression", "compressor", "adaptive_signal", "error_feedback"):
            if key in saved and saved[key] != getattr(self.settings, key):
                raise ValueError(f"checkpoint was written with {key}={saved[key]!r}, this run "
                                 f"has {key}={getattr(self.settings, key)!r}")
        self.stats.load_state_dict(state["counters"])
        device = self.comm.device
        self.memory.load_state_dict(state["memory"], device=device)
        self.signal.load_state_dict(state["signal"])


_ALIGN = 8  # bytes: every packed tensor starts at a multiple of it (any dtype views there)


def _pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One uint8 buffer: the number of tensors and each one's length (int64), then every
    tensor's bytes, each padded to ``_ALIGN``."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    header = 8 * (1 + len(tensors))
    total = header + sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
    packed = torch.empty(total, dtype=torch.uint8, device=device)
    packed[:header].view(torch.int64).copy_(
        torch.tensor([len(tensors)] + [t.numel() for t in tensors], dtype=torch.int64))
    at = header
    for t, n in zip(tensors, sizes):
        if n:
            packed[at:at + n].view(t.dtype).copy_(t.reshape(-1))
        at += -(-n // _ALIGN) * _ALIGN
    return packed


def _unpack(packed: torch.Tensor, like: list[torch.Tensor],
            counts: list[int]) -> list[list[torch.Tensor]]:
    """A packed buffer back to one payload per layer (``counts``: tensors per layer; views,
    no copies): tensor j takes the dtype of ``like[j]`` (this rank's) and its shape when the
    lengths agree, else 1-D."""
    header = packed[:8 * (1 + len(like))].view(torch.int64).tolist()
    if header[0] != len(like):
        raise RuntimeError(f"a rank sent {header[0]} payload tensors, this one "
                           f"{len(like)}: every rank must run the same compressor")
    tensors, at = [], 8 * (1 + len(like))
    for t, numel in zip(like, header[1:]):
        n = numel * t.element_size()
        got = packed[at:at + n].view(t.dtype)
        tensors.append(got.view(t.shape) if numel == t.numel() else got)
        at += -(-n // _ALIGN) * _ALIGN
    payloads, start = [], 0
    for count in counts:
        payloads.append(tensors[start:start + count])
        start += count
    return payloads


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"
