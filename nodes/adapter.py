"""Host adapter: run a DiTFastAttnV2 plan inside ComfyUI's Flux and SD3/SD3.5 models via public hooks only.

`apply_dfa` clones the MODEL and installs one chained `optimized_attention_override` (a `DFAPatch`; during a
sampling run a per-run `_Run` takes its place) plus keyed wrappers: OUTER_SAMPLE (per-run state, percent
range, summary line), APPLY_MODEL (latent grid, text length, sigma -> plan position, SD3 layer counter) and
the callbacks ON_PREPARE_STATE (stay on top of the override slot) and ON_CLEANUP (free the head cache).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import weakref
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..calibration.plan import LayerSpec, ModelSignature, Plan
from ..kernels.cost import kept_pairs
from ..kernels.engine import ArrowBackend, CallContext, DenseFn, HeadwiseEngine
from ..kernels.methods import FULL, LayerDecision, MethodKind

__all__ = [
    "MIN_HOST_OVERRIDE",
    "MIN_HOST_FLUX",
    "HostSupport",
    "host_support",
    "model_signature",
    "apply_dfa",
    "install_patch",
    "HostPatch",
    "DFAPatch",
    "CalibrationPatch",
    "RunSummary",
    "forward_options",
    "standalone_run",
    "finish_run",
]

log = logging.getLogger(__name__)

#: First ComfyUI release with `transformer_options["optimized_attention_override"]` (PR #9639).
MIN_HOST_OVERRIDE = "0.3.59"
#: First ComfyUI release whose Flux passes `block_type` / `block_index` to attention (PR #10841).
MIN_HOST_FLUX = "0.3.75"

WRAPPER_KEY = "dfav2"  # key of our wrappers and callbacks
SLOT = "optimized_attention_override"
TO_PATCH = "dfav2_patch"  # the DFAPatch (configuration) in model_options["transformer_options"]
TO_RUN = "dfav2_run"  # the per-run _Run, only in the guider's per-run copy of model_options
TO_FORWARD = "dfav2_forward"  # the per-forward _Forward, only in apply_model's copy of transformer_options



def _no_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compiler.disable(fn)`, applied at the first call: keeps Python bookkeeping out of compiled graphs
    without importing torch._dynamo (and with it Triton) when the pack is imported."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disable = getattr(getattr(torch, "compiler", None), "disable", None)
            disabled.append(disable(fn) if disable is not None else fn)
        return disabled[0](*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------ host checks


@dataclass(frozen=True)
class HostSupport:
    """What the running ComfyUI offers; each flag is found by feature detection, not by version number."""

    version: str
    override: bool  # optimized_attention_override honoured by the attention backends
    flux_block_identity: bool  # Flux writes block_type / block_index into transformer_options

    def flux_error(self) -> str | None:
        if not self.override:
            return (
                f"DiTFastAttnV2 needs ComfyUI >= {MIN_HOST_OVERRIDE} (attention override hook) and >= {MIN_HOST_FLUX} "
                f"for Flux; this is ComfyUI {self.version}. Update ComfyUI."
            )
        if not self.flux_block_identity:
            return (
                f"DiTFastAttnV2 on Flux needs ComfyUI >= {MIN_HOST_FLUX} (Flux block_type/block_index in "
                f"transformer_options); this is ComfyUI {self.version}. Update ComfyUI (SD3/SD3.5 work from "
                f"{MIN_HOST_OVERRIDE})."
            )
        return None

    def sd3_error(self) -> str | None:
        if not self.override:
            return (
                f"DiTFastAttnV2 needs ComfyUI >= {MIN_HOST_OVERRIDE} (transformer_options "
                f"'optimized_attention_override'); this is ComfyUI {self.version}. Update ComfyUI."
            )
        return None


def _source_mentions(obj: Any, needle: str) -> bool | None:
    try:
        return needle in inspect.getsource(obj)
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=1)
def host_support() -> HostSupport:
    """Probe the host once (imports ComfyUI modules; call only inside ComfyUI)."""
    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "unknown"
    import comfy.ldm.modules.attention as attention

    wrap = getattr(attention, "wrap_attn", None)
    override = wrap is not None and _source_mentions(wrap, SLOT) is not False
    try:
        from comfy.ldm.flux.model import Flux

        flux_ids = _source_mentions(Flux.forward_orig, "block_index")
    except ImportError:
        flux_ids = False
    return HostSupport(str(version), bool(override), flux_ids is not False)


# ------------------------------------------------------------------------------------- model signature


@dataclass(frozen=True)
class _ModelInfo:
    signature: ModelSignature
    patch_size: int
    register_length: int  # SD3 register tokens prepended to the text (0 for released checkpoints)


def _model_info(model: Any) -> _ModelInfo:
    base = getattr(model, "model", model)
    dm = getattr(base, "diffusion_model", base)
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    if isinstance(dm, Flux):
        heads = int(dm.num_heads)
        head_dim = int(dm.hidden_size) // heads
        layers = [LayerSpec(f"double.{i}", heads, head_dim) for i in range(len(dm.double_blocks))]
        layers += [LayerSpec(f"single.{i}", heads, head_dim) for i in range(len(dm.single_blocks))]
        return _ModelInfo(ModelSignature("flux", tuple(layers)), int(dm.patch_size), 0)
    if isinstance(dm, MMDiT):
        layers = []
        for i, block in enumerate(dm.joint_blocks):
            xb = block.x_block
            layers.append(LayerSpec(f"joint.{i}", int(xb.attn.num_heads), int(xb.attn.head_dim)))
            if getattr(xb, "x_block_self_attn", False):
                layers.append(LayerSpec(f"joint.{i}.attn2", int(xb.attn2.num_heads), int(xb.attn2.head_dim), True))
        return _ModelInfo(ModelSignature("sd3", tuple(layers)), int(dm.patch_size), int(getattr(dm, "register_length", 0)))
    raise ValueError(
        f"DiTFastAttnV2 supports Flux and SD3/SD3.5 models; this model is {type(dm).__name__} "
        f"({type(base).__name__}). Connect a Flux or SD3 model."
    )


def model_signature(model: Any) -> ModelSignature:
    """The attention layers of a ComfyUI MODEL (ModelPatcher, BaseModel or diffusion model) in forward order.

    Flux: ``double.<i>`` then ``single.<i>``; SD3/SD3.5: ``joint.<i>`` and, for SD3.5-Medium's blocks with a
    second image-only self-attention, ``joint.<i>.attn2`` (image_only) right after it.
    Raises ValueError for any other model family.
    """
    return _model_info(model).signature


# ----------------------------------------------------------------------------------------- run records


@dataclass(frozen=True)
class ForwardRecord:
    """One model forward of a run: its sigma, the plan position used (None: dense) and the cache key."""

    sigma: float
    position: int | None
    cache_key: Hashable


@dataclass(frozen=True)
class RunSummary:
    """What one sampling run did (also logged as one line)."""

    forwards: tuple[ForwardRecord, ...]
    attention_calls: int
    engine_calls: int
    heads: dict[str, int]
    cache_hits: int
    cache_misses: int
    fallbacks: dict[str, int]
    kept_flops: int
    dense_flops: int

    @property
    def flops_saved(self) -> float:
        return 0.0 if self.dense_flops == 0 else 1.0 - self.kept_flops / self.dense_flops

    def line(self) -> str:
        total = sum(self.heads.values()) or 1
        share = " / ".join(f"{k} {100.0 * v / total:.0f}%" for k, v in self.heads.items())
        fb = sum(self.fallbacks.values())
        reasons = f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.fallbacks.items()))})" if fb else ""
        return (
            f"DiTFastAttnV2: {len(self.forwards)} forwards, {self.attention_calls} attention calls; heads {share}; "
            f"cache hits {self.cache_hits}, misses {self.cache_misses}; est. attention FLOPs saved "
            f"{100.0 * self.flops_saved:.1f}%; dense fallbacks {fb}{reasons}"
        )


# ------------------------------------------------------------------------------------ the patch object


class HostPatch:
    """What `install_patch` puts into the override slot of a cloned MODEL (one per Apply/Calibrate execution).

    Outside a sampling run (no OUTER_SAMPLE wrapper around the call) it only passes through to the previous
    override or the host backend, so it is exact. Each sampling run gets a fresh `new_run(...)` in its place.
    """

    def __init__(self, *, info: _ModelInfo, backend: ArrowBackend, prev: Callable[..., Any] | None = None) -> None:
        self.info = info
        self.family = info.signature.family
        self.backend: ArrowBackend = backend
        self.prev = prev  # set by install_patch: the override that was in the slot before
        # Flux: (block_type, block_index) as the host writes them -> signature layer index
        self.flux_layers: dict[tuple[str, int], int] = {}
        if self.family == "flux":
            for i, spec in enumerate(info.signature.layers):
                block_type, index = spec.name.split(".")
                self.flux_layers[(block_type, int(index))] = i
        self._active_runs: weakref.WeakSet[_Run] = weakref.WeakSet()

    def __deepcopy__(self, memo: dict) -> HostPatch:  # ComfyUI <= 0.12 deep-copies model_options on clone()
        return self

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _dense_call(self.prev, func, args, kwargs)

    def new_run(self, prev: Callable[..., Any] | None, model_sampling: Any) -> _Run:
        raise NotImplementedError

    def end_run(self, run: _Run) -> None:
        """Called once after each sampling run (in the OUTER_SAMPLE wrapper's `finally`)."""


class DFAPatch(HostPatch):
    """An applied plan (DFAApply). `last_summary` holds the last sampling run's summary."""

    def __init__(
        self,
        *,
        plan: Plan,
        info: _ModelInfo,
        start_percent: float,
        end_percent: float,
        backend: ArrowBackend,
        prev: Callable[..., Any] | None = None,
        label: str = "",
    ) -> None:
        super().__init__(info=info, backend=backend, prev=prev)
        self.plan = plan
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.label = label
        self.last_summary: RunSummary | None = None

    def new_run(self, prev: Callable[..., Any] | None, model_sampling: Any) -> _Run:
        return _PlanRun(self, prev, model_sampling)

    def end_run(self, run: _Run) -> None:
        summary = run.finish()
        self.last_summary = summary
        log.info("%s", summary.line())

    def __repr__(self) -> str:
        return f"DFAPatch({self.label or self.plan.description or 'plan'}, {self.info.signature.describe()})"


class CalibrationPatch(HostPatch):
    """A calibration pass (DFACalibrate): every routed attention call goes to `calibrator.attend(...)`.

    After the run: `fallbacks` (reason -> calls that the calibrator did not see), `txt_len` (text tokens of the
    first routed forward) and `error` (the first exception raised by the calibrator; those calls ran dense).
    """

    def __init__(self, *, info: _ModelInfo, calibrator: Any, backend: ArrowBackend = "auto",
                 prev: Callable[..., Any] | None = None) -> None:
        super().__init__(info=info, backend=backend, prev=prev)
        self.calibrator = calibrator
        self.fallbacks: dict[str, int] = {}
        self.txt_len: int | None = None
        self.error: BaseException | None = None
        self.last_summary: RunSummary | None = None

    def new_run(self, prev: Callable[..., Any] | None, model_sampling: Any) -> _Run:
        return _CalibrationRun(self, prev, None)  # the whole schedule; no percent range

    def end_run(self, run: _Run) -> None:
        summary = run.finish()
        self.last_summary = summary
        self.fallbacks = dict(summary.fallbacks)


def _dense_call(prev: Callable[..., Any] | None, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if prev is not None:
        return prev(func, *args, **kwargs)
    return func(*args, **kwargs)


class _Forward:
    """Per model forward (one apply_model call): geometry, plan position, cache key, SD3 layer counter."""

    __slots__ = ("run", "position", "txt_len", "n_img", "key", "next_layer", "reason")

    def __init__(self, run: _Run, position: int | None, txt_len: int, n_img: int, key: Hashable, reason: str | None):
        self.run = run
        self.position = position
        self.txt_len = txt_len
        self.n_img = n_img
        self.key = key
        self.next_layer = 0
        self.reason = reason


@dataclass
class _Routed:
    layer: int
    position: int
    txt_len: int
    n_img: int
    key: Hashable
    heads: int
    head_dim: int
    batch: int
    seq_len: int
    flat: bool  # SD3 layout [B, L, H*D]


@dataclass
class _Counters:
    attention_calls: int = 0
    passthrough_full_heads: int = 0
    errors: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    kept_pairs: int = 0
    dense_pairs: int = 0


@functools.lru_cache(maxsize=4096)
def _pair_cost(decision: LayerDecision, txt_len: int, n_img: int, hit: bool) -> tuple[int, int]:
    kept = 0
    for m in decision.methods:
        kept += kept_pairs(txt_len, n_img, FULL if (m.kind is MethodKind.CACHE and not hit) else m)
    return kept, (txt_len + n_img) ** 2 * decision.heads


class _Run:
    """One sampling run of a HostPatch: routing (layer identity, geometry checks, dense fallbacks with one
    warning per kind), forward log and counters. Subclasses decide positions and run the routed calls."""

    def __init__(self, patch: HostPatch, prev: Callable[..., Any] | None, model_sampling: Any) -> None:
        self.patch = patch
        self.prev = prev
        self.layers = patch.info.signature.layers
        self.engines: dict[torch.device, HeadwiseEngine] = {}
        self.forwards: list[ForwardRecord] = []
        self.counters = _Counters()
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> _Run:
        return self

    # -- hooks for subclasses -------------------------------------------------------------------------
    def position(self, sigma: float) -> int | None:
        """Position of a forward at `sigma` (None: every call of the forward runs dense)."""
        raise NotImplementedError

    def shortcut(self, fwd: _Forward, layer: int, heads: int, seq_len: int, batch: int, head_dim: int) -> bool:
        """True: this routed call runs exactly as the host would (no engine work needed)."""
        return False

    def check_run(self, n_img: int, to: dict) -> None:
        """Called for every routed forward: compare the run with what the plan was made for (warn once)."""

    def forget(self, fwd: _Forward, layer: int, device: torch.device) -> None:
        """The layer ran the host's attention instead of the routed path."""

    def attend(self, r: _Routed, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn,
               scale: float | None) -> torch.Tensor:
        raise NotImplementedError

    def on_error(self, exc: Exception) -> None:
        self.fallback("engine", f"head-wise attention failed ({type(exc).__name__}: {exc})")

    def fallback(self, category: str, detail: str) -> None:
        self.counters.fallbacks[category] += 1
        if category not in self._warned:
            with self._lock:
                first = category not in self._warned
                self._warned.add(category)
            if first:
                log.warning("DiTFastAttnV2: %s; using the host's dense attention (warned once per run)", detail)

    @_no_compile
    def begin_forward(self, x: Any, sigma_t: Any, context: Any, to: dict, extra: dict) -> _Forward:
        reason = None
        position = None
        txt_len = n_img = 0
        sigmas = to.get("sigmas", sigma_t)
        try:
            sigma = float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else float(sigmas[0])
        except Exception:  # noqa: BLE001 - never fail a forward over bookkeeping
            sigma = math.nan
        key: Hashable = None
        if not (torch.is_tensor(x) and x.dim() == 4):
            reason = "latent is not [B, C, H, W]"
        elif context is None or not torch.is_tensor(context) or context.dim() != 3:
            reason = "no text conditioning tensor"
        elif extra.get("ref_latents") is not None:
            reason = "reference latents (Kontext / edit) are not part of a plan's layout"
        elif extra.get("attention_mask") is not None:
            reason = "an attention mask is present"
        elif self.patch.family == "sd3" and _has_block_replace(to):
            reason = "block replace patches (e.g. Skip Layer Guidance) make SD3 layer identity unreliable"
        elif not math.isfinite(sigma):
            reason = "no sigma for this forward"
        if reason is None:
            p = self.patch.info.patch_size
            n_img = -(-int(x.shape[-2]) // p) * -(-int(x.shape[-1]) // p)
            txt_len = int(context.shape[1]) + self.patch.info.register_length
            self.check_run(n_img, to)
            position = self.position(sigma)
            chunks = to.get("uuids") or to.get("cond_or_uncond") or ()
            try:
                chunk_key = tuple(chunks)
            except TypeError:
                chunk_key = (id(chunks),)
            key = (str(x.device), chunk_key, int(x.shape[0]))
        fwd = _Forward(self, position, txt_len, n_img, key, reason)
        self.forwards.append(ForwardRecord(sigma, position if reason is None else None, key))
        return fwd

    @_no_compile
    def end_forward(self, fwd: _Forward) -> None:
        if self.patch.family == "sd3" and fwd.reason is None and fwd.next_layer not in (0, len(self.layers)):
            self.fallback(
                "layer count",
                f"a forward made {fwd.next_layer} attention calls but the model has {len(self.layers)} attention "
                "layers (blocks skipped or repeated?); later layers of such a forward may be misidentified",
            )

    # -- the override ---------------------------------------------------------------------------------
    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(self._local, "depth", 0):
            # Re-entered through a chained override that points back at us: run the host backend.
            return func(*args, **kwargs)
        try:
            routed = self._route(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the override never raises
            self.fallback("internal", f"routing failed ({type(exc).__name__}: {exc})")
            routed = None
        if not isinstance(routed, _Routed):
            return self._dense(func, args, kwargs)
        try:
            return self._attend(routed, func, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            self.on_error(exc)
            return self._dense(func, args, kwargs)

    def _dense(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            return _dense_call(self.prev, func, args, kwargs)
        finally:
            self._local.depth -= 1

    @_no_compile
    def _route(self, args: tuple, kwargs: dict) -> _Routed | None:
        """The plan entry of this call, or None for a plain dense call (reasons are logged once per run)."""
        c = self.counters
        c.attention_calls += 1
        to = kwargs.get("transformer_options")
        fwd = to.get(TO_FORWARD) if isinstance(to, dict) else None
        if not isinstance(fwd, _Forward) or fwd.run is not self or not isinstance(to, dict):
            return None  # not inside a forward of the patched model (e.g. a ControlNet): host attention
        if fwd.reason is not None:
            self.fallback(fwd.reason, fwd.reason)
            return None
        # layer identity
        if self.patch.family == "flux":
            bt, bi = to.get("block_type"), to.get("block_index")
            if bt is None or bi is None:
                self.fallback("no block identity", f"the host gives no Flux block_type/block_index (needs ComfyUI >= {MIN_HOST_FLUX})")
                return None
            layer = self.patch.flux_layers.get((bt, bi))
            if layer is None:
                self.fallback("unknown layer", f"unknown Flux layer {bt}.{bi}")
                return None
        else:
            layer = fwd.next_layer
            fwd.next_layer += 1
            if layer >= len(self.layers):
                self.fallback("unknown layer", f"more attention calls in one forward than the model's {len(self.layers)} layers")
                return None
        if fwd.position is None:
            return None  # outside start/end percent: dense
        routed = self._check_call(fwd, layer, args, kwargs)
        if routed is None and args and torch.is_tensor(args[0]):
            self.forget(fwd, layer, args[0].device)
        return routed

    def _check_call(self, fwd: _Forward, layer: int, args: tuple, kwargs: dict) -> _Routed | None:
        assert fwd.position is not None
        c = self.counters
        spec = self.layers[layer]
        # shapes and arguments
        if len(args) < 3 or len(args) > 4:
            self.fallback("arguments", f"unexpected attention call with {len(args)} positional arguments")
            return None
        q, k, v = args[0], args[1], args[2]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if kwargs.get("mask") is not None:
            self.fallback("mask", "an attention mask is present")
            return None
        if kwargs.get("enable_gqa"):
            self.fallback("gqa", "grouped-query attention is not supported")
            return None
        if not isinstance(heads, int) or heads < 1:
            self.fallback("heads", f"attention call without a head count ({heads!r})")
            return None
        flat = not kwargs.get("skip_reshape", False)
        if flat:
            if q.dim() != 3 or q.shape[-1] % heads:
                self.fallback("layout", f"unexpected query shape {tuple(q.shape)} for {heads} heads")
                return None
            batch, seq_len, hd = q.shape
            head_dim = hd // heads
        else:
            if q.dim() != 4 or q.shape[1] != heads:
                self.fallback("layout", f"unexpected query shape {tuple(q.shape)} for {heads} heads")
                return None
            batch, _, seq_len, head_dim = q.shape
        if flat:  # SD3 passes v (sometimes k) as [B, L, H, D] next to q [B, L, H*D]
            same = all(t.shape == q.shape or t.shape == (batch, seq_len, heads, head_dim) for t in (k, v))
        else:
            same = k.shape == q.shape and v.shape == q.shape
        if not same:
            self.fallback("Lq != Lk", f"query {tuple(q.shape)} and key/value {tuple(k.shape)}/{tuple(v.shape)} differ (KV cache?)")
            return None
        if heads != spec.heads or head_dim != spec.head_dim:
            self.fallback(
                "head mismatch",
                f"layer {spec.name}: plan expects {spec.heads} heads × {spec.head_dim}, call has {heads} × {head_dim}",
            )
            return None
        txt_len = 0 if spec.image_only else fwd.txt_len
        if seq_len != txt_len + fwd.n_img:
            self.fallback(
                "layout",
                f"layer {spec.name}: sequence length {seq_len} is not text {txt_len} + image grid {fwd.n_img}",
            )
            return None
        if self.shortcut(fwd, layer, heads, seq_len, batch, head_dim):
            return None  # exactly the host call
        return _Routed(layer, fwd.position, txt_len, fwd.n_img, fwd.key, heads, head_dim, batch, seq_len, flat)

    def _attend(self, r: _Routed, func: Callable[..., Any], args: tuple, kwargs: dict) -> torch.Tensor:
        q, k, v = args[0], args[1], args[2]
        if r.flat:
            q, k, v = (t.reshape(r.batch, r.seq_len, r.heads, r.head_dim).transpose(1, 2) for t in (q, k, v))
        dense_kwargs = {key: val for key, val in kwargs.items() if key not in ("heads", "skip_reshape", "skip_output_reshape")}

        def dense(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            out = self._dense(func, (q_, k_, v_, q_.shape[1]), {**dense_kwargs, "skip_reshape": True, "skip_output_reshape": True})
            if out.dim() == 3:  # a chained override that ignored skip_output_reshape
                out = out.unflatten(-1, (q_.shape[1], q_.shape[-1])).transpose(1, 2)
            return out

        out = self.attend(r, q, k, v, dense, kwargs.get("scale"))
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(r.batch, r.seq_len, r.heads * r.head_dim)

    # -- end of run ------------------------------------------------------------------------------------
    def release(self) -> None:
        for eng in list(self.engines.values()):
            eng.cache.clear()

    def finish(self) -> RunSummary:
        heads = {m.value: 0 for m in MethodKind}
        hits = misses = calls = 0
        for eng in self.engines.values():
            for name, n in eng.stats.heads.items():
                heads[name] += n
            hits += eng.stats.cache_hits
            misses += eng.stats.cache_misses
            calls += eng.stats.calls
        heads[MethodKind.FULL.value] += self.counters.passthrough_full_heads
        summary = RunSummary(
            forwards=tuple(self.forwards),
            attention_calls=self.counters.attention_calls,
            engine_calls=calls,
            heads=heads,
            cache_hits=hits,
            cache_misses=misses,
            fallbacks=dict(self.counters.fallbacks),
            kept_flops=4 * self.counters.kept_pairs,
            dense_flops=4 * self.counters.dense_pairs,
        )
        for eng in self.engines.values():
            eng.reset()
        self.engines.clear()
        return summary


class _PlanRun(_Run):
    """A DFAApply run: positions from the plan by sigma, per-device HeadwiseEngines with their head caches."""

    patch: DFAPatch

    def __init__(self, patch: DFAPatch, prev: Callable[..., Any] | None, model_sampling: Any) -> None:
        super().__init__(patch, prev, model_sampling)
        self.plan = patch.plan
        self.start_sigma = math.inf
        self.end_sigma = -math.inf
        if model_sampling is not None:
            if patch.start_percent > 0.0:
                self.start_sigma = float(model_sampling.percent_to_sigma(patch.start_percent))
            if patch.end_percent < 1.0:
                self.end_sigma = float(model_sampling.percent_to_sigma(patch.end_percent))

    def _engine(self, device: torch.device) -> HeadwiseEngine:
        eng = self.engines.get(device)
        if eng is None:
            with self._lock:
                eng = self.engines.setdefault(device, HeadwiseEngine(self.plan, backend=self.patch.backend))
        return eng

    def position(self, sigma: float) -> int | None:
        if self.end_sigma < sigma <= self.start_sigma:
            return self.plan.position_for_sigma(sigma)
        return None

    def check_run(self, n_img: int, to: dict) -> None:
        cal = self.plan.calibration
        if cal is None or "run differs" in self._warned:
            return
        self._warned.add("run differs")
        notes = []
        sample_sigmas = to.get("sample_sigmas")
        steps = len(sample_sigmas) - 1 if sample_sigmas is not None and len(sample_sigmas) > 1 else None
        if steps is not None and steps != cal.steps:
            notes.append(f"{steps} steps instead of {cal.steps}")
        p = self.patch.info.patch_size
        cal_img = -(-(cal.height // 8) // p) * -(-(cal.width // 8) // p)
        if n_img != cal_img:
            notes.append(f"{n_img} image tokens instead of {cal_img} ({cal.width}x{cal.height})")
        if notes:
            log.warning(
                "DiTFastAttnV2: this run differs from the plan's calibration (%s); the plan is mapped by sigma and "
                "arrow bands scale with the image, but its error budget was measured at the calibrated settings. "
                "Calibrate a plan for these settings if the result changes visibly.", "; ".join(notes))

    def shortcut(self, fwd: _Forward, layer: int, heads: int, seq_len: int, batch: int, head_dim: int) -> bool:
        assert fwd.position is not None
        if self.plan.decision(fwd.position, layer).all_full and not self.plan.keep_heads(fwd.position, layer):
            c = self.counters
            c.passthrough_full_heads += heads
            pairs = seq_len * seq_len * heads * batch * head_dim
            c.kept_pairs += pairs
            c.dense_pairs += pairs
            return True
        return False

    def forget(self, fwd: _Forward, layer: int, device: torch.device) -> None:
        eng = self.engines.get(device)
        if eng is not None and fwd.position is not None:  # no older output of this layer may be reused later
            eng.forget(CallContext(layer, fwd.position, fwd.txt_len, fwd.key))

    def attend(self, r: _Routed, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn,
               scale: float | None) -> torch.Tensor:
        engine = self._engine(q.device)
        stats = engine.stats
        hits_before = stats.cache_hits
        ctx = CallContext(layer=r.layer, position=r.position, txt_len=r.txt_len, cache_key=r.key)
        out = engine.attend(ctx, q, k, v, dense=dense, scale=scale)
        decision = self.plan.decision(r.position, r.layer)
        hit = not decision.cache_heads or stats.cache_hits > hits_before
        kept, dense_pairs = _pair_cost(decision, r.txt_len, r.n_img, hit)
        self.counters.kept_pairs += kept * r.batch * r.head_dim
        self.counters.dense_pairs += dense_pairs * r.batch * r.head_dim
        return out


class _CalibrationRun(_Run):
    """A DFACalibrate run: every routed call goes to the calibrator (which measures and decides)."""

    patch: CalibrationPatch

    def position(self, sigma: float) -> int | None:
        if self.patch.error is not None:
            return None
        try:
            self.patch.calibrator.begin_forward(sigma)
            return int(self.patch.calibrator.position)
        except Exception as exc:  # noqa: BLE001 - reported by calibrate_dfa after the run
            self.on_error(exc)
            return None

    def attend(self, r: _Routed, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn,
               scale: float | None) -> torch.Tensor:
        if self.patch.txt_len is None and not self.layers[r.layer].image_only:
            self.patch.txt_len = r.txt_len
        nxt = r.layer + 1 if r.layer + 1 < len(self.layers) else None
        return self.patch.calibrator.attend(r.layer, r.txt_len, q, k, v, dense=dense, chunk=r.key, next_layer=nxt)

    def on_error(self, exc: Exception) -> None:
        if self.patch.error is None:
            self.patch.error = exc
            log.error("DiTFastAttnV2 calibration: %s: %s", type(exc).__name__, exc)
        self.counters.errors += 1


def _has_block_replace(to: dict) -> bool:
    dit = (to.get("patches_replace") or {}).get("dit") or {}
    return any(isinstance(k, tuple) and k and k[0] == "double_block" for k in dit)


# --------------------------------------------------------------------------------- wrappers, callbacks


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def forward_options(transformer_options: dict, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, **extra: Any) -> dict:
    """A copy of `transformer_options` that carries this forward's routing info (what APPLY_MODEL adds).

    For callers that run the diffusion model directly (benchmarks) with a run from `begin_run`.
    """
    run = transformer_options.get(TO_RUN)
    if not isinstance(run, _Run):
        return transformer_options
    out = dict(transformer_options)
    out[TO_FORWARD] = run.begin_forward(x, sigma, context, transformer_options, extra)
    return out


def _apply_model_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    to = _arg(args, kwargs, 5, "transformer_options")
    run = to.get(TO_RUN) if isinstance(to, dict) else None
    if not isinstance(run, _Run):
        return executor(*args, **kwargs)
    x = _arg(args, kwargs, 0, "x")
    t = _arg(args, kwargs, 1, "t")
    context = _arg(args, kwargs, 3, "c_crossattn")
    extra = {k: v for k, v in kwargs.items() if k in ("ref_latents", "attention_mask")}
    try:
        fwd = run.begin_forward(x, t, context, to, extra)
    except Exception as exc:  # noqa: BLE001
        run.fallback("internal", f"forward set-up failed ({type(exc).__name__}: {exc})")
        return executor(*args, **kwargs)
    new_to = dict(to)
    new_to[TO_FORWARD] = fwd
    if "transformer_options" in kwargs or len(args) <= 5:
        kwargs = {**kwargs, "transformer_options": new_to}
    else:
        args = args[:5] + (new_to,) + args[6:]
    out = executor(*args, **kwargs)
    run.end_forward(fwd)
    return out


def begin_run(patch: HostPatch, model_options: dict, model_sampling: Any) -> _Run:
    """Install a fresh run for `patch` into `model_options` (a per-run copy) and return it."""
    to = model_options.setdefault("transformer_options", {})
    cur = to.get(SLOT)
    if cur is patch or isinstance(cur, (HostPatch, _Run)):
        prev = patch.prev
    else:
        prev = cur  # a non-chaining override installed after us: keep it for the dense heads
        if cur is not None:
            log.info("DiTFastAttnV2: another attention override was installed after DFAApply; chaining it for dense heads")
    run = patch.new_run(prev, model_sampling)
    to[TO_RUN] = run
    to[SLOT] = run
    patch._active_runs.add(run)
    return run


def _outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    guider = executor.class_obj
    orig = getattr(guider, "model_options", None)
    to = orig.get("transformer_options") if isinstance(orig, dict) else None
    if not isinstance(to, dict) or not isinstance(to.get(TO_PATCH), HostPatch) or isinstance(to.get(TO_RUN), _Run):
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


def _on_prepare_state(patcher: Any, timestep: Any = None, model_options: dict | None = None, *_: Any, **__: Any) -> None:
    """Stay on top of the override slot: a node that replaced it during the run gets chained, not lost."""
    if not isinstance(model_options, dict):
        return  # older hosts (0.3.64) call prepare_state without model_options
    to = model_options.get("transformer_options")
    if not isinstance(to, dict):
        return
    run = to.get(TO_RUN)
    if isinstance(run, _Run) and to.get(SLOT) is not run:
        cur = to.get(SLOT)
        if cur is not None and cur is not run.patch:
            run.prev = cur
        to[SLOT] = run


def _on_cleanup(patch: HostPatch, patcher: Any, *_: Any, **__: Any) -> None:
    for run in list(patch._active_runs):
        run.release()


# ----------------------------------------------------------------------------------------- public API


def apply_dfa(
    model: Any,
    *,
    plan: Plan,
    enabled: bool = True,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    backend: ArrowBackend = "auto",
    label: str = "",
) -> Any:
    """Return a clone of `model` (a ComfyUI ModelPatcher) that runs `plan` in its attention.

    Parameters
    ----------
    model : ModelPatcher of a Flux or SD3/SD3.5 model; never modified.
    plan : a validated Plan whose model signature equals the model's (`model_signature`).
    enabled : False returns `model` itself, untouched.
    start_percent, end_percent : sampling range (0 = first step, 1 = last) where the plan is used; outside it
        every head is dense. 0 <= start_percent <= end_percent <= 1.
    backend : arrow backend of the engine ("auto", "triton", "flex", "sdpa").

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
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a DiTFastAttnV2 Plan, got {type(plan).__name__}")
    support = host_support()
    if not support.override:
        raise RuntimeError(support.sd3_error())
    info = _model_info(model)
    sig = info.signature
    if sig.family == "flux" and support.flux_error():
        raise RuntimeError(support.flux_error())
    problem = plan.model.mismatch(sig)
    if problem is not None:
        raise ValueError(
            f"the plan does not fit this model: {problem}. Plan: {plan.model.describe()}; model: {sig.describe()}. "
            "Calibrate a plan for this model."
        )
    patch = DFAPatch(
        plan=plan, info=info, start_percent=float(start_percent), end_percent=float(end_percent),
        backend=backend, label=label,
    )
    return install_patch(model, patch)


def install_patch(model: Any, patch: HostPatch) -> Any:
    """Clone `model` and install `patch`: the override slot (chaining what was there; an earlier DFA patch is
    replaced, not chained), keyed OUTER_SAMPLE / APPLY_MODEL wrappers and ON_PREPARE_STATE / ON_CLEANUP
    callbacks. The input model is not modified. Sets `patch.prev`."""
    import comfy.patcher_extension as pe

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(SLOT)
    if isinstance(prev, HostPatch):
        log.info("DiTFastAttnV2: the model already had a DiTFastAttnV2 patch; the new one replaces it")
        prev = prev.prev
    elif isinstance(prev, _Run):
        prev = prev.patch.prev
    for kind in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.APPLY_MODEL):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
    for kind in (pe.CallbacksMP.ON_PREPARE_STATE, pe.CallbacksMP.ON_CLEANUP):
        m.remove_callbacks_with_key(kind, WRAPPER_KEY)
    patch.prev = prev
    to[TO_PATCH] = patch
    to[SLOT] = patch
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper)
    m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, WRAPPER_KEY, _on_prepare_state)
    m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, functools.partial(_on_cleanup, patch))
    return m


def standalone_run(
    model: Any, plan: Plan, *, backend: ArrowBackend = "auto", prev: Callable[..., Any] | None = None
) -> dict:
    """transformer_options with a fresh run of `plan`, for driving a diffusion model directly (no sampler).

    Per forward, pass ``forward_options(to, x, sigma, context)`` as the model's transformer_options;
    ``finish_run(to)`` returns the RunSummary. Used by bench/bench_overhead.py.
    """
    info = _model_info(model)
    problem = plan.model.mismatch(info.signature)
    if problem is not None:
        raise ValueError(f"the plan does not fit this model: {problem}")
    patch = DFAPatch(plan=plan, info=info, start_percent=0.0, end_percent=1.0, backend=backend, prev=prev)
    options: dict = {"transformer_options": {TO_PATCH: patch}}
    begin_run(patch, options, None)
    return options["transformer_options"]


def finish_run(transformer_options: dict) -> RunSummary:
    run = transformer_options[TO_RUN]
    summary = run.finish()
    run.patch.last_summary = summary
    return summary
