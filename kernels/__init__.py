"""Everything that executes attention: the method vocabulary, arrow masks, the cost model, the head-wise
engine and the fused Triton kernel. Pure torch/Triton; never imports the host (ComfyUI)."""

from __future__ import annotations

from .cost import Geometry, decision_flops, grid_tokens, head_cost, image_tokens, kept_pairs, kept_tiles, kernel_tile
from .engine import (
    CachedHeads,
    CallContext,
    EngineStats,
    HeadCache,
    HeadwiseEngine,
    available_backends,
    headwise_attention,
)
from .masks import arrow_block_mask, arrow_keep, arrow_mask_mod
from .methods import CACHE, FULL, WINDOW_FULL, WINDOW_SKIP, HeadMethod, LayerDecision, MethodKind, arrow

__all__ = [
    "CACHE",
    "FULL",
    "WINDOW_FULL",
    "WINDOW_SKIP",
    "CachedHeads",
    "CallContext",
    "EngineStats",
    "Geometry",
    "HeadCache",
    "HeadMethod",
    "HeadwiseEngine",
    "LayerDecision",
    "MethodKind",
    "arrow",
    "arrow_block_mask",
    "arrow_keep",
    "arrow_mask_mod",
    "available_backends",
    "decision_flops",
    "grid_tokens",
    "head_cost",
    "headwise_attention",
    "image_tokens",
    "kept_pairs",
    "kept_tiles",
    "kernel_tile",
]
