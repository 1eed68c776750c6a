"""SGD with momentum and weight decay, without ``torch.optim``.

The arithmetic is ``torch.optim.SGD``'s single-tensor path (its default on the CPU), bit for
bit: d = g + wd x p; buf = d on the first step, then momentum x buf + d; p -= lr x buf.
``torch.optim`` imports ``torch._dynamo`` on an optimizer's first call, about a second of
CPU per process, which a 16-rank run on two cores pays 16 times at start-up.
"""
from __future__ import annotations

from typing import Iterable

import torch


class SGD:
    """The optimizer of the training loop: ``param_groups[0]["lr"]`` is set every step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum and weight decay >= 0, got {lr}, "
                             f"{momentum}, {weight_decay}")
        self.params = [p for p in params if p.requires_grad]
        self.param_groups = [{"lr": lr, "momentum": momentum, "weight_decay": weight_decay}]
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.requires_grad_(False)
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad
            if weight_decay != 0:
                d = d.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = self.momentum_buffers[i] = d.detach().clone()
                else:
                    buf.mul_(momentum).add_(d, alpha=1)
                d = buf
            p.add_(d, alpha=-lr)

    def state_dict(self) -> dict:
        return {"param_groups": [dict(g) for g in self.param_groups],
                "momentum_buffers": [None if b is None else b.clone()
                                     for b in self.momentum_buffers]}

    def load_state_dict(self, state: dict) -> None:
        buffers = state["momentum_buffers"]
        if len(buffers) != len(self.params):
            raise ValueError(f"optimizer state for {len(buffers)} parameters, this model has "
                             f"{len(self.params)}")
        self.param_groups = [dict(g) for g in state["param_groups"]]
        self.momentum_buffers = [None if b is None else b.to(p.device).clone()
                                 for b, p in zip(buffers, self.params)]
