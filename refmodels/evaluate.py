"""Sample a reference model through ComfyUI's own KSampler and draw grids (PSNR / SSIM: calibration/quality.py).

Host-side (imports ComfyUI's ``nodes`` lazily). Used by training's final check, the fidelity study, the demo and
the host tests, so every number about the reference models comes through the same sampling path a user's
workflow takes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import codec, models, scenes

__all__ = ["sample", "sample_images", "grid_png"]


def sample(model: Any, name: str, captions: Sequence[str], *, res: int, steps: int, seed: int,
           sampler: str = "euler", scheduler: str = "simple", cfg: float | None = None) -> tuple[torch.Tensor, float]:
    """KSampler on a batch of captions: (host latents, wall seconds). cfg defaults to the model's own."""
    import nodes

    spec = models.SPECS[name]
    cfg = spec.cfg if cfg is None else cfg
    pos = models.conditioning(name, list(captions))
    neg = models.conditioning(name, [""] * len(captions))
    latent = {"samples": torch.zeros([len(captions), codec.CHANNELS, res // codec.PATCH, res // codec.PATCH])}
    t0 = time.perf_counter()
    out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]["samples"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def sample_images(model: Any, name: str, sc: Sequence[scenes.Scene], *, res: int, steps: int, seed: int,
                  batch: int = 16, **kw: Any) -> torch.Tensor:
    """Images `[B, 3, res, res]` in [0, 1] for scenes, sampled in batches (seed + batch index)."""
    imgs = []
    for i in range(0, len(sc), batch):
        lat, _ = sample(model, name, [s.caption for s in sc[i:i + batch]], res=res, steps=steps, seed=seed + i, **kw)
        imgs.append(models.decode_samples(model, lat))
    return torch.cat(imgs)


def grid_png(rows: Sequence[torch.Tensor], path: Path, labels: Sequence[str] = (), tile: int = 192) -> Path:
    """Rows of images `[B, 3, H, W]` as one PNG, each tile resized to `tile` px, with an optional label per row."""
    from PIL import Image, ImageDraw

    pad = 18 if labels else 0
    ncol = max(r.shape[0] for r in rows)
    canvas = Image.new("RGB", (ncol * tile, len(rows) * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        arr = (r.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        y = i * (tile + pad)
        if labels:
            draw.text((4, y + 3), labels[i], fill=(0, 0, 0))
        for j, im in enumerate(arr):
            canvas.paste(Image.fromarray(im).resize((tile, tile), Image.BILINEAR), (j * tile, y + pad))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
