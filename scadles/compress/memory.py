"""Error feedback: what compression left out of a layer is added back at its next step.

``ResidualMemory`` keeps one residual per parameter name (grace's ``memory/residual.py``);
``NoMemory`` is the plain baseline (``--no-error-feedback``). Residuals are in the units of
what was sent, i.e. of the weighted gradient w_i x g_i.

Exactness: at every step ``sent + new residual == weighted gradient + old residual``. On a
sparse step the residual is what Top-k dropped (the exchanger takes the sent entries out of
the compensated gradient in place and hands it over with ``adopt_``); on a dense step the old residual goes out
with the gradient and the memory is cleared, so nothing is counted twice or lost.
"""
from __future__ import annotations

import torch


class ResidualMemory:
    """Residuals keyed by parameter name."""

    keeps_residuals = True

    def __init__(self):
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate_into_(self, out: torch.Tensor, grad: torch.Tensor | None, weight: float,
                         name: str) -> torch.Tensor:
        """``out = weight x grad + residual`` in one pass (``out`` may be ``grad`` itself;
        ``grad`` None counts as zeros); returns ``out``."""
        residual = self.residuals.get(name)
        if grad is None:
            return out.copy_(residual) if residual is not None else out.zero_()
        if residual is None:
            return torch.mul(grad, weight, out=out)
        return torch.add(residual, grad, alpha=weight, out=out)

    def adopt_(self, name: str, tensor: torch.Tensor) -> None:
        """``tensor`` already holds what the compressed payload did not carry (the caller
        took the sent part out in place): it becomes the residual of ``name``, no copy."""
        self.residuals[name] = tensor

    def clear(self) -> None:
        """Forget every residual (after a dense step has sent them)."""
        self.residuals.clear()

    def state_dict(self) -> dict:
        return {"residuals": {n: r.detach().cpu().clone() for n, r in self.residuals.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.residuals = {n: r.to(device) for n, r in state.get("residuals", {}).items()}


class NoMemory:
    """No error feedback: what compression drops is lost."""

    keeps_residuals = False

    @property
    def residuals(self) -> dict[str, torch.Tensor]:
        return {}

    def compensate_into_(self, out: torch.Tensor, grad: torch.Tensor | None, weight: float,
                         name: str) -> torch.Tensor:
        return out.zero_() if grad is None else torch.mul(grad, weight, out=out)

    def clear(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"residuals": {}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state.get("residuals"):
            raise ValueError("checkpoint holds error-feedback residuals but error feedback "
                             "is off (--no-error-feedback): resume with the same setting")
