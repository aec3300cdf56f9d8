"""Correctness of kernels/arrow_triton.py against a float64 masked-softmax reference.

CPU tier: Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported when no CUDA is
present), small odd sizes, every method mix, both layouts, poisoned outputs.
GPU tier (`-m gpu`): the same checks at Flux / SD3.5 sizes on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernel_module():
    # Load the file itself (it has no package-relative imports) so that the kernel is decorated with the
    # interpreter setting chosen above, whatever imported the package earlier.
    spec = importlib.util.spec_from_file_location("_dfav2_arrow_triton_under_test",
                                                  _ROOT / "kernels" / "arrow_triton.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


at = _load_kernel_module()
_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_only = pytest.mark.skipif(not _INTERP, reason="interpreter tier: set TRITON_INTERPRET=1 (auto when no CUDA)")
gpu = pytest.mark.gpu

FULL, SKIP = -1, -2


# ---------------------------------------------------------------------------------------------------
# reference and helpers
# ---------------------------------------------------------------------------------------------------

def _to_bhld(x: torch.Tensor, layout: str, H: int) -> torch.Tensor:
    if layout == "bhld":
        return x
    B, L, HD = x.shape
    return x.view(B, L, H, HD // H).transpose(1, 2)


def _keep_mask(w: int, L: int, T: int, device) -> torch.Tensor:
    qi = torch.arange(L, device=device)[:, None]
    ki = torch.arange(L, device=device)[None, :]
    if w == FULL:
        return torch.ones(L, L, dtype=torch.bool, device=device)
    return (qi < T) | (ki < T) | ((qi - ki).abs() <= w)


def reference(q, k, v, windows, T, layout, sm_scale=None):
    """float64 masked softmax attention; skipped heads come back as NaN (they must not be compared)."""
    H = len(windows)
    qb, kb, vb = (_to_bhld(x, layout, H).double() for x in (q, k, v))
    B, _, L, D = qb.shape
    scale = sm_scale if sm_scale is not None else D ** -0.5
    out = torch.full_like(qb, float("nan"))
    for h, w in enumerate(windows):
        if w == SKIP:
            continue
        s = (qb[:, h] @ kb[:, h].transpose(-1, -2)) * scale
        s = s.masked_fill(~_keep_mask(w, L, T, q.device), float("-inf"))
        out[:, h] = torch.softmax(s, dim=-1) @ vb[:, h]
    return out  # [B, H, L, D]


def _make_qkv(B, H, L, D, layout, dtype, device, gen, noncontig=False):
    def one():
        if layout == "bhld":
            if noncontig:  # a permuted view of a packed [B, L, 3, H, D] tensor, as models produce
                base = torch.randn(B, L, 3, H, D, generator=gen, device="cpu").to(device=device, dtype=dtype)
                return base[:, :, 1].transpose(1, 2)
            return torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
        if noncontig:  # last dim contiguous, token stride wider than H*D
            base = torch.randn(B, L, 2 * H * D, generator=gen).to(device=device, dtype=dtype)
            return base[:, :, H * D:]
        return torch.randn(B, L, H * D, generator=gen).to(device=device, dtype=dtype)
    return one(), one(), one()


def _rel_err(out_bhld: torch.Tensor, ref: torch.Tensor, heads) -> float:
    worst = 0.0
    for h in heads:
        o, r = out_bhld[:, h].double(), ref[:, h]
        worst = max(worst, ((o - r).norm() / r.norm()).item())
    return worst


def _windows(kind: str, H: int, L: int, T: int, rng: random.Random) -> list[int]:
    N = L - T
    if kind == "full":
        return [FULL] * H
    if kind == "skip":
        return [SKIP] * H
    if kind == "diag":
        return [0] * H
    if kind == "arrow":
        return [max(N // (2 * f), 0) for f in (8, 16, 32)] * H
    # mixed: every method incl. tiny / huge bands
    pool = [FULL, SKIP, 0, 1, 3, 7, 16, 33, max(N // 16, 0), N + 5]
    ws = [rng.choice(pool) for _ in range(H)]
    ws[0], ws[-1] = FULL, SKIP
    return ws


def _check(B, H, L, T, D, layout, kind, dtype, device, tol, config=None, noncontig=False, seed=0,
           prefill=False, sm_scale=None):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    windows = _windows(kind, H, L, T, rng)[:H]
    q, k, v = _make_qkv(B, H, L, D, layout, dtype, device, gen, noncontig)
    hw = torch.tensor(windows, dtype=torch.int32, device=device)
    if prefill:  # the cache the caller pastes for skipped heads: must survive bit-exactly
        out = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    else:        # poison: any element left unwritten in a computed head shows up as NaN
        out = torch.full_like(q, float("nan"))
    before = out.clone()
    if config is None:
        res = at.arrow_attention_triton(q, k, v, hw, T, layout=layout, out=out, sm_scale=sm_scale)
    else:
        res = at._launch(q, k, v, hw, T, layout, sm_scale, out, config=config)
    assert res.data_ptr() == out.data_ptr()
    ref = reference(q, k, v, windows, T, layout, sm_scale)
    ob, bb = _to_bhld(out, layout, H), _to_bhld(before, layout, H)
    live = [h for h, w in enumerate(windows) if w != SKIP]
    for h, w in enumerate(windows):
        if w == SKIP:  # nothing written: same bits as before (NaN-poison stays NaN)
            assert torch.equal(ob[:, h].isnan(), bb[:, h].isnan())
            assert torch.equal(ob[:, h].nan_to_num(0.0), bb[:, h].nan_to_num(0.0)), f"head {h} (skip) was written"
        else:
            assert not ob[:, h].isnan().any(), f"head {h} (w={w}) has unwritten/NaN elements"
    if live:
        err = _rel_err(ob, ref, live)
        assert err <= tol, f"relative error {err:.3e} > {tol:.0e} (windows={windows})"
    return windows


# ---------------------------------------------------------------------------------------------------
# CPU interpreter tier
# ---------------------------------------------------------------------------------------------------

# fp32 vs float64 reference: exact-order-free fp32 softmax/matmul lands ~1e-7; 1e-5 is the bar.
_F32_TOL = 1e-5
# bf16 inputs and bf16 P in the second product: ~3e-3 typical; 1e-2 is the bar.
_BF16_TOL = 1e-2

_CPU_CASES = [
    # B, H, L, T, D, layout, kind
    (1, 3, 37, 0, 16, "bhld", "mixed"),
    (2, 3, 37, 5, 32, "blhd_flat", "mixed"),
    (1, 5, 70, 16, 16, "bhld", "mixed"),
    (1, 5, 70, 33, 32, "blhd_flat", "arrow"),
    (2, 3, 131, 5, 16, "bhld", "arrow"),
    (1, 5, 131, 33, 16, "blhd_flat", "mixed"),
    (1, 3, 131, 16, 64, "bhld", "full"),
    (1, 3, 70, 0, 64, "blhd_flat", "diag"),
    (2, 3, 37, 16, 128, "bhld", "mixed"),
    (1, 3, 37, 5, 16, "bhld", "skip"),
    (1, 3, 70, 70, 16, "blhd_flat", "mixed"),  # text only (N = 0)
]


@cpu_only
@pytest.mark.parametrize("B,H,L,T,D,layout,kind", _CPU_CASES)
def test_fp32_matches_reference(B, H, L, T, D, layout, kind):
    _check(B, H, L, T, D, layout, kind, torch.float32, "cpu", _F32_TOL, seed=L * 7 + T)


# Small and odd lengths (issue 10 item 3): T = 0, 1, 2 and N = 1 exercise the compile-time specialisation of ints
# equal to 1 on GPUs (the CPU compile check is tests/test_arrow_compile.py) and the empty / one-tile edge cases.
_SMALL = [  # B, H, T, N, D, layout
    (1, 3, 0, 1, 64, "bhld"),
    (2, 1, 1, 1, 64, "blhd_flat"),
    (1, 3, 1, 129, 64, "bhld"),
    (1, 2, 2, 1, 64, "blhd_flat"),
    (1, 3, 2, 129, 128, "bhld"),
    (1, 1, 77, 1, 64, "bhld"),
]


@cpu_only
@pytest.mark.parametrize("B,H,T,N,D,layout", _SMALL)
def test_small_and_odd_lengths(B, H, T, N, D, layout):
    _check(B, H, T + N, T, D, layout, "mixed" if H > 1 else "full", torch.float32, "cpu", _F32_TOL,
           seed=T * 31 + N, prefill=bool(N % 2))


@cpu_only
def test_zero_skip_writes_zeros_and_nothing_else_changes():
    gen = torch.Generator().manual_seed(41)
    q, k, v = _make_qkv(2, 4, 37, 16, "blhd_flat", torch.float32, "cpu", gen)
    windows = [SKIP, FULL, 3, SKIP]
    hw = torch.tensor(windows, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    at.arrow_attention_triton(q, k, v, hw, 5, layout="blhd_flat", out=out, zero_skip=True)
    ob = _to_bhld(out, "blhd_flat", 4)
    assert torch.equal(ob[:, [0, 3]], torch.zeros_like(ob[:, [0, 3]]))
    assert _rel_err(ob, reference(q, k, v, windows, 5, "blhd_flat"), [1, 2]) <= _F32_TOL


def test_unsupported_reason_names_what_the_kernel_cannot_take():
    x = torch.randn(1, 2, 8, 16)
    assert at.unsupported_reason(x, x, x, 2, "bhld", device_check=False) is None
    odd = torch.randn(1, 2, 8, 24)
    assert "head_dim 24" in at.unsupported_reason(odd, odd, odd, 2, "bhld", device_check=False)
    assert "dtype" in at.unsupported_reason(x.double(), x.double(), x.double(), 2, "bhld", device_check=False)
    many = torch.randn(1, at.MAX_HEADS + 1, 4, 16)
    assert "heads" in at.unsupported_reason(many, many, many, at.MAX_HEADS + 1, "bhld", device_check=False)
    assert "Lq != Lk" in at.unsupported_reason(x, x[:, :, :5], x[:, :, :5], 2, "bhld", device_check=False)
    flat = torch.randn(1, 8, 64)[:, :, ::2]  # last dim not contiguous
    assert "contiguous" in at.unsupported_reason(flat, flat, flat, 2, "blhd_flat", device_check=False)
    # 32-bit row offsets: a (batch, head) slice addressed past 2^31 elements (a meta tensor: strides, no memory)
    huge = torch.empty_strided((1, 1, 3, 16), (48, 48, 2**30, 1), device="meta")
    assert "2^31" in at.unsupported_reason(huge, huge, huge, 1, "bhld", device_check=False)


@cpu_only
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),   # BLOCK_N > BLOCK_M
    dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1),
    dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
])
@pytest.mark.parametrize("T", [0, 5, 16, 33])
def test_tile_shapes(config, T):
    _check(1, 5, 131, T, 16, "bhld", "mixed", torch.float32, "cpu", _F32_TOL, config=config, seed=T + 1)


@cpu_only
def test_plan_cache_reuse_with_new_tensors():
    # the second call with the same key takes the cached plan (descriptors / launcher) with new pointers
    at._PLANS.clear()
    for seed in (21, 22):
        _check(1, 5, 70, 16, 16, "bhld", "mixed", torch.float32, "cpu", _F32_TOL, seed=seed)
    n = len(at._PLANS)
    assert n >= 1
    # another txt_len, another sm_scale, a strided view, out=None: new keys, still correct
    _check(1, 5, 70, 17, 16, "bhld", "mixed", torch.float32, "cpu", _F32_TOL, seed=23)
    _check(1, 5, 70, 16, 16, "bhld", "mixed", torch.float32, "cpu", _F32_TOL, seed=24, sm_scale=0.2)
    _check(1, 5, 70, 16, 16, "bhld", "mixed", torch.float32, "cpu", _F32_TOL, seed=25, noncontig=True)
    assert len(at._PLANS) == n + 3
    gen = torch.Generator().manual_seed(26)
    for _ in range(2):
        q, k, v = _make_qkv(1, 3, 37, 16, "bhld", torch.float32, "cpu", gen)
        hw = torch.tensor([FULL, 4, 0], dtype=torch.int32)
        res = at.arrow_attention_triton(q, k, v, hw, 7)
        assert _rel_err(res, reference(q, k, v, [FULL, 4, 0], 7, "bhld"), range(3)) <= _F32_TOL


@cpu_only
@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
def test_bf16(layout):
    _check(2, 5, 70, 5, 32, layout, "mixed", torch.bfloat16, "cpu", _BF16_TOL, seed=3)


@cpu_only
@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
def test_noncontiguous_views_and_prefilled_out(layout):
    _check(2, 5, 70, 16, 16, layout, "mixed", torch.float32, "cpu", _F32_TOL, noncontig=True, prefill=True,
           seed=11, sm_scale=0.3)


@cpu_only
def test_returns_new_tensor_without_out():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _make_qkv(1, 3, 37, 16, "bhld", torch.float32, "cpu", gen)
    hw = torch.tensor([FULL, 4, 0], dtype=torch.int32)
    res = at.arrow_attention_triton(q, k, v, hw, 7)
    ref = reference(q, k, v, [FULL, 4, 0], 7, "bhld")
    assert res.shape == q.shape and res.dtype == q.dtype
    assert _rel_err(res, ref, range(3)) <= _F32_TOL


def test_rejects_bad_input():
    q = torch.randn(1, 2, 8, 16)
    hw = torch.tensor([FULL, FULL], dtype=torch.int32)
    with pytest.raises(ValueError, match="layout"):
        at.arrow_attention_triton(q, q, q, hw, 0, layout="bshd")
    with pytest.raises(ValueError, match="int32"):
        at.arrow_attention_triton(q, q, q, hw.long(), 0)
    with pytest.raises(ValueError, match="txt_len"):
        at.arrow_attention_triton(q, q, q, hw, 9)
    with pytest.raises(ValueError, match="head_dim"):
        x = torch.randn(1, 2, 8, 24)
        at.arrow_attention_triton(x, x, x, hw, 0)
    with pytest.raises(ValueError, match="heads"):
        at.arrow_attention_triton(q, q, q, hw[:1], 0)
    with pytest.raises(ValueError, match="one shape"):
        at.arrow_attention_triton(q, q[:, :, :7], q[:, :, :7], hw, 0)


# ---------------------------------------------------------------------------------------------------
# GPU tier (real sizes)
# ---------------------------------------------------------------------------------------------------

_GPU_CASES = [
    # B, H, L, T, D, layout, kind  (Flux 1024²: N = 4096, 24 x 128; SD3.5-L 1024²: 38 x 64, T = 154)
    (1, 24, 256 + 4096, 256, 128, "bhld", "mixed"),
    (1, 24, 512 + 4096, 512, 128, "bhld", "arrow"),
    (2, 24, 256 + 4096, 256, 128, "bhld", "full"),
    (1, 38, 154 + 4096, 154, 64, "blhd_flat", "mixed"),
    (2, 38, 154 + 4096, 154, 64, "blhd_flat", "arrow"),
    (1, 24, 512 + 16384, 512, 128, "bhld", "mixed"),
    (1, 5, 333 + 1001, 333, 128, "bhld", "mixed"),   # odd L, T not a tile multiple
    (2, 24, 154 + 1023, 154, 64, "bhld", "mixed"),
]


@gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,L,T,D,layout,kind", _GPU_CASES)
def test_gpu_real_sizes(B, H, L, T, D, layout, kind, dtype):
    _check(B, H, L, T, D, layout, kind, dtype, "cuda", _BF16_TOL if dtype == torch.bfloat16 else 5e-3,
           seed=L + T, noncontig=(B == 2))


@gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [0, 1, 2, 77, 154, 333])
@pytest.mark.parametrize("N", [1, 129, 1000])
def test_gpu_small_and_odd_lengths(T, N, D):
    # every (T, N) of issue 10 item 3 at the default config (T = 1 / L = 1 used to fail to compile), both layouts
    layout = "bhld" if (T + N) % 2 else "blhd_flat"
    _check(2 if N == 129 else 1, 5, T + N, T, D, layout, "mixed", torch.bfloat16, "cuda", _BF16_TOL,
           seed=T * 7 + N + D, prefill=(N == 1000))


@gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
def test_gpu_prefill_and_fp32(layout):
    _check(1, 5, 1234, 77, 64, layout, "mixed", torch.float32, "cuda", 1e-5, prefill=True, seed=9)
    _check(1, 5, 1234, 77, 128, layout, "mixed", torch.bfloat16, "cuda", _BF16_TOL, prefill=True, seed=10)


_GPU_VARIANTS = [dict(BLOCK_N=64), dict(WS=False), dict(TMA=False)]  # config switches of the one kernel


@gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("variant", _GPU_VARIANTS)
@pytest.mark.parametrize("B,H,L,T,D,layout,kind", [_GPU_CASES[0], _GPU_CASES[6], _GPU_CASES[7], _GPU_CASES[4]])
def test_gpu_variants(variant, B, H, L, T, D, layout, kind):
    # other configs of the production kernel (sm90 defaults with one switch flipped): same function
    cfg = dict(at._default_config(torch.device("cuda"), D, torch.bfloat16))
    cfg.update(variant)
    _check(B, H, L, T, D, layout, kind, torch.bfloat16, "cuda", _BF16_TOL, config=cfg, seed=L + T + 1,
           noncontig=(B == 2))


@gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("B,H,L,T,D,layout,kind", [_GPU_CASES[0], _GPU_CASES[3], _GPU_CASES[6]])
def test_gpu_cached_launch_and_graph_replay(B, H, L, T, D, layout, kind):
    # same key three times with fresh data (1st: JIT path, then the cached direct launcher), then a CUDA
    # graph captured on the cached path and replayed on new data copied into the captured buffers
    for seed in (31, 32, 33):
        _check(B, H, L, T, D, layout, kind, torch.bfloat16, "cuda", _BF16_TOL, seed=seed)
    gen = torch.Generator().manual_seed(34)
    windows = _windows(kind, H, L, T, random.Random(34))[:H]
    hw = torch.tensor(windows, dtype=torch.int32, device="cuda")
    q, k, v = _make_qkv(B, H, L, D, layout, torch.bfloat16, "cuda", gen)
    out = torch.full_like(q, float("nan"))
    at.arrow_attention_triton(q, k, v, hw, T, layout=layout, out=out)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        at.arrow_attention_triton(q, k, v, hw, T, layout=layout, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        at.arrow_attention_triton(q, k, v, hw, T, layout=layout, out=out)
    q2, k2, v2 = _make_qkv(B, H, L, D, layout, torch.bfloat16, "cuda", gen)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = reference(q2, k2, v2, windows, T, layout)
    live = [h for h, w in enumerate(windows) if w != SKIP]
    assert _rel_err(_to_bhld(out, layout, H), ref, live) <= _BF16_TOL


@gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERP, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("layout", ["bhld", "blhd_flat"])
def test_gpu_kernel_v3_serves_hopper_d128_and_agrees_with_v2(layout, monkeypatch):
    # On sm90, head_dim 128, bf16 the default launch runs kernel v3 (arrow_gluon.py) -- the cases above then test
    # v3, not a silent fallback -- and it agrees with the Triton kernel (explicit config) on the same inputs.
    if torch.cuda.get_device_capability()[0] != 9 or at._gluon() is None:
        pytest.skip("kernel v3 runs on Hopper with a Gluon-capable Triton")
    B, H, L, T = 1, 6, 512 + 1111, 512
    gen = torch.Generator().manual_seed(77)
    q, k, v = _make_qkv(B, H, L, 128, layout, torch.bfloat16, "cuda", gen, noncontig=True)
    hw = torch.tensor([FULL, 40, SKIP, 0, FULL, 300], dtype=torch.int32, device="cuda")
    at._PLANS.clear()
    o3 = torch.full_like(q, float("nan"))
    at.arrow_attention_triton(q, k, v, hw, T, layout=layout, out=o3)
    assert at.GLUON, "kernel v3 failed and was disabled"
    plans = [p for key, p in at._PLANS.items() if key[0] == "gluon"]
    assert len(plans) == 1 and plans[0] is not None, "the call did not run on kernel v3"
    cfg = at._default_config(torch.device("cuda"), 128, torch.bfloat16)
    o2 = torch.full_like(q, float("nan"))
    at._launch(q, k, v, hw, T, layout, None, o2, config=cfg)
    live = [0, 1, 3, 4, 5]
    b3, b2 = _to_bhld(o3, layout, H), _to_bhld(o2, layout, H)
    assert b3[:, 2].isnan().all() and b2[:, 2].isnan().all()   # the skipped head: untouched by both
    diff = ((b3[:, live].float() - b2[:, live].float()).norm() / b2[:, live].float().norm()).item()
    assert diff < 5e-3, diff
    # DFAV2_KERNEL=triton (read at import) / a failed v3: the Triton kernel serves the call, no v3 plan is made
    monkeypatch.setattr(at, "GLUON", False)
    at._PLANS.clear()
    at.arrow_attention_triton(q, k, v, hw, T, layout=layout, out=o3)
    assert not [key for key in at._PLANS if key[0] == "gluon"]


@cpu_only
def test_heavy_first_order_is_a_stable_permutation():
    windows = [0, SKIP, FULL, 17, 3, FULL, SKIP, 17, 400]
    order = at._head_order(torch.tensor(windows, dtype=torch.int32)).tolist()
    key = {FULL: 1 << 30, SKIP: -2}
    expect = sorted(range(len(windows)), key=lambda h: (-key.get(windows[h], windows[h]), h))
    assert order == expect
