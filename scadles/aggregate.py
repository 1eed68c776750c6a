"""Aggregation weights and learning-rate scaling.

ScaDLES trains each device on a batch whose size b_i follows its stream rate. Each rank
multiplies its mean gradient by its weight b_i / B (B = sum of the b_i, from
``global_batch``) before the exchange sums over ranks (``scadles/exchange/``), so the
aggregate equals the gradient of the mean loss over the union of all local batches. With
equal batches the weight is 1 / W and this is plain data-parallel averaging. Weights are
always passed in, never assumed.

The learning rate is a pure function of numbers every rank agrees on (the global batch and
the samples consumed by the whole group), so every rank always uses the same one.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from scadles.comm import Comm


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
