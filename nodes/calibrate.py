"""DFACalibrate's host side: one ordinary sampling pass through the host's sampler in which every attention
call goes to the core's `ProgressiveCalibrator` (method.md §4.5), then a validated plan.

Hooks are the same as DFAApply's (hooks.py): a chained override plus keyed OUTER_SAMPLE / APPLY_MODEL
wrappers on a clone, so the input model is never changed and nothing stays patched after an error. The router
hands every routed call to the calibrator through the same consumer protocol the engine implements.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..calibration.plan import CalibrationRecord, Plan, save_plan
from ..calibration.prompts import parse_prompts
from ..calibration.search import DEFAULT_CANDIDATES, DEFAULT_DELTA, ProgressiveCalibrator, SearchConfig, with_fp8
from ..kernels import cost
from ..kernels.engine import ArrowBackend
from ..kernels.methods import CACHE, HeadMethod, arrow
from ..kernels.quant import fp8_supported
from .hooks import HostPatch, install_patch
from .host import host_support, host_version
from .layouts import Layout, model_layout
from .plans import existing_plan_path, plan_write_path
from .records import batch_of, calibration_settings, calibration_summary, check_reusable, read_existing_plan
from .router import Run
from .summary import RunSummary

__all__ = [
    "CalibrationPatch", "CalibrationResult", "calibrate_dfa", "encode_prompts", "host_version", "CANDIDATE_SETS",
    "DEFAULT_CANDIDATE_SET", "FP8_MODES", "NodeResult", "calibrate_plan_node", "search_candidates",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationResult:
    plan: Plan
    samples: torch.Tensor  # the calibration pass's (compressed) latents
    wall_time_s: float


class CalibrationPatch(HostPatch):
    """A calibration pass (DFACalibrate): every routed attention call goes to `calibrator.attend(...)`.

    After the run: `fallbacks` (reason -> calls that the calibrator did not see) and `error` (the first exception
    raised by the calibrator; those calls ran dense).
    """

    def __init__(self, *, layout: Layout, calibrator: ProgressiveCalibrator, backend: ArrowBackend = "auto",
                 prev: Callable[..., Any] | None = None) -> None:
        super().__init__(layout=layout, backend=backend, prev=prev)
        self.calibrator = calibrator
        self.fallbacks: dict[str, int] = {}
        self.error: BaseException | None = None

    def new_run(self, prev: Callable[..., Any] | None, model_sampling: Any) -> Run:
        cal = self.calibrator

        def position(sigma: float) -> int | None:  # the whole schedule; no percent range
            if self.error is not None:
                return None
            cal.begin_forward(sigma)
            return cal.position

        return Run(self.layout, prev, consumer_for=lambda device: cal, position=position, on_error=self._on_error)

    def _on_error(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
            log.error("DiTFastAttnV2 calibration: %s: %s", type(exc).__name__, exc)

    def end_run(self, run: Run) -> RunSummary:
        summary = super().end_run(run)
        self.fallbacks = dict(summary.fallbacks)
        return summary


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

    layout = model_layout(model)
    err = host_support().error_for(layout.family)
    if err:
        raise RuntimeError(err)
    if width < 16 or height < 16 or steps < 2:
        raise ValueError(f"calibration needs width, height >= 16 and steps >= 2, got {width}x{height}, {steps} steps")
    batch = batch_of(positive)
    settings = calibration_settings(
        model, positive=positive, negative=negative, width=width, height=height, steps=steps, cfg=cfg,
        sampler_name=sampler_name, scheduler=scheduler, seed=seed, config=config, guidance=guidance, prompts=prompts)
    calibrator = ProgressiveCalibrator(layout.signature, config, backend=backend)
    patch = CalibrationPatch(layout=layout, calibrator=calibrator, backend=backend)
    m = install_patch(model, patch)
    # The latent grid follows the model's latent format (8x for Flux/SD3, 16x for Flux 2).
    latent = torch.zeros([batch, 4, height // layout.latent_scale, width // layout.latent_scale])
    latent = comfy.sample.fix_empty_latent_channels(m, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)

    def on_step(step: int, x0: Any, x: Any, total: int) -> None:
        if patch.error is not None:  # the calibrator failed (those calls ran dense): stop instead of finishing
            raise _CalibratorFailed()
        if callback is not None:
            callback(step + 1, total)

    start = time.perf_counter()
    try:
        samples = comfy.sample.sample(
            m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
            denoise=1.0, callback=on_step, disable_pbar=True, seed=seed,
        )
    except _CalibratorFailed:
        samples = None
    except BaseException:
        calibrator.reset()  # free the previous outputs now, not when the traceback is dropped
        raise
    finally:
        del m  # the patched clone; the input model never carried the patch
    wall = time.perf_counter() - start
    if patch.error is not None:
        calibrator.reset()
        raise RuntimeError(f"calibration failed inside the model: {patch.error}") from patch.error
    assert samples is not None
    if patch.fallbacks:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(patch.fallbacks.items()))
        raise ValueError(f"calibration could not see the attention layers of this model ({reasons}); no plan was made")
    n_img = layout.image_tokens(width, height)
    record = CalibrationRecord(
        **settings,
        txt_len=int(calibrator.txt_len if calibrator.txt_len is not None else 0),
        host_version=host_version(),
        pack_version=pack_version,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        wall_time_s=round(wall, 3),
    )
    log.info("DiTFastAttnV2 calibration: %d positions, %d image tokens, %.1f s", len(calibrator.sigmas), n_img, wall)
    plan = calibrator.plan(record, description)
    calibrator.reset()
    return CalibrationResult(plan, samples, wall)


class _CalibratorFailed(Exception):
    """Raised from the step callback to end the sampling pass early after a calibrator error."""


# ------------------------------------------------------------------------------------------ the node's function

#: Candidate sets offered by DFACalibrate (full attention is always implicit). The first is the paper's default.
CANDIDATE_SETS: dict[str, tuple[HeadMethod, ...]] = {
    "cache + arrow 8/16/32 (default)": DEFAULT_CANDIDATES,
    "arrow 8/16/32 only": (arrow(8), arrow(16), arrow(32)),
    "cache only": (CACHE,),
    "cache + arrow 8": (CACHE, arrow(8)),
    "arrow 8 only": (arrow(8),),
}
DEFAULT_CANDIDATE_SET = next(iter(CANDIDATE_SETS))
#: DFACalibrate's fp8 option: off (no FP8 candidates), on (FP8 variants of full and of each arrow candidate), auto
#: (on when the GPU calibrated on has FP8 tensor cores, compute capability >= 8.9).
FP8_MODES: tuple[str, ...] = ("off", "on", "auto")


def search_candidates(candidates: str, fp8: str, device: Any = None) -> tuple[HeadMethod, ...]:
    """The candidates a DFACalibrate run searches: the set named `candidates` (a key of CANDIDATE_SETS), with
    their FP8 variants (`with_fp8`) when `fp8` is "on", or "auto" and `device` has FP8 tensor cores."""
    if candidates not in CANDIDATE_SETS:
        raise ValueError(f"unknown candidate set {candidates!r}; choose one of {', '.join(CANDIDATE_SETS)}")
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {fp8!r}")
    base = CANDIDATE_SETS[candidates]
    if fp8 == "on" or (fp8 == "auto" and device is not None and fp8_supported(device)):
        return with_fp8(base)
    return base


@dataclass(frozen=True)
class NodeResult:
    plan: Plan
    summary: str
    path: Path
    samples: Any  # the calibration pass's latents [B, C, H, W]; None when an existing plan was reused
    wall_time_s: float


def _oom_in(exc: BaseException | None) -> BaseException | None:
    """The out-of-memory error in `exc` or its causes (CUDA OOM type, or a CPU allocator failure), else None."""
    import torch

    oom_types = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, oom_types):
            return exc
        text = str(exc).lower()
        if isinstance(exc, (RuntimeError, MemoryError)) and (
            isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
        ):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _with_guidance(conditioning: list, guidance: float | None) -> list:
    """Conditioning with `guidance` set where an entry has none (Flux's guidance embedding); others unchanged."""
    if guidance is None:
        return conditioning
    return [[c[0], {**c[1], "guidance": c[1].get("guidance", guidance)}] + list(c[2:]) for c in conditioning]


def _zero_like(conditioning: list) -> list:
    """ConditioningZeroOut of `conditioning` (the negative when neither a negative nor a CLIP is connected)."""
    import torch

    out = []
    for c in conditioning:
        extra = dict(c[1])
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(c[0]), extra] + list(c[2:]))
    return out


def calibrate_plan_node(
    *,
    model: Any,
    clip: Any = None,
    prompts: str = "",
    positive: list | None = None,
    negative_prompt: str = "",
    negative: list | None = None,
    width: int = 1024,
    height: int = 1024,
    steps: int = 28,
    cfg: float = 1.0,
    guidance: float = 3.5,
    sampler_name: str = "euler",
    scheduler: str = "simple",
    seed: int = 0,
    delta: float = DEFAULT_DELTA,
    candidates: str = DEFAULT_CANDIDATE_SET,
    fp8: str = "off",
    plan_name: str = "my_plan",
    overwrite: bool = False,
    backend: ArrowBackend = "auto",
    on_step: Callable[[int, int], None] | None = None,
) -> NodeResult:
    """DFACalibrate: calibrate a plan on `model` and write it to ``models/dfa_plans/<plan_name>.json``.

    Prompts: `positive` (a CONDITIONING whose batch holds the prompts) wins; else `clip` encodes `prompts` (one per
    line) into one batch. Negative: `negative`, else `negative_prompt` through `clip`, else the zeroed positive.
    `guidance` (Flux only) fills in conditioning entries that carry none. `delta` is the per-layer, per-step error
    budget (0: every head full). `candidates` is a key of CANDIDATE_SETS; `fp8` one of FP8_MODES (FP8 variants of
    full and the arrow candidates; "auto": on where the host's GPU has FP8 tensor cores). `on_step(step, total)` is
    called after each sampler step, after the host's progress bar.

    An existing ``<plan_name>.json`` with `overwrite` off: when its model signature and calibration settings
    (`calibration_settings`: δ, candidates, prompts' encodings, sampler, size, seed, weights ...) equal this call's,
    it is loaded and returned (`samples` None, no sampling: calibrating again would give the same plan); otherwise
    ValueError showing both records.

    Raises ValueError for user mistakes (an existing file that differs, no prompts, bad names, unsupported
    model), before anything is sampled where possible. The host's interrupt propagates unchanged; running out of
    memory raises torch.OutOfMemoryError saying that no plan was written. In every failure no file is written and
    `model` is unchanged (calibration runs on a clone).
    """
    import comfy.model_management
    import comfy.utils
    import torch

    from .. import __version__ as pack_version

    device = comfy.model_management.get_torch_device() if fp8 == "auto" else None
    # the FP8 factor is read per calibration (module attribute, not the dataclass default bound at import)
    config = SearchConfig(delta=float(delta), candidates=search_candidates(candidates, fp8, device),
                          fp8_cost_factor=cost.FP8_COST_FACTOR)
    # An existing file is either this very calibration (reused) or a refusal, decided before sampling; a file that
    # is not a plan fails here, before anything is encoded.
    start = time.perf_counter()
    existing = None if overwrite else existing_plan_path(plan_name)
    previous = read_existing_plan(existing) if existing is not None else None
    path = existing if existing is not None else plan_write_path(plan_name, overwrite=overwrite)
    layout = model_layout(model)  # ValueError for models other than Flux / SD3
    flux_guidance = float(guidance) if layout.family in ("flux", "flux2") else None

    if positive is not None:
        pos = _with_guidance(positive, flux_guidance)
        n_prompts = batch_of(pos)
    elif clip is not None:
        texts = parse_prompts(prompts)
        pos = encode_prompts(clip, texts, guidance=flux_guidance)
        n_prompts = len(texts)
    else:
        raise ValueError(
            "DFACalibrate needs prompts: connect a CLIP (the prompt list is encoded with it) or a positive CONDITIONING"
        )
    if negative is not None:
        neg = _with_guidance(negative, flux_guidance)
    elif clip is not None:
        neg = encode_prompts(clip, [negative_prompt], guidance=flux_guidance)
    else:
        neg = _zero_like(pos)
    recorded_guidance = flux_guidance
    if flux_guidance is not None:
        recorded_guidance = float(pos[0][1].get("guidance", flux_guidance))
    if previous is not None:
        requested = calibration_settings(
            model, positive=pos, negative=neg, width=int(width), height=int(height), steps=int(steps), cfg=float(cfg),
            sampler_name=sampler_name, scheduler=scheduler, seed=int(seed), config=config, guidance=recorded_guidance,
            prompts=n_prompts)
        check_reusable(path, previous, layout.signature, requested)
        assert previous.calibration is not None  # check_reusable refuses plans without a record
        summary = calibration_summary(
            previous, path, f"loaded, not calibrated again: the file was calibrated on {previous.calibration.date} "
            f"({previous.calibration.wall_time_s:.1f} s) for this model with these settings; turn overwrite on to redo it", layout)
        log.info("DiTFastAttnV2 calibration: %s was calibrated for this model with these settings; loaded it instead "
                 "of calibrating again", path)
        return NodeResult(previous, summary, path, None, time.perf_counter() - start)

    pbar = comfy.utils.ProgressBar(int(steps))

    def progress(step: int, total: int) -> None:
        pbar.update_absolute(step, total)
        if on_step is not None:
            on_step(step, total)

    try:
        result = calibrate_dfa(
            model, positive=pos, negative=neg, width=int(width), height=int(height), steps=int(steps), cfg=float(cfg),
            sampler_name=sampler_name, scheduler=scheduler, seed=int(seed), config=config,
            guidance=recorded_guidance, prompts=n_prompts, backend=backend, callback=progress,
            pack_version=str(pack_version),
            description=f"DFACalibrate {path.stem}: delta {float(delta):g}, {candidates}"
                        + (", FP8 variants" if any(c.fp8 for c in config.candidates) else ""),
        )
    except comfy.model_management.InterruptProcessingException:
        log.warning("DiTFastAttnV2 calibration was interrupted: no plan was written (%s); the model is unchanged", path)
        raise
    except Exception as exc:
        oom = _oom_in(exc)
        if oom is None:
            raise
        raise torch.OutOfMemoryError(
            f"DiTFastAttnV2 calibration ran out of memory ({type(oom).__name__}: {str(oom).strip()[:300]}). No plan "
            f"was written ({path}) and the model is unchanged. Calibrate with fewer prompts, a smaller width/height "
            "or fewer candidates, or free memory (unload other models)."
        ) from exc

    try:
        saved = save_plan(result.plan, path, overwrite=overwrite)
    except FileExistsError:
        raise ValueError(
            f"plan file {path} appeared while calibrating and overwrite is off; it was not replaced. Choose another "
            "plan_name or turn overwrite on."
        ) from None
    summary = calibration_summary(result.plan, saved, f"calibration: {result.wall_time_s:.1f} s for {steps} steps x {n_prompts} "
                                  "prompt(s)", layout)
    log.info("DiTFastAttnV2 calibration wrote %s", saved)
    return NodeResult(result.plan, summary, saved, result.samples, result.wall_time_s)
