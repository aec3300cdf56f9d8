"""FP8 heads (issue 11): the quantization scheme's reference (kernels/quant.py) against an independent float64
implementation of its definition and against exact attention; the FP8 vocabulary; the op's and the engine's
bf16 fallback where FP8 cannot run (CPU here), warned once; the cost model's FP8 factor."""

from __future__ import annotations

import logging

import pytest
import torch

from dfav2.kernels import (
    CACHE,
    FULL,
    FULL_FP8,
    QUANT_FP8,
    QUANT_NONE,
    WINDOW_FULL,
    WINDOW_SKIP,
    Geometry,
    HeadMethod,
    LayerDecision,
    arrow,
    arrow_attention,
    fp8_attention_reference,
    fp8_supported,
    head_cost,
    head_table,
    headwise_attention,
)
from dfav2.kernels import attention as api
from dfav2.kernels import engine
from dfav2.kernels import quant as Q
from dfav2.kernels.cost import FP8_COST_FACTOR, decision_cost, decision_flops, kept_pairs
from dfav2.kernels.engine import call_cost

E4M3 = torch.float8_e4m3fn


def exact(q, k, v, window, txt_len):
    """float64 attention with the arrow keep rule (text rows/cols full, |i - j| <= w)."""
    q, k, v = (x.double() for x in (q, k, v))
    seq = q.shape[2]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if window != WINDOW_FULL:
        i = torch.arange(seq)
        keep = (i[:, None] < txt_len) | (i[None, :] < txt_len) | ((i[:, None] - i[None, :]).abs() <= window)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def scheme(q, k, v, window, txt_len):
    """The FP8 scheme written out per (batch, head) from its definition (scales in float32 as specified, the
    products of e4m3 values in float64): an independent check of `fp8_attention_reference`."""
    b, h, seq, d = q.shape
    out = torch.empty(b, h, seq, d, dtype=torch.float64)
    i = torch.arange(seq)
    for bi in range(b):
        for hi in range(h):
            qq, kk, vv = q[bi, hi].float(), k[bi, hi].float(), v[bi, hi].float()
            kk = kk - kk.mean(0)
            tile = torch.arange(seq) // Q.Q_BLOCK  # one Q scale per tile of Q_BLOCK query rows
            sq = torch.stack([qq[tile == t].abs().amax() for t in range(int(tile[-1]) + 1)])[tile]
            sq = (sq / 448).clamp_min(1e-12)
            sk = (kk.abs().amax(1) / 448).clamp_min(1e-12)
            q8 = (qq / sq[:, None]).clamp(-448, 448).to(E4M3).double()
            k8 = (kk / sk[:, None]).clamp(-448, 448).to(E4M3).double()
            s = (q8 @ k8.T) * sq.double()[:, None] * sk.double()[None, :] * d ** -0.5
            if window != WINDOW_FULL:
                keep = (i[:, None] < txt_len) | (i[None, :] < txt_len) | ((i[:, None] - i[None, :]).abs() <= window)
                s = s.masked_fill(~keep, float("-inf"))
            p = torch.exp(s - s.amax(1, keepdim=True))
            out[bi, hi] = (p.to(v.dtype).double() @ vv.double()) / p.sum(1, keepdim=True)  # P.V in v's dtype
    return out


def realistic(b, h, seq, d, dtype, seed):
    """Unit-scale q and k (score std ~1, as after the models' q/k norms), four key channels with large constant
    offsets (what K smoothing removes) and one large value channel."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, seq, d, generator=g)
    k = torch.randn(b, h, seq, d, generator=g)
    ch = torch.randperm(d, generator=g)[:4]
    k[..., ch] += torch.tensor([50.0, -40.0, 30.0, 60.0])
    v = torch.randn(b, h, seq, d, generator=g)
    v[..., ch[0]] *= 8
    return [x.to(dtype) for x in (q, k, v)]


def rel_l2(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def worst_row_cos(a, ref):
    return torch.nn.functional.cosine_similarity(a.double(), ref, dim=-1).min().item()


SHAPES = [(1, 2, 77, 64, 5), (2, 3, 333, 128, 17), (1, 2, 1025, 64, 0), (1, 1, 600, 128, 100)]


# ---------------------------------------------------------------------------------------------- the scheme


@pytest.mark.parametrize("b,h,seq,d,t", SHAPES[:3])
@pytest.mark.parametrize("arrow_band", [False, True])
def test_reference_is_the_scheme(b, h, seq, d, t, arrow_band):
    q, k, v = realistic(b, h, seq, d, torch.bfloat16, seed=seq)
    w = seq // 16 if arrow_band else WINDOW_FULL
    got = fp8_attention_reference(q, k, v, w, t)
    assert got.dtype == q.dtype and got.shape == q.shape
    # float32 vs float64 summation can flip a rare p8 rounding; nothing else may differ
    assert rel_l2(got, scheme(q, k, v, w, t)) < 3e-3


@pytest.mark.parametrize("b,h,seq,d,t", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arrow_band", [False, True])
def test_fp8_error_against_exact_attention(b, h, seq, d, t, dtype, arrow_band):
    q, k, v = realistic(b, h, seq, d, dtype, seed=7 * seq + d)
    w = max(1, seq // 16) if arrow_band else WINDOW_FULL
    ref = exact(q, k, v, w, t)
    got = fp8_attention_reference(q, k, v, w, t)
    # measured 0.047-0.056 relative L2 and >= 0.98 worst-row cosine on these inputs; a wrong scale gives O(1)
    assert rel_l2(got, ref) < 0.07
    assert worst_row_cos(got, ref) > 0.97
    # the same heads in the inputs' dtype are far closer: the bound above is FP8's, not the test's slack
    assert rel_l2(exact(q, k, v, w, t).to(dtype), ref) < 0.01


@pytest.mark.parametrize("b,h,seq,d,t", SHAPES[:3])
def test_k_smoothing_is_what_keeps_the_error_down(monkeypatch, b, h, seq, d, t):
    q, k, v = realistic(b, h, seq, d, torch.bfloat16, seed=seq + 1)
    ref = exact(q, k, v, WINDOW_FULL, t)
    assert rel_l2(fp8_attention_reference(q, k, v, WINDOW_FULL, t), ref) < 0.07
    monkeypatch.setattr(Q, "smooth_k", lambda k: (k.float(), 0.0))
    assert rel_l2(fp8_attention_reference(q, k, v, WINDOW_FULL, t), ref) > 0.12  # measured 0.16-0.27


def test_smoothing_is_softmax_invariant():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 41, 16, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + torch.randn(16, generator=g, dtype=torch.float64) * 20
    ks, km = Q.smooth_k(k)
    assert km.shape == (2, 3, 1, 16) and torch.allclose(ks.double().mean(-2), torch.zeros(2, 3, 16, dtype=torch.float64), atol=1e-4)
    torch.testing.assert_close(exact(q, ks.double(), v, 4, 3), exact(q, k, v, 4, 3), rtol=0, atol=1e-5)  # float32 k


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 17, 24), (1, 129, 128)])
def test_quantize_per_token_and_block_error_bounds(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-2])[:, None]  # rows of very different scale
    x8, s = Q.quantize_per_token(x)
    assert x8.dtype == E4M3 and s.shape == shape[:-1] and s.dtype == torch.float32
    back = x8.float() * s[..., None]
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative) down to 2^-6, then subnormals of step 2^-9 (in units of scale)
    bound = torch.maximum(x.abs() * 2 ** -4, s[..., None] * 2 ** -10) * 1.0001
    assert torch.all((back - x).abs() <= bound)
    assert torch.allclose(x8.float().abs().amax(-1), torch.full(shape[:-1], 448.0))  # each row uses the full range
    c8, cs = Q.quantize_per_block(x, rows=4)
    assert cs.shape == shape[:-2] + (-(-shape[-2] // 4),)
    per_row = cs.repeat_interleave(4, dim=-1)[..., :shape[-2], None]
    cback = c8.float() * per_row
    assert torch.all((cback - x).abs() <= torch.maximum(x.abs() * 2 ** -4, per_row * 2 ** -10) * 1.0001)
    blocks = torch.nn.functional.pad(c8.float().abs().amax(-1), (0, (-shape[-2]) % 4)).unflatten(-1, (-1, 4)).amax(-1)
    assert torch.allclose(blocks, torch.full_like(blocks, 448.0))  # each block uses the full range


def test_zero_rows_and_channels_quantize_to_zeros_and_attention_stays_finite():
    x = torch.zeros(3, 8)
    x[1] = torch.arange(8) - 4.0
    x8, s = Q.quantize_per_token(x)
    assert torch.all(x8[0].float() == 0) and torch.all(x8[2].float() == 0) and torch.all(s > 0)
    q = torch.zeros(1, 1, 9, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 9, 16).bfloat16()
    v = torch.zeros(1, 1, 9, 16, dtype=torch.bfloat16)
    out = fp8_attention_reference(q, k, v, 2, 3)
    assert torch.all(out == 0)


def test_skipped_heads_and_per_head_windows():
    q, k, v = realistic(1, 3, 50, 32, torch.bfloat16, seed=4)
    out = fp8_attention_reference(q, k, v, [WINDOW_FULL, WINDOW_SKIP, 3], 6)
    assert torch.all(out[:, 1] == 0)
    torch.testing.assert_close(out[:, 0], fp8_attention_reference(q[:, :1], k[:, :1], v[:, :1], WINDOW_FULL, 6)[:, 0])
    torch.testing.assert_close(out[:, 2], fp8_attention_reference(q[:, 2:], k[:, 2:], v[:, 2:], 3, 6)[:, 0])
    with pytest.raises(ValueError, match="windows"):
        fp8_attention_reference(q, k, v, [WINDOW_FULL, 3], 6)
    with pytest.raises(ValueError, match="txt_len"):
        fp8_attention_reference(q, k, v, 3, 51)


def test_row_blocks_do_not_change_the_result(monkeypatch):
    q, k, v = realistic(2, 2, 97, 32, torch.float16, seed=5)
    whole = fp8_attention_reference(q, k, v, 7, 9)
    monkeypatch.setattr(Q, "_ROW_BLOCK", 13)
    torch.testing.assert_close(fp8_attention_reference(q, k, v, 7, 9), whole, rtol=0, atol=0)


def test_fp8_supported_is_false_on_cpu_and_old_gpus(monkeypatch):
    assert not fp8_supported("cpu") and not fp8_supported(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert not fp8_supported("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert fp8_supported("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_supported("cuda")


# ---------------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("name", ["full+fp8", "arrow/8+fp8", "arrow/16+fp8", "arrow/4096+fp8", "arrow/3+fp8"])
def test_fp8_names_round_trip(name):
    m = HeadMethod.parse(name)
    assert m.name == name and str(m) == name and m.fp8 and not m.base.fp8
    assert m.base.name == name.removesuffix("+fp8") and m.base.with_fp8() == m
    assert m.window(4096) == m.base.window(4096)


@pytest.mark.parametrize("name", ["cache+fp8", "full+fp8+fp8", "arrow/8+FP8", "+fp8", "full+int8", "arrow/0+fp8",
                                  "arrow/+fp8", "fp8"])
def test_bad_fp8_names_are_named_in_the_error(name):
    with pytest.raises(ValueError) as err:
        HeadMethod.parse(name)
    assert repr(name) in str(err.value)


def test_cache_takes_no_quantization():
    with pytest.raises(ValueError, match="cache"):
        CACHE.with_fp8()


def test_decision_groups_quant_table_and_all_full():
    a8q = arrow(8, fp8=True)
    dec = LayerDecision((FULL, FULL_FP8, a8q, CACHE, arrow(8), a8q, arrow(16, fp8=True)))
    assert dec.full_heads == (0,) and dec.arrow_heads == (4,) and dec.cache_heads == (3,)
    assert dec.fp8_heads == (1, 2, 5, 6)
    assert dec.quant == (QUANT_NONE, QUANT_FP8, QUANT_FP8, QUANT_NONE, QUANT_NONE, QUANT_FP8, QUANT_FP8)
    assert dict(dec.fp8_groups) == {FULL_FP8: (1,), a8q: (2, 5), arrow(16, fp8=True): (6,)}
    assert dec.windows(64) == (WINDOW_FULL, WINDOW_FULL, 4, WINDOW_SKIP, 4, 4, 2)
    assert dec.unquantized.methods == (FULL, FULL, arrow(8), CACHE, arrow(8), arrow(8), arrow(16))
    assert dec.unquantized.unquantized is dec.unquantized
    assert LayerDecision.uniform(FULL, 3).all_full
    assert not LayerDecision.uniform(FULL_FP8, 3).all_full  # the dense bypass must not swallow FP8 heads
    assert LayerDecision.uniform(FULL_FP8, 3).unquantized.all_full
    assert dec != dec.unquantized and hash(LayerDecision((FULL_FP8,))) != hash(LayerDecision((FULL,)))


# ---------------------------------------------------------------------------------------------- execution


def test_op_runs_fp8_heads_in_bf16_on_cpu_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(api, "_warned", set())
    h, t, n, d = 4, 5, 40, 16
    q, k, v = realistic(2, h, t + n, d, torch.bfloat16, seed=11)
    windows = [WINDOW_FULL, 6, WINDOW_SKIP, 2]
    table = head_table(windows, "cpu")
    quant = torch.tensor([1, 1, 0, 0], dtype=torch.int32)
    plain = arrow_attention(q, k, v, table, t)
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        for _ in range(3):
            got = arrow_attention(q, k, v, table, t, head_quant=quant)
            via_op = torch.ops.dfav2.arrow_attention(q, k, v, table, t, "bhld", None, quant)
    assert torch.equal(got, plain) and torch.equal(via_op, plain)
    said = [r.getMessage() for r in caplog.records if "FP8" in r.getMessage()]
    assert len(said) == 1 and "no FP8 tensor cores here" in said[0] and "bf16" in said[0], said
    if not api._interpreting():
        # the reference reads the tables on the host: an all-zero table is no FP8 head, nothing to say (the kernel's
        # path, e.g. under TRITON_INTERPRET, never reads it and says it once for any table)
        caplog.clear()
        monkeypatch.setattr(api, "_warned", set())
        with caplog.at_level(logging.WARNING, logger=api.__name__):
            arrow_attention(q, k, v, table, t, head_quant=torch.zeros(h, dtype=torch.int32))
        assert not [r for r in caplog.records if "FP8" in r.getMessage()]


@pytest.mark.parametrize("case", ["fp8", "old_gpu"])
def test_op_hands_head_quant_to_the_kernel_only_where_fp8_runs(monkeypatch, caplog, case):
    """The Triton path with the kernel stood in for: the quant table reaches `arrow_attention_triton(head_quant=)`
    on an FP8 GPU; on a GPU below compute capability 8.9 the call runs without it (bf16) and says so once."""
    at = pytest.importorskip("dfav2.kernels.arrow_triton")
    seen = []

    def fake(q, k, v, head_window, txt_len, *, layout="bhld", sm_scale=None, out=None, zero_skip=False,
             head_quant=None):
        seen.append(None if head_quant is None else head_quant.tolist())

    monkeypatch.setattr(at, "arrow_attention_triton", fake)
    api._fp8_reason.cache_clear()
    monkeypatch.setattr(api, "_warned", set())
    monkeypatch.setattr(api, "fp8_supported", lambda device: case != "old_gpu")
    q, k, v = realistic(1, 3, 20, 16, torch.bfloat16, seed=2)
    table = head_table([WINDOW_FULL, 4, WINDOW_SKIP], "cpu")
    quant = torch.tensor([1, 0, 1], dtype=torch.int32)
    try:
        with caplog.at_level(logging.WARNING, logger=api.__name__):
            for _ in range(2):
                api._execute(q, k, v, table, 3, "bhld", None, torch.empty_like(q), True, None, quant)
            api._execute(q, k, v, table, 3, "bhld", None, torch.empty_like(q), True, None, None)
    finally:
        api._fp8_reason.cache_clear()
    said = [r.getMessage() for r in caplog.records if "FP8" in r.getMessage()]
    if case == "fp8":
        assert seen == [[1, 0, 1], [1, 0, 1], None] and not said
    else:
        assert seen == [None, None, None] and len(said) == 1 and "FP8 heads run in bf16" in said[0]
        assert "no FP8 tensor cores" in said[0]


def test_op_head_quant_errors_name_the_problem():
    q, k, v = realistic(1, 2, 12, 16, torch.float32, seed=1)
    table = head_table([WINDOW_FULL, 3], "cpu")
    with pytest.raises(ValueError, match="head_quant"):
        arrow_attention(q, k, v, table, 2, head_quant=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="head_quant"):
        arrow_attention(q, k, v, table, 2, head_quant=torch.ones(3, dtype=torch.int32))


def test_opcheck_with_head_quant():
    h, t, n, d = 3, 4, 21, 16
    q, k, v = realistic(1, h, t + n, d, torch.float32, seed=5)
    table = head_table([WINDOW_FULL, 3, WINDOW_SKIP], "cpu")
    quant = torch.tensor([1, 0, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dfav2.arrow_attention.default, (q, k, v, table, t, "bhld", None, quant))
    out = torch.randn_like(q)
    torch.library.opcheck(torch.ops.dfav2.arrow_attention_out.default, (q, k, v, table, t, "bhld", 0.25, out, quant))


def test_compile_traces_the_op_with_head_quant():
    from torch._dynamo.testing import CompileCounterWithBackend

    h, t, n, d = 3, 4, 21, 16
    q, k, v = realistic(1, h, t + n, d, torch.float32, seed=6)
    table = head_table([WINDOW_FULL, 3, 0], "cpu")
    quant = torch.tensor([1, 0, 1], dtype=torch.int32)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, k, v: arrow_attention(q, k, v, table, t, head_quant=quant), fullgraph=True,
                       backend=counter)
    torch.testing.assert_close(fn(q, k, v), arrow_attention(q, k, v, table, t))
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["sdpa", "triton", "auto"])
def test_engine_runs_fp8_heads_as_their_base_method_on_cpu(monkeypatch, caplog, backend):
    monkeypatch.setattr(engine, "_warned", set())
    q, k, v = realistic(2, 5, 45, 16, torch.bfloat16, seed=12)
    dec = LayerDecision((FULL_FP8, arrow(8, fp8=True), FULL, arrow(4), arrow(8, fp8=True)))
    with caplog.at_level(logging.WARNING, logger=engine.__name__):
        for _ in range(2):
            got, hit = headwise_attention(q, k, v, 5, dec, backend=backend)
    want, _ = headwise_attention(q, k, v, 5, dec.unquantized, backend="sdpa")
    # "triton" on CPU is the kernel under TRITON_INTERPRET when another test module set it, else masked SDPA
    tol = 2e-2 if backend == "triton" else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    said = [r.getMessage() for r in caplog.records if "FP8" in r.getMessage()]
    assert hit and len(said) == 1 and "FP8 heads run in bf16" in said[0], said


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulate_fp8_runs_fp8_heads_through_the_reference_only_inside_the_block(dtype):
    """`engine.emulate_fp8` (the fidelity study's apply-time switch): inside it, FP8 heads equal
    `fp8_attention_reference` of their window and the other heads (cached ones included, from the cache) are
    unchanged; outside it, and after it, FP8 heads run their base method in the inputs' dtype."""
    t, seq, h = 5, 45, 6
    q, k, v = realistic(2, h, seq, 16, dtype, seed=21)
    dec = LayerDecision((FULL_FP8, arrow(8, fp8=True), FULL, arrow(4), arrow(8, fp8=True), CACHE))
    cached = engine.CachedHeads((5,), torch.randn(2, 1, seq, 16).to(dtype))
    plain, hit = headwise_attention(q, k, v, t, dec, cached=cached, backend="sdpa")
    want_plain, _ = headwise_attention(q, k, v, t, dec.unquantized, cached=cached, backend="sdpa")
    assert hit and torch.equal(plain, want_plain)
    n = seq - t
    with engine.emulate_fp8():
        got, hit = headwise_attention(q, k, v, t, dec, cached=cached, backend="sdpa")
        all_fp8, _ = headwise_attention(q, k, v, t, LayerDecision.uniform(arrow(8, fp8=True), h), backend="sdpa")
        _, miss = headwise_attention(q, k, v, t, dec, backend="sdpa")  # no cache: the cached head runs full
        with engine.emulate_fp8(False):
            off, _ = headwise_attention(q, k, v, t, dec, cached=cached, backend="sdpa")
    assert hit and not miss and torch.equal(off, plain)
    windows = dec.windows(n)
    for hd in range(h):
        if dec.methods[hd].fp8:
            ref = fp8_attention_reference(q[:, hd:hd + 1], k[:, hd:hd + 1], v[:, hd:hd + 1], windows[hd], t)
            torch.testing.assert_close(got[:, hd:hd + 1], ref, rtol=0, atol=0)
            assert not torch.equal(got[:, hd], plain[:, hd])  # the emulation changes what the head computes
        else:
            assert torch.equal(got[:, hd], plain[:, hd])
    torch.testing.assert_close(all_fp8, fp8_attention_reference(q, k, v, windows[1], t), rtol=0, atol=0)
    after, _ = headwise_attention(q, k, v, t, dec, cached=cached, backend="sdpa")
    assert torch.equal(after, plain)  # the switch is off again after the block


def test_all_fp8_full_layer_on_cpu_is_dense_attention():
    q, k, v = realistic(1, 3, 30, 16, torch.float32, seed=13)
    calls = []

    def dense(q, k, v):
        calls.append(q.shape[1])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    out, _ = headwise_attention(q, k, v, 4, LayerDecision.uniform(FULL_FP8, 3), dense=dense, backend="sdpa")
    assert calls == [3] and torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_engine_passes_the_quant_table_to_the_kernel(monkeypatch):
    """Where FP8 can run, the engine's Triton path hands the op the per-head quant table (and full_by_dense keeps
    FP8 full heads in the kernel): checked with the kernel and FP8 capability stood in for."""
    seen = {}

    def fake_op(q, k, v, table, txt_len, *, scale=None, out=None, head_quant=None):
        seen["windows"], seen["quant"] = table.tolist(), None if head_quant is None else head_quant.tolist()
        out.zero_()
        return out

    monkeypatch.setattr(engine, "arrow_attention", fake_op)
    monkeypatch.setattr(engine, "fp8_unsupported", lambda *a, **kw: None)
    monkeypatch.setattr(engine, "kernel_unsupported", lambda *a, **kw: None)
    q, k, v = realistic(1, 4, 37, 16, torch.float32, seed=14)
    dec = LayerDecision((FULL_FP8, FULL, arrow(2, fp8=True), arrow(2)))
    headwise_attention(q, k, v, 5, dec, backend="triton", full_by_dense=True,
                       dense=lambda q, k, v: torch.zeros_like(q))
    assert seen == {"windows": [WINDOW_FULL, WINDOW_SKIP, 8, 8], "quant": [1, 0, 1, 0]}
    headwise_attention(q, k, v, 5, dec.unquantized, backend="triton")
    assert seen["quant"] is None  # no FP8 head, no table: the bf16 launch is unchanged


def test_call_cost_counts_fp8_heads_and_pairs_separately():
    t, n = 7, 96
    dec = LayerDecision((FULL_FP8, arrow(8, fp8=True), FULL, arrow(8), CACHE))
    c = call_cost(dec, t, n, True)
    full_p, a8_p = kept_pairs(t, n, FULL), kept_pairs(t, n, arrow(8))
    assert (c.full, c.arrow, c.cached, c.fp8) == (2, 2, 1, 2)
    assert c.fp8_pairs == full_p + a8_p and c.kept_pairs == 2 * (full_p + a8_p)
    st = engine.EngineStats()
    st.record(c, batch=2, head_dim=16)
    assert st.fp8_heads == 2 and st.fp8_flops == c.fp8_pairs * 4 * 2 * 16 and st.heads["full"] == 2


# ---------------------------------------------------------------------------------------------- cost model


@pytest.mark.parametrize("tile", [None, 16, 64])
@pytest.mark.parametrize("factor", [0.6, 0.25, 1.0, 1.7])
def test_fp8_cost_is_kept_pairs_times_the_factor(tile, factor):
    geo = Geometry(13, 333, 4, 64)
    for base in (FULL, arrow(8), arrow(32)):
        plain = head_cost(geo, base, tile)
        assert head_cost(geo, base.with_fp8(), tile, fp8_factor=factor) == round(plain * factor)
        assert head_cost(geo, base, tile, fp8_factor=factor) == plain  # bf16 heads do not change
    assert head_cost(geo, FULL_FP8) == round(head_cost(geo, FULL) * FP8_COST_FACTOR)
    dec = LayerDecision((FULL_FP8, arrow(8)))
    kept, dense = decision_cost(geo, dec, tile, fp8_factor=factor)
    assert kept == round(head_cost(geo, FULL, tile) * factor) + head_cost(geo, arrow(8), tile)
    assert decision_flops(geo, dec, tile)[0] == (head_cost(geo, FULL, tile) + head_cost(geo, arrow(8), tile)) * 4 * 64
    with pytest.raises(ValueError, match="fp8_factor"):
        head_cost(geo, FULL_FP8, fp8_factor=0.0)


def test_fp8_study_compares_joint_points_with_the_sparsity_curve_at_equal_time():
    """refmodels/study.py's fp8 item: a joint point is compared with the sparsity-alone curve interpolated linearly in
    modeled time; outside the curve's time range there is no difference."""
    from dfav2.refmodels.study import _interp, fp8_compare

    assert _interp([0.2, 0.6], [20.0, 30.0], 0.5) == pytest.approx(27.5) and _interp([0.2, 0.6], [1, 2], 0.7) is None
    sparse = [dict(time_kept=0.6, psnr=30.0, ssim=0.96), dict(time_kept=0.2, psnr=20.0, ssim=0.80)]
    joint = [dict(delta=0.1, time_kept=0.5, psnr=29.0, ssim=0.95, fp8_head_share=0.3),
             dict(delta=1.0, time_kept=0.1, psnr=18.0, ssim=0.7, fp8_head_share=0.5)]
    rows = fp8_compare({"sparsity": sparse, "fp8 x0.6": joint})
    assert rows[0]["sparsity_psnr"] == 27.5 and rows[0]["d_psnr"] == 1.5 and rows[0]["d_ssim"] == pytest.approx(0.03)
    assert rows[1]["d_psnr"] is None and rows[1]["series"] == "fp8 x0.6"
