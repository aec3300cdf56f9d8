"""Attention cost model: kept (q, k) pairs and FLOPs per head method, token-exact or tile-granular.

The calibration search uses `head_cost` as the saving weight of each candidate, `inspect` prints
`decision_flops`. An FP8 head keeps the pairs of its base method but each costs `FP8_COST_FACTOR` of a bf16 pair:
`head_cost` and `decision_cost` weigh FP8 pairs by it (time), `kept_pairs`, `kept_tiles` and `decision_flops` do
not (FLOPs are FLOPs). Tile-granular cost counts the score tiles a block-sparse kernel must compute
(the same tile rule as `masks.arrow_block_tables`): a tile pair is paid in full if any pair in it is kept.
`kernel_tile` is the one tile rule (the Triton kernel's tile per head_dim) that the search, the summaries and
the kernel share; `grid_tokens` / `image_tokens` the one image-token count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .masks import arrow_block_tables
from .methods import HeadMethod, LayerDecision, MethodKind

__all__ = ["FP8_COST_FACTOR", "Geometry", "image_tokens", "grid_tokens", "kernel_tile", "band_pairs", "cross_band_pairs", "kept_pairs", "kept_tiles", "head_cost", "decision_cost", "decision_flops"]

#: Time of one FP8 score pair relative to one bf16 pair (e4m3 QKᵀ, bf16 PV, the quantization pre-pass included).
#: Measured on an H200 (bench/bench_fp8.py, Flux-dev 2K, all heads full, both on kernel v3, 2026-11-29): 5.556 vs
#: 5.518 ms at text 256, 5.675 vs 5.640 at text 512: 1.01 (mixed plans 1.05-1.06, Flux 1K 1.19-1.22: the pre-pass
#: weighs more there). Earlier: 1.20 with FP8 on the Triton kernel against bf16 on v3, 1.08 both on the Triton kernel.
#: FP8 heads are not faster, so a search never prefers them for time. A calibration records the factor it searched
#: with (`CalibrationRecord.fp8_cost_factor`).
FP8_COST_FACTOR = 1.01


@dataclass(frozen=True)
class Geometry:
    """Shape of one attention call: text tokens first, then image tokens, then the tokens of each reference latent
    (`refs`, Kontext / edit); heads × head_dim per layer."""

    txt_len: int
    n_img_tokens: int
    heads: int = 24
    head_dim: int = 128
    batch: int = 1
    refs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "refs", tuple(self.refs))
        if any(r < 0 for r in self.refs):
            raise ValueError(f"reference token counts must be >= 0, got {self.refs}")
        for name in ("txt_len", "n_img_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("heads", "head_dim", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def seq_len(self) -> int:
        return self.txt_len + self.n_img_tokens + sum(self.refs)

    @property
    def dense_pairs(self) -> int:
        return self.seq_len * self.seq_len


def band_pairs(n: int, w: int) -> int:
    """#{(i, j) in [0, n)²: |i - j| <= w} in closed form."""
    if n <= 0:
        return 0
    if w >= n - 1:
        return n * n
    return n * (2 * w + 1) - w * (w + 1)


def _min_sum(x: int, a: int) -> int:
    """sum_{i=1..x} min(a, i) (0 for x <= 0)."""
    if x <= 0:
        return 0
    if x <= a:
        return x * (x + 1) // 2
    return a * (a + 1) // 2 + (x - a) * a


def cross_band_pairs(a: int, b: int, w: int) -> int:
    """#{(i, j) in [0, a) x [0, b): |i - j| <= w} in closed form (all pairs minus those beyond the band on each
    side); `band_pairs(n, w)` is the square case."""
    if a <= 0 or b <= 0:
        return 0
    return a * b - _min_sum(b - w - 1, a) - _min_sum(a - w - 1, b)


def kept_pairs(txt_len: int, n_img_tokens: int, method: HeadMethod, refs: Sequence[int] = ()) -> int:
    """Token-exact number of (q, k) score pairs one head computes (cache: 0). `refs`: reference segments after the
    image; the band applies per pair of segments on offsets (masks.py), with the image's window N // (2 f)."""
    seq = txt_len + n_img_tokens + sum(refs)
    if method.kind is MethodKind.FULL:
        return seq * seq
    if method.kind is MethodKind.CACHE:
        return 0
    w = method.window(n_img_tokens)
    # text rows (T x L) + non-text rows x text cols ((L - T) x T) + the band of every (segment, segment) pair
    if not refs:
        band = band_pairs(n_img_tokens, w)
    else:
        segs = (n_img_tokens, *refs)
        band = sum(cross_band_pairs(a, b, w) for a in segs for b in segs)
    return txt_len * seq + (seq - txt_len) * txt_len + band


@lru_cache(maxsize=4096)
def kept_tiles(txt_len: int, n_img_tokens: int, method: HeadMethod, tile: int, refs: tuple[int, ...] = ()) -> int:
    """Number of tile×tile score tiles a block-sparse kernel computes for one head."""
    seq = txt_len + n_img_tokens + sum(refs)
    if method.kind is MethodKind.CACHE or seq == 0:
        return 0
    nb = -(-seq // tile)
    if method.kind is MethodKind.FULL:
        return nb * nb
    any_kept, _ = arrow_block_tables(txt_len, seq, [method.window(n_img_tokens)], tile, refs=refs)
    return int(any_kept.sum())


def head_cost(geometry: Geometry, method: HeadMethod, tile: int | None = None, *,
              fp8_factor: float = FP8_COST_FACTOR) -> int:
    """Cost of one head in bf16 score pairs: token-exact when `tile` is None, else tiles × tile²; an FP8 method's
    pairs times `fp8_factor` (rounded to an integer: the knapsack works on integer savings). ``fp8_factor=1``
    counts pairs (FLOPs)."""
    if tile is None:
        pairs = kept_pairs(geometry.txt_len, geometry.n_img_tokens, method, geometry.refs)
    else:
        pairs = kept_tiles(geometry.txt_len, geometry.n_img_tokens, method, tile, geometry.refs) * tile * tile
    if not method.fp8:
        return pairs
    if not (math.isfinite(fp8_factor) and fp8_factor > 0):
        raise ValueError(f"fp8_factor must be a finite number > 0, got {fp8_factor!r}")
    return round(pairs * fp8_factor)


def decision_cost(geometry: Geometry, decision: LayerDecision, tile: int | None = None, *,
                  fp8_factor: float = FP8_COST_FACTOR) -> tuple[int, int]:
    """(kept, dense) cost of one layer decision in bf16 score pairs (`head_cost`), summed over its heads."""
    kept = sum(head_cost(geometry, m, tile, fp8_factor=fp8_factor) for m in decision.methods)
    dense = head_cost(geometry, HeadMethod(MethodKind.FULL), tile) * decision.heads
    return kept, dense


def decision_flops(geometry: Geometry, decision: LayerDecision, tile: int | None = None) -> tuple[int, int]:
    """(kept, dense) attention FLOPs of one layer decision: 4 · pairs · head_dim · batch (QK^T and PV; an FP8 pair
    is a FLOP pair like any other)."""
    kept, dense = decision_cost(geometry, decision, tile, fp8_factor=1.0)
    scale = 4 * geometry.head_dim * geometry.batch
    return kept * scale, dense * scale


def grid_tokens(latent_h: int, latent_w: int, patch: int) -> int:
    """Image tokens of a latent of latent_h × latent_w with patch × patch patches (partial patches padded, as
    the host's `pad_to_patch_size` does)."""
    return -(-latent_h // patch) * -(-latent_w // patch)


def image_tokens(width: int, height: int, *, vae_scale: int = 8, patch: int = 2) -> int:
    """Image tokens of a width×height picture: latent = pixels // vae_scale (8 for Flux/SD3, 16 for Flux 2),
    then `grid_tokens` (patch 2 for Flux/SD3, 1 for Flux 2)."""
    return grid_tokens(height // vae_scale, width // vae_scale, patch)


def kernel_tile(head_dim: int) -> int:
    """Query/key tile (tokens) that the fused kernel uses for `head_dim` on the GPUs it is tuned for (sm90:
    64 × 64 tiles for head_dim <= 64, 128 × 128 above; kernels/arrow_triton.py `_arch_config`; the untuned
    sm80/86/89/120 configs use 64 × 64 everywhere). The cost model, the calibration search and every summary count
    tiles with this rule."""
    return 64 if head_dim <= 64 else 128
