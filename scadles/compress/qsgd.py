"""QSGD-style stochastic quantization (Alistarh et al., NeurIPS 2017): the worked example of
a compressor whose payload is not (values, indices).

Each element x of a layer is sent as sign(x) x l, an integer level l in 0..s (``levels``)
drawn so that E[l] = s |x| / ||x||: with r = s |x| / ||x||, l = floor(r) + 1 with
probability r - floor(r), else floor(r). The payload is ``[norm, signed levels]``: ||x|| as
one float32 and the levels as int8 (s <= 127), so a float32 layer travels in about a quarter
of its bytes; ``decompress`` gives ||x|| / s x (signed levels), an unbiased estimate of x
whose error per element is below ||x|| / s. ``--compression-ratio`` does not apply (the
constructor takes no ``ratio``).

The rounding draws from this compressor's own generator, seeded from ``seed`` or, when None,
from ``torch.initial_seed()`` at construction (the training loop seeds torch per rank before
it builds the exchanger, so ranks round independently and reproducibly).
"""
from __future__ import annotations

import torch

MAX_LEVELS = 127  # levels travel as int8


class QSGDCompressor:
    """``compress(tensor, name) -> ([norm, levels], (shape, dtype))``."""

    name = "qsgd"

    def __init__(self, levels: int = MAX_LEVELS, seed: int | None = None):
        if isinstance(levels, bool) or not isinstance(levels, int) or \
                not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"QSGD levels must be an integer in [1, {MAX_LEVELS}], "
                             f"got {levels!r}")
        self.levels = levels
        self._seed = torch.initial_seed() if seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def compress(self, tensor: torch.Tensor, name: str
                 ) -> tuple[list[torch.Tensor], tuple[torch.Size, torch.dtype]]:
        flat = tensor.detach().reshape(-1).float()
        norm = flat.norm().reshape(1)
        scaled = flat.abs().mul_(self.levels / norm.clamp_min(torch.finfo(torch.float32).tiny))
        noise = torch.rand(scaled.shape, generator=self._generator(flat.device),
                           device=flat.device)
        levels = scaled.add_(noise).floor_().clamp_(max=self.levels)
        levels = levels.copysign_(flat).to(torch.int8)
        return [norm, levels], (tensor.shape, tensor.dtype)

    def decompress(self, payload: list[torch.Tensor],
                   ctx: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
        shape, dtype = ctx
        out = torch.zeros(shape, dtype=dtype, device=payload[1].device)
        return self.decompress_add_(out, payload, ctx)

    def decompress_add_(self, out: torch.Tensor, payload: list[torch.Tensor],
                        ctx: tuple[torch.Size, torch.dtype], alpha: float = 1.0
                        ) -> torch.Tensor:
        """``out += alpha x decompress(payload, ctx)`` in place (no host sync)."""
        norm, levels = payload
        scale = (norm * (alpha / self.levels)).to(out.dtype).reshape(())
        return out.addcmul_(levels.view(out.shape).to(out.dtype), scale)
