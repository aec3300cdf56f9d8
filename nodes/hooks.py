"""Wrapper and callback installation: how a patch (DFAApply's plan, DFACalibrate's search) sits in a cloned MODEL.

One chained `optimized_attention_override` (the `HostPatch`; during a sampling run a per-run `router.Run` takes
its place) plus keyed wrappers: OUTER_SAMPLE (per-run state, summary line), APPLY_MODEL (latent grid, text
length, sigma -> plan position, SD3 layer counter; the run stays on top of the override slot, peers.py) and the
callback ON_CLEANUP (free the run's device memory).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Callable

import torch

from ..kernels.engine import ArrowBackend
from .host import SLOT
from .layouts import Layout, Reason
from .peers import describe_override
from .router import TO_FORWARD, Run
from .summary import RunSummary

__all__ = ["WRAPPER_KEY", "SLOT", "TO_PATCH", "TO_RUN", "HostPatch", "install_patch", "begin_run", "forward_options"]

log = logging.getLogger(__name__)

WRAPPER_KEY = "dfav2"  # key of our wrappers and callbacks
TO_PATCH = "dfav2_patch"  # the HostPatch (configuration) in model_options["transformer_options"]
TO_RUN = "dfav2_run"  # the per-run Run, only in the guider's per-run copy of model_options


class HostPatch:
    """What `install_patch` puts into the override slot of a cloned MODEL (one per Apply/Calibrate execution).

    Outside a sampling run (no OUTER_SAMPLE wrapper around the call) it only passes through to the previous
    override or the host backend, so it is exact. Each sampling run gets a fresh `new_run(...)` in its place.
    """

    def __init__(self, *, layout: Layout, backend: ArrowBackend, prev: Callable[..., Any] | None = None) -> None:
        self.layout = layout
        self.backend: ArrowBackend = backend
        self.prev = prev  # set by install_patch: the override that was in the slot before
        self.last_summary: RunSummary | None = None
        self._active_runs: weakref.WeakSet[Run] = weakref.WeakSet()

    def __deepcopy__(self, memo: dict) -> HostPatch:  # ComfyUI <= 0.12 deep-copies model_options on clone()
        return self

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.prev is not None:
            return self.prev(func, *args, **kwargs)
        return func(*args, **kwargs)

    def new_run(self, prev: Callable[..., Any] | None, model_sampling: Any) -> Run:
        raise NotImplementedError

    def end_run(self, run: Run) -> RunSummary:
        """Called once after each sampling run (in the OUTER_SAMPLE wrapper's `finally`)."""
        summary = run.finish()
        self.last_summary = summary
        return summary


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def forward_options(transformer_options: dict, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                    **extra: Any) -> dict:
    """A copy of `transformer_options` that carries this forward's routing info (what APPLY_MODEL adds).

    For callers that run the diffusion model directly (benchmarks) with a run from `begin_run`.
    """
    run = transformer_options.get(TO_RUN)
    if not isinstance(run, Run):
        return transformer_options
    out = dict(transformer_options)
    out[TO_FORWARD] = run.begin_forward(x, sigma, context, transformer_options, extra)
    return out


def _apply_model_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    to = _arg(args, kwargs, 5, "transformer_options")
    run = to.get(TO_RUN) if isinstance(to, dict) else None
    if not isinstance(run, Run):
        return executor(*args, **kwargs)
    x = _arg(args, kwargs, 0, "x")
    t = _arg(args, kwargs, 1, "t")
    context = _arg(args, kwargs, 3, "c_crossattn")
    extra = {k: v for k, v in kwargs.items() if k in ("ref_latents", "attention_mask")}
    try:
        fwd = run.begin_forward(x, t, context, to, extra)
    except Exception as exc:  # noqa: BLE001
        run.fallback(Reason("internal", f"forward set-up failed ({type(exc).__name__}: {exc})"))
        return executor(*args, **kwargs)
    new_to = dict(to)
    new_to[TO_FORWARD] = fwd
    top = to.get(SLOT)
    if top is not run:  # e.g. Model Sparse Attention re-installed itself on top this step: chain it, stay on top
        if top is not None and top is not run.owner and top is not run.prev:
            run.chain_dense(top)
            _say_chained(run, top, later=True)
        new_to[SLOT] = run
    if "transformer_options" in kwargs or len(args) <= 5:
        kwargs = {**kwargs, "transformer_options": new_to}
    else:
        args = args[:5] + (new_to,) + args[6:]
    out = executor(*args, **kwargs)
    run.end_forward(fwd)
    return out


def _say_chained(run: Run, override: Any, *, later: bool) -> None:
    """Once per run: which node serves which calls when another override shares the slot (peers.py)."""
    name = describe_override(override)
    where = "after DFAApply (or re-installed itself on top)" if later else "before DFAApply"
    run.warn_once(
        "chained", "DiTFastAttnV2: the attention override %s was placed %s; DiTFastAttnV2 routes every attention call "
        "of this model and %s runs the heads the plan keeps full and the calls that run dense", name, where, name,
        level=logging.INFO)


def begin_run(patch: HostPatch, model_options: dict, model_sampling: Any) -> Run:
    """Install a fresh run for `patch` into `model_options` (a per-run copy) and return it."""
    to = model_options.setdefault("transformer_options", {})
    cur = to.get(SLOT)
    later = not (cur is patch or isinstance(cur, (HostPatch, Run)))
    prev = cur if later else patch.prev  # a (non-chaining) override installed after us serves the dense heads
    run = patch.new_run(prev, model_sampling)
    run.owner = patch
    if prev is not None:
        _say_chained(run, prev, later=later)
    to[TO_RUN] = run
    to[SLOT] = run
    patch._active_runs.add(run)
    return run


def _outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    guider = executor.class_obj
    orig = getattr(guider, "model_options", None)
    to = orig.get("transformer_options") if isinstance(orig, dict) else None
    if not isinstance(to, dict) or not isinstance(to.get(TO_PATCH), HostPatch) or isinstance(to.get(TO_RUN), Run):
        return executor(*args, **kwargs)
    patch = to[TO_PATCH]
    import comfy.model_patcher

    options = comfy.model_patcher.create_model_options_clone(orig)
    model_sampling = guider.model_patcher.model.model_sampling
    run = begin_run(patch, options, model_sampling)
    guider.model_options = options
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig
        patch.end_run(run)


def _on_cleanup(patch: HostPatch, patcher: Any, *_: Any, **__: Any) -> None:
    for run in list(patch._active_runs):
        run.release()


def install_patch(model: Any, patch: HostPatch) -> Any:
    """Clone `model` and install `patch`: the override slot (chaining what was there; an earlier DFA patch is
    replaced, not chained), keyed OUTER_SAMPLE / APPLY_MODEL wrappers and an ON_CLEANUP callback (an
    ON_PREPARE_STATE callback left by an earlier pack version is removed). The input model is not modified. Sets
    `patch.prev`."""
    import comfy.patcher_extension as pe

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(SLOT)
    if isinstance(prev, HostPatch):
        log.info("DiTFastAttnV2: the model already had a DiTFastAttnV2 patch; the new one replaces it")
        prev = prev.prev
    elif isinstance(prev, Run):
        prev = prev.owner.prev if prev.owner is not None else prev.prev
    for kind in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.APPLY_MODEL):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
    for kind in (pe.CallbacksMP.ON_PREPARE_STATE, pe.CallbacksMP.ON_CLEANUP):
        m.remove_callbacks_with_key(kind, WRAPPER_KEY)
    patch.prev = prev
    to[TO_PATCH] = patch
    to[SLOT] = patch
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, functools.partial(_on_cleanup, patch))
    return m
