"""Progressive head-wise plan search of DiTFastAttnV2 (method.md §4.5), host-independent.

The host adapter runs one ordinary sampling pass and hands every attention call to
`ProgressiveCalibrator.attend`. At the first position every head is full. At each later position and
layer: the dense output, each arrow candidate's output and the cache candidate (this layer's
*compressed* output of the previous forward) give a per-head RSE; pairs over the head cap are dropped;
an exact knapsack maximises the tile-granular attention cost saved within the budget δ; and the
compressed output is returned, so later layers and steps calibrate on inputs that already carry the
upstream compression. Previous outputs wait in pinned CPU memory, not on the GPU.

FP8 candidates (`with_fp8`: full+fp8, arrow/f+fp8) are measured the same way, against the dense output of the
head: through the FP8 kernel where it runs, else with the exact emulation (`kernels.engine.emulate_fp8`, i.e.
`kernels.quant.fp8_attention_reference`), so a calibration on CPU or an older GPU still measures (and feeds forward)
the FP8 error; their cost is the kept pairs times `SearchConfig.fp8_cost_factor`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..kernels.cost import FP8_COST_FACTOR, Geometry, head_cost, kernel_tile
from ..kernels.engine import (
    ArrowBackend,
    CachedHeads,
    CallContext,
    DenseFn,
    EngineStats,
    KernelTables,
    call_cost,
    emulate_fp8,
    headwise_attention,
)
from ..kernels.methods import CACHE, FULL, FULL_FP8, HeadMethod, LayerDecision, MethodKind, arrow
from ..kernels.offload import OffloadStore
from .knapsack import HEAD_CAP_FACTOR, solve_layer, solve_layer_uniform
from .metric import HeadRse
from .plan import CalibrationRecord, ModelSignature, Plan, PlanPosition

__all__ = ["DEFAULT_CANDIDATES", "DEFAULT_DELTA", "SearchConfig", "ProgressiveCalibrator", "with_fp8"]

#: The recommended error budget, from the fidelity study on the trained reference models (README): the largest
#: delta whose compressed images stay above ~27 dB PSNR / 0.95 SSIM on both; 0.4 drifted visibly there.
DEFAULT_DELTA = 0.1
#: The paper's default candidate set (full attention is always implicit).
DEFAULT_CANDIDATES: tuple[HeadMethod, ...] = (CACHE, arrow(8), arrow(16), arrow(32))


def with_fp8(candidates: Sequence[HeadMethod]) -> tuple[HeadMethod, ...]:
    """`candidates` plus the FP8 variants a head may take: full+fp8 and arrow/f+fp8 for each arrow candidate (cache
    has none), after the given ones, without repeats."""
    out = list(dict.fromkeys(candidates))
    for m in (FULL_FP8, *(c.base.with_fp8() for c in candidates if c.kind is MethodKind.ARROW)):
        if m not in out:
            out.append(m)
    return tuple(out)


@dataclass(frozen=True)
class SearchConfig:
    """delta: per-layer, per-step error budget (sum of head RSEs); candidates: compressing methods (FP8 variants
    included: `with_fp8`); fp8_cost_factor: time of an FP8 score pair relative to a bf16 pair in the cost model."""

    delta: float
    candidates: tuple[HeadMethod, ...] = DEFAULT_CANDIDATES
    head_cap_factor: float = HEAD_CAP_FACTOR
    tile: int | None = None  # cost-model tile; None: the kernel's tile for the layer's head_dim (kernels.cost.kernel_tile)
    offload: bool = True
    granularity: Literal["head", "layer"] = "head"  # "layer": all heads of a layer share one method (v1, a baseline)
    fp8_cost_factor: float = FP8_COST_FACTOR

    def __post_init__(self) -> None:
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < float("inf")):
            raise ValueError(f"delta must be a finite number >= 0, got {self.delta!r}")
        if FULL in self.candidates:
            raise ValueError("'full' is implicit; list only compressing candidates (full+fp8 is one)")
        if not (isinstance(self.fp8_cost_factor, (int, float)) and math.isfinite(self.fp8_cost_factor)
                and self.fp8_cost_factor > 0):
            raise ValueError(f"fp8_cost_factor must be a finite number > 0, got {self.fp8_cost_factor!r}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates must be distinct")
        if self.granularity not in ("head", "layer"):
            raise ValueError(f"granularity must be 'head' or 'layer', got {self.granularity!r}")


class ProgressiveCalibrator:
    """Collects a plan during one sampling pass. Host-independent: the adapter supplies sigmas,
    layer indices, text lengths and the host's dense attention.

    Call `begin_forward(sigma)` before each model evaluation, then `attend(ctx, q, k, v, ...)` (the
    `AttentionConsumer` protocol the engine also implements) for every attention call of that evaluation in
    forward order, finally `plan(record)`.
    """

    def __init__(self, model: ModelSignature, config: SearchConfig, *, backend: ArrowBackend = "auto") -> None:
        self.model = model
        self.config = config
        self.backend: ArrowBackend = backend
        self.sigmas: list[float] = []
        self._decisions: list[dict[int, LayerDecision]] = []
        self._prev = OffloadStore(config.offload)
        self._saving_cache: dict[tuple, np.ndarray] = {}
        # (position, layer, rse [H, M]) for reports; inf: not measured (no previous output to cache, or a candidate
        # that saves nothing at this geometry)
        self.rse_log: list[tuple[int, int, np.ndarray]] = []
        self.stats = EngineStats()  # what the compressed outputs fed forward cost (as the engine reports it)
        self.txt_len: int | None = None  # text tokens of the first call of a text+image layer (for the record)
        self.tables = KernelTables()

    @property
    def position(self) -> int:
        return len(self.sigmas) - 1

    def begin_forward(self, sigma: float) -> None:
        """Start a model evaluation at `sigma`. Equal sigma: same position; lower: a new position."""
        sigma = float(sigma)
        if self.sigmas and sigma > self.sigmas[-1]:
            raise ValueError(f"calibration needs decreasing sigmas, got {sigma} after {self.sigmas[-1]}")
        if not self.sigmas or sigma < self.sigmas[-1]:
            self.sigmas.append(sigma)
            self._decisions.append({})

    def _savings(self, txt_len: int, n_img: int, layer: int, refs: tuple[int, ...] = ()) -> np.ndarray:
        key = (txt_len, n_img, layer, refs)
        s = self._saving_cache.get(key)
        if s is None:
            spec = self.model.layers[layer]
            geo = Geometry(txt_len, n_img, spec.heads, spec.head_dim, refs=refs)
            tile = self.config.tile or kernel_tile(spec.head_dim)
            full = head_cost(geo, FULL, tile)
            f8 = self.config.fp8_cost_factor  # an FP8 factor >= 1 makes full+fp8 save nothing: never chosen
            s = np.array([max(0, full - head_cost(geo, m, tile, fp8_factor=f8)) for m in self.config.candidates],
                         dtype=np.int64)
            self._saving_cache[key] = s
        return s

    @torch.no_grad()
    def attend(
        self,
        ctx: CallContext,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense: DenseFn | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """One attention call, q/k/v [B, H, L, D] text first -> compressed output [B, H, L, D].

        `ctx.layer`, `ctx.txt_len` and `ctx.refs` (reference latents' token counts after the image) place the call;
        `ctx.cache_key` separates batches that the host evaluates
        separately (e.g. cond and uncond of different text lengths): the first chunk of a position decides,
        later chunks follow it. `ctx.position` is informational (positions come from `begin_forward`). The
        previous output of the next layer is fetched early. `scale` must be None (the default softmax scale).
        `ctx.mask` (a host mask on text key columns only) is applied to the dense reference and to every candidate,
        so errors are measured with the mask the call carries.
        """
        if not self.sigmas:
            raise RuntimeError("begin_forward(sigma) must be called before attend()")
        if scale is not None:
            raise ValueError("the calibrator measures with the default softmax scale; got an explicit scale")
        layer, txt_len, chunk, refs, mask = ctx.layer, ctx.txt_len, ctx.cache_key, ctx.refs, ctx.mask
        if self.txt_len is None and not self.model.layers[layer].image_only:
            self.txt_len = txt_len
        pos = self.position
        key = (chunk, layer)
        decisions = self._decisions[pos]
        prev = self._prev.get(key) if pos > 0 else None
        hit = True
        if layer in decisions:
            dec = decisions[layer]
            cached = None if prev is None else CachedHeads(tuple(range(dec.heads)), prev)
            out, hit = self._run(q, k, v, txt_len, dec, refs, cached=cached, dense=dense, mask=mask)
        elif pos == 0:
            dec = decisions[layer] = LayerDecision.uniform(FULL, q.shape[1])
            out, _ = headwise_attention(q, k, v, txt_len, dec, dense=dense, tables=self.tables, refs=refs, mask=mask)
        else:
            out, dec = self._search(pos, layer, txt_len, q, k, v, dense, prev, refs, mask)
            decisions[layer] = dec
        self.stats.record(call_cost(dec, txt_len, q.shape[2] - txt_len - sum(refs), hit, refs), q.shape[0], q.shape[3])
        self._prev.put(key, out)
        if layer + 1 < len(self.model.layers):
            self._prev.prefetch((chunk, layer + 1))
        return out

    def _search(self, pos, layer, txt_len, q, k, v, dense, prev, refs=(), mask=None) -> tuple[torch.Tensor, LayerDecision]:
        heads = q.shape[1]
        n_img = q.shape[2] - txt_len - sum(refs)
        dense_out, _ = headwise_attention(q, k, v, txt_len, LayerDecision.uniform(FULL, heads), dense=dense,
                                          tables=self.tables, refs=refs, mask=mask)
        savings = self._savings(txt_len, n_img, layer, refs)
        rse_of = HeadRse(dense_out)
        outs: list[torch.Tensor | None] = []
        rses = []
        for m, saving in zip(self.config.candidates, savings.tolist()):
            if saving == 0:  # the knapsack never takes a candidate that saves nothing (full+fp8 at an FP8 factor
                y = None     # >= 1, a band that covers the image): not running it is exact, and it is not cheap
            elif m.kind is MethodKind.CACHE:
                y = prev if prev is not None and prev.shape == dense_out.shape else None
            else:
                y, _ = self._run(q, k, v, txt_len, LayerDecision.uniform(m, heads), refs, mask=mask)
            outs.append(y)
            rses.append(rse_of(y) if y is not None else torch.full((heads,), float("inf"), device=q.device))
        rse = torch.stack(rses, 1).cpu().numpy().astype(np.float64)  # one sync per layer: decisions live on the host
        self.rse_log.append((pos, layer, rse))
        if self.config.granularity == "layer":
            choice = solve_layer_uniform(rse, savings, self.config.delta)
        else:
            choice = solve_layer(rse, savings, self.config.delta, head_cap_factor=self.config.head_cap_factor)
        methods = tuple(FULL if c < 0 else self.config.candidates[c] for c in choice.tolist())
        out = dense_out
        for ci, y in enumerate(outs):
            chosen = np.flatnonzero(choice == ci)
            if len(chosen) and y is not None:
                idx = torch.as_tensor(chosen, device=q.device)
                out[:, idx] = y[:, idx]
        return out, LayerDecision(methods)

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, txt_len: int, dec: LayerDecision,
             refs: tuple[int, ...], cached: CachedHeads | None = None,
             dense: DenseFn | None = None, mask=None) -> tuple[torch.Tensor, bool]:
        """`headwise_attention` of `dec`, except that where FP8 cannot run its FP8 heads are emulated exactly
        (`emulate_fp8`) instead of running in bf16: the search measures FP8's error on any machine. Calls with a
        text-only mask run FP8 heads in bf16 when applied (the fused kernel takes no mask), and are measured so."""
        with emulate_fp8():
            return headwise_attention(q, k, v, txt_len, dec, cached=cached, dense=dense, backend=self.backend,
                                      tables=self.tables, refs=refs, mask=mask)

    def plan(self, record: CalibrationRecord | None = None, description: str = "") -> Plan:
        """The plan of the pass so far. Layers never seen at a position stay full."""
        if not self.sigmas:
            raise RuntimeError("no model evaluation was calibrated")
        positions = []
        for sigma, decisions in zip(self.sigmas, self._decisions):
            layers = tuple(decisions.get(i, LayerDecision.uniform(FULL, spec.heads)) for i, spec in enumerate(self.model.layers))
            positions.append(PlanPosition(sigma, layers))
        return Plan(self.model, tuple(positions), record, description)

    def reset(self) -> None:
        self.sigmas.clear()
        self._decisions.clear()
        self._prev.clear()
        self.rse_log.clear()
        self.tables.clear()
        self.stats.reset()
        self.txt_len = None

