"""FP8 heads of the arrow kernel (`head_quant`), against kernels/quant.py's reference of the scheme and float64.

CPU tier: Triton's interpreter (TRITON_INTERPRET=1 when there is no CUDA), small odd sizes, FP8 and bf16 heads mixed
in one launch. GPU tier (`-m gpu`, FP8 tensor cores: sm89+): real sizes and odd lengths.
The quantization: Q.K^T in e4m3 with one scale per query tile of Q and per-token scales of mean-smoothed K; P.V in
the input dtype.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from dfav2.kernels.quant import fp8_attention_reference

# the bf16 kernel tests' loader, interpreter switch, markers and keep mask (tests/ is not a package)
_spec = importlib.util.spec_from_file_location("_dfav2_test_arrow_triton",
                                               pathlib.Path(__file__).with_name("test_arrow_triton.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
FULL, SKIP, _INTERP, at, cpu_only, gpu, reference = (_base.FULL, _base.SKIP, _base._INTERP, _base.at, _base.cpu_only,
                                                     _base.gpu, _base.reference)


def _inputs(B, H, L, D, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ch = 0.5 + torch.rand(1, H, 1, D, generator=g) * 2
    q = torch.randn(B, H, L, D, generator=g) * ch
    k = torch.randn(B, H, L, D, generator=g) * ch + 2 * torch.randn(1, H, 1, D, generator=g)  # offset: smoothing
    v = torch.randn(B, H, L, D, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _q_block(q, D, L):
    """Query rows per Q scale of the kernel that serves the call: kernel v3's tile on Hopper at head_dim 128, else the
    Triton kernel's BLOCK_M."""
    g = at._gluon() if q.is_cuda and not _INTERP else None
    if g is not None and at.GLUON and D == g.HEAD_DIM and torch.cuda.get_device_capability(q.device)[0] == 9:
        return g.BLOCK_M
    return at._default_config(q.device, D, q.dtype, L)["BLOCK_M"]


def _check(B, H, T, N, D, windows, quant, dtype, device, seed, tol_emu, tol_exact):
    L = T + N
    q, k, v = _inputs(B, H, L, D, dtype, device, seed)
    hw = torch.tensor(windows, dtype=torch.int32, device=device)
    hq = torch.tensor(quant, dtype=torch.int32, device=device)
    o = at.arrow_attention_triton(q, k, v, hw, T, head_quant=hq, zero_skip=True)
    plain = at.arrow_attention_triton(q, k, v, hw, T, zero_skip=True)
    emu = fp8_attention_reference(q, k, v, windows, T, q_block=_q_block(q, D, L)).double()
    exact = reference(q, k, v, windows, T, "bhld")
    for h, w in enumerate(windows):
        if w == SKIP:
            assert torch.count_nonzero(o[:, h]) == 0
        elif quant[h]:
            # the kernel quantizes P against the running row max (online softmax), the emulation against the final
            # one: the two differ by P's rounding, well inside the gap to a wrong scale or a missing smoothing
            assert _rel(o[:, h], emu[:, h]) < tol_emu, (h, w, _rel(o[:, h], emu[:, h]))
            assert _rel(o[:, h], exact[:, h]) < tol_exact, (h, w, _rel(o[:, h], exact[:, h]))
        else:  # bf16 heads of an FP8 launch run the bf16 code: bit-identical to the launch without FP8 heads
            assert torch.equal(o[:, h], plain[:, h]), h


@cpu_only
@pytest.mark.parametrize("B,H,T,N,D", [(1, 4, 5, 32, 32), (2, 4, 0, 61, 16), (1, 4, 9, 70, 64), (1, 4, 1, 1, 32)])
def test_fp8_heads_interpreter(B, H, T, N, D):
    windows = [FULL, max(N // 8, 0), N // 3, SKIP]
    _check(B, H, T, N, D, windows, [1, 1, 0, 1], torch.float32, "cpu", seed=B * 7 + N, tol_emu=0.05, tol_exact=0.1)


@cpu_only
def test_fp8_rounding_matches_torch():
    """The interpreter's e4m3 rounding (`_to_fp8`, arithmetic) equals torch's cast, across binade edges."""
    import triton
    import triton.language as tl

    @triton.jit
    def k(X, Y, n: tl.constexpr):
        o = tl.arange(0, n)
        tl.store(Y + o, at._to_fp8(tl.load(X + o), True))

    x = torch.cat([torch.randn(4096) * 30, torch.tensor([31.85, -31.49, 1.9889, 448.0, 0.0, 2.0 ** -8, 2.0 ** -10,
                                                         0.0146, -239.9, 15.99])])
    x = torch.cat([x, torch.zeros(8192 - x.numel())])
    y = torch.empty_like(x)
    k[(1,)](x, y, 8192)
    assert torch.equal(y, x.to(torch.float8_e4m3fn).float())


needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or _INTERP or
                               torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU (sm89+)")


@gpu
@needs_fp8
@pytest.mark.parametrize("B,H,T,N,D", [(1, 24, 512, 4096, 128), (2, 6, 77, 1000, 128), (1, 38, 154, 4096, 64),
                                       (1, 3, 1, 129, 128), (1, 4, 0, 333, 64), (1, 4, 2, 1, 128)])
def test_gpu_fp8_heads(B, H, T, N, D):
    windows = [(FULL, N // 16, N // 32, SKIP)[h % 4] for h in range(H)]
    quant = [(1, 1, 0, 1, 1, 0)[h % 6] for h in range(H)]
    # FP8 Q.K^T itself costs ~9 % relative L2 on these inputs (H200: 0.085-0.090); the kernel matches the reference
    # of the scheme far closer (< 3 %, P's rounding in the online softmax)
    _check(B, H, T, N, D, windows, quant, torch.bfloat16, "cuda", seed=N + H, tol_emu=0.03, tol_exact=0.12)


@gpu
@needs_fp8
def test_gpu_fp8_without_flags_is_bf16():
    q, k, v = _inputs(1, 4, 700, 128, torch.bfloat16, "cuda", 3)
    hw = torch.tensor([FULL, 40, 20, FULL], dtype=torch.int32, device="cuda")
    zero = torch.zeros(4, dtype=torch.int32, device="cuda")
    assert torch.equal(at.arrow_attention_triton(q, k, v, hw, 50, head_quant=zero),
                       at.arrow_attention_triton(q, k, v, hw, 50))



@gpu
@needs_fp8
def test_gpu_fp8_heads_run_on_kernel_v3(monkeypatch):
    """On Hopper at head_dim 128 FP8 launches run on kernel v3 (its plan carries the pre-pass) and agree with the
    Triton kernel's FP8 heads (the same scheme; they differ in the order of rounding only)."""
    g = at._gluon()
    if torch.cuda.get_device_capability()[0] != 9 or g is None:
        pytest.skip("kernel v3 runs on sm90 only")
    q, k, v = _inputs(2, 5, 1077, 128, torch.bfloat16, "cuda", 11)
    hw = torch.tensor([FULL, 60, 37, SKIP, 5], dtype=torch.int32, device="cuda")
    hq = torch.tensor([1, 1, 0, 1, 1], dtype=torch.int32, device="cuda")
    at._PLANS.clear()
    o3 = at.arrow_attention_triton(q, k, v, hw, 77, head_quant=hq, zero_skip=True)
    assert at.GLUON, "kernel v3 failed and was disabled"
    steps = [e[1] for key, e in at._PLANS.items() if key[0] == "gluon" and e is not None]
    assert len(steps) == 1 and steps[0] is not None, "the FP8 launch did not run on kernel v3"
    monkeypatch.setattr(at, "GLUON", False)
    o2 = at.arrow_attention_triton(q, k, v, hw, 77, head_quant=hq, zero_skip=True)
    for h in range(5):
        if hw[h] == SKIP:   # zeros from both (a relative error would be 0 / 0)
            assert torch.count_nonzero(o3[:, h]) == 0 and torch.count_nonzero(o2[:, h]) == 0
        else:
            assert _rel(o3[:, h], o2[:, h].double()) < 0.02, (h, _rel(o3[:, h], o2[:, h].double()))
