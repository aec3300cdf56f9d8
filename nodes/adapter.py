"""DFAApply's glue: `apply_dfa` checks a plan against the model and the host and installs a `DFAPatch` (hooks.py);
each sampling run of the patch routes attention (router.py) to per-device `HeadwiseEngine`s that run the plan.
`standalone_run` / `finish_run` drive the same run without a sampler (benchmarks)."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable


from ..calibration.plan import Plan
from ..kernels.dense import DENSE_MODES, fastest_dense
from ..kernels.engine import CACHE_OFFLOAD_MODES, ArrowBackend, CacheOffload, HeadwiseEngine
from .hooks import TO_PATCH, TO_RUN, HostPatch, begin_run, install_patch
from .host import host_support
from .layouts import Layout, model_layout, weights_fingerprint
from . import report
from .router import Run
from .summary import RunSummary

__all__ = ["TO_PATCH", "DFAPatch", "apply_dfa", "standalone_run", "finish_run"]

log = logging.getLogger(__name__)


class DFAPatch(HostPatch):
    """An applied plan (DFAApply). `last_summary` holds the last sampling run's summary."""

    def __init__(
        self,
        *,
        plan: Plan,
        layout: Layout,
        start_percent: float,
        end_percent: float,
        backend: ArrowBackend,
        dense: str = "fastest",
        cache_offload: CacheOffload = "auto",
        prev: Callable[..., Any] | None = None,
        label: str = "",
        node_id: str | None = None,
    ) -> None:
        super().__init__(layout=layout, backend=backend, prev=prev)
        self.plan = plan
        self.dense = dense
        self.cache_offload: CacheOffload = cache_offload
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.label = label
        self.node_id = node_id  # the DFAApply node (its UI shows the per-run report)

    def new_run(self, prev: Callable[..., Any] | None, model_sampling: Any) -> Run:
        start_sigma, end_sigma = math.inf, -math.inf
        if model_sampling is not None:
            if self.start_percent > 0.0:
                start_sigma = float(model_sampling.percent_to_sigma(self.start_percent))
            if self.end_percent < 1.0:
                end_sigma = float(model_sampling.percent_to_sigma(self.end_percent))
        plan, backend = self.plan, self.backend

        def position(sigma: float) -> int | None:
            return plan.position_for_sigma(sigma) if end_sigma < sigma <= start_sigma else None

        warned: list[bool] = []

        def check(n_img: int, to: dict) -> None:
            if not warned:
                warned.append(True)
                self._check_run(n_img, to)

        # dense "fastest": calls the plan keeps all full go to cuDNN-first SDPA, full heads of mixed layers to the
        # arrow kernel's own launch; a chained override (Sage, ModelAttentionBackend, ...) always serves them.
        # "host": every full head runs the host's attention (or the chained override).
        fast = fastest_dense if self.dense == "fastest" and prev is None else None
        offload = self.cache_offload  # the run sets the engines' full_by_dense from its fast_dense
        return Run(self.layout, prev, position=position, check=check, fast_dense=fast,
                   consumer_for=lambda device: HeadwiseEngine(plan, backend=backend, cache_offload=offload))

    def _check_run(self, n_img: int, to: dict) -> None:
        """Warn once per run when the run differs from what the plan was calibrated for."""
        cal = self.plan.calibration
        if cal is None:
            return
        notes = []
        sample_sigmas = to.get("sample_sigmas")
        steps = len(sample_sigmas) - 1 if sample_sigmas is not None and len(sample_sigmas) > 1 else None
        if steps is not None and steps != cal.steps:
            notes.append(f"{steps} steps instead of {cal.steps}")
        cal_img = self.layout.image_tokens(cal.width, cal.height)
        if n_img != cal_img:
            notes.append(f"{n_img} image tokens instead of {cal_img} ({cal.width}x{cal.height})")
        if notes:
            log.warning(
                "DiTFastAttnV2: this run differs from the plan's calibration (%s); the plan is mapped by sigma and "
                "arrow bands scale with the image, but its error budget was measured at the calibrated settings. "
                "Calibrate a plan for these settings if the result changes visibly.", "; ".join(notes))

    def end_run(self, run: Run) -> RunSummary:
        summary = super().end_run(run)
        log.info("%s", summary.line())
        report.send(report.REPORT_EVENT, report.report_payload(
            summary, node=self.node_id, label=self.label, signature=self.layout.signature))
        return summary

    def __repr__(self) -> str:
        return f"DFAPatch({self.label or self.plan.description or 'plan'}, {self.layout.signature.describe()})"


_PREFERRED_WARNED: list[bool] = []


def _warn_preferred_attention_once() -> None:
    """Once per process: this host drops a checkpoint's preferred attention backend before any override."""
    if not _PREFERRED_WARNED:
        _PREFERRED_WARNED.append(True)
        log.warning(
            "DiTFastAttnV2: this ComfyUI does not hand a checkpoint's preferred attention backend to attention "
            "overrides, so under DFAApply the heads the plan keeps full run the global backend, not the "
            "checkpoint's own (e.g. int8). To choose it, place a Model Attention Backend node before DFAApply or "
            "start ComfyUI with that backend's flag.")


def _check_plan_fits(plan: Plan, layout: Layout) -> None:
    problem = plan.model.mismatch(layout.signature)
    if problem is not None:
        raise ValueError(
            f"the plan does not fit this model: {problem}. Plan: {plan.model.describe()}; model: "
            f"{layout.signature.describe()}. Calibrate a plan for this model."
        )


def apply_dfa(
    model: Any,
    *,
    plan: Plan,
    enabled: bool = True,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    backend: ArrowBackend = "auto",
    dense: str = "fastest",
    cache_offload: CacheOffload = "auto",
    label: str = "",
    node_id: str | None = None,
) -> Any:
    """Return a clone of `model` (a ComfyUI ModelPatcher) that runs `plan` in its attention.

    Parameters
    ----------
    model : ModelPatcher of a Flux or SD3/SD3.5 model; never modified.
    plan : a validated Plan whose model signature equals the model's (`layouts.model_signature`).
    enabled : False returns `model` itself, untouched.
    start_percent, end_percent : sampling range (0 = first step, 1 = last) where the plan is used; outside it
        every head is dense. 0 <= start_percent <= end_percent <= 1.
    backend : arrow backend of the engine ("auto", "triton", "flex", "sdpa").
    dense : "fastest" (calls whose heads all run full use cuDNN-first SDPA, full heads of mixed layers run in the
        arrow kernel) or "host" (every full head runs the host's attention: an all-full plan is then bit-identical
        to the unpatched model). A chained attention override always serves the full heads.
    cache_offload : where cached heads wait between steps: "gpu", "cpu" (pinned memory, prefetched a layer ahead)
        or "auto" (cpu when the plan's largest cache would take over 2 % of the GPU's memory).
    label, node_id : the plan's name and the DFAApply node for the log line and the UI's per-run report.

    Raises
    ------
    ValueError : the plan does not fit the model, the model is not Flux/SD3, or the percents are invalid.
    RuntimeError : the host is too old for this model family (message names the needed ComfyUI version).
    """
    if not enabled:
        return model
    if not (0.0 <= start_percent <= end_percent <= 1.0):
        raise ValueError(
            f"start_percent and end_percent must satisfy 0 <= start <= end <= 1, got {start_percent} and {end_percent}"
        )
    if dense not in DENSE_MODES:
        raise ValueError(f"dense must be one of {', '.join(DENSE_MODES)}, got {dense!r}")
    if cache_offload not in CACHE_OFFLOAD_MODES:
        raise ValueError(f"cache_offload must be one of {', '.join(CACHE_OFFLOAD_MODES)}, got {cache_offload!r}")
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a DiTFastAttnV2 Plan, got {type(plan).__name__}")
    support = host_support()
    if not support.override:
        raise RuntimeError(support.sd3_error())
    layout = model_layout(model)
    err = support.error_for(layout.family)
    if err:
        raise RuntimeError(err)
    _check_plan_fits(plan, layout)
    if support.preferred_attention == "stripped":
        _warn_preferred_attention_once()
    recorded = plan.calibration.weights if plan.calibration is not None else None
    if recorded is not None:
        mine = weights_fingerprint(model)
        if mine is not None and mine != recorded:
            log.warning(
                "DiTFastAttnV2: plan %s was calibrated on other weights of this architecture (fingerprint %s, this "
                "model %s), e.g. another finetune; its error budget may not hold here. Calibrate a plan for this "
                "model if the result changes visibly.", label or plan.description or "(unnamed)", recorded, mine)
    patch = DFAPatch(
        plan=plan, layout=layout, start_percent=float(start_percent), end_percent=float(end_percent),
        backend=backend, dense=dense, cache_offload=cache_offload, label=label, node_id=node_id,
    )
    return install_patch(model, patch)


def standalone_run(
    model: Any, plan: Plan, *, backend: ArrowBackend = "auto", dense: str = "fastest",
    cache_offload: CacheOffload = "auto", prev: Callable[..., Any] | None = None,
) -> dict:
    """transformer_options with a fresh run of `plan`, for driving a diffusion model directly (no sampler).

    Per forward, pass ``hooks.forward_options(to, x, sigma, context)`` as the model's transformer_options;
    ``finish_run(to)`` returns the RunSummary. Used by bench/bench_overhead.py.
    """
    layout = model_layout(model)
    _check_plan_fits(plan, layout)
    patch = DFAPatch(plan=plan, layout=layout, start_percent=0.0, end_percent=1.0, backend=backend, dense=dense,
                     cache_offload=cache_offload, prev=prev)
    options: dict = {"transformer_options": {TO_PATCH: patch}}
    begin_run(patch, options, None)
    return options["transformer_options"]


def finish_run(transformer_options: dict) -> RunSummary:
    """End a `standalone_run`: its summary (also stored as the patch's `last_summary`)."""
    run = transformer_options[TO_RUN]
    return run.owner.end_run(run)


