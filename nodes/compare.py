"""DFACompare's function: sample one latent uncompressed and with a plan (DFAApply's `apply_dfa`, on a clone) with the
same noise through the host's own KSampler path, decode both with the host's VAEDecode, and report PSNR / SSIM
(calibration/quality.py) and the measured sampling time of both runs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration.plan import Plan
from ..calibration.quality import difference_map, psnr_ssim
from .adapter import TO_PATCH, apply_dfa

__all__ = ["CompareResult", "compare_dfa"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareResult:
    """Both decoded images and their difference as IMAGE tensors [B, H, W, 3] in [0, 1], the per-image PSNR (dB)
    and SSIM, both sampling times (seconds, VAE decode excluded) and the report text."""

    uncompressed: torch.Tensor
    compressed: torch.Tensor
    difference: torch.Tensor
    psnr: list[float]
    ssim: list[float]
    time_uncompressed_s: float
    time_compressed_s: float
    report: str


def _timed_sample(model: Any, device: torch.device, **kw: Any) -> tuple[dict, float]:
    import nodes

    def sync() -> None:
        if device.type == "cuda":  # sampling is asynchronous on CUDA: time to the end of the work, not the launch
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    latent = nodes.common_ksampler(model, **kw)[0]  # KSampler's own path, with its progress bar and previews
    sync()
    return latent, time.perf_counter() - start


def _decode(vae: Any, latent: dict) -> torch.Tensor:
    import nodes

    return nodes.VAEDecode().decode(vae, latent)[0]


def _mean_min(values: list[float], fmt: str, unit: str = "") -> str:
    text = format(sum(values) / len(values), fmt) + unit
    return text if len(values) == 1 else f"{text} (min {format(min(values), fmt)}{unit})"


def compare_dfa(
    *,
    model: Any,
    plan: Plan,
    positive: list,
    negative: list,
    vae: Any,
    latent_image: dict,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    difference_gain: float = 4.0,
    label: str = "",
) -> CompareResult:
    """Sample `latent_image` with `model` as is, then with `plan` applied (same seed and noise), and compare.

    The plan is checked against the model (`apply_dfa`: ValueError / RuntimeError; a model that already carries a
    DFAApply patch is refused) before anything is sampled and is
    applied to a clone, so `model` is never patched, also when a run fails. The model is loaded before the first
    timed run, so neither time includes moving the weights; the compressed time does include one-time work of the
    first compressed run in a process (compiling the arrow kernel on CUDA). The host's interrupt propagates.
    """
    import comfy.model_management

    if TO_PATCH in (model.model_options.get("transformer_options") or {}):
        raise ValueError(
            "DFACompare got a model that already runs a DiTFastAttnV2 plan (DFAApply before it), so its "
            "'uncompressed' run would be compressed. Connect the model from before DFAApply (e.g. the loader)."
        )
    patched = apply_dfa(model, plan=plan, start_percent=start_percent, end_percent=end_percent, label=label)
    device = comfy.model_management.get_torch_device()
    comfy.model_management.load_models_gpu([model])
    kw = dict(seed=int(seed), steps=int(steps), cfg=float(cfg), sampler_name=sampler_name, scheduler=scheduler,
              positive=positive, negative=negative, latent=latent_image, denoise=float(denoise))
    ref_latent, t_ref = _timed_sample(model, device, **kw)
    out_latent, t_dfa = _timed_sample(patched, device, **kw)
    run = patched.model_options["transformer_options"][TO_PATCH].last_summary
    ref_img, out_img = _decode(vae, ref_latent), _decode(vae, out_latent)
    psnr, ssim = psnr_ssim(out_img, ref_img)
    diff = difference_map(out_img, ref_img, difference_gain)

    identical = all(p == float("inf") for p in psnr)
    lines = [
        f"DiTFastAttnV2 A/B ({label or plan.description or 'plan'}): {ref_img.shape[0]} image(s) "
        f"{ref_img.shape[2]}x{ref_img.shape[1]}, {steps} steps {sampler_name}/{scheduler}, cfg {cfg:g}, seed {seed}",
        f"time: uncompressed {t_ref:.2f} s, compressed {t_dfa:.2f} s, speed-up {t_ref / max(t_dfa, 1e-9):.2f}x "
        f"(sampling only, on {device.type}{', synchronized' if device.type == 'cuda' else ''}; VAE decode excluded)",
        "quality of compressed vs uncompressed: " + (
            "identical images (PSNR inf, SSIM 1)" if identical else
            f"PSNR {_mean_min(psnr, '.2f', ' dB')}, SSIM {_mean_min(ssim, '.4f')} (mean over {len(psnr)} image(s))"),
        f"difference image: |compressed - uncompressed| x {difference_gain:g}, clipped (black = equal)",
    ]
    if run is not None:
        lines.append(run.line())
    if device.type != "cuda":
        lines.append("note: without CUDA arrow heads run a masked dense reference, so only cached heads save time")
    report = "\n".join(lines)
    log.info("%s", report.replace("\n", "; "))
    return CompareResult(ref_img, out_img, diff, psnr, ssim, t_ref, t_dfa, report)
