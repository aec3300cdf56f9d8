"""FP8 attention of one head: the quantization scheme the FP8 kernel implements, and its exact reference.

Per (batch, head), inputs q, k, v ``[L, D]`` in bf16 / fp16 (any float dtype here), e4m3 = ``torch.float8_e4m3fn``
(largest finite value `FP8_MAX` = 448), every scale and accumulation in float32:

1. K smoothing: ``km`` = mean of k over all L tokens per channel; ``k' = k - km``. Softmax is invariant to it (it
   adds ``q · km`` to a whole score row) and it removes the channel offsets that would otherwise set K's per-token
   scale (DiT keys carry large per-channel biases: without it small keys lose most of their bits).
2. Q per query tile: ``sq[t] = max |q| over the tile's Q_BLOCK rows / 448`` (floored at `SCALE_FLOOR`, so an all-zero
   tile divides by a tiny number, not by 0); ``q8 = e4m3(q / sq)``. K per token on ``k'``: ``sk[n]``, ``k8``. One
   scale per query tile lets the kernel fold it into the key scales: one multiply per score, as in bf16.
3. Scores ``s = (q8 @ k8ᵀ) · sq · sk[None, :] · sm_scale``, masked like the head's method (full, or the arrow band
   with text rows and columns full; `masks.arrow_keep`).
4. ``p = exp(s - rowmax(s))``, ``l`` = row sum of p (float32); ``O = (p rounded to the inputs' dtype) @ v / l``:
   P·V stays in the inputs' dtype. An e4m3 P·V (P times 448, V per channel) measured slower than this in both kernels
   on an H200 (Triton 0.5x, kernel v3 0.9x at Flux 2K; kernels/NOTES.md).

Every e4m3 cast is of a value already scaled into [-448, 448]; the scaled values are clamped to that range first so
float32 rounding in the division (448.00003) cannot reach the cast (``float8_e4m3fn`` has no infinity: an
out-of-range value would become NaN). The kernel's online softmax differs from this exact one only in rounding.

The quant table convention (kernels/methods.py): int32 ``[H]``, `QUANT_NONE` (0) the inputs' dtype, `QUANT_FP8` (1)
this scheme. Where FP8 cannot run (CPU, GPUs below compute capability 8.9, a kernel without FP8) FP8 heads run in
the inputs' dtype; the calibration still measures their FP8 error with this reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .masks import arrow_keep
from .methods import WINDOW_FULL, WINDOW_SKIP

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FLOOR",
    "fp8_supported",
    "smooth_k",
    "quantize_per_token",
    "quantize_per_block",
    "fp8_attention_reference",
]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite ``float8_e4m3fn`` value.
FP8_MAX = 448.0
#: Least scale: an all-zero row or channel quantizes to zeros instead of dividing by zero.
SCALE_FLOOR = 1e-12
#: Query rows per Q scale: the kernel's query tile at head_dim 128 on Hopper (kernels/arrow_triton.py uses its own
#: tile, 64 rows at head_dim 64; the error statistics differ little).
Q_BLOCK = 128
#: Query rows per block of the reference (a multiple of Q_BLOCK; bounds its float32 score block to B·h·rows·L).
_ROW_BLOCK = 1024


def fp8_supported(device: torch.device | str) -> bool:
    """True where FP8 tensor cores exist: a CUDA device of compute capability >= 8.9 (Ada, Hopper, Blackwell).
    False on CPU and every other device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def smooth_k(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k - km, km) for k ``[..., L, D]``: km ``[..., 1, D]`` is the float32 mean over the L tokens per channel;
    the smoothed keys are float32. Softmax-invariant (each score row shifts by q · km)."""
    kf = k.float()
    km = kf.mean(dim=-2, keepdim=True)
    return kf - km, km


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales of x ``[..., L, D]`` with one scale per token (row):
    ``scale = max(max_d |x|, SCALE_FLOOR · 448) / 448``, shape ``[..., L]``; ``x ≈ x8.float() · scale[..., None]``."""
    scale = x.float().abs().amax(dim=-1).div(FP8_MAX).clamp_min(SCALE_FLOOR)
    return _to_fp8(x, scale[..., None]), scale


def quantize_per_block(x: torch.Tensor, rows: int = Q_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales of x ``[..., L, D]`` with one scale per block of `rows` tokens (the last block
    may be shorter): shape ``[..., ceil(L / rows)]``; ``x ≈ x8.float() · scale.repeat_interleave(rows)[..., :L, None]``."""
    seq = x.shape[-2]
    amax = x.float().abs().amax(dim=-1)  # [..., L]
    pad = (-seq) % rows
    if pad:
        amax = torch.nn.functional.pad(amax, (0, pad))
    scale = amax.unflatten(-1, (-1, rows)).amax(dim=-1).div(FP8_MAX).clamp_min(SCALE_FLOOR)
    per_row = scale.repeat_interleave(rows, dim=-1)[..., :seq]
    return _to_fp8(x, per_row[..., None]), scale


def _window_list(windows: int | Sequence[int] | torch.Tensor, heads: int) -> list[int]:
    if isinstance(windows, torch.Tensor):
        windows = windows.tolist()
    if isinstance(windows, int):
        return [windows] * heads
    out = [int(w) for w in windows]
    if len(out) != heads:
        raise ValueError(f"got {len(out)} windows for {heads} heads")
    return out


@torch.no_grad()
def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: int | Sequence[int] | torch.Tensor,
    txt_len: int,
    *,
    scale: float | None = None,
    refs: Sequence[int] = (),
    q_block: int = Q_BLOCK,
) -> torch.Tensor:
    """FP8 attention (the scheme of this module's docstring) of q, k, v ``[B, H, L, D]``, text first.

    `windows`: one window for every head or one per head (`WINDOW_FULL`, `WINDOW_SKIP` or an arrow half-width; the
    `LayerDecision.windows` vocabulary); skipped heads are zeros. `refs`: reference segments after the image, banded
    as in masks.py. `scale`: softmax scale, default 1/sqrt(D). `q_block`: query rows per Q scale (the kernel's
    query tile; tests pass the tile of the config they compare with). Returns q's shape and dtype. Computed in float32, per
    distinct window and in blocks of query rows (every row is independent once the K and V scales are known), so
    the memory is bounded by a block of scores, never B·H·L² at once: the calibration's FP8 emulation at real sizes.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, L, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, heads, seq, d = q.shape
    if not 0 <= txt_len <= seq - sum(refs):
        raise ValueError(f"txt_len {txt_len} and references {tuple(refs)} must fit in {seq} tokens")
    ws = _window_list(windows, heads)
    sm_scale = float(scale) if scale is not None else d ** -0.5
    out = torch.zeros_like(q)
    groups: dict[int, list[int]] = {}
    for h, w in enumerate(ws):
        groups.setdefault(WINDOW_SKIP if w < WINDOW_FULL else w, []).append(h)
    for w, hs in groups.items():
        if w == WINDOW_SKIP:
            continue
        idx = torch.tensor(hs, dtype=torch.long, device=q.device)
        qh, kh, vh = q[:, idx], k[:, idx], v[:, idx]
        k8, sk = quantize_per_token(smooth_k(kh)[0])
        kf, vf = k8.float(), vh.float()
        keep = None if w == WINDOW_FULL else arrow_keep(txt_len, seq, w, q.device, refs)
        # rows per block so that one float32 score block stays near 2**26 values (256 MB) however many heads
        rows = max(1, min(_ROW_BLOCK, (1 << 26) // max(1, b * len(hs) * seq)))
        rows = max(q_block, rows // q_block * q_block)  # whole Q tiles per block
        for r0 in range(0, seq, rows):
            r1 = min(seq, r0 + rows)
            q8, sq = quantize_per_block(qh[:, :, r0:r1], q_block)
            sq = sq.repeat_interleave(q_block, dim=-1)[..., :r1 - r0]
            s = (q8.float() @ kf.transpose(-1, -2)) * sq[..., None] * sk[..., None, :] * sm_scale
            if keep is not None:
                s = s.masked_fill(~keep[r0:r1], float("-inf"))
            m = s.amax(dim=-1, keepdim=True)  # every row keeps its text columns or its diagonal: finite
            p = torch.exp(s - m)
            l = p.sum(dim=-1, keepdim=True)
            o = (p.to(v.dtype).float() @ vf) / l
            out[:, idx, r0:r1] = o.to(q.dtype)
    return out
