"""A fixed image <-> 16-channel latent codec at 1/8 resolution: an orthonormal patch projection, no training.

Each 8x8 RGB patch (192 numbers) is mapped to 16 coefficients:
1. the colour is turned into an orthonormal opponent basis: Y = (R+G+B)/sqrt(3), C1 = (R-G)/sqrt(2),
   C2 = (R+G-2B)/sqrt(6), after centring pixels at 0.5;
2. each channel gets the orthonormal 8x8 DCT-II; the codec keeps the 10 lowest-frequency luminance coefficients
   (zig-zag order) and 3 per chroma channel (DC and the two first AC terms);
3. each kept coefficient is divided by a fixed scale (`SCALES`, about its standard deviation over the scene
   generator's images) so that the latent has roughly unit variance per channel.

Steps 1-2 are the first 16 rows of an orthogonal 192x192 matrix, so decoding is the transpose (the dropped
coefficients are zero): images come back low-passed inside each patch, which keeps shapes, colours, positions
and the stripe textures of `scenes` (period >= 16 px at 512 px). Values here are *normalised* latents, the space a
diffusion model works in; `refmodels.models` converts them to and from the host's latent format
(`process_in` / `process_out`), so that ComfyUI's sampler and our decoder agree.
"""

from __future__ import annotations

import math

import torch

__all__ = ["encode", "decode", "PATCH", "CHANNELS", "SCALES", "basis"]

PATCH = 8
CHANNELS = 16
_ZIGZAG = [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]
_KEEP = [(0, uv) for uv in _ZIGZAG] + [(c, uv) for c in (1, 2) for uv in _ZIGZAG[:3]]
#: Per-coefficient scale (about the standard deviation over `scenes` images at 512 px; fixed once, never refit).
SCALES = (2.5, 0.21, 0.21, 0.07, 0.13, 0.07, 0.035, 0.075, 0.07, 0.04,
          1.17, 0.08, 0.08, 1.05, 0.11, 0.11)


def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def basis() -> torch.Tensor:
    """The 16 x 192 projection (rows orthonormal), acting on patches flattened as [channel, y, x]."""
    colour = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)
    d = _dct_matrix(PATCH)
    rows = []
    for c, (u, v) in _KEEP:
        spatial = torch.outer(d[u], d[v])  # [y, x]
        rows.append((colour[c][:, None, None] * spatial[None]).reshape(-1))
    return torch.stack(rows)


_BASIS = basis().float()
_SCALE = torch.tensor(SCALES, dtype=torch.float32)


def encode(images: torch.Tensor) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] (H, W multiples of 8) -> normalised latents `[B, 16, H/8, W/8]`."""
    b, c, h, w = images.shape
    if c != 3 or h % PATCH or w % PATCH:
        raise ValueError(f"encode: expected [B, 3, H, W] with H, W multiples of {PATCH}, got {list(images.shape)}")
    x = (images.float() - 0.5).reshape(b, 3, h // PATCH, PATCH, w // PATCH, PATCH)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // PATCH, w // PATCH, 3 * PATCH * PATCH)
    z = x @ _BASIS.to(x.device).T / _SCALE.to(x.device)
    return z.permute(0, 3, 1, 2).contiguous()


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents `[B, 16, h, w]` -> images `[B, 3, 8h, 8w]`, clamped to [0, 1]."""
    b, c, h, w = latents.shape
    if c != CHANNELS:
        raise ValueError(f"decode: expected {CHANNELS} latent channels, got {c}")
    z = latents.float().permute(0, 2, 3, 1) * _SCALE.to(latents.device)
    x = (z @ _BASIS.to(latents.device)).reshape(b, h, w, 3, PATCH, PATCH)
    x = x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * PATCH, w * PATCH)
    return (x + 0.5).clamp(0, 1)
