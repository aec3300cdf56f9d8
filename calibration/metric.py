"""Local metric of DiTFastAttnV2 (method.md §4.1): per-head relative squared error of a candidate
output against the dense output of the same layer at the same step."""

from __future__ import annotations

import torch

__all__ = ["head_rse"]


def head_rse(candidate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RSE per head: mean((y_m - y_o)²) / mean((y_o - mean(y_o))²), means over batch, tokens and head dim.

    candidate, reference : [B, H, L, D] (any float dtype; computed in float32). Text tokens count too.
    Returns float32 [H] on the inputs' device. A head whose reference is constant gets its MSE / eps.
    """
    if candidate.shape != reference.shape or candidate.dim() != 4:
        raise ValueError(f"expected two [B, H, L, D] tensors of one shape, got {tuple(candidate.shape)} and {tuple(reference.shape)}")
    ref = reference.float()
    dims = (0, 2, 3)
    err = (candidate.float() - ref).square().mean(dims)
    var = ref.var(dims, correction=0)
    return err / var.clamp_min(eps)
