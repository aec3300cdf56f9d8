"""Reference tokens (Kontext / edit reference latents appended after the image): masks, cost, engine and router
with a sequence [text T, image N, ref R1, ref R2, ...], against brute-force references. No references is the plain
arrow."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from dfav2.calibration import LayerSpec, ModelSignature, Plan
from dfav2.kernels import CACHE, FULL, WINDOW_FULL, WINDOW_SKIP, CachedHeads, CallContext, HeadwiseEngine, LayerDecision, arrow
from dfav2.kernels.cost import Geometry, band_pairs, cross_band_pairs, head_cost, kept_pairs, kept_tiles
from dfav2.kernels.engine import call_cost, headwise_attention
from dfav2.kernels.masks import arrow_block_tables, arrow_keep, arrow_mask_mod, segment_offsets
from dfav2.nodes.calls import dense_reason
from dfav2.nodes.layouts import Layout
from dfav2.nodes.router import TO_FORWARD, Run


def brute_keep(t: int, n: int, refs: tuple[int, ...], w: int) -> torch.Tensor:
    """The definition, pair by pair: text rows/columns full; other pairs inside |o(q) - o(k)| <= w, o the offset
    inside the token's own segment (the image, or its reference)."""
    seq = t + n + sum(refs)
    offset = list(range(t))
    for length in (n, *refs):
        offset += list(range(length))
    keep = torch.zeros(seq, seq, dtype=torch.bool)
    for q in range(seq):
        for k in range(seq):
            keep[q, k] = w == WINDOW_FULL or (w >= 0 and (q < t or k < t or abs(offset[q] - offset[k]) <= w))
    return keep


def geometries(count: int, seed: int) -> list[tuple[int, int, tuple[int, ...]]]:
    rng = random.Random(seed)
    out = [(0, 1, ()), (0, 7, (5,)), (3, 0, (4,)), (5, 9, ()), (1, 33, (31,)), (2, 10, (3, 0, 12)), (0, 20, (20, 7))]
    out += [(rng.randint(0, 20), rng.randint(0, 50), tuple(rng.randint(0, 40) for _ in range(rng.randint(0, 3))))
            for _ in range(count)]
    return out


@pytest.mark.parametrize("t,n,r", geometries(12, 1))
def test_keep_matrix_and_mask_mod_equal_the_definition(t, n, r):
    seq = t + n + sum(r)
    for w in sorted({WINDOW_FULL, WINDOW_SKIP, 0, 1, 3, n // 4, n // 2, n + 5}):
        want = brute_keep(t, n, r, w)
        assert torch.equal(arrow_keep(t, seq, w, refs=r), want), (t, n, r, w)
        if w >= 0:
            idx = torch.arange(seq)
            band = torch.tensor([w])
            mod = arrow_mask_mod(t, band, segment_offsets(t, seq, r) if r else None)
            got = mod(torch.zeros(()), torch.zeros((), dtype=torch.long), idx[:, None], idx[None, :])
            assert torch.equal(got, want)


@pytest.mark.parametrize("t,n", [(0, 9), (4, 17), (13, 70)])
def test_zero_references_is_the_plain_arrow(t, n):
    for w in (0, 2, n // 3):
        assert torch.equal(arrow_keep(t, t + n, w, refs=()), arrow_keep(t, t + n, w))
        assert torch.equal(arrow_keep(t, t + n, w), brute_keep(t, n, (), w))
        for m in (arrow(2), arrow(8)):
            assert kept_pairs(t, n, m, ()) == kept_pairs(t, n, m)


@pytest.mark.parametrize("tile", [4, 16, 32])
@pytest.mark.parametrize("t,n,r", geometries(8, 2))
def test_block_tables_equal_tiled_brute_force(t, n, r, tile):
    seq = t + n + sum(r)
    windows = [WINDOW_FULL, WINDOW_SKIP, 0, 2, n // 5, n // 2]
    any_kept, all_kept = arrow_block_tables(t, seq, windows, tile, refs=r)
    nb = -(-seq // tile)
    for h, w in enumerate(windows):
        keep = brute_keep(t, n, r, w)
        pad_any = torch.zeros(nb * tile, nb * tile, dtype=torch.bool)
        pad_all = torch.ones(nb * tile, nb * tile, dtype=torch.bool)
        pad_any[:seq, :seq] = keep
        pad_all[:seq, :seq] = keep
        assert torch.equal(any_kept[h], pad_any.view(nb, tile, nb, tile).any(dim=(1, 3))), (h, w)
        assert torch.equal(all_kept[h], pad_all.view(nb, tile, nb, tile).all(dim=3).all(dim=1)), (h, w)


@pytest.mark.parametrize("t,n,r", geometries(8, 3))
def test_cost_counts_equal_brute_force(t, n, r):
    seq = t + n + sum(r)
    for m in (FULL, CACHE, arrow(1), arrow(2), arrow(8), arrow(32)):
        w = m.window(n)  # the window follows the image tokens only
        keep = brute_keep(t, n, r, w)
        assert kept_pairs(t, n, m, r) == int(keep.sum()), m
        geo = Geometry(t, n, 2, 16, refs=r)
        assert geo.seq_len == seq and head_cost(geo, m) == int(keep.sum())
        for tile in (8, 32):
            if seq == 0:
                continue
            nb = -(-seq // tile)
            pad = torch.zeros(nb * tile, nb * tile, dtype=torch.bool)
            pad[:seq, :seq] = keep
            tiles = int(pad.view(nb, tile, nb, tile).any(dim=(1, 3)).sum())
            assert kept_tiles(t, n, m, tile, r) == tiles
            assert head_cost(geo, m, tile) == tiles * tile * tile
    dec = LayerDecision((FULL, arrow(8), CACHE))
    c = call_cost(dec, t, n, True, r)
    assert c.dense_pairs == 3 * seq * seq
    assert c.kept_pairs == seq * seq + kept_pairs(t, n, arrow(8), r)


def test_cross_band_pairs_closed_form():
    for a in range(0, 13):
        for b in range(0, 13):
            for w in (0, 1, 2, 5, 11, 20):
                want = sum(1 for i in range(a) for j in range(b) if abs(i - j) <= w)
                assert cross_band_pairs(a, b, w) == want
        for w in (0, 3, 12):
            assert cross_band_pairs(a, a, w) == band_pairs(a, w)


def masked_reference(q, k, v, t, r, decision, cached):
    """float64 softmax with `brute_keep` per head."""
    q, k, v = (x.double() for x in (q, k, v))
    n = q.shape[2] - t - sum(r)
    out = torch.empty_like(q)
    for h, m in enumerate(decision.methods):
        if m == CACHE:
            out[:, h] = cached[:, h].double()
            continue
        s = q[:, h] @ k[:, h].transpose(-1, -2) / q.shape[-1] ** 0.5
        s = s.masked_fill(~brute_keep(t, n, r, m.window(n)), float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, h]
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
@pytest.mark.parametrize("b,h,t,n,r,d", [(1, 4, 5, 37, (29,), 16), (2, 3, 0, 64, (64,), 8), (1, 5, 11, 70, (3, 40), 32)])
def test_engine_backends_agree_with_the_reference(backend, b, h, t, n, r, d):
    """SDPA and Flex run the segment mask; "triton" (the fused kernel knows no references) is routed to them."""
    g = torch.Generator().manual_seed(t * 1000 + n + sum(r))
    seq = t + n + sum(r)
    q, k, v = (torch.randn(b, h, seq, d, generator=g) for _ in range(3))
    choices = [FULL, CACHE, arrow(2), arrow(4), arrow(8)]
    decision = LayerDecision(tuple(choices[i % len(choices)] for i in range(h)))
    cached_all = torch.randn(b, h, seq, d, generator=g)
    cached = CachedHeads(decision.cache_heads, cached_all[:, list(decision.cache_heads)])
    out, hit = headwise_attention(q, k, v, t, decision, cached=cached, backend=backend, refs=r)  # type: ignore[arg-type]
    assert hit
    ref = masked_reference(q, k, v, t, r, decision, cached_all)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5
    # and the references matter: treating them as image tokens gives another result
    plain, _ = headwise_attention(q, k, v, t, decision, cached=cached, backend="sdpa")
    assert not torch.allclose(plain, out)


def test_engine_rejects_references_that_do_not_fit():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError):
        headwise_attention(q, q, q, 4, LayerDecision((arrow(2), FULL)), refs=(3, 4))


# ------------------------------------------------------------------------------------------------ router

FLUX = Layout(ModelSignature("flux", (LayerSpec("double.0", 2, 16), LayerSpec("single.0", 2, 16))), patch_size=2)
SD3 = Layout(ModelSignature("sd3", (LayerSpec("joint.0", 2, 16),)), patch_size=2)
T, GRID, N = 5, (8, 6), 12  # 8x6 latent, patch 2 -> 12 image tokens


def host_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def test_layout_counts_reference_tokens_like_the_host():
    # odd latent sides are padded to the patch, as the host's process_img does
    refs = [torch.zeros(1, 16, 8, 6), torch.zeros(1, 16, 5, 7)]
    assert FLUX.reference_tokens(refs) == (12, 3 * 4)
    assert FLUX.reference_tokens([]) == ()
    assert SD3.reference_tokens(refs).kind == "reference latents"
    assert FLUX.reference_tokens([torch.zeros(3)]).kind == "reference latents"
    assert FLUX.reference_tokens(5).kind == "reference latents"


def test_dense_reason_counts_reference_tokens():
    spec = FLUX.signature.layers[0]
    q = torch.randn(1, 2, T + N + 7, 16)
    assert dense_reason(spec, T, N, (q, q, q, 2), dict(skip_reshape=True), 7) is None
    r = dense_reason(spec, T, N, (q, q, q, 2), dict(skip_reshape=True), 6)
    assert r.kind == "layout" and "reference 6" in r


@pytest.mark.parametrize("method", [arrow(2), CACHE, FULL], ids=str)
def test_flux_run_with_reference_latents_is_routed_with_the_reference_count(method):
    plan = Plan.uniform(FLUX.signature, [1.0, 0.5], method, first_full=True)
    engines: list[HeadwiseEngine] = []

    def consumer(device):
        engines.append(HeadwiseEngine(plan, backend="sdpa"))
        return engines[-1]

    run = Run(FLUX, None, consumer_for=consumer, position=plan.position_for_sigma)
    refs = [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 6, 2)]  # 4 + 3 reference tokens
    r = (4, 3)
    g = torch.Generator().manual_seed(0)
    outs = []
    for sigma in (1.0, 0.5):
        base = {"sigmas": torch.tensor([sigma]), "uuids": ["cond"]}
        fwd = run.begin_forward(torch.zeros(1, 16, *GRID), None, torch.zeros(1, T, 8), base, {"ref_latents": refs})
        assert fwd.reason is None and fwd.refs == r and fwd.ref_len == 7 and fwd.n_img == N
        to = {**base, TO_FORWARD: fwd}
        for bt in ("double", "single"):
            q, k, v = (torch.randn(1, 2, T + N + 7, 16, generator=g) for _ in range(3))
            got = run(host_attention, q, k, v, 2, skip_reshape=True,
                      transformer_options={**to, "block_type": bt, "block_index": 0})
            outs.append((got, q, k, v))
        run.end_forward(fwd)
    # the compressed forward ran the ref-aware mask
    got, q, k, v = outs[2]
    if method == arrow(2):
        keep = arrow_keep(T, T + N + 7, method.window(N), refs=r)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(1, T + N + 7, -1)
        torch.testing.assert_close(got, want)
    s = run.finish()
    assert not s.fallbacks and s.attention_calls == 4
    want_kept = want_dense = 0
    for pos in (0, 1):
        for layer in (0, 1):
            c = call_cost(plan.decision(pos, layer), T, N, True, r)
            want_kept += c.kept_pairs * 4 * 16
            want_dense += c.dense_pairs * 4 * 16
    assert (s.kept_flops, s.dense_flops) == (want_kept, want_dense)
    assert s.dense_flops == 4 * 2 * (T + N + 7) ** 2 * 4 * 16
    if method == arrow(2):
        assert s.heads["arrow"] == 4 and s.kept_flops < s.dense_flops
    assert CallContext(0, 1, 2).refs == ()


def test_reference_count_mismatch_falls_back_for_the_call():
    plan = Plan.uniform(FLUX.signature, [1.0, 0.5], arrow(2), first_full=True)
    run = Run(FLUX, None, consumer_for=lambda d: HeadwiseEngine(plan, backend="sdpa"), position=plan.position_for_sigma)
    base = {"sigmas": torch.tensor([0.5]), "uuids": ["cond"]}
    fwd = run.begin_forward(torch.zeros(1, 16, *GRID), None, torch.zeros(1, T, 8), base,
                            {"ref_latents": [torch.zeros(1, 16, 4, 4)]})
    q = torch.randn(1, 2, T + N + 5, 16)  # the model made 5 reference tokens, not 4
    got = run(host_attention, q, q, q, 2, skip_reshape=True,
              transformer_options={**base, TO_FORWARD: fwd, "block_type": "double", "block_index": 0})
    assert torch.equal(got, host_attention(q, q, q, 2, skip_reshape=True))
    assert run.finish().fallbacks == {"layout": 1}


def test_sd3_forward_with_reference_latents_runs_dense():
    plan = Plan.uniform(SD3.signature, [1.0, 0.5], arrow(2), first_full=True)
    run = Run(SD3, None, consumer_for=lambda d: HeadwiseEngine(plan, backend="sdpa"), position=plan.position_for_sigma)
    base = {"sigmas": torch.tensor([0.5]), "uuids": ["cond"]}
    fwd = run.begin_forward(torch.zeros(1, 16, *GRID), None, torch.zeros(1, T, 8), base,
                            {"ref_latents": [torch.zeros(1, 16, 4, 4)]})
    assert fwd.reason is not None and fwd.reason.kind == "reference latents"
