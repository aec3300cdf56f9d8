"""What makes two DFACalibrate runs the same calibration, and reusing an existing plan file when they are.

A calibration is deterministic in the model (signature and weights), the conditioning and the settings recorded in
the plan's `CalibrationRecord` (`SETTINGS_FIELDS`); a file whose record equals a new request is loaded instead of
calibrating again, any other existing file is refused with both records shown.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from ..calibration.cli import flops_kept, summarize, tile_label, time_kept
from ..calibration.plan import (
    ModelSignature, Plan, PlanError, describe_settings, load_plan, settings_differences,
)
from ..calibration.search import SearchConfig
from .layouts import Layout, weights_fingerprint

__all__ = [
    "batch_of", "conditioning_fingerprint", "calibration_settings", "calibration_summary", "read_existing_plan",
    "check_reusable",
]


def batch_of(conditioning: list) -> int:
    """Batch size of a CONDITIONING (its largest entry)."""
    return max(int(c[0].shape[0]) for c in conditioning)


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu", torch.float32).contiguous()
        h.update(f"T{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _hash_value(h, v)
        h.update(b"]")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_value(h, value[k])
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(repr(value).encode())
    else:  # other objects (hooks, control nets): their type only; a repr would carry a memory address
        h.update(type(value).__qualname__.encode())


def conditioning_fingerprint(positive: list, negative: list | None = None) -> str:
    """A short hash of CONDITIONING values (every tensor's values and shape, scalar options such as guidance):
    equal prompts through the same text encoder give the same string."""
    h = hashlib.sha256()
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is not None:
            h.update(name.encode())
            _hash_value(h, cond)
    return "c1:" + h.hexdigest()[:16]


def calibration_settings(
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
) -> dict[str, Any]:
    """The settings part (`SETTINGS_FIELDS`) of the record `calibrate_dfa` writes for these inputs; DFACalibrate
    compares it with an existing file's record. The negative counts only when cfg != 1 (at cfg 1 the host's
    sampler never evaluates it)."""
    return dict(
        delta=float(config.delta),
        candidates=("full",) + tuple(c.name for c in config.candidates),
        prompts=int(prompts if prompts is not None else batch_of(positive)),
        steps=int(steps),
        sampler=sampler_name,
        scheduler=scheduler,
        cfg=float(cfg),
        guidance=None if guidance is None or not math.isfinite(guidance) else float(guidance),
        width=int(width),
        height=int(height),
        seed=int(seed),
        weights=weights_fingerprint(model),
        conditioning=conditioning_fingerprint(positive, None if math.isclose(cfg, 1.0) else negative),
        # recorded only when FP8 candidates were searched, so plans made before FP8 existed stay reusable
        fp8_cost_factor=float(config.fp8_cost_factor) if any(c.fp8 for c in config.candidates) else None,
    )


def calibration_summary(plan: Plan, path: Path, how: str, layout: Layout) -> str:
    """DFACalibrate's summary of `plan` (written to or read from `path`): file, `summarize`, then `how` it was made
    and the estimated attention speed-up (image tokens from the model's latent format, e.g. Flux 2's 1/16)."""
    cal = plan.calibration
    assert cal is not None
    n_img = layout.image_tokens(cal.width, cal.height)
    _, tiled = flops_kept(plan, width=cal.width, height=cal.height, txt_len=cal.txt_len, n_img=n_img)
    cost = time_kept(plan, width=cal.width, height=cal.height, txt_len=cal.txt_len, n_img=n_img)  # FP8 weighed
    return "\n".join([
        f"plan: {path}",
        summarize(plan),
        f"{how}; estimated attention speed-up {1 / max(cost, 1e-9):.2f}x (attention FLOPs kept at "
        f"{tile_label(plan)} {100 * tiled:.1f}%)",
    ])


def read_existing_plan(path: Path) -> Plan:
    """The plan in an existing file that DFACalibrate must not replace; ValueError when it is not a plan."""
    try:
        return load_plan(path)
    except (PlanError, OSError) as exc:
        raise ValueError(
            f"plan file {path} already exists but is not a readable DiTFastAttnV2 plan ({exc}); overwrite is off, so "
            "it was not replaced and no calibration was run. Choose another plan_name or turn overwrite on."
        ) from None


def check_reusable(path: Path, plan: Plan, signature: ModelSignature, requested: dict[str, Any]) -> None:
    """Nothing when `plan` (read from `path`) is what calibrating `signature` with the `requested` settings
    (`calibration_settings`) would give; else ValueError naming the differences and showing both records."""
    problems = []
    sig = plan.model.mismatch(signature)
    if sig is not None:
        problems.append(f"model: {sig}")
    cal = plan.calibration
    if cal is None:
        problems.append("the file has no calibration record (a hand-made plan)")
    else:
        problems += [f"{name}: file {mine}, now {now}" for name, mine, now in settings_differences(cal, requested)]
    if problems:
        raise ValueError(
            f"plan file {path} already exists and was made with other settings or for another model; overwrite is "
            f"off, so it was not replaced and no calibration was run. Differences: {'; '.join(problems)}.\n"
            f"file: {plan.model.describe()}; {cal.describe() if cal is not None else 'no calibration record'}\n"
            f"now:  {signature.describe()}; {describe_settings(requested)}\n"
            "Turn overwrite on to calibrate again and replace the file, or choose another plan_name."
        )
