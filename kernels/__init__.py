"""Everything that executes attention: the method vocabulary, arrow masks, the FP8 scheme (quant.py), the cost
model, the head-wise engine, the public op `arrow_attention` (``torch.ops.dfav2.arrow_attention``) and the fused Triton kernel behind it.
Pure torch/Triton; never imports the host (ComfyUI)."""

from __future__ import annotations

from .attention import LAYOUTS, arrow_attention, arrow_attention_reference, fp8_unsupported, head_table, kernel_unsupported
from .cost import (
    FP8_COST_FACTOR,
    Geometry,
    decision_flops,
    grid_tokens,
    head_cost,
    image_tokens,
    kept_pairs,
    kept_tiles,
    kernel_tile,
)
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
from .methods import (
    CACHE,
    FULL,
    FULL_FP8,
    QUANT_FP8,
    QUANT_NONE,
    WINDOW_FULL,
    WINDOW_SKIP,
    HeadMethod,
    LayerDecision,
    MethodKind,
    Quant,
    arrow,
)
from .quant import fp8_attention_reference, fp8_supported

__all__ = [
    "LAYOUTS",
    "CACHE",
    "FP8_COST_FACTOR",
    "FULL",
    "FULL_FP8",
    "QUANT_FP8",
    "QUANT_NONE",
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
    "Quant",
    "arrow",
    "arrow_attention",
    "arrow_attention_reference",
    "arrow_block_mask",
    "arrow_keep",
    "arrow_mask_mod",
    "available_backends",
    "decision_flops",
    "fp8_attention_reference",
    "fp8_supported",
    "fp8_unsupported",
    "grid_tokens",
    "head_cost",
    "head_table",
    "headwise_attention",
    "image_tokens",
    "kept_pairs",
    "kept_tiles",
    "kernel_tile",
    "kernel_unsupported",
]
