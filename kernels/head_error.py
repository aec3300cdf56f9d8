"""Per-head squared error of two attention outputs in one read: the calibrator's metric at memory speed.

`head_sq_err(a, b)` = Σ over batch, tokens and head dim of (a - b)² per head, float32 ``[H]``, for ``[B, H, L, D]``
tensors of any strides. The calibrator compares every candidate of a layer call with the dense output (seven or
eight times per call); torch's elementwise form materialises four float32 copies of the tensor and took 0.87 ms per
comparison at Flux 1K with 4 prompts on an H200 (bench/bench_candidates.py), about as long as the candidate's own
attention. On CUDA a Triton kernel reads each input once and sums in float32; partial sums per (head, batch, row
chunk) are added up by torch afterwards, so the result is deterministic (no atomics: a plan must not depend on the
order in which thread blocks finished). Elsewhere the same sum in torch.

No package-relative imports: tests load this file under Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton take the torch path
    triton = None

__all__ = ["head_sq_err"]

ROWS_PER_PROGRAM = 512   # query rows summed by one program: ~800 programs at Flux 1K (4 prompts) and 2K (1)
BLOCK_ROWS = 32
_kernel_ok = True  # False after the kernel failed once (warned): torch from then on

if triton is not None:

    @triton.jit
    def _sq_err_kernel(A, Bt, OUT, B, H, L, D, sa_b, sa_h, sa_l, sa_d, sb_b, sb_h, sb_l, sb_d, CHUNKS,
                       ROWS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        c = tl.program_id(1)
        bi = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        a_base = A + bi * sa_b + h * sa_h
        b_base = Bt + bi * sb_b + h * sb_h
        acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
        for r0 in range(0, ROWS, BLOCK_L):
            rows = (c * ROWS + r0 + tl.arange(0, BLOCK_L)).to(tl.int64)
            m = (rows < L)[:, None] & cmask[None, :]
            x = tl.load(a_base + rows[:, None] * sa_l + cols[None, :] * sa_d, mask=m, other=0.0).to(tl.float32)
            y = tl.load(b_base + rows[:, None] * sb_l + cols[None, :] * sb_d, mask=m, other=0.0).to(tl.float32)
            d = x - y
            acc += d * d
        tl.store(OUT + (h * B + bi) * CHUNKS + c, tl.sum(tl.sum(acc, 1), 0))


def head_sq_err(a: torch.Tensor, b: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """Σ (a - b)² per head over batch, tokens and head dim, float32 [H] on the inputs' device.

    a, b: [B, H, L, D] of one shape and device (any float dtypes, any strides; computed in float32).
    use_triton: None = the Triton kernel on CUDA, torch elsewhere; True on CPU tensors needs Triton's interpreter
    (TRITON_INTERPRET=1 before this file is imported: the tests).
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two [B, H, L, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"the two tensors are on different devices ({a.device}, {b.device})")
    global _kernel_ok
    if use_triton is None:
        use_triton = triton is not None and a.is_cuda and _kernel_ok
    B, H, L, D = a.shape
    if use_triton and a.numel():
        chunks = triton.cdiv(L, ROWS_PER_PROGRAM)
        part = torch.empty(H * B * chunks, dtype=torch.float32, device=a.device)
        try:
            with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
                _sq_err_kernel[(B * H, chunks)](a, b, part, B, H, L, D, *a.stride(), *b.stride(), chunks,
                                                ROWS=ROWS_PER_PROGRAM, BLOCK_L=BLOCK_ROWS,
                                                BLOCK_D=triton.next_power_of_2(D), num_warps=4)
            return part.view(H, B * chunks).sum(1)
        except Exception as exc:  # noqa: BLE001 - e.g. a GPU Triton does not support: never fail the calibration
            _kernel_ok = False
            warnings.warn(f"DiTFastAttnV2: the metric's Triton kernel failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "measuring in torch from now on (slower calibration, same numbers)", RuntimeWarning,
                          stacklevel=2)
    return (a.float() - b.float()).square().sum((0, 2, 3))

