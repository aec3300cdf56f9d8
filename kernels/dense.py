"""Dense attention on the fastest SDPA backend, for calls whose heads all run full.

ComfyUI's attention pins SDPA's backend order to FlashAttention-2 first; on an H200 cuDNN's fused attention is
1.31× faster at Flux 2K (baselines.md; kernels/NOTES.md). `fastest_dense` asks for cuDNN first and lets SDPA fall
back to flash / memory-efficient / math where cuDNN does not take the shape (head_dim, dtype, device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DENSE_MODES", "fastest_dense"]

#: DFAApply's `dense` option: "fastest" serves all-full calls with `fastest_dense` (unless another attention
#: override is chained); "host" leaves every full head to the host's attention (exact with an all-full plan).
DENSE_MODES = ("fastest", "host")

_ORDER: list | None = None


def _order() -> list:
    global _ORDER
    if _ORDER is None:
        from torch.nn.attention import SDPBackend

        _ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]
    return _ORDER


def fastest_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q, k, v [B, H, L, D] -> [B, H, L, D], on cuDNN where SDPA can use it."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_order(), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
