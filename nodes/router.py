"""The attention router: one sampling run's override. Per forward it fixes the geometry, plan position and cache
key; per attention call it decides (calls.py checks the call itself) whether the call can go to the consumer (the
engine or the calibrator) or runs the host's dense attention, and it keeps the run's forward log and warnings.
Layers the plan keeps exactly dense at a position go back to the host before any parsing (the lean path).

Plain Python and torch, no host import: CI tests it on fake calls of both layouts (Flux [B, H, L, D] with
``skip_reshape``, SD3 [B, L, H·D]). The host's wrappers (hooks.py) create a `Run` per sampling run.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..kernels.engine import AttentionConsumer, CallContext
from ..kernels.masks import TextMask, text_only_mask
from ..kernels.methods import MethodKind
from .calls import Call, dense_call, describe_forward, parse_call
from .layouts import Layout, Reason
from .peers import describe_override
from .summary import ForwardRecord, RunSummary

__all__ = ["Run", "Forward", "TO_FORWARD"]

log = logging.getLogger(__name__)

TO_FORWARD = "dfav2_forward"  # the per-forward Forward, only in apply_model's copy of transformer_options


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


_BYPASS = object()  # _route's answer for a call the plan keeps all full (no parsing, no engine)


def _is_compiling() -> bool:
    f = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(f()) if f is not None else False


class Forward:
    """Per model forward (one apply_model call): geometry, plan position, cache key, SD3 layer counter, and the
    lean path: `bypass[layer]` says the plan keeps that layer exactly dense here, `bypassed` lists those calls."""

    __slots__ = ("run", "position", "txt_len", "n_img", "refs", "ref_len", "key", "next_layer", "reason", "batch",
                 "consumer", "bypass", "bypassed", "calls_before", "masks")

    def __init__(self, run: Run, position: int | None, txt_len: int, n_img: int, key: Hashable,
                 reason: Reason | None, refs: tuple[int, ...] = ()) -> None:
        self.run = run
        self.position = position
        self.txt_len = txt_len
        self.n_img = n_img
        self.refs = refs  # token counts of the reference latents after the image (Kontext / edit)
        self.ref_len = sum(refs)
        self.key = key
        self.next_layer = 0
        self.reason = reason
        self.batch = 0
        self.consumer: AttentionConsumer | None = None
        self.bypass: tuple[bool, ...] | None = None
        self.bypassed: list[int] = []
        # The run's call counter at the start: end_forward compares the calls that reached the override with the
        # model's layers (shared by concurrent forwards, so it can only over-count).
        self.calls_before = run.attention_calls
        self.masks: dict[tuple, tuple[torch.Tensor, TextMask | str]] | None = None

    def check_mask(self, mask: torch.Tensor, batch: int, heads: int, seq_len: int, txt_len: int) -> TextMask | str:
        """`masks.text_only_mask`, once per (mask tensor, version, geometry) in this forward: the host hands every
        layer the same mask object, so a forward pays one small device reduction, not one per layer."""
        try:
            version = mask._version
        except (AttributeError, RuntimeError):  # inference-mode tensors have no version counter
            version = None
        key = (id(mask), version, tuple(mask.shape), batch, heads, seq_len, txt_len)
        seen = self.masks.get(key) if self.masks is not None else None
        if seen is not None and seen[0] is mask:
            return seen[1]
        result = text_only_mask(mask, batch, heads, seq_len, txt_len)
        if self.masks is None:
            self.masks = {}
        self.masks[key] = (mask, result)  # the reference keeps id(mask) from being reused within the forward
        self.run.mask_checks += 1
        return result


# ----------------------------------------------------------------------------------------------------- run


class Run:
    """One sampling run: the override object in the slot. Routed calls go to a consumer per device
    (`consumer_for(device)`); everything else runs `prev` (a chained override) or the host's backend.

    position(sigma): the plan position of a forward (None: all its calls dense). check(n_img, to): called per
    routed forward (warn-once comparisons with the calibration). on_error(exc): a consumer raised (the call
    then runs dense).
    """

    def __init__(
        self,
        layout: Layout,
        prev: Callable[..., Any] | None,
        *,
        consumer_for: Callable[[torch.device], AttentionConsumer],
        position: Callable[[float], int | None],
        check: Callable[[int, dict], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
        owner: Any = None,
        fast_dense: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.layout = layout
        self.layers = layout.signature.layers
        self.prev = prev
        self.owner = owner  # the patch this run belongs to (hooks.py)
        # (q, k, v, scale) [B, H, L, D] -> [B, H, L, D] for full heads on `fast_devices` (None: the host serves them)
        self.fast_dense = fast_dense
        self.fast_devices = ("cuda",)  # elsewhere the host's attention is as fast, and exact
        self._consumer_for = consumer_for
        self._position = position
        self._check = check
        self._on_error = on_error
        self.consumers: dict[torch.device, AttentionConsumer] = {}
        self.forwards: list[ForwardRecord] = []
        self.attention_calls = 0
        self.text_mask_calls = 0  # routed calls whose host mask touches only text key columns
        self.mask_checks = 0  # masks classified (one device reduction each): once per mask and forward
        self.fallbacks: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._geometry: dict[tuple, tuple[tuple, ...]] = {}
        self._unreported: list[Forward] = []  # forwards whose bypassed calls the consumer has not counted yet
        self._route_compiled = _no_compile(self._route)

    def __deepcopy__(self, memo: dict) -> Run:  # ComfyUI <= 0.12 deep-copies model_options
        return self

    def consumer(self, device: torch.device) -> AttentionConsumer:
        c = self.consumers.get(device)
        if c is None:
            with self._lock:
                c = self.consumers.get(device)
                if c is None:
                    c = self.consumers[device] = self._consumer_for(device)
                    if self.fast_dense is None and hasattr(c, "full_by_dense"):
                        c.full_by_dense = True  # the host (or a chained override) serves every full head
        return c

    def chain_dense(self, prev: Callable[..., Any]) -> None:
        """From now on `prev` (an override installed after this run began) serves the full heads and dense calls."""
        self.prev = prev
        self.fast_dense = None
        for c in self.consumers.values():
            if hasattr(c, "full_by_dense"):
                c.full_by_dense = True

    def warn_once(self, key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        if first:
            log.log(level, message, *args)

    def fallback(self, reason: Reason, calls: int = 1) -> None:
        with self._lock:
            self.fallbacks[reason.kind] += calls
        self.warn_once(reason.kind, "DiTFastAttnV2: %s; using the host's dense attention (warned once per run)", reason)

    # -- forwards ------------------------------------------------------------------------------------------
    @_no_compile
    def begin_forward(self, x: Any, sigma_t: Any, context: Any, to: dict, extra: dict) -> Forward:
        position = None
        sigmas = to.get("sigmas", sigma_t)
        try:
            sigma = float(sigmas.reshape(-1)[0]) if torch.is_tensor(sigmas) else float(sigmas[0])
        except Exception:  # noqa: BLE001 - never fail a forward over bookkeeping
            sigma = math.nan
        reason, txt_len, n_img, refs, key = describe_forward(self.layout, x, context, to, extra, sigma)
        if reason is None:
            if self._check is not None:
                self._check(n_img, to)
            try:
                position = self._position(sigma)
            except Exception as exc:  # noqa: BLE001 - e.g. the calibrator refused the sigma
                self.error(exc)
                position = None
        fwd = Forward(self, position, txt_len, n_img, key, reason, refs)
        if reason is None and position is not None:
            consumer = fwd.consumer = self.consumer(x.device)
            bypass_layers = getattr(consumer, "bypass_layers", None)  # the engine has it; the calibrator not
            if bypass_layers is not None:
                fwd.bypass = bypass_layers(position, len(self.layers))
                fwd.batch = int(x.shape[0])
                self._unreported.append(fwd)
        self.forwards.append(ForwardRecord(sigma, position if reason is None else None, key))
        return fwd

    @_no_compile
    def end_forward(self, fwd: Forward) -> None:
        self._report_bypassed(fwd)
        seen, layers = self.attention_calls - fwd.calls_before, len(self.layers)
        if seen < layers:  # the others ran without the plan: skipped blocks or attention around the slot
            self.fallback(Reason(
                "missed calls", f"a forward reached DiTFastAttnV2 with {seen} of the model's {layers} attention calls "
                "(blocks skipped, e.g. by Skip Layer Guidance, or attention computed without the override slot); "
                "the missing calls ran without the plan"), layers - seen)
        elif self.layout.counts_calls and fwd.reason is None and fwd.next_layer not in (0, len(self.layers)):
            self.fallback(Reason(
                "layer count",
                f"a forward made {fwd.next_layer} attention calls but the model has {len(self.layers)} attention "
                "layers (blocks skipped or repeated?); later layers of such a forward may be misidentified",
            ))

    def _report_bypassed(self, fwd: Forward) -> None:
        """Hand the forward's bypassed calls to its consumer (at end_forward, or at finish for callers that run
        the model without the host's wrapper and so never end a forward)."""
        if not fwd.bypassed or fwd.consumer is None:
            return
        layers, fwd.bypassed = tuple(fwd.bypassed), []
        gkey = (fwd.txt_len, fwd.n_img, fwd.refs)
        geo = self._geometry.get(gkey)
        if geo is None:
            geo = self._geometry[gkey] = tuple(
                (t, t + fwd.n_img + fwd.ref_len, s.head_dim, fwd.refs) for s in self.layers
                for t in (0 if s.image_only else fwd.txt_len,))
        fwd.consumer.record_bypassed(fwd.position, layers, geo, fwd.batch, fwd.key)  # type: ignore[attr-defined]

    def error(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(exc)
        else:
            self.fallback(Reason("engine", f"head-wise attention failed ({type(exc).__name__}: {exc})"))

    # -- the override ---------------------------------------------------------------------------------------
    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(self._local, "depth", 0):
            # Re-entered through a chained override that points back at us: run the host backend.
            return func(*args, **kwargs)
        try:
            # Under torch.compile the bookkeeping runs eagerly (a graph break here); eagerly, no wrapper cost.
            routed = (self._route_compiled if _is_compiling() else self._route)(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the override never raises
            self.fallback(Reason("internal", f"routing failed ({type(exc).__name__}: {exc})"))
            routed = None
        if routed is None:
            return self._dense(func, args, kwargs)
        if routed is _BYPASS:
            return self._all_full(func, args, kwargs)
        try:
            return self._attend(routed, func, kwargs)
        except Exception as exc:  # noqa: BLE001
            self.error(exc)
            return self._dense(func, args, kwargs)

    def _all_full(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A call whose heads all run full: `fast_dense` where set and the call is plain, else the host."""
        fast = self.fast_dense
        q = args[0] if args else None
        if (fast is None or kwargs.get("mask") is not None or not torch.is_tensor(q)
                or q.device.type not in self.fast_devices):
            return self._dense(func, args, kwargs)
        try:
            return dense_call(fast, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the override never raises
            self.fallback(Reason("dense", f"fast dense attention failed ({type(exc).__name__}: {exc})"))
            return self._dense(func, args, kwargs)

    def _dense(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            if self.prev is not None:  # the host's precedence: an override wins over a preferred backend
                return self.prev(func, *args, **kwargs)
            if "preferred_attention" in kwargs:
                # A checkpoint's own backend choice (hosts that hand it to overrides): honour it like the host would.
                kwargs = dict(kwargs)
                preferred = getattr(kwargs.pop("preferred_attention"), "function", None)
                if preferred is not None:
                    return preferred(*args, **kwargs)
            return func(*args, **kwargs)
        finally:
            local.depth -= 1

    def _route(self, args: tuple, kwargs: dict) -> tuple[Call, CallContext, AttentionConsumer] | object | None:
        """The consumer call for this attention call, `_BYPASS` for a layer the plan keeps all full here, or None
        for a plain dense call (reasons warned once)."""
        with self._lock:  # the MultiGPU CFG split routes from one thread per GPU
            self.attention_calls += 1
        to = kwargs.get("transformer_options")
        fwd = to.get(TO_FORWARD) if isinstance(to, dict) else None
        if not isinstance(fwd, Forward) or fwd.run is not self:
            return None  # not inside a forward of the patched model (e.g. a ControlNet): host attention
        if fwd.reason is not None:
            self.fallback(fwd.reason)
            return None
        if self.layout.counts_calls:
            layer: int | Reason = fwd.next_layer
            fwd.next_layer += 1
            if fwd.next_layer > len(self.layers):
                layer = Reason("unknown layer", f"more attention calls in one forward than the model's {len(self.layers)} layers")
        else:
            layer = self.layout.block_layer(to)  # type: ignore[arg-type]
        if isinstance(layer, Reason):
            self.fallback(layer)
            return None
        if fwd.position is None:
            return None  # outside start/end percent, or the consumer refused this forward: dense
        if fwd.bypass is not None and fwd.bypass[layer]:
            fwd.bypassed.append(layer)  # all full, nothing kept: exactly a dense call, counted per forward
            return _BYPASS
        spec = self.layers[layer]
        txt_len = 0 if spec.image_only else fwd.txt_len
        call = parse_call(spec, txt_len, fwd.n_img, args, kwargs, fwd.ref_len, fwd.check_mask)
        if isinstance(call, Reason):
            self.fallback(call)
            q = args[0] if args else None
            if torch.is_tensor(q):
                forget = getattr(self.consumers.get(q.device), "forget", None)
                if forget is not None:  # no older output of this layer may be reused later
                    forget(CallContext(layer, fwd.position, txt_len, fwd.key, fwd.refs))
            return None
        if call.mask is not None:
            with self._lock:
                self.text_mask_calls += 1
        return call, CallContext(layer, fwd.position, txt_len, fwd.key, fwd.refs, call.mask), self.consumer(call.q.device)

    def _attend(self, routed: tuple[Call, CallContext, AttentionConsumer], func: Callable[..., Any],
                kwargs: dict) -> torch.Tensor:
        call, ctx, consumer = routed
        q, k, v = call.q, call.k, call.v
        if call.flat:
            shape = (call.batch, call.seq_len, call.heads, call.head_dim)
            q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        scale = kwargs.get("scale")
        fast = self.fast_dense
        if fast is not None and call.mask is None and q.device.type in self.fast_devices:
            dense: Callable[..., torch.Tensor] = functools.partial(fast, scale=scale)
        else:
            dense = _DenseHeads(self, func, kwargs)
        out = consumer.attend(ctx, q, k, v, dense, scale)
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(call.batch, call.seq_len, call.heads * call.head_dim)

    # -- end of run ----------------------------------------------------------------------------------------
    def release(self) -> None:
        """Free what the consumers hold on the device (ON_CLEANUP): head caches, masks, tables."""
        for c in list(self.consumers.values()):
            release = getattr(c, "release", None)  # engines; the calibrator's state is its result (freed by its owner)
            if release is not None:
                release()

    def finish(self) -> RunSummary:
        for fwd in self._unreported:
            self._report_bypassed(fwd)
        self._unreported.clear()
        heads = {m.value: 0 for m in MethodKind}
        hits = misses = calls = kept = dense = fp8 = 0
        seen: set[int] = set()
        for c in self.consumers.values():
            if id(c) in seen:
                continue
            seen.add(id(c))
            st = c.stats
            for name, n in st.heads.items():
                heads[name] += n
            hits += st.cache_hits
            misses += st.cache_misses
            calls += st.calls
            kept += st.kept_flops
            dense += st.dense_flops
            fp8 += st.fp8_heads
        summary = RunSummary(
            forwards=tuple(self.forwards),
            attention_calls=self.attention_calls,
            engine_calls=calls,
            heads=heads,
            cache_hits=hits,
            cache_misses=misses,
            fallbacks=dict(self.fallbacks),
            kept_flops=kept,
            dense_flops=dense,
            dense_by=describe_override(self.prev) if self.prev is not None else None,
            text_mask_calls=self.text_mask_calls,
            fp8_heads=fp8,
        )
        self.release()
        self.consumers.clear()
        return summary


class _DenseHeads:
    """The host's dense attention on [B, h, L, D] head subsets (what the consumer calls for full heads). A small
    object instead of a per-call closure; kwargs the host backend does not need are dropped once here. In a call
    with a text-only mask the consumer passes the host's mask for the heads (the call's own mask, sliced only
    when it varies per head)."""

    __slots__ = ("run", "func", "kwargs")

    def __init__(self, run: Run, func: Callable[..., Any], kwargs: dict) -> None:
        self.run = run
        self.func = func
        kw = {k: v for k, v in kwargs.items() if k not in ("heads", "skip_reshape", "skip_output_reshape")}
        kw["skip_reshape"] = True
        kw["skip_output_reshape"] = True
        self.kwargs = kw

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        kwargs = self.kwargs
        if mask is not None and mask is not kwargs.get("mask"):
            kwargs = {**kwargs, "mask": mask}
        out = self.run._dense(self.func, (q, k, v, q.shape[1]), kwargs)
        if out.dim() == 3:  # a chained override that ignored skip_output_reshape
            out = out.unflatten(-1, (q.shape[1], q.shape[-1])).transpose(1, 2)
        return out

