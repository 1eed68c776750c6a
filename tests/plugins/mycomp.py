"""A compressor plug-in from outside the package (``--compressor mycomp:RandomK``): random-k
with nothing but the contract's two methods (no ``decompress_add_``, no ``sparse_payload``),
so the exchanger takes its general path. And broken ones for the error paths."""
from __future__ import annotations

import torch


class RandomK:
    """Keep ``ratio`` of each layer's entries, chosen at random, scaled by 1 / ratio."""

    def __init__(self, ratio: float = 0.5, seed: int = 0):
        self.ratio = ratio
        self.generator = torch.Generator().manual_seed(seed)

    def compress(self, tensor, name):
        flat = tensor.reshape(-1)
        k = max(1, int(flat.numel() * self.ratio))
        indices = torch.randperm(flat.numel(), generator=self.generator)[:k]
        return [flat[indices] / self.ratio, indices], (tensor.shape, tensor.dtype)

    def decompress(self, payload, ctx):
        values, indices = payload
        shape, dtype = ctx
        out = torch.zeros(shape, dtype=dtype).reshape(-1)
        out[indices] = values.to(dtype)
        return out.view(shape)


class PayloadNotTensors:
    def compress(self, tensor, name):
        return [tensor.tolist()], None

    def decompress(self, payload, ctx):
        return torch.tensor(payload[0])


class NoDecompress:
    def compress(self, tensor, name):
        return [tensor], None


class WrongShape:
    def compress(self, tensor, name):
        return [tensor.reshape(-1)], None

    def decompress(self, payload, ctx):
        return payload[0]
