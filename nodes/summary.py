"""What one sampling run did: its forwards and the engine's counts, as the run summary line (log, UI, A/B report)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["ForwardRecord", "RunSummary"]



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
    dense_by: str | None = None  # the chained override that ran the full heads and dense calls (None: the host's)
    text_mask_calls: int = 0  # calls run by the plan that carried a host mask on text key columns only (e.g. Redux)
    fp8_heads: int = 0  # head-calls the plan computes in FP8 (counted in `heads` too; bf16 where FP8 cannot run)

    @property
    def flops_saved(self) -> float:
        return 0.0 if self.dense_flops == 0 else 1.0 - self.kept_flops / self.dense_flops

    def line(self) -> str:
        total = sum(self.heads.values()) or 1
        share = " / ".join(f"{k} {100.0 * v / total:.0f}%" for k, v in self.heads.items())
        fb = sum(self.fallbacks.values())
        reasons = f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.fallbacks.items()))})" if fb else ""
        dense_by = f"; full heads and dense calls ran {self.dense_by}" if self.dense_by else ""
        masked = f" ({self.text_mask_calls} with a text-only mask, compressed)" if self.text_mask_calls else ""
        if self.fp8_heads:
            share = f"{share} (FP8 {100.0 * self.fp8_heads / total:.0f}%)"
        return (
            f"DiTFastAttnV2: {len(self.forwards)} forwards, {self.attention_calls} attention calls{masked}; heads {share}; "
            f"cache hits {self.cache_hits}, misses {self.cache_misses}; est. attention FLOPs saved "
            f"{100.0 * self.flops_saved:.1f}%; dense fallbacks {fb}{reasons}{dense_by}"
        )
