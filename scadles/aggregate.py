"""Weighted aggregation of flat gradient buckets, and learning-rate scaling.

ScaDLES trains each device on a batch whose size b_i follows its stream rate. Each rank
multiplies its mean gradient by its weight b_i / B (B = sum of the b_i, from
``global_batch``) before a sum-allreduce, so the aggregate equals the gradient of the mean
loss over the union of all local batches. With equal batches the weight is 1 / W and this is
plain data-parallel averaging. Weights are always passed in, never assumed.

Gradients travel as flattened buckets of at most ``bucket_cap_mb`` (one collective per bucket,
not per parameter), like DistributedDataParallel's.

The learning rate is a pure function of numbers every rank agrees on (the global batch and
the samples consumed by the whole group), so every rank always uses the same one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from scadles.comm import Comm


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

    Same interface as the compressed exchangers, so the training loop does not know which
    one it has: ``exchange`` returns the per-step statistics written to the metrics rows.
    """

    def __init__(self, comm: Comm, bucket_cap_mb: float = 25.0):
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.comm = comm
        self.bucket_cap_mb = bucket_cap_mb
        self.steps = 0
        self.bytes_sent_total = 0
        self.floats_sent_total = 0
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
        self.steps += 1
        self.bytes_sent_total += bytes_sent
        self.floats_sent_total += floats_sent
        return {"compressed": False, "ratio": 1.0, "signal": None, "bytes_sent": bytes_sent,
                "floats_sent": floats_sent, "compress_s": 0.0}

    def state_dict(self) -> dict:
        """The counters, so that a resumed run's summary counts the whole run."""
        return {"counters": {"steps": self.steps, "bytes_sent_total": self.bytes_sent_total,
                             "floats_sent_total": self.floats_sent_total}}

    def load_state_dict(self, state: dict) -> None:
        counters = state.get("counters", {})  # {} from a checkpoint of an older version
        self.steps = int(counters.get("steps", 0))
        self.bytes_sent_total = int(counters.get("bytes_sent_total", 0))
        self.floats_sent_total = int(counters.get("floats_sent_total", 0))

    def summary(self) -> dict:
        return {"steps": self.steps, "compressed_steps": 0, "dense_steps": self.steps,
                "cnc_ratio": 0.0, "switches": 0, "compress_s_total": 0.0,
                "bytes_sent_total": self.bytes_sent_total,
                "floats_sent_total": self.floats_sent_total}


def global_batch(comm: Comm, local_bsz: int) -> int:
    """B = sum of the local batch sizes over all ranks (one small allreduce)."""
    if local_bsz < 0:
        raise ValueError(f"local batch size must be >= 0, got {local_bsz}")
    total = torch.tensor([local_bsz], dtype=torch.int64, device=comm.device)
    comm.allreduce_(total, op="sum")
    return int(total.item())


def aggregation_weight(local_bsz: int, global_bsz: int) -> float:
    """This rank's weight b_i / B; 0 when the whole group had nothing to train on."""
    if not 0 <= local_bsz <= max(global_bsz, 0):
        raise ValueError(f"local batch {local_bsz} does not fit in global batch {global_bsz}")
    return local_bsz / global_bsz if global_bsz else 0.0


def scaled_lr(base_lr: float, global_bsz: int, ref_global_bsz: int) -> float:
    """Linear scaling: ``base_lr`` is right for ``ref_global_bsz``; a global batch twice as
    large gets twice the learning rate."""
    if ref_global_bsz <= 0:
        raise ValueError(f"reference global batch size must be positive, got {ref_global_bsz}")
    if global_bsz < 0:
        raise ValueError(f"global batch size must be >= 0, got {global_bsz}")
    return base_lr * global_bsz / ref_global_bsz


def warmup_lr(target_lr: float, samples_after_step: int, warmup_samples: int) -> float:
    """Linear warmup in samples: a step after which the whole group has trained s samples
    uses min(1, s / ``warmup_samples``) of ``target_lr``. Counting samples, not steps (Goyal
    et al. 2017 warm up over 5 epochs), treats a mode with few large steps like one with many
    small ones. Goyal et al. ramp from the unscaled lr; a ResNet152 trained from scratch
    diverges at that lr here (loss 25 by step 3 at 0.1), so the ramp starts near 0, as He
    et al. warm ResNet-110 up at a tenth of its lr."""
    if warmup_samples < 0:
        raise ValueError(f"warmup_samples must be >= 0, got {warmup_samples}")
    if warmup_samples == 0:
        return target_lr
    return target_lr * min(1.0, max(samples_after_step, 0) / warmup_samples)


def step_lr(base_lr: float, global_bsz: int, ref_global_bsz: int, samples_before: int, *,
            scale: bool, warmup_samples: int = 0, max_lr: float = 0.0) -> float:
    """The learning rate of a training step of ``global_bsz`` samples, after the group has
    trained ``samples_before``, before the MultiStep decay: ``base_lr`` (ddp) or, with
    ``scale``, linearly scaled by the global batch and capped at ``max_lr`` (0: no cap);
    then warmed up over the first ``warmup_samples``."""
    lr = base_lr
    if scale:
        lr = scaled_lr(base_lr, global_bsz, ref_global_bsz)
        if max_lr > 0:
            lr = min(lr, max_lr)
    return warmup_lr(lr, samples_before + global_bsz, warmup_samples)


def multistep_factor(samples_seen_global: int, epoch_samples: int,
                     milestones_epochs: Iterable[float], gamma: float) -> float:
    """MultiStep decay on epochs of samples consumed by the whole group: ``gamma`` to the
    number of milestones reached, where milestone m is reached once the group has trained
    on m x ``epoch_samples`` samples. Every rank passes the same numbers, so every rank gets
    the same factor, whatever its own batch sizes."""
    if epoch_samples <= 0:
        raise ValueError(f"epoch_samples must be positive, got {epoch_samples}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    reached = sum(1 for m in milestones_epochs
                  if samples_seen_global >= math.ceil(m * epoch_samples))
    return gamma ** reached
