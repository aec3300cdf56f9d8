"""Local metric of DiTFastAttnV2 (method.md §4.1): per-head relative squared error of a candidate
output against the dense output of the same layer at the same step."""

from __future__ import annotations

import torch

from ..kernels.head_error import head_sq_err

__all__ = ["HeadRse", "head_rse"]


class HeadRse:
    """`head_rse` against one reference: its per-head variance is computed once, and each candidate costs one read of
    both tensors (`kernels.head_error.head_sq_err`) -- the calibrator measures every candidate of a layer call
    against the same dense output."""

    __slots__ = ("reference", "_den")

    def __init__(self, reference: torch.Tensor, eps: float = 1e-12) -> None:
        if reference.dim() != 4:
            raise ValueError(f"expected a [B, H, L, D] reference, got shape {tuple(reference.shape)}")
        self.reference = reference
        var = reference.float().var((0, 2, 3), correction=0)
        B, _, L, D = reference.shape
        self._den = var.clamp_min(eps) * (B * L * D)  # the error's mean over batch, tokens and head dim, divided by var

    def __call__(self, candidate: torch.Tensor) -> torch.Tensor:
        return head_sq_err(candidate, self.reference) / self._den  # head_sq_err checks the shapes


def head_rse(candidate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RSE per head: mean((y_m - y_o)²) / mean((y_o - mean(y_o))²), means over batch, tokens and head dim.

    candidate, reference : [B, H, L, D] (any float dtype; computed in float32). Text tokens count too.
    Returns float32 [H] on the inputs' device. A head whose reference is constant gets its MSE / eps.
    """
    return HeadRse(reference, eps)(candidate)
