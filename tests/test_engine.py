"""Reference engine: exactness against SDPA and a float64 naive reference, arrow mask semantics, caching."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dfav2.kernels import (
    CACHE,
    FULL,
    WINDOW_FULL,
    WINDOW_SKIP,
    CachedHeads,
    CallContext,
    HeadwiseEngine,
    LayerDecision,
    arrow,
    arrow_block_mask,
    arrow_keep,
    headwise_attention,
)
from dfav2.calibration import LayerSpec, ModelSignature, Plan, PlanPosition


def naive_reference(q, k, v, txt_len, decision, cached=None):
    """float64 masked softmax, one head at a time, straight from method.md §2.1."""
    q, k, v = (t.double() for t in (q, k, v))
    b, h, seq, d = q.shape
    n_img = seq - txt_len
    out = torch.empty_like(q)
    idx = torch.arange(seq)
    for head, m in enumerate(decision.methods):
        if m.name == "cache":
            out[:, head] = cached[:, head].double()
            continue
        s = q[:, head] @ k[:, head].transpose(-1, -2) / d**0.5
        if m.name != "full":
            w = n_img // (2 * m.factor)
            keep = (idx[:, None] < txt_len) | (idx[None, :] < txt_len) | ((idx[:, None] - idx[None, :]).abs() <= w)
            s = s.masked_fill(~keep, float("-inf"))
        out[:, head] = torch.softmax(s, -1) @ v[:, head]
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = [  # (B, H, T, N, D): text and image counts that are not multiples of 64/128
    (1, 3, 0, 67, 16),
    (2, 5, 13, 70, 32),
    (1, 4, 77, 130, 64),
    (3, 2, 5, 257, 8),
]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("shape", SHAPES)
def test_engine_matches_float64_reference(shape, backend):
    b, h, t, n, d = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    q, k, v = (torch.randn(b, h, t + n, d, generator=g) for _ in range(3))
    choices = [FULL, CACHE, arrow(8), arrow(16), arrow(32), arrow(2)]
    methods = tuple(choices[int(i)] for i in torch.randint(0, len(choices), (h,), generator=g))
    decision = LayerDecision(methods)
    cached_all = torch.randn(b, h, t + n, d, generator=g)
    cached = CachedHeads(decision.cache_heads, cached_all[:, list(decision.cache_heads)])
    out, hit = headwise_attention(q, k, v, t, decision, cached=cached, backend=backend)
    assert hit
    ref = naive_reference(q, k, v, t, decision, cached_all)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_all_full_plan_is_bit_identical_to_sdpa(shape):
    b, h, t, n, d = shape
    q, k, v = (torch.randn(b, h, t + n, d) for _ in range(3))
    out, _ = headwise_attention(q, k, v, t, LayerDecision.uniform(FULL, h))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_full_heads_use_the_given_dense_function_on_the_gathered_heads():
    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    seen = []

    def dense(q_, k_, v_):
        seen.append(q_.shape[1])
        return torch.full_like(q_, 7.0)

    decision = LayerDecision((FULL, arrow(8), FULL, arrow(8)))
    out, _ = headwise_attention(q, k, v, 10, decision, dense=dense)
    assert seen == [2]  # one call for both full heads
    assert torch.all(out[:, [0, 2]] == 7.0)
    assert not torch.any(out[:, [1, 3]] == 7.0)


def test_cached_head_returns_exactly_the_stored_output():
    q, k, v = (torch.randn(1, 3, 40, 8) for _ in range(3))
    stored = torch.randn(1, 2, 40, 8)
    decision = LayerDecision((CACHE, arrow(16), CACHE))
    out, hit = headwise_attention(q, k, v, 7, decision, cached=CachedHeads((0, 2), stored))
    assert hit
    assert torch.equal(out[:, 0], stored[:, 0]) and torch.equal(out[:, 2], stored[:, 1])


@pytest.mark.parametrize(
    "cached",
    [None, CachedHeads((1,), torch.randn(1, 1, 40, 8)), CachedHeads((0,), torch.randn(1, 1, 39, 8))],
    ids=["none", "wrong-heads", "wrong-length"],
)
def test_cache_miss_computes_the_head_in_full(cached):
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out, hit = headwise_attention(q, k, v, 7, LayerDecision((CACHE, FULL)), cached=cached)
    assert not hit
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("t,n,w", [(0, 9, 0), (3, 17, 2), (13, 70, 4), (5, 40, 100)])
def test_arrow_keep_matches_definition_token_by_token(t, n, w):
    keep = arrow_keep(t, t + n, w)
    for qi, ki in itertools.product(range(t + n), repeat=2):
        expected = qi < t or ki < t or abs(qi - ki) <= w
        assert bool(keep[qi, ki]) == expected


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("t,n", [(0, 100), (13, 232), (77, 300), (130, 9)])
def test_fast_block_mask_equals_create_block_mask(t, n, block):
    from torch.nn.attention.flex_attention import create_block_mask

    seq = t + n
    widths = [WINDOW_FULL, WINDOW_SKIP, 0, n // 16, n // 64, 3 * block]
    fast = arrow_block_mask(t, seq, widths, block_size=block)
    hw = torch.tensor([1 << 30 if w == WINDOW_FULL else w for w in widths])

    def mod(b, h, qi, ki):
        keep = (qi < t) | (ki < t) | ((qi - ki).abs() <= hw[h])
        return keep & (hw[h] >= 0)

    slow = create_block_mask(mod, 1, len(widths), seq, seq, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(fast.to_dense(), slow.to_dense())
    # Token level: the fast mask's mask_mod on its blocks equals the definition.
    for h, w in enumerate(widths):
        if w != WINDOW_SKIP:
            ref = arrow_keep(t, seq, w)
            got = torch.zeros(seq, seq, dtype=torch.bool)
            qi, ki = torch.meshgrid(torch.arange(seq), torch.arange(seq), indexing="ij")
            got = fast.mask_mod(torch.tensor(0), torch.tensor(h), qi, ki)
            assert torch.equal(got, ref)


def _plan(heads: int, methods_per_position: list[tuple]) -> Plan:
    model = ModelSignature("flux", (LayerSpec("double.0", heads, 8), LayerSpec("single.0", heads, 8)))
    positions = []
    for i, methods in enumerate(methods_per_position):
        dec = LayerDecision(methods)
        positions.append(PlanPosition(1.0 - i / len(methods_per_position), (dec, dec)))
    return Plan(model, tuple(positions))


def test_engine_carries_cached_heads_across_positions_and_counts_hits():
    plan = _plan(3, [(FULL, FULL, FULL), (CACHE, arrow(8), FULL), (CACHE, CACHE, FULL)])
    engine = HeadwiseEngine(plan, backend="sdpa")
    outs = []
    for pos in range(3):
        q, k, v = (torch.randn(1, 3, 30, 8) for _ in range(3))
        outs.append(engine.attend(CallContext(layer=1, position=pos, txt_len=6, cache_key="cond"), q, k, v))
    # head 0: cached at positions 1 and 2 -> carries position 0's output; head 1 cached at 2 -> position 1's.
    assert torch.equal(outs[1][:, 0], outs[0][:, 0])
    assert torch.equal(outs[2][:, 0], outs[0][:, 0])
    assert torch.equal(outs[2][:, 1], outs[1][:, 1])
    assert engine.stats.cache_hits == 3 and engine.stats.cache_misses == 0
    # Keys are separate: another cache key has nothing stored -> miss, computed in full.
    q, k, v = (torch.randn(1, 3, 30, 8) for _ in range(3))
    engine.attend(CallContext(layer=1, position=2, txt_len=6, cache_key="uncond"), q, k, v)
    assert engine.stats.cache_misses == 2
    engine.reset()
    assert len(engine.cache) == 0 and engine.stats.calls == 0


def test_engine_keeps_only_heads_needed_now_or_next():
    plan = _plan(4, [(FULL,) * 4, (FULL, FULL, FULL, FULL), (CACHE, FULL, FULL, FULL), (FULL,) * 4])
    assert plan.keep_heads(0, 0) == ()
    assert plan.keep_heads(1, 0) == (0,)
    assert plan.keep_heads(2, 0) == (0,)
    assert plan.keep_heads(3, 0) == ()
    engine = HeadwiseEngine(plan, backend="sdpa")
    q = torch.randn(1, 4, 20, 8)
    engine.attend(CallContext(0, 1, 5, None), q, q, q)
    entry = engine.cache.get((None, 0))
    assert entry is not None and entry.heads == (0,) and entry.values.shape == (1, 1, 20, 8)


def test_engine_rejects_inconsistent_inputs():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="heads"):
        headwise_attention(q, q, q, 3, LayerDecision((FULL, FULL, FULL)))
    with pytest.raises(ValueError, match="txt_len"):
        headwise_attention(q, q, q, 11, LayerDecision((FULL, FULL)))
    with pytest.raises(ValueError, match="one shape"):
        headwise_attention(q, q[:, :, :9], q, 3, LayerDecision((FULL, FULL)))
