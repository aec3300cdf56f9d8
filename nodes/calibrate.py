"""DFACalibrate's host side: one ordinary sampling pass through the host's sampler in which every attention
call goes to the core's `ProgressiveCalibrator` (method.md §4.5), then a validated plan.

Hooks are the same as DFAApply's (adapter.py): a chained override plus keyed OUTER_SAMPLE / APPLY_MODEL
wrappers on a clone, so the input model is never changed and nothing stays patched after an error.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration.plan import CalibrationRecord, Plan
from ..calibration.search import ProgressiveCalibrator, SearchConfig
from ..kernels.engine import ArrowBackend
from .adapter import CalibrationPatch, _model_info, host_support, install_patch

__all__ = ["CalibrationResult", "calibrate_dfa", "encode_prompts", "host_version"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationResult:
    plan: Plan
    samples: torch.Tensor  # the calibration pass's (compressed) latents
    wall_time_s: float


def host_version() -> str:
    try:
        from comfyui_version import __version__

        return str(__version__)
    except ImportError:
        return "unknown"


def encode_prompts(clip: Any, prompts: Sequence[str], *, guidance: float | None) -> list:
    """Encode prompts with the host's CLIP into ONE conditioning whose batch holds every prompt.

    Text lengths differ for long prompts; shorter ones are zero-padded to the longest so the whole set
    runs as one batch (one calibration decision for all prompts, as in the reference).
    """
    conds, pooled = [], []
    extra: dict[str, Any] = {}
    for text in prompts:
        tokens = clip.tokenize(text)
        enc = clip.encode_from_tokens_scheduled(tokens)
        cond, opts = enc[0][0], enc[0][1]
        conds.append(cond)
        if opts.get("pooled_output") is not None:
            pooled.append(opts["pooled_output"])
    longest = max(c.shape[1] for c in conds)
    if any(c.shape[1] != longest for c in conds):
        log.info("DiTFastAttnV2 calibration: prompts have different text lengths; padding to %d tokens", longest)
    batch = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in conds])
    if pooled:
        extra["pooled_output"] = torch.cat(pooled)
    if guidance is not None:
        extra["guidance"] = guidance
    return [[batch, extra]]


def _batch_of(conditioning: list) -> int:
    return max(int(c[0].shape[0]) for c in conditioning)


def calibrate_dfa(
    model: Any,
    *,
    positive: list,
    negative: list,
    width: int,
    height: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    seed: int,
    config: SearchConfig,
    guidance: float | None = None,
    prompts: int | None = None,
    backend: ArrowBackend = "auto",
    callback: Callable[[int, int], None] | None = None,
    pack_version: str = "",
    description: str = "",
) -> CalibrationResult:
    """Run one sampling pass of `model` on the conditioning batch and return the calibrated plan.

    The batch size is the conditioning's batch (one latent per prompt). `callback(step, total)` is called
    after each sampler step. Raises ValueError for unsupported models/inputs, RuntimeError for an old
    host; the host's interrupt and out-of-memory errors propagate (no plan is produced).
    """
    import comfy.sample

    support = host_support()
    info = _model_info(model)
    err = support.flux_error() if info.signature.family == "flux" else support.sd3_error()
    if err:
        raise RuntimeError(err)
    if width < 16 or height < 16 or steps < 2:
        raise ValueError(f"calibration needs width, height >= 16 and steps >= 2, got {width}x{height}, {steps} steps")
    batch = _batch_of(positive)
    calibrator = ProgressiveCalibrator(info.signature, config, backend=backend)
    patch = CalibrationPatch(info=info, calibrator=calibrator, backend=backend)
    m = install_patch(model, patch)
    latent = torch.zeros([batch, 4, height // 8, width // 8])
    latent = comfy.sample.fix_empty_latent_channels(m, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)

    def on_step(step: int, x0: Any, x: Any, total: int) -> None:
        if callback is not None:
            callback(step + 1, total)

    start = time.perf_counter()
    samples = comfy.sample.sample(
        m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
        denoise=1.0, callback=on_step, disable_pbar=True, seed=seed,
    )
    wall = time.perf_counter() - start
    if patch.error is not None:
        raise RuntimeError(f"calibration failed inside the model: {patch.error}") from patch.error
    if patch.fallbacks:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(patch.fallbacks.items()))
        raise ValueError(f"calibration could not see the attention layers of this model ({reasons}); no plan was made")
    n_img = -(-(height // 8) // info.patch_size) * -(-(width // 8) // info.patch_size)
    record = CalibrationRecord(
        delta=float(config.delta),
        candidates=("full",) + tuple(c.name for c in config.candidates),
        prompts=int(prompts if prompts is not None else batch),
        steps=int(steps),
        sampler=sampler_name,
        scheduler=scheduler,
        cfg=float(cfg),
        guidance=None if guidance is None or not math.isfinite(guidance) else float(guidance),
        width=int(width),
        height=int(height),
        txt_len=int(patch.txt_len if patch.txt_len is not None else 0),
        seed=int(seed),
        host_version=host_version(),
        pack_version=pack_version,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        wall_time_s=round(wall, 3),
    )
    log.info("DiTFastAttnV2 calibration: %d positions, %d image tokens, %.1f s", len(calibrator.sigmas), n_img, wall)
    return CalibrationResult(calibrator.plan(record, description), samples, wall)
