"""The identity compressor: the whole tensor is the payload (what a dense step sends)."""
from __future__ import annotations

import torch


class IdentityCompressor:
    """``compress(tensor, name) -> ((values,), ctx)``; lossless, so it leaves no residual."""

    name = "identity"

    def compress(self, tensor: torch.Tensor, name: str) -> tuple[tuple[torch.Tensor], torch.Size]:
        return (tensor.reshape(-1),), tensor.shape

    def decompress(self, payload: tuple[torch.Tensor], ctx: torch.Size) -> torch.Tensor:
        (values,) = payload
        return values.view(ctx)

    def decompress_add_(self, out: torch.Tensor, payload: tuple[torch.Tensor],
                        ctx: torch.Size, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha x decompress(payload, ctx)`` in place."""
        (values,) = payload
        return out.add_(values.view(ctx), alpha=alpha)
