"""Head-wise attention engine (DiTFastAttnV2): route each head to full, arrow or cached attention.

Pure torch, CPU and GPU. Full heads run as one dense call on the gathered heads (or the host's own
attention when a `dense` function is given), arrow heads as one masked call (FlexAttention with a
per-head BlockMask, masked SDPA, or the Triton kernel), cached heads are pasted from a `HeadCache`.
`AttentionConsumer` is the protocol the host adapter drives: the engine here and the calibrator
(calibration/search.py) both implement it and report their own per-call statistics (`EngineStats`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from .attention import arrow_attention, fp8_unsupported, kernel_unsupported
from .cost import kept_pairs
from .masks import TextMask, arrow_block_mask, arrow_keep, host_mask_4d
from .methods import FULL, WINDOW_FULL, WINDOW_SKIP, LayerDecision, MethodKind
from .offload import OffloadStore
from .quant import fp8_attention_reference

__all__ = [
    "ArrowBackend",
    "AttentionConsumer",
    "CallCost",
    "DenseFn",
    "KernelTables",
    "call_cost",
    "CachedHeads",
    "HeadCache",
    "CacheOffload",
    "CACHE_OFFLOAD_MODES",
    "CallContext",
    "EngineStats",
    "HeadwiseEngine",
    "headwise_attention",
    "available_backends",
    "fp8_blocked",
    "emulate_fp8",
]

log = logging.getLogger(__name__)

#: Dense attention on [B, h, L, D] -> [B, h, L, D] (e.g. the host's own backend).
DenseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ArrowBackend = Literal["auto", "sdpa", "flex", "triton"]
#: Where a run's head cache waits between steps: "gpu", "cpu" (pinned host memory, prefetched a layer ahead) or
#: "auto" (cpu when the plan's largest cache would take more than CACHE_OFFLOAD_SHARE of the GPU's memory).
CacheOffload = Literal["auto", "gpu", "cpu"]
CACHE_OFFLOAD_MODES: tuple[str, ...] = ("auto", "gpu", "cpu")
CACHE_OFFLOAD_SHARE = 0.02


@dataclass(frozen=True)
class CachedHeads:
    """Stored outputs of some heads of one layer: `values` is [B, len(heads), L, D]."""

    heads: tuple[int, ...]
    values: torch.Tensor


class HeadCache:
    """Per-run store of head outputs. Keys are chosen by the caller (device, cond chunk, layer ...).

    With `offload`, CUDA values wait in pinned CPU memory (offload.py) and `prefetch` brings a key back ahead
    of its `get`; each `get` is followed by a `put` or `discard` of that key (the engine's pattern)."""

    def __init__(self, offload: bool = False) -> None:
        self._heads: dict[Hashable, tuple[int, ...]] = {}
        self._values = OffloadStore(offload)

    @property
    def offload(self) -> bool:
        return self._values.offload

    @offload.setter
    def offload(self, on: bool) -> None:  # for entries put from now on
        self._values.offload = on

    def get(self, key: Hashable) -> CachedHeads | None:
        heads = self._heads.get(key)
        if heads is None:
            return None
        values = self._values.get(key)
        return None if values is None else CachedHeads(heads, values)

    def put(self, key: Hashable, entry: CachedHeads) -> None:
        self._heads[key] = entry.heads
        self._values.put(key, entry.values)

    def prefetch(self, key: Hashable) -> None:
        if key in self._heads:
            self._values.prefetch(key)

    def discard(self, key: Hashable) -> None:
        """Forget the entry of `key` (no error if there is none)."""
        if self._heads.pop(key, None) is not None:
            self._values.discard(key)

    def clear(self) -> None:
        self._heads.clear()
        self._values.clear()

    def __len__(self) -> int:
        return len(self._heads)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (offloaded entries count only while prefetched)."""
        return self._values.device_nbytes


def available_backends() -> dict[str, str | None]:
    """Arrow backends and why each is unavailable (None = available)."""
    reasons: dict[str, str | None] = {"sdpa": None}
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        reasons["flex"] = None
    except ImportError as exc:  # pragma: no cover - torch < 2.5
        reasons["flex"] = f"FlexAttention not importable: {exc}"
    try:
        from .arrow_triton import arrow_attention_triton  # noqa: F401

        reasons["triton"] = None if torch.cuda.is_available() else "no CUDA device"
    except ImportError as exc:
        reasons["triton"] = f"Triton kernel not importable: {exc}"
    return reasons


class KernelTables:
    """Index tensors, arrow masks and kernel tables built for attention calls, owned by one engine (or
    calibrator) and freed with it: nothing device-side outlives a sampling run. The SDPA path's dense band
    masks are L² booleans (~285 MB each at 2048²), so they must never pile up in a process-wide cache."""

    def __init__(self) -> None:
        self._store: dict[Hashable, torch.Tensor | object] = {}

    def index(self, heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = ("index", heads, device)
        t = self._store.get(key)
        if t is None:
            t = self._store[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return t  # type: ignore[return-value]

    def band_mask(self, txt_len: int, seq_len: int, window: int, device: torch.device,
                  refs: tuple[int, ...] = ()) -> torch.Tensor:
        key = ("band", txt_len, seq_len, window, device, refs)
        t = self._store.get(key)
        if t is None:
            t = self._store[key] = arrow_keep(txt_len, seq_len, window, device, refs)
        return t  # type: ignore[return-value]

    def block_mask(self, txt_len: int, seq_len: int, windows: tuple[int, ...], device: torch.device,
                   refs: tuple[int, ...] = ()):
        key = ("flex", txt_len, seq_len, windows, device, refs)
        t = self._store.get(key)
        if t is None:
            t = self._store[key] = arrow_block_mask(txt_len, seq_len, windows, device=device, refs=refs)
        return t

    def window_table(self, windows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The int32 per-head table of `windows` (or of quant flags: the same tensor for the same tuple)."""
        key = ("windows", windows, device)
        t = self._store.get(key)
        if t is None:
            t = self._store[key] = torch.tensor(windows, dtype=torch.int32, device=device)
        return t  # type: ignore[return-value]

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)


@functools.lru_cache(maxsize=2)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@functools.lru_cache(maxsize=1)
def _cuda_auto_backend() -> ArrowBackend:
    return "triton" if available_backends()["triton"] is None else "flex"


def _resolve_backend(backend: ArrowBackend, device: torch.device) -> ArrowBackend:
    if backend != "auto":
        return backend
    return _cuda_auto_backend() if device.type == "cuda" else "sdpa"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, mask=None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_host_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
                    ) -> torch.Tensor:
    """The default dense attention of a masked call: SDPA with a host mask as the host broadcasts it."""
    mask = host_mask_4d(mask)
    if mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _cache_usable(cached: CachedHeads | None, needed: tuple[int, ...], q: torch.Tensor) -> bool:
    if cached is None:
        return False
    v = cached.values
    b, _, seq, d = q.shape
    if v.shape[0] != b or v.shape[2] != seq or v.shape[3] != d or v.dtype != q.dtype or v.device != q.device:
        return False
    have = set(cached.heads)
    return all(h in have for h in needed)


def headwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    txt_len: int,
    decision: LayerDecision,
    *,
    cached: CachedHeads | None = None,
    dense: DenseFn | None = None,
    backend: ArrowBackend = "auto",
    scale: float | None = None,
    tables: KernelTables | None = None,
    full_by_dense: bool = False,
    refs: tuple[int, ...] = (),
    mask: TextMask | None = None,
) -> tuple[torch.Tensor, bool]:
    """Attention of one layer with per-head methods.

    Parameters
    ----------
    q, k, v : Tensor [B, H, L, D], text tokens first (any strides; same dtype and device).
    txt_len : number of text tokens T (0 <= T <= L); image tokens are N = L - T - R.
    decision : this layer's methods at this position, one per head (H heads).
    cached : stored outputs for the cached heads; if it is missing or does not fit (shape, dtype,
        device, heads) the cached heads are computed in full instead (a *cache miss*).
    dense : dense attention used for the full heads (default: SDPA with `scale`).
    backend : how arrow heads run: "sdpa" (masked SDPA, exact, O(L²) mask memory), "flex"
        (FlexAttention, per-head BlockMask), "triton" (fused kernel), "auto" (triton > flex on CUDA,
        sdpa elsewhere).
    tables : where index tensors and masks are kept between calls (an engine's per-run tables); None builds
        them for this call only.
    full_by_dense : the Triton backend computes full heads in its own launch unless this is True; then `dense`
        computes them (DFAApply's dense "host": full heads always run the host's attention). FP8 full heads stay in
        the kernel's launch (the host has no FP8 attention).
    refs : token counts of the reference latents (Kontext / edit) after the image, in order; arrow heads band each
        pair of segments on in-segment offsets (masks.py).
    mask : the host's attention mask when it touches only text key columns (`masks.text_only_mask`): full heads
        get it through `dense` (called as ``dense(q, k, v, host_mask)``, the mask sliced to the heads only when it
        varies per head), arrow heads add its text-column bias to their band (FlexAttention score_mod on CUDA,
        a combined float mask on SDPA; the fused kernel takes no mask, so "triton" runs them on those).

    Returns
    -------
    (out, cache_hit): out is [B, H, L, D] in q's dtype; cache_hit is False when cached heads were
    recomputed because no usable cache was given.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, heads, seq, d = q.shape
    if heads != decision.heads:
        raise ValueError(f"decision has {decision.heads} heads but q has {heads}")
    ref_len = sum(refs) if refs else 0
    if txt_len < 0 or txt_len + ref_len > seq or (refs and min(refs) < 0):
        raise ValueError(f"txt_len {txt_len} and references {refs} must be >= 0 and fit in {seq} tokens")
    if mask is None:
        dense_fn: DenseFn = dense if dense is not None else functools.partial(_sdpa, scale=scale)
    else:
        dense_fn = _MaskedDense(dense if dense is not None else functools.partial(_sdpa_host_mask, scale=scale), mask)
    if tables is None:
        tables = KernelTables()

    hit = True
    if decision.cache_heads and not _cache_usable(cached, decision.cache_heads, q):
        hit = False
        decision = LayerDecision(tuple(FULL if m.kind is MethodKind.CACHE else m for m in decision.methods))
    if decision.fp8_heads:
        fp8_why = fp8_blocked(q, k, v, backend, refs)
        if fp8_why is not None and mask is None and _EMULATE_FP8.get():
            out, emulated_hit = _fp8_emulated(q, k, v, txt_len, decision, cached, dense, backend, scale, tables,
                                              full_by_dense, refs)
            return out, hit and emulated_hit  # a cache miss was already resolved above (its heads now full)
        if fp8_why is not None:  # FP8 heads run their base method in q's dtype (an all-FP8-full layer: dense)
            decision = decision.unquantized
            _warn_once(f"{fp8_why}; FP8 heads run in {_DTYPE_NAMES.get(q.dtype, str(q.dtype).removeprefix('torch.'))}")
    if decision.all_full:
        return dense_fn(q, k, v), hit

    device = q.device
    n_img = seq - txt_len - ref_len
    chosen = _resolve_backend(backend, device)
    if chosen == "triton" and refs:
        # The fused kernel knows only text + image; calls with reference segments run the same mask on
        # FlexAttention (CUDA) or masked SDPA (elsewhere).
        chosen = "flex" if device.type == "cuda" else "sdpa"
    if mask is not None and chosen == "triton":
        chosen = _fallback_backend(d, q.dtype, device)  # the fused kernel takes no mask
    if chosen == "triton":
        why = kernel_unsupported(q, k, v, heads)
        if why is not None:  # e.g. head_dim 96, float64, no CUDA: FlexAttention on CUDA, masked SDPA elsewhere
            chosen = _fallback_backend(d, q.dtype, device)
            _warn_once(f"the arrow kernel cannot run {why}; arrow heads run on {chosen} instead")
    if chosen == "flex" and mask is not None:  # full heads run `dense` with the host's mask below: no blocks here
        windows = tuple(WINDOW_SKIP if w == WINDOW_FULL else w for w in decision.windows(n_img))
        block_mask = tables.block_mask(txt_len, seq, windows, device, refs)
        try:
            out = _flex_fn(device.type == "cuda")(q, k, v, score_mod=mask.score_mod(), block_mask=block_mask,
                                                  scale=scale)
        except Exception as exc:  # noqa: BLE001 - never raise inside the sampler
            # Inductor may find no kernel config for a mask's score_mod (H200, bf16, a [B, 1, L, T] bias from a
            # bool mask: "No valid triton configs", 240 KB of shared memory): run those heads on masked SDPA
            _warn_once(f"FlexAttention could not compile this text-mask call ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:160]}); its arrow heads run on masked SDPA")
            chosen = "sdpa"
    if chosen == "sdpa":
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        for factor, group in decision.arrow_groups:
            idx = tables.index(group, device)
            keep = tables.band_mask(txt_len, seq, decision.methods[group[0]].window(n_img), device, refs)
            if mask is not None:
                keep = mask.combined(keep, idx, q.dtype)
            out[:, idx] = _sdpa(q[:, idx], k[:, idx], v[:, idx], scale, keep)
    elif chosen == "flex":
        if mask is None:
            block_mask = tables.block_mask(txt_len, seq, decision.windows(n_img), device, refs)
            out = _flex_fn(device.type == "cuda")(q, k, v, block_mask=block_mask, scale=scale)
    elif chosen == "triton":
        # One launch for full and arrow heads; the kernel leaves the skipped (cached) heads of `out` alone, so the
        # cached outputs are pasted first. With `full_by_dense` the full heads are skipped too and `dense` runs them.
        windows = decision.windows(n_img)
        if full_by_dense:
            windows = tuple(WINDOW_SKIP if w == WINDOW_FULL and not fq else w for w, fq in zip(windows, decision.quant))
        out = torch.empty_like(q)
        _paste_cached(out, decision, cached, tables, device)
        quant = tables.window_table(decision.quant, device) if decision.fp8_heads else None
        arrow_attention(q, k, v, tables.window_table(windows, device), txt_len, scale=scale, out=out, head_quant=quant)
        if full_by_dense and decision.full_heads:
            idx = tables.index(decision.full_heads, device)
            out[:, idx] = dense_fn(q[:, idx], k[:, idx], v[:, idx])
        return out, hit
    else:
        raise ValueError(f"unknown arrow backend {backend!r}")

    if decision.full_heads:
        idx = tables.index(decision.full_heads, device)
        if mask is None:
            out[:, idx] = dense_fn(q[:, idx], k[:, idx], v[:, idx])
        else:
            out[:, idx] = dense_fn(q[:, idx], k[:, idx], v[:, idx], idx)  # type: ignore[call-arg]
    _paste_cached(out, decision, cached, tables, device)
    return out, hit


#: Set by `emulate_fp8` (a ContextVar: per thread / task, off by default).
_EMULATE_FP8: contextvars.ContextVar[bool] = contextvars.ContextVar("dfav2_emulate_fp8", default=False)


@contextlib.contextmanager
def emulate_fp8(on: bool = True):
    """Within the block, FP8 heads that cannot run in FP8 here (`fp8_blocked`: CPU, older GPUs, another backend) are
    computed by the exact emulation `fp8_attention_reference` instead of in the inputs' dtype, so that applying a
    plan on such a machine shows FP8's error. For measurements (the fidelity study's ``fp8`` item) and tests only:
    the emulation computes every score in float32 and is far slower than the kernel. Where the FP8 kernel runs,
    nothing changes; calls with a host mask (`mask`) keep their bf16 fallback, as the calibration measures them.
    Off by default; DFAApply never sets it."""
    token = _EMULATE_FP8.set(bool(on))
    try:
        yield
    finally:
        _EMULATE_FP8.reset(token)


def _fp8_emulated(q, k, v, txt_len, decision, cached, dense, backend, scale, tables, full_by_dense, refs
                  ) -> tuple[torch.Tensor, bool]:
    """`headwise_attention` of `decision` with its FP8 heads emulated (`emulate_fp8`): the other heads as usual,
    then each FP8 group overwritten by `fp8_attention_reference` (the calibrator measures FP8 candidates so)."""
    if len(decision.fp8_heads) == decision.heads:
        out, hit = torch.empty_like(q), True
    else:
        out, hit = headwise_attention(q, k, v, txt_len, decision.unquantized, cached=cached, dense=dense,
                                      backend=backend, scale=scale, tables=tables, full_by_dense=full_by_dense,
                                      refs=refs)
    n_img = q.shape[2] - txt_len - sum(refs)
    for m, heads in decision.fp8_groups:
        idx = tables.index(heads, q.device)
        out[:, idx] = fp8_attention_reference(q[:, idx], k[:, idx], v[:, idx], m.window(n_img), txt_len,
                                              scale=scale, refs=refs)
    return out, hit


class _MaskedDense:
    """Dense attention of a masked call: `dense(q, k, v, host_mask)` with the host's mask (sliced to the heads
    `index` only when it varies per head)."""

    __slots__ = ("dense", "mask")

    def __init__(self, dense: Callable[..., torch.Tensor], mask: TextMask) -> None:
        self.dense = dense
        self.mask = mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None = None
                 ) -> torch.Tensor:
        return self.dense(q, k, v, self.mask.for_heads(index))


def _paste_cached(out: torch.Tensor, decision: LayerDecision, cached: CachedHeads | None, tables: KernelTables,
                  device: torch.device) -> None:
    if decision.cache_heads:
        assert cached is not None  # guaranteed by _cache_usable
        idx = tables.index(decision.cache_heads, device)
        src = tables.index(tuple(cached.heads.index(h) for h in decision.cache_heads), device)
        out[:, idx] = cached.values[:, src]


_warned: set[str] = set()
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _warn_once(message: str) -> None:
    """Log `message` once per process (a fallback that repeats every call is said once)."""
    if message not in _warned:
        _warned.add(message)
        log.warning("DiTFastAttnV2: %s (warned once)", message)


def fp8_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: ArrowBackend = "auto",
                refs: tuple[int, ...] = ()) -> str | None:
    """Why `headwise_attention` would run the FP8 heads of this call in q's dtype (None: the Triton kernel runs
    them in FP8): another backend, reference latents, a call the kernel cannot take, no FP8 tensor cores."""
    chosen = _resolve_backend(backend, q.device)
    if chosen != "triton":
        return "no FP8 tensor cores here" if q.device.type != "cuda" else f"the {chosen} backend has no FP8 path"
    if refs:
        return "the FP8 kernel does not take reference latents"
    return fp8_unsupported(q, k, v, q.shape[1])


def _fallback_backend(head_dim: int, dtype: torch.dtype, device: torch.device) -> ArrowBackend:
    """Where arrow heads go when the fused kernel cannot take a call: FlexAttention on CUDA (block-sparse, no L x L
    mask) for the head dims and dtypes its kernels are built for (powers of two 16..256; fp16, bf16, fp32), masked
    SDPA otherwise (exact, any shape and dtype, an L x L mask per distinct window)."""
    pow2 = 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    if device.type == "cuda" and pow2 and dtype in (torch.float16, torch.bfloat16, torch.float32):
        return "flex"
    return "sdpa"


class PlanLike(Protocol):
    def decision(self, position: int, layer: int) -> LayerDecision: ...

    def keep_heads(self, position: int, layer: int) -> tuple[int, ...]: ...


class CallContext(NamedTuple):
    """Where an attention call sits: plan layer index, plan position index, text length, cache key, the
    token counts of the reference latents after the image (Kontext / edit; () without), and the host's attention
    mask when it touches only text key columns (`masks.TextMask`; None without a mask).
    (A NamedTuple: built once per routed call, where a frozen dataclass's __init__ costs ~1 µs more.)"""

    layer: int
    position: int
    txt_len: int
    cache_key: Hashable = None
    refs: tuple[int, ...] = ()
    mask: TextMask | None = None


@dataclass
class EngineStats:
    """What a consumer did during one run, reported by the consumer itself (plain ints: no device syncs).

    heads: head-calls per method kind actually used (a cache miss counts as full; FP8 heads count under their kind
    too); fp8_heads / fp8_flops: head-calls and kept FLOPs the plan computes in FP8 (where FP8 cannot run they ran
    in the inputs' dtype, warned once); cache_hits / cache_misses: cached heads served from / recomputed without
    the cache; kept_flops / dense_flops: attention FLOPs computed and what dense attention would have cost
    (4 · pairs · head_dim · batch)."""

    calls: int = 0
    heads: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in MethodKind})
    cache_hits: int = 0
    cache_misses: int = 0
    kept_flops: int = 0
    dense_flops: int = 0
    fp8_heads: int = 0
    fp8_flops: int = 0

    def reset(self) -> None:
        self.calls = self.cache_hits = self.cache_misses = self.kept_flops = self.dense_flops = 0
        self.fp8_heads = self.fp8_flops = 0
        self.heads = {k.value: 0 for k in MethodKind}

    def record(self, cost: CallCost, batch: int, head_dim: int) -> None:
        """Add one call of known cost (see `call_cost`)."""
        self.calls += 1
        heads = self.heads
        heads["full"] += cost.full
        heads["arrow"] += cost.arrow
        heads["cache"] += cost.cached
        self.cache_hits += cost.cached
        self.cache_misses += cost.missed
        scale = 4 * batch * head_dim
        self.kept_flops += cost.kept_pairs * scale
        self.dense_flops += cost.dense_pairs * scale
        if cost.fp8:
            self.fp8_heads += cost.fp8
            self.fp8_flops += cost.fp8_pairs * scale


@dataclass(frozen=True)
class CallCost:
    """Per call of one layer decision at one geometry: heads per method kind used and score pairs per batch element;
    `fp8` of the full and arrow heads and `fp8_pairs` of the kept pairs are computed in FP8."""

    full: int
    arrow: int
    cached: int
    missed: int
    kept_pairs: int
    dense_pairs: int
    fp8: int = 0
    fp8_pairs: int = 0


@functools.lru_cache(maxsize=512)
def call_cost(decision: LayerDecision, txt_len: int, n_img: int, hit: bool, refs: tuple[int, ...] = ()) -> CallCost:
    """The cost of running `decision` at (txt_len, n_img, refs); without a cache `hit` the cached heads run
    full."""
    n_cache = len(decision.cache_heads)
    kept = fp8_pairs = 0
    for m in decision.methods:
        pairs = kept_pairs(txt_len, n_img, FULL if (m.kind is MethodKind.CACHE and not hit) else m, refs)
        kept += pairs
        if m.fp8:
            fp8_pairs += pairs
    kinds = [m.kind for m in decision.methods]  # FP8 heads count under their kind, and in `fp8`
    return CallCost(
        full=kinds.count(MethodKind.FULL) + (0 if hit else n_cache),
        arrow=kinds.count(MethodKind.ARROW),
        cached=n_cache if hit else 0,
        missed=0 if hit else n_cache,
        kept_pairs=kept,
        dense_pairs=(txt_len + n_img + sum(refs)) ** 2 * decision.heads,
        fp8=len(decision.fp8_heads),
        fp8_pairs=fp8_pairs,
    )


class AttentionConsumer(Protocol):
    """What the host adapter hands routed attention calls to: the engine (sampling with a plan) and the
    calibrator (searching one). `attend` takes q, k, v [B, H, L, D] text first and returns [B, H, L, D];
    `stats` reports what the calls did."""

    stats: EngineStats

    def attend(self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               dense: DenseFn | None = None, scale: float | None = None) -> torch.Tensor: ...


class _Entry:
    """Per (position, layer, text length, sequence length, device), built once per run."""

    __slots__ = ("decision", "keep", "keep_index", "hit_cost", "miss_cost")
    decision: LayerDecision
    keep: tuple[int, ...]
    keep_index: torch.Tensor | None
    hit_cost: CallCost
    miss_cost: CallCost


class HeadwiseEngine:
    """Runs a plan: `attend(ctx, q, k, v)` for each attention call, keeping the per-run head cache.

    The cache entry of a layer holds the heads that this position or the next one reuses
    (`plan.keep_heads`), so a repeated evaluation at one position (heun) and the next step both hit.
    Everything an attention call needs besides its tensors (decision, heads to keep, their index tensor, cost)
    is looked up once per (position, layer, geometry) and kept until `reset()`, as are the kernel tables.
    """

    def __init__(self, plan: PlanLike, *, backend: ArrowBackend = "auto", cache: HeadCache | None = None,
                 full_by_dense: bool = False, cache_offload: CacheOffload = "auto") -> None:
        self.plan = plan
        self.backend: ArrowBackend = backend
        self.full_by_dense = full_by_dense  # see headwise_attention
        self.cache = cache if cache is not None else HeadCache(offload=cache_offload == "cpu")
        self._offload_undecided = cache is None and cache_offload == "auto"
        self.projected_cache_bytes: int | None = None  # set when "auto" decides
        self.stats = EngineStats()
        self.tables = KernelTables()
        self._entries: dict[tuple, _Entry] = {}
        self._bypass: dict[int, tuple[bool, ...]] = {}
        self._bypass_cost: dict[tuple, tuple[int, int, int]] = {}

    def release(self) -> None:
        """Free what the engine holds on the device (head cache, per-run tables); the counters stay."""
        self.cache.clear()
        self.tables.clear()
        self._entries.clear()
        self._bypass.clear()
        self._bypass_cost.clear()

    def reset(self) -> None:
        """End of a run: `release` and zero the counters."""
        self.release()
        self.stats.reset()

    def _entry(self, ctx: CallContext, seq: int, device: torch.device) -> _Entry:
        key = (ctx.position, ctx.layer, ctx.txt_len, seq, device, ctx.refs)
        e = self._entries.get(key)
        if e is None:
            e = _Entry()
            dec = e.decision = self.plan.decision(ctx.position, ctx.layer)
            e.keep = self.plan.keep_heads(ctx.position, ctx.layer)
            e.keep_index = self.tables.index(e.keep, device) if e.keep else None
            n_img = seq - ctx.txt_len - sum(ctx.refs)
            e.hit_cost = call_cost(dec, ctx.txt_len, n_img, True, ctx.refs)
            e.miss_cost = call_cost(dec, ctx.txt_len, n_img, False, ctx.refs)
            self._entries[key] = e
        return e

    def bypass_layers(self, position: int, n_layers: int) -> tuple[bool, ...]:
        """Per layer at `position`: True where the plan runs every head full and keeps nothing for later steps.
        Such calls are exactly the host's dense attention, so the router hands them straight back to the host
        (no parsing, no reshapes) and reports them once per forward with `record_bypassed`."""
        t = self._bypass.get(position)
        if t is None:
            plan = self.plan
            t = self._bypass[position] = tuple(
                plan.decision(position, layer).all_full and not plan.keep_heads(position, layer)
                for layer in range(n_layers)
            )
        return t

    def record_bypassed(self, position: int, layers: tuple[int, ...], geometry: tuple[tuple, ...],
                        batch: int, cache_key: Hashable) -> None:
        """Count the calls of `layers` (bypassed at `position` in one forward) as full calls; `geometry[layer]` is
        (text length, sequence length, head_dim[, reference token counts]). Their cache entries are dropped, as `attend` does when nothing
        is kept, so no later forward reuses an output older than this one."""
        key = (position, layers, geometry)
        agg = self._bypass_cost.get(key)
        if agg is None:
            full = kept = dense = 0
            for layer in layers:
                txt_len, seq, head_dim, *rest = geometry[layer]
                refs: tuple[int, ...] = rest[0] if rest else ()
                c = call_cost(self.plan.decision(position, layer), txt_len, seq - txt_len - sum(refs), True, refs)
                full += c.full
                kept += c.kept_pairs * 4 * head_dim
                dense += c.dense_pairs * 4 * head_dim
            agg = self._bypass_cost[key] = (full, kept, dense)
        st = self.stats
        st.calls += len(layers)
        st.heads["full"] += agg[0]
        st.kept_flops += agg[1] * batch
        st.dense_flops += agg[2] * batch
        if len(self.cache):
            for layer in layers:
                self.cache.discard((cache_key, layer))

    def attend(
        self,
        ctx: CallContext,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense: DenseFn | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """q, k, v [B, H, L, D] text first -> [B, H, L, D]."""
        e = self._entry(ctx, q.shape[2], q.device)
        decision = e.decision
        key = (ctx.cache_key, ctx.layer)
        cached = self.cache.get(key) if decision.cache_heads else None
        if self.cache.offload:  # start bringing the next layer's heads back while this layer computes
            self.cache.prefetch((ctx.cache_key, ctx.layer + 1))
        out, hit = headwise_attention(
            q, k, v, ctx.txt_len, decision, cached=cached, dense=dense, backend=self.backend, scale=scale,
            tables=self.tables, full_by_dense=self.full_by_dense, refs=ctx.refs, mask=ctx.mask,
        )
        self.stats.record(e.hit_cost if hit else e.miss_cost, q.shape[0], q.shape[3])
        if e.keep_index is not None:
            values = out[:, e.keep_index]
            if self._offload_undecided and values.is_cuda:
                self._decide_offload(values.numel() * values.element_size() // len(e.keep), values.device)
            self.cache.put(key, CachedHeads(e.keep, values))
        else:  # nothing of this forward is kept: an older entry must not be reused later (after a jump)
            self.cache.discard(key)
        return out

    def _decide_offload(self, head_bytes: int, device: torch.device) -> None:
        """"auto": offload when the plan's largest per-position cache (at this geometry) would take more than
        CACHE_OFFLOAD_SHARE of the GPU's memory. Decided once, at the first stored head."""
        self._offload_undecided = False
        layers = getattr(getattr(self.plan, "model", None), "layers", None)
        positions = getattr(self.plan, "positions", None)
        if layers is None or positions is None:
            return
        heads = max(sum(len(self.plan.keep_heads(p, li)) for li in range(len(layers))) for p in range(len(positions)))
        total = torch.cuda.get_device_properties(device).total_memory
        self.cache.offload = heads * head_bytes > CACHE_OFFLOAD_SHARE * total
        self.projected_cache_bytes = heads * head_bytes

    def forget(self, ctx: CallContext) -> None:
        """The layer of `ctx` ran outside the engine (host attention): drop its stored heads so the next
        forward cannot reuse an output older than the previous forward."""
        self.cache.discard((ctx.cache_key, ctx.layer))
