"""How far a compressed image is from the uncompressed one: PSNR, SSIM and an amplified difference map.

Images are in ComfyUI's IMAGE layout, ``[B, H, W, C]`` floats in [0, 1] (torch tensors on any device). Used by
DFACompare, the demo and the fidelity study, so every quality number the pack reports is computed here.
"""

from __future__ import annotations

import math

import torch

__all__ = ["psnr_ssim", "difference_map"]


def _pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"need two image batches [B, H, W, C] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.detach().float().clamp(0, 1).cpu(), b.detach().float().clamp(0, 1).cpu()


def psnr_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB, data range 1; inf for identical images) and SSIM (scikit-image, over the colour
    channels, data range 1) of two image batches ``[B, H, W, C]`` in [0, 1]; values outside are clipped."""
    from skimage.metrics import structural_similarity

    x_all, y_all = _pairs(a, b)
    psnr, ssim = [], []
    for x, y in zip(x_all.numpy(), y_all.numpy()):
        mse = float(((x - y) ** 2).mean())
        psnr.append(math.inf if mse == 0 else 10 * math.log10(1.0 / mse))
        ssim.append(float(structural_similarity(x, y, channel_axis=2, data_range=1.0)))
    return psnr, ssim


def difference_map(a: torch.Tensor, b: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """``|a - b| * gain`` clipped to [0, 1], per channel, in the inputs' layout ``[B, H, W, C]`` (on the CPU):
    black where the images agree; gain 4 makes a difference of 1/4 of the range white."""
    x, y = _pairs(a, b)
    return ((x - y).abs() * float(gain)).clamp(0, 1)
