"""Top-k sparsification: keep the k entries of largest magnitude of each layer.

k = max(1, int(numel x compression_ratio)) per layer (never more than numel). The payload is
``(values, indices)`` into the flattened layer; indices are int32 when the layer is small
enough for them (always, in practice), int64 otherwise. Only the payload crosses the network;
the context (numel, shape) stays on this rank.

Selection is exact but avoids ``torch.topk`` over large layers, which is slow on CPU: a
random sample of |g| brackets the k-th largest magnitude between two thresholds; entries
above the upper one are kept outright, ``torch.topk`` runs only over the thin band between
the two, and when the sample misleads (rarely) the full ``torch.topk`` runs instead. The
magnitudes and the mask live in scratch buffers kept between steps (the largest layer's size),
because allocating model-sized temporaries every step costs more than the arithmetic.
"""
from __future__ import annotations

import math

import torch

INT32_MAX = 2 ** 31 - 1
SAMPLED_SELECTION_MIN_NUMEL = 100_000  # below this a plain torch.topk is as fast
SAMPLE_FRACTION = 0.01                  # of the layer, at least SAMPLE_MIN entries
SAMPLE_MIN = 1000
BAND_SIGMAS = 4.0                       # bracket width, in binomial standard deviations


def topk_k(numel: int, compression_ratio: float) -> int:
    """How many entries a layer of ``numel`` elements keeps."""
    return min(numel, max(1, int(numel * compression_ratio)))


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest index dtype that can address ``numel`` elements."""
    return torch.int32 if numel <= INT32_MAX else torch.int64


class _Scratch:
    """Reusable 1-D buffers (magnitudes, a mask), grown to the largest layer seen."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        slot = (key, dtype, device)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


def topk_indices(flat: torch.Tensor, k: int, generator: torch.Generator | None = None,
                 scratch: _Scratch | None = None) -> torch.Tensor:
    """Indices (int64, unordered) of ``k`` entries of the 1-D ``flat`` largest in magnitude
    (the same set ``torch.topk(flat.abs(), k)`` selects, up to ties)."""
    numel = flat.numel()
    if numel < SAMPLED_SELECTION_MIN_NUMEL or 2 * k > numel:
        return torch.topk(flat.abs(), k, sorted=False).indices
    scratch = scratch or _Scratch()
    magnitude = torch.abs(flat, out=scratch.get("magnitude", numel, flat.dtype, flat.device))

    # Bracket the k-th largest magnitude with two order statistics of a random sample.
    samples = max(SAMPLE_MIN, int(numel * SAMPLE_FRACTION))
    picks = torch.randint(0, numel, (samples,), generator=generator, device=flat.device)
    expected = samples * k / numel  # sampled entries above the k-th largest, on average
    margin = BAND_SIGMAS * math.sqrt(expected) + 10
    rank_low = min(samples, int(expected + margin))       # threshold below the k-th
    rank_high = int(expected - margin)                    # threshold above it
    ordered = torch.topk(magnitude[picks], rank_low, sorted=True).values
    low = ordered[rank_low - 1]
    high = ordered[rank_high - 1] if rank_high >= 1 else math.inf

    # One pass over the layer: the candidates at or above the lower threshold. Those above
    # the upper one are kept; torch.topk picks the rest from the band between the two.
    mask = scratch.get("mask", numel, torch.bool, flat.device)
    candidates = torch.ge(magnitude, low, out=mask).nonzero().squeeze(1)
    candidate_magnitude = magnitude[candidates]
    keep = candidate_magnitude > high
    band = (~keep).nonzero().squeeze(1)
    need = k - (candidates.numel() - band.numel())
    if not 0 <= need <= band.numel():  # the sample misled us: select the slow way
        return torch.topk(magnitude, k, sorted=False).indices
    keep[band[torch.topk(candidate_magnitude[band], need, sorted=False).indices]] = True
    return candidates[keep]


class TopKCompressor:
    """``compress(tensor, name) -> ((values, indices), (numel, shape))``."""

    name = "topk"

    def __init__(self, compression_ratio: float, seed: int = 0):
        if not 0.0 < compression_ratio <= 1.0:
            raise ValueError(f"compression_ratio must be in (0, 1], got {compression_ratio!r}")
        self.compression_ratio = compression_ratio
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch = _Scratch()

    def _generator(self, device: torch.device) -> torch.Generator:
        """This compressor's own sampling generator on ``device`` (never the global RNG)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def compress(self, tensor: torch.Tensor, name: str
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, torch.Size]]:
        flat = tensor.reshape(-1)
        numel = flat.numel()
        k = topk_k(numel, self.compression_ratio) if numel else 0
        if k == numel:
            # Everything is kept: no selection needed, indices in order.
            indices = torch.arange(numel, device=flat.device)
        else:
            indices = topk_indices(flat, k, self._generator(flat.device), self._scratch)
        values = flat[indices]
        return (values, indices.to(index_dtype(numel))), (numel, tensor.shape)

    def decompress(self, payload: tuple[torch.Tensor, torch.Tensor],
                   ctx: tuple[int, torch.Size]) -> torch.Tensor:
        values, _ = payload
        numel, shape = ctx
        out = torch.zeros(numel, dtype=values.dtype, device=values.device)
        return self.decompress_add_(out, payload, ctx).view(shape)

    def decompress_add_(self, out: torch.Tensor, payload: tuple[torch.Tensor, torch.Tensor],
                        ctx: tuple[int, torch.Size], alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha x decompress(payload, ctx)`` in place, touching only k entries."""
        values, indices = payload
        out.view(-1).index_add_(0, indices, values, alpha=alpha)
        return out
