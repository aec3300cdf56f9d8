"""Host attention masks that touch only text key columns (Redux ``attn_bias``, text padding): classification,
the engine against a float64 masked reference, and the router (compressed, one check per forward; regional
masks stay dense)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dfav2.calibration import LayerSpec, ModelSignature, Plan
from dfav2.kernels import CACHE, FULL, CachedHeads, LayerDecision, arrow
from dfav2.kernels.engine import headwise_attention
from dfav2.kernels.masks import TextMask, arrow_keep, host_mask_4d, text_only_mask
from dfav2.kernels.engine import HeadwiseEngine
from dfav2.kernels.methods import MethodKind
from dfav2.nodes.calls import dense_reason
from dfav2.nodes.layouts import Layout
from dfav2.nodes.router import TO_FORWARD, Run

NEG = float("-inf")


def redux_mask(b: int, t: int, n: int, lo: int, hi: int, bias: float, dtype=torch.float32) -> torch.Tensor:
    """StyleModelApply's attn_bias mask after the host's upscale: [B, L, L], `bias` on the redux text columns."""
    m = torch.zeros(b, t + n, t + n, dtype=dtype)
    m[:, :, lo:hi] = bias
    return m


# ----------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("shape", ["LL", "B1L", "B1LL", "BLL", "BHLL", "11LL"])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_text_only_masks_of_every_broadcast_shape_are_recognised(shape, kind):
    b, h, t, n = 2, 3, 5, 11
    seq = t + n
    dims = {"LL": (seq, seq), "B1L": (b, 1, seq), "B1LL": (b, 1, seq, seq), "BLL": (b, seq, seq),
            "BHLL": (b, h, seq, seq), "11LL": (1, 1, seq, seq)}[shape]
    if shape == "B1L":  # a key padding mask [B, 1, 1, L] in its 4-D form
        dims = (b, 1, 1, seq)
    g = torch.Generator().manual_seed(0)
    if kind == "float":
        m = torch.zeros(dims)
        m[..., :t] = torch.randn(*dims[:-1], t, generator=g)
        m[..., 1] = NEG  # -inf padding of a text token
    else:
        m = torch.ones(dims, dtype=torch.bool)
        m[..., 1] = False
    got = text_only_mask(m, b, h, seq, t)
    assert isinstance(got, TextMask), got
    assert got.mask is m and got.view4.dim() == 4 and got.bias.shape == (*got.view4.shape[:3], t)
    if kind == "bool":
        assert got.bias.dtype == torch.float32 and torch.all(got.bias[..., 1] == NEG) and torch.all(got.bias[..., 0] == 0)
    # an image column that is not a no-op makes it regional
    r = m.clone()
    if kind == "float":
        r[..., t + 3] = -1.0
    else:
        r[..., t + 3] = False
    assert isinstance(text_only_mask(r, b, h, seq, t), str)


def test_mask_shapes_that_do_not_fit_the_call_are_refused():
    t, n = 4, 6
    seq = t + n
    assert "broadcast" in text_only_mask(torch.zeros(3, seq, seq), 2, 2, seq, t)  # batch 3 vs 2
    assert "broadcast" in text_only_mask(torch.zeros(seq, seq + 1), 1, 2, seq, t)
    assert "broadcast" in text_only_mask(torch.zeros(1, 4, seq, seq), 1, 2, seq, t)  # 4 heads vs 2
    assert "dtype" in text_only_mask(torch.zeros(seq, seq, dtype=torch.int64), 1, 2, seq, t)
    assert isinstance(text_only_mask(torch.zeros(seq, seq), 1, 2, seq, 0), TextMask)  # no text: all no-op
    nan = torch.zeros(seq, seq)
    nan[:, t] = math.nan
    assert isinstance(text_only_mask(nan, 1, 2, seq, t), str)
    assert host_mask_4d(torch.zeros(2, seq, seq)).shape == (2, 1, seq, seq)
    assert host_mask_4d(torch.zeros(seq, seq)).shape == (1, 1, seq, seq)


# -------------------------------------------------------------------------------------------------- engine


def masked_reference(q, k, v, t, decision, mask4, cached=None, refs=()):
    """float64 softmax attention with the host mask (additive; bool False as -inf) plus each head's arrow band."""
    q, k, v = (x.double() for x in (q, k, v))
    b, h, seq, d = q.shape
    n = seq - t - sum(refs)
    if mask4.dtype == torch.bool:
        add = torch.zeros(mask4.shape, dtype=torch.float64).masked_fill(~mask4, NEG)
    else:
        add = mask4.double()
    add = add.expand(b, h, seq, seq)
    out = torch.empty_like(q)
    for hi, m in enumerate(decision.methods):
        if m.kind is MethodKind.CACHE:
            out[:, hi] = cached.values[:, cached.heads.index(hi)].double()
            continue
        s = q[:, hi] @ k[:, hi].transpose(-1, -2) / math.sqrt(d) + add[:, hi]
        keep = arrow_keep(t, seq, m.window(n), refs=refs)
        s = s.masked_fill(~keep, NEG)
        out[:, hi] = torch.softmax(s, -1) @ v[:, hi]
    return out


def _random_mask(kind, shape, b, h, t, seq, g):
    dims = {"B1LL": (b, 1, seq, seq), "BLL": (b, seq, seq), "B11L": (b, 1, 1, seq), "BHLL": (b, h, seq, seq)}[shape]
    if kind == "bool":
        m = torch.ones(dims, dtype=torch.bool)
        if t > 1:
            m[..., t - 1] = False  # the last text token padded away
        return m
    m = torch.zeros(dims)
    m[..., :t] = torch.randn(*dims[:-1], t, generator=g) * 2
    if t > 2:
        m[..., t - 2:t] = NEG  # padding as -inf, the Redux bias elsewhere
    return m


@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
@pytest.mark.parametrize("kind,shape", [("float", "BLL"), ("float", "B1LL"), ("float", "B11L"), ("float", "BHLL"),
                                        ("bool", "BLL"), ("bool", "B11L")])
@pytest.mark.parametrize("b,t,n,refs", [(1, 5, 17, ()), (2, 13, 41, ()), (2, 7, 30, (9,)), (1, 0, 12, ())])
def test_engine_with_a_text_mask_matches_a_float64_masked_reference(backend, kind, shape, b, t, n, refs):
    h, d = 5, 16
    seq = t + n + sum(refs)
    g = torch.Generator().manual_seed(b * 100 + t + n)
    q, k, v = (torch.randn(b, h, seq, d, generator=g) for _ in range(3))
    mask = _random_mask(kind, shape, b, h, t, seq, g)
    tm = text_only_mask(mask, b, h, seq, t)
    assert isinstance(tm, TextMask)
    decision = LayerDecision((FULL, arrow(2), CACHE, arrow(4), FULL))
    cached = CachedHeads((2,), torch.randn(b, 1, seq, d, generator=g))
    out, hit = headwise_attention(q, k, v, t, decision, cached=cached, backend=backend, refs=refs, mask=tm)
    assert hit
    want = masked_reference(q, k, v, t, decision, host_mask_4d(mask), cached, refs)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    # full heads are exactly SDPA with the host's mask (what the host's own attention computes)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=host_mask_4d(mask))
    assert torch.equal(out[:, [0, 4]], full[:, [0, 4]])


def test_full_heads_get_the_hosts_mask_sliced_only_when_it_varies_per_head():
    b, h, t, n, d = 1, 4, 3, 9, 8
    seq = t + n
    q, k, v = (torch.randn(b, h, seq, d) for _ in range(3))
    seen = []

    def dense(q, k, v, mask):
        seen.append(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=host_mask_4d(mask))

    shared = redux_mask(b, t, n, 1, 3, -2.0)
    decision = LayerDecision((FULL, arrow(2), FULL, arrow(2)))
    headwise_attention(q, k, v, t, decision, dense=dense, backend="sdpa", mask=text_only_mask(shared, b, h, seq, t))
    assert seen[-1] is shared  # the host gets its own tensor
    per_head = torch.zeros(b, h, seq, seq)
    per_head[:, :, :, :t] = torch.arange(h, dtype=torch.float32)[:, None, None]
    headwise_attention(q, k, v, t, decision, dense=dense, backend="sdpa", mask=text_only_mask(per_head, b, h, seq, t))
    assert seen[-1].shape == (b, 2, seq, seq) and torch.equal(seen[-1], per_head[:, [0, 2]])
    all_full = LayerDecision((FULL,) * h)
    out, _ = headwise_attention(q, k, v, t, all_full, dense=dense, mask=text_only_mask(per_head, b, h, seq, t))
    assert seen[-1] is per_head


# -------------------------------------------------------------------------------------------------- router

T, GRID, N = 5, (8, 8), 16
FLUX = Layout(ModelSignature("flux", (LayerSpec("double.0", 2, 16), LayerSpec("single.0", 2, 16))), patch_size=2)


def host_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's attention_pytorch in small (2-D / 3-D masks get batch and head axes)."""
    if mask is not None:
        mask = host_mask_4d(mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _run(plan):
    return Run(FLUX, None, consumer_for=lambda d: HeadwiseEngine(plan, backend="sdpa"), position=plan.position_for_sigma)


def _forward(run, sigma):
    base = {"sigmas": torch.tensor([sigma]), "uuids": ["cond"]}
    fwd = run.begin_forward(torch.zeros(1, 16, *GRID), None, torch.zeros(1, T, 8), base,
                            {"attention_mask": torch.zeros(1, T + N, T + N)})
    assert fwd.reason is None
    return fwd, {**base, TO_FORWARD: fwd}


def _mixed_plan():
    plan = Plan.uniform(FLUX.signature, [1.0, 0.5], arrow(8), first_full=True)
    pos = type(plan.positions[1])(0.5, tuple(LayerDecision((FULL, arrow(4))) for _ in FLUX.signature.layers))
    return Plan(plan.model, (plan.positions[0], pos), None, "mixed")


def test_router_runs_text_masked_calls_compressed_checking_the_mask_once_per_forward(caplog):
    plan = _mixed_plan()
    run = _run(plan)
    mask = redux_mask(1, T, N, 2, 4, math.log(0.3))
    with caplog.at_level(logging.WARNING, logger="dfav2"):
        for sigma in (1.0, 0.5):
            fwd, to = _forward(run, sigma)
            for bt in ("double", "single"):
                q, k, v = (torch.randn(1, 2, T + N, 16) for _ in range(3))
                got = run(host_attention, q, k, v, 2, skip_reshape=True, mask=mask,
                          transformer_options={**to, "block_type": bt, "block_index": 0})
                dec = plan.decision(fwd.position, 0 if bt == "double" else 1)
                want = masked_reference(q, k, v, T, dec, host_mask_4d(mask))
                torch.testing.assert_close(got.double(), want.transpose(1, 2).reshape(1, T + N, -1), rtol=1e-4, atol=1e-5)
                if sigma == 1.0:  # all full: the host's own call, bit for bit
                    assert torch.equal(got, host_attention(q, k, v, 2, skip_reshape=True, mask=mask))
            run.end_forward(fwd)
    assert run.mask_checks == 1  # the first forward is all full (bypassed: the host gets the call untouched)
    s = run.finish()
    assert not s.fallbacks and s.text_mask_calls == 2 and s.heads["arrow"] == 2 and s.heads["full"] == 6
    assert "2 with a text-only mask" in s.line()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_regional_masks_stay_dense_with_the_mask_reason():
    plan = _mixed_plan()
    run = _run(plan)
    mask = redux_mask(1, T, N, 2, 4, -1.0)
    mask[:, :, T + 3] = NEG  # an image column masked: regional
    fwd, to = _forward(run, 0.5)
    for bt in ("double", "single"):
        q, k, v = (torch.randn(1, 2, T + N, 16) for _ in range(3))
        got = run(host_attention, q, k, v, 2, skip_reshape=True, mask=mask,
                  transformer_options={**to, "block_type": bt, "block_index": 0})
        assert torch.equal(got, host_attention(q, k, v, 2, skip_reshape=True, mask=mask))
    run.end_forward(fwd)
    assert run.mask_checks == 1
    s = run.finish()
    assert s.fallbacks == {"mask": 2} and s.text_mask_calls == 0


def test_dense_reason_of_masked_calls():
    spec = FLUX.signature.layers[0]
    q = torch.randn(1, 2, T + N, 16)
    text = redux_mask(1, T, N, 0, 2, -3.0)
    assert dense_reason(spec, T, N, (q, q, q, 2), dict(skip_reshape=True, mask=text)) is None
    region = text.clone()
    region[:, :, -1] = 1.0
    r = dense_reason(spec, T, N, (q, q, q, 2), dict(skip_reshape=True, mask=region))
    assert r.kind == "mask" and "regional" in r


def test_a_flex_compile_failure_falls_back_to_masked_sdpa(monkeypatch, caplog):
    """Inductor can refuse a mask's score_mod (on an H200: bf16 with a bool mask's [B, 1, L, T] bias, "No valid
    triton configs"): the call must not raise inside the sampler; its arrow heads run on masked SDPA, said once."""
    import dfav2.kernels.engine as engine

    def refuse(compiled):
        def flex(*args, **kwargs):
            raise RuntimeError("No valid triton configs. OutOfMemoryError: out of resource")
        return flex

    b, h, t, n = 2, 4, 7, 33
    seq = t + n
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(b, h, seq, 16, generator=g) for _ in range(3))
    mask = _random_mask("bool", "B1LL", b, h, t, seq, g)
    tm = text_only_mask(mask, b, h, seq, t)
    decision = LayerDecision((FULL, arrow(2), CACHE, arrow(4)))
    cached = CachedHeads((2,), torch.randn(b, 1, seq, 16, generator=g))
    want, _ = headwise_attention(q, k, v, t, decision, cached=cached, backend="sdpa", mask=tm)
    monkeypatch.setattr(engine, "_flex_fn", refuse)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            out, hit = headwise_attention(q, k, v, t, decision, cached=cached, backend="flex", mask=tm)
            assert hit and torch.equal(out, want)
    assert sum("could not compile this text-mask call" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention with the score_mod)")
@pytest.mark.parametrize("backend", ["auto", "flex", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,shape", [("float", "BLL"), ("float", "B11L"), ("bool", "B1LL"), ("float", "BHLL")])
def test_engine_with_a_text_mask_on_cuda(backend, dtype, kind, shape):
    b, h, t, n, d = 2, 4, 77, 300, 64
    seq = t + n
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, seq, d, generator=g) for _ in range(3))
    mask = _random_mask(kind, shape, b, h, t, seq, g)
    decision = LayerDecision((FULL, arrow(2), CACHE, arrow(4)))
    cached = CachedHeads((2,), torch.randn(b, 1, seq, d, generator=g))
    dev = torch.device("cuda")
    qc, kc, vc = (x.to(dev, dtype) for x in (q, k, v))
    mc = mask.to(dev) if mask.dtype == torch.bool else mask.to(dev, dtype)
    tm = text_only_mask(mc, b, h, seq, t)
    assert isinstance(tm, TextMask)
    cc = CachedHeads((2,), cached.values.to(dev, dtype))
    want = masked_reference(qc.cpu(), kc.cpu(), vc.cpu(), t, decision, host_mask_4d(mc.cpu()), CachedHeads((2,), cc.values.cpu()))
    out, _ = headwise_attention(qc, kc, vc, t, decision, cached=cc, backend=backend, mask=tm)
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol)


def test_mask_check_is_cached_per_forward_also_for_inference_tensors():
    """ComfyUI samples under torch.inference_mode, whose tensors have no version counter: the per-forward cache
    then keys on the tensor alone (one reduction per forward still)."""
    run = _run(_mixed_plan())
    with torch.inference_mode():
        mask = redux_mask(1, T, N, 2, 4, -1.0)
        fwd, _ = _forward(run, 0.5)
        for _ in range(3):
            assert isinstance(fwd.check_mask(mask, 1, 2, T + N, T), TextMask)
        other = mask.clone()
        assert isinstance(fwd.check_mask(other, 1, 2, T + N, T), TextMask)
        fwd2, _ = _forward(run, 0.5)
        fwd2.check_mask(mask, 1, 2, T + N, T)
    assert run.mask_checks == 3
