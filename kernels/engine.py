"""Head-wise attention engine (DiTFastAttnV2): route each head to full, arrow or cached attention.

Pure torch, CPU and GPU. Full heads run as one dense call on the gathered heads (or the host's own
attention when a `dense` function is given), arrow heads as one masked call (FlexAttention with a
per-head BlockMask, masked SDPA, or the Triton kernel), cached heads are pasted from a `HeadCache`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from .masks import arrow_block_mask, arrow_keep
from .methods import FULL, LayerDecision, MethodKind

__all__ = [
    "ArrowBackend",
    "DenseFn",
    "CachedHeads",
    "HeadCache",
    "CallContext",
    "EngineStats",
    "HeadwiseEngine",
    "headwise_attention",
    "available_backends",
]

#: Dense attention on [B, h, L, D] -> [B, h, L, D] (e.g. the host's own backend).
DenseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ArrowBackend = Literal["auto", "sdpa", "flex", "triton"]


@dataclass(frozen=True)
class CachedHeads:
    """Stored outputs of some heads of one layer: `values` is [B, len(heads), L, D]."""

    heads: tuple[int, ...]
    values: torch.Tensor


class HeadCache:
    """Per-run store of head outputs. Keys are chosen by the caller (device, cond chunk, layer ...)."""

    def __init__(self) -> None:
        self._store: dict[Hashable, CachedHeads] = {}

    def get(self, key: Hashable) -> CachedHeads | None:
        return self._store.get(key)

    def put(self, key: Hashable, entry: CachedHeads) -> None:
        self._store[key] = entry

    def discard(self, key: Hashable) -> None:
        """Forget the entry of `key` (no error if there is none)."""
        self._store.pop(key, None)

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return sum(e.values.numel() * e.values.element_size() for e in self._store.values())


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


@functools.lru_cache(maxsize=256)
def _index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _band_mask(txt_len: int, seq_len: int, half_width: int, device: torch.device) -> torch.Tensor:
    return arrow_keep(txt_len, seq_len, half_width, device)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(txt_len: int, seq_len: int, widths: tuple[int | None, ...], device: torch.device):
    return arrow_block_mask(txt_len, seq_len, widths, device=device)


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
) -> tuple[torch.Tensor, bool]:
    """Attention of one layer with per-head methods.

    Parameters
    ----------
    q, k, v : Tensor [B, H, L, D], text tokens first (any strides; same dtype and device).
    txt_len : number of text tokens T (0 <= T <= L); image tokens are N = L - T.
    decision : this layer's methods at this position, one per head (H heads).
    cached : stored outputs for the cached heads; if it is missing or does not fit (shape, dtype,
        device, heads) the cached heads are computed in full instead (a *cache miss*).
    dense : dense attention used for the full heads (default: SDPA with `scale`).
    backend : how arrow heads run: "sdpa" (masked SDPA, exact, O(L²) mask memory), "flex"
        (FlexAttention, per-head BlockMask), "triton" (fused kernel), "auto" (triton > flex on CUDA,
        sdpa elsewhere).

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
    if not 0 <= txt_len <= seq:
        raise ValueError(f"txt_len must be in [0, {seq}], got {txt_len}")
    dense_fn: DenseFn = dense if dense is not None else (lambda q_, k_, v_: _sdpa(q_, k_, v_, scale))

    hit = True
    if decision.cache_heads and not _cache_usable(cached, decision.cache_heads, q):
        hit = False
        decision = LayerDecision(tuple(FULL if m.kind is MethodKind.CACHE else m for m in decision.methods))
    if decision.all_full:
        return dense_fn(q, k, v), hit

    device = q.device
    n_img = seq - txt_len
    chosen = _resolve_backend(backend, device)
    if chosen == "sdpa":
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        for factor, group in decision.arrow_groups:
            idx = _index(group, device)
            mask = _band_mask(txt_len, seq, decision.methods[group[0]].half_width(n_img), device)
            out[:, idx] = _sdpa(q[:, idx], k[:, idx], v[:, idx], scale, mask)
    elif chosen == "flex":
        widths = tuple(
            m.half_width(n_img) if m.kind is MethodKind.ARROW else -1 for m in decision.methods
        )
        block_mask = _flex_block_mask(txt_len, seq, widths, device)
        out = _flex_fn(device.type == "cuda")(q, k, v, block_mask=block_mask, scale=scale)
    elif chosen == "triton":
        from .arrow_triton import arrow_attention_triton

        # One launch for full and arrow heads; cached heads are skipped by the kernel and pasted below.
        out = arrow_attention_triton(q, k, v, _triton_table(decision, n_img, device), txt_len, sm_scale=scale)
    else:
        raise ValueError(f"unknown arrow backend {backend!r}")

    if decision.full_heads and chosen != "triton":
        idx = _index(decision.full_heads, device)
        out[:, idx] = dense_fn(q[:, idx], k[:, idx], v[:, idx])
    if decision.cache_heads:
        assert cached is not None  # guaranteed by _cache_usable
        idx = _index(decision.cache_heads, device)
        src = _index(tuple(cached.heads.index(h) for h in decision.cache_heads), device)
        out[:, idx] = cached.values[:, src]
    return out, hit


@functools.lru_cache(maxsize=1024)
def _triton_table(decision: LayerDecision, n_img: int, device: torch.device) -> torch.Tensor:
    # Kernel table, built once per (decision, geometry, device): -1 full, -2 skip (cached), w >= 0 arrow.
    codes = {MethodKind.FULL: -1, MethodKind.CACHE: -2}
    table = [m.half_width(n_img) if m.kind is MethodKind.ARROW else codes[m.kind] for m in decision.methods]
    return torch.tensor(table, dtype=torch.int32, device=device)


class PlanLike(Protocol):
    def decision(self, position: int, layer: int) -> LayerDecision: ...

    def keep_heads(self, position: int, layer: int) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class CallContext:
    """Where an attention call sits: plan layer index, plan position index, text length, cache key."""

    layer: int
    position: int
    txt_len: int
    cache_key: Hashable = None


@dataclass
class EngineStats:
    """Counters of one run (plain ints: no device syncs)."""

    calls: int = 0
    heads: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in MethodKind})
    cache_hits: int = 0
    cache_misses: int = 0

    def reset(self) -> None:
        self.calls = self.cache_hits = self.cache_misses = 0
        self.heads = {k.value: 0 for k in MethodKind}


class HeadwiseEngine:
    """Runs a plan: `attend(ctx, q, k, v)` for each attention call, keeping the per-run head cache.

    The cache entry of a layer holds the heads that this position or the next one reuses
    (`plan.keep_heads`), so a repeated evaluation at one position (heun) and the next step both hit.
    """

    def __init__(self, plan: PlanLike, *, backend: ArrowBackend = "auto", cache: HeadCache | None = None) -> None:
        self.plan = plan
        self.backend: ArrowBackend = backend
        self.cache = cache if cache is not None else HeadCache()
        self.stats = EngineStats()

    def reset(self) -> None:
        self.cache.clear()
        self.stats.reset()

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
        decision = self.plan.decision(ctx.position, ctx.layer)
        key = (ctx.cache_key, ctx.layer)
        cached = self.cache.get(key) if decision.cache_heads else None
        out, hit = headwise_attention(
            q, k, v, ctx.txt_len, decision, cached=cached, dense=dense, backend=self.backend, scale=scale
        )
        stats = self.stats
        stats.calls += 1
        n_cache = len(decision.cache_heads)
        if hit:
            stats.cache_hits += n_cache
        else:  # the cached heads were computed in full
            stats.cache_misses += n_cache
        stats.heads[MethodKind.FULL.value] += len(decision.full_heads) + (0 if hit else n_cache)
        stats.heads[MethodKind.ARROW.value] += len(decision.arrow_heads)
        stats.heads[MethodKind.CACHE.value] += n_cache if hit else 0
        keep = self.plan.keep_heads(ctx.position, ctx.layer)
        if keep:
            self.cache.put(key, CachedHeads(keep, out[:, _index(keep, out.device)]))
        else:  # nothing of this forward is kept: an older entry must not be reused later (after a jump)
            self.cache.discard(key)
        return out

    def forget(self, ctx: CallContext) -> None:
        """The layer of `ctx` ran outside the engine (host attention): drop its stored heads so the next
        forward cannot reuse an output older than the previous forward."""
        self.cache.discard((ctx.cache_key, ctx.layer))
