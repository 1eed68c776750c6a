"""Test doubles shared by unit tests of pure logic: a one-rank world and named parameters."""
from __future__ import annotations

import torch


class OneRankComm:
    """A world of one: collectives return their input (what a one-rank group does)."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def allreduce_(self, tensor, op="sum"):
        return tensor

    def allgather_varlen(self, tensor):
        return [tensor.clone()]


def named(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(f"layer{i}", torch.nn.Parameter(torch.randn(s, generator=gen)))
            for i, s in enumerate(shapes)]
