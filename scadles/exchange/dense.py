"""The dense gradient exchange: weighted sum-allreduce of flat gradient buckets.

Each rank multiplies its gradients by its weight w_i = b_i / B (``aggregate.py``) and one
sum-allreduce per bucket leaves sum_i w_i grad_i in every ``.grad``. Gradients travel as
flattened buckets of at most ``bucket_cap_mb`` (one collective per bucket, not per
parameter), like DistributedDataParallel's, in buffers kept from step to step.
``weighted_allreduce_`` is also the compressed exchanger's dense step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from scadles.comm import Comm
from scadles.exchange.stats import ExchangeStats, ExchangeSummary


@dataclass(frozen=True)
class Slot:
    """Where one parameter's gradient lives in a flat buffer."""

    offset: int
    numel: int
    shape: torch.Size


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient; zeros when it has none (a rank with an empty batch)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def flatten_grads(params: Iterable[torch.Tensor]) -> tuple[torch.Tensor, list[Slot]]:
    """All gradients of ``params`` in one new 1-D tensor, and where each one sits in it.

    Parameters without a gradient count as zeros. All must share one dtype and device.
    """
    params = list(params)
    if not params:
        raise ValueError("flatten_grads needs at least one parameter")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"one flat buffer needs one dtype and device, got {dtypes} on {devices}")
    layout, offset = [], 0
    for p in params:
        layout.append(Slot(offset, p.numel(), p.shape))
        offset += p.numel()
    flat = torch.cat([_grad_or_zeros(p).reshape(-1) for p in params])
    return flat, layout


def unflatten_into(flat: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    """Write ``flat`` back into the ``.grad`` of ``params`` (in the order they were
    flattened), creating gradients where there were none."""
    params = list(params)
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat buffer of shape {tuple(flat.shape)} does not match "
                         f"{len(params)} parameters with {total} elements")
    offset = 0
    for p in params:
        chunk = flat[offset:offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += p.numel()


def make_buckets(params: Sequence[torch.Tensor], bucket_cap_mb: float) -> list[list[int]]:
    """Indices of ``params`` grouped into buckets of at most ``bucket_cap_mb`` (a parameter
    larger than the cap gets a bucket of its own), never mixing dtypes or devices."""
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
    cap_bytes = bucket_cap_mb * 1024 * 1024
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        same_kind = not current or (params[current[0]].dtype == p.dtype
                                    and params[current[0]].device == p.device)
        if current and (not same_kind or current_bytes + nbytes > cap_bytes):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


class GradBuckets:
    """Persistent flat buffers for the gradients of a fixed list of parameters, one per
    bucket. Reusing them saves a fresh allocation (and its page faults) every step, which
    on CPU costs more than the copy itself."""

    def __init__(self, params: Sequence[torch.Tensor], bucket_cap_mb: float = 25.0):
        self.params = list(params)
        self.buckets = make_buckets(self.params, bucket_cap_mb)
        self.buffers = [torch.empty(sum(self.params[i].numel() for i in b),
                                    dtype=self.params[b[0]].dtype, device=self.params[b[0]].device)
                        for b in self.buckets]

    def __len__(self) -> int:
        return len(self.buckets)

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether these buffers were laid out for exactly ``params``."""
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def _slices(self, i: int):
        offset = 0
        for j in self.buckets[i]:
            p = self.params[j]
            yield p, self.buffers[i][offset:offset + p.numel()]
            offset += p.numel()

    def pack_(self, i: int, weight: float) -> torch.Tensor:
        """Buffer ``i`` := ``weight`` x the gradients of its parameters (zeros for none)."""
        for p, chunk in self._slices(i):
            if p.grad is None:
                chunk.zero_()
            else:
                torch.mul(p.grad.reshape(-1), weight, out=chunk)
        return self.buffers[i]

    def unpack_(self, i: int) -> None:
        """The gradients of bucket ``i``'s parameters := buffer ``i``."""
        for p, chunk in self._slices(i):
            if p.grad is None:
                p.grad = chunk.view_as(p).clone()
            else:
                p.grad.copy_(chunk.view_as(p))


def weighted_allreduce_(comm: Comm, params: Sequence[torch.Tensor], weight: float,
                        bucket_cap_mb: float = 25.0, buckets: GradBuckets | None = None) -> int:
    """Replace every ``.grad`` of ``params`` with the sum over ranks of weight_r x grad_r,
    one flat bucket at a time (``buckets``: reusable buffers for these ``params``).
    Returns the payload bytes this rank sent."""
    params = list(params)
    if buckets is None or not buckets.matches(params):
        buckets = GradBuckets(params, bucket_cap_mb)
    bytes_sent = 0
    for i in range(len(buckets)):
        flat = buckets.pack_(i, weight)
        comm.allreduce_(flat, op="sum")
        buckets.unpack_(i)
        bytes_sent += flat.numel() * flat.element_size()
    return bytes_sent


class DenseExchanger:
    """The uncompressed gradient exchange: weighted sum-allreduce of flat buckets.

    Same interface as ``SparseExchanger``, so the training loop does not know which one it
    has: ``exchange`` returns the per-step statistics written to the metrics rows,
    ``summary()`` the run's, ``state_dict()`` the counters.
    """

    def __init__(self, comm: Comm, bucket_cap_mb: float = 25.0):
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.comm = comm
        self.bucket_cap_mb = bucket_cap_mb
        self.stats = ExchangeStats()
        self._buckets: GradBuckets | None = None

    def exchange(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], weight: float,
                 step: int, epoch: int | None = None) -> dict:
        """Aggregate the gradients of ``named_params`` in place with this rank's ``weight``.
        ``epoch`` is accepted for the exchanger interface (adaptive signals use it)."""
        params = [p for _, p in named_params]
        if self._buckets is None or not self._buckets.matches(params):
            self._buckets = GradBuckets(params, self.bucket_cap_mb)
        bytes_sent = weighted_allreduce_(self.comm, params, weight, buckets=self._buckets)
        floats_sent = sum(p.numel() for p in params)
        self.stats.record(False, bytes_sent, floats_sent, 0.0)
        return {"compressed": False, "ratio": 1.0, "signal": None, "bytes_sent": bytes_sent,
                "floats_sent": floats_sent, "compress_s": 0.0}

    def summary(self) -> ExchangeSummary:
        return self.stats.summary()

    def state_dict(self) -> dict:
        """The counters, so that a resumed run's summary counts the whole run."""
        return {"counters": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state.get("counters", {}))  # {}: an older version's
