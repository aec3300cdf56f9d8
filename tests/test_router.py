"""The attention router without a host: `dense_reason` and a whole run on fake calls of both layouts (Flux
[B, H, L, D] with skip_reshape, SD3 [B, L, H·D] with heads=), against a fake host backend."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfav2.calibration import LayerSpec, ModelSignature, Plan
from dfav2.kernels import CACHE, FULL, HeadwiseEngine, arrow
from dfav2.kernels.methods import LayerDecision
from dfav2.nodes.layouts import Layout
from dfav2.nodes.calls import dense_reason
from dfav2.nodes.router import TO_FORWARD, Run

ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution")

FLUX = Layout(ModelSignature("flux", (LayerSpec("double.0", 2, 16), LayerSpec("single.0", 2, 16))), patch_size=2)
SD3 = Layout(ModelSignature("sd3", (LayerSpec("joint.0", 2, 16), LayerSpec("joint.0.attn2", 2, 16, True))), patch_size=2)
T, GRID = 5, (8, 8)  # 5 text tokens, 8x8 latent -> 16 image tokens
N = 16


def host_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):
    """What ComfyUI's attention_pytorch does, in small."""
    if not skip_reshape:
        b, l, hd = q.shape
        q, k, v = (t.reshape(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def test_router_imports_no_host_module():
    for name in ("router.py", "calls.py", "layouts.py"):
        tree = ast.parse((ROOT / "nodes" / name).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                assert m.split(".")[0] not in HOST_MODULES, (name, m)


def flux_qkv(seq=T + N, heads=2, dim=16, kv_seq=None):
    q = torch.randn(1, heads, seq, dim)
    k = torch.randn(1, heads, kv_seq or seq, dim)
    return q, k, torch.randn_like(k)


@pytest.mark.parametrize("args,kwargs,kind", [
    (flux_qkv(), dict(skip_reshape=True), None),
    (flux_qkv(), dict(skip_reshape=True, mask=torch.full((21, 21), -1.0)), "mask"),  # image columns: regional
    (flux_qkv(), dict(skip_reshape=True, mask=torch.zeros(21, 21)), None),  # text-only (here: no-op) masks route
    (flux_qkv(kv_seq=30), dict(skip_reshape=True), "Lq != Lk"),
    (flux_qkv(dim=8), dict(skip_reshape=True), "head mismatch"),
    (flux_qkv(seq=30), dict(skip_reshape=True), "layout"),
    (flux_qkv()[:2], dict(skip_reshape=True), "arguments"),
])
def test_dense_reason_on_flux_calls(args, kwargs, kind):
    heads = args[0].shape[1]
    r = dense_reason(FLUX.signature.layers[0], T, N, (*args, heads) if len(args) == 3 else args, kwargs)
    assert (r is None) if kind is None else (r.kind == kind and isinstance(r, str) and r)


def test_dense_reason_on_sd3_calls():
    spec = SD3.signature.layers[0]
    q = torch.randn(1, T + N, 32)
    v4 = torch.randn(1, T + N, 2, 16)  # SD3 passes v as [B, L, H, D] next to q [B, L, H*D]
    assert dense_reason(spec, T, N, (q, q, v4), dict(heads=2)) is None
    assert dense_reason(spec, T, N, (q, q, q), {}).kind == "heads"
    assert dense_reason(spec, T, N, (q, q, q), dict(heads=3)).kind == "layout"
    image_only = SD3.signature.layers[1]
    assert dense_reason(image_only, T, N, (q, q, q), dict(heads=2)).kind == "layout"  # attn2 sees no text
    qi = torch.randn(1, N, 32)
    assert dense_reason(image_only, T, N, (qi, qi, qi), dict(heads=2)) is None


def _run(layout, plan, backend="sdpa"):
    return Run(layout, None, consumer_for=lambda d: HeadwiseEngine(plan, backend=backend),
               position=plan.position_for_sigma)


def _forward(run, sigma=0.5, tokens=T, **to):
    x = torch.zeros(1, 16, *GRID)
    ctx = torch.zeros(1, tokens, 8)
    base = {"sigmas": torch.tensor([sigma]), "uuids": ["cond"], **to}
    fwd = run.begin_forward(x, None, ctx, base, {})
    return fwd, {**base, TO_FORWARD: fwd}


def _plan(layout, method):
    return Plan.uniform(layout.signature, [1.0, 0.5], method, first_full=True)


def test_all_full_flux_run_is_exactly_the_host_call():
    run = _run(FLUX, _plan(FLUX, FULL))
    _, to = _forward(run)
    for bt in ("double", "single"):
        q, k, v = flux_qkv()
        opts = {**to, "block_type": bt, "block_index": 0}
        got = run(host_attention, q, k, v, 2, skip_reshape=True, transformer_options=opts)
        assert torch.equal(got, host_attention(q, k, v, 2, skip_reshape=True))
    s = run.finish()
    assert s.attention_calls == 2 and s.engine_calls == 2 and s.heads["full"] == 4 and not s.fallbacks
    assert s.kept_flops == s.dense_flops > 0


def test_arrow_and_cache_on_both_layouts_with_engine_reported_counts():
    for layout in (FLUX, SD3):
        plan = Plan.uniform(layout.signature, [1.0, 0.5], arrow(8), first_full=True)
        run = _run(layout, plan)
        _, to = _forward(run)
        for li, spec in enumerate(layout.signature.layers):
            seq = (0 if spec.image_only else T) + N
            if layout is FLUX:
                q, k, v = flux_qkv(seq)
                out = run(host_attention, q, k, v, 2, skip_reshape=True,
                          transformer_options={**to, "block_type": spec.name.split(".")[0], "block_index": 0})
                assert out.shape == (1, seq, 32)
            else:
                q = torch.randn(1, seq, 32)
                out = run(host_attention, q, q, q, heads=2, transformer_options=to)
                assert out.shape == q.shape
                assert not torch.equal(out, host_attention(q, q, q, 2))  # the band drops pairs
        s = run.finish()
        assert s.engine_calls == 2 and s.heads["arrow"] == 4 and not s.fallbacks
        assert 0 < s.kept_flops < s.dense_flops


def test_cache_hits_are_reported_by_the_engine():
    plan = Plan.uniform(FLUX.signature, [1.0, 0.5], CACHE, first_full=True)
    run = _run(FLUX, plan)
    q, k, v = flux_qkv()
    for sigma in (1.0, 0.5):
        _, to = _forward(run, sigma)
        run(host_attention, q, k, v, 2, skip_reshape=True, transformer_options={**to, "block_type": "double", "block_index": 0})
    s = run.finish()
    assert s.cache_hits == 2 and s.cache_misses == 0 and s.heads["cache"] == 2


def test_fallbacks_are_exact_counted_and_warned_once(caplog):
    run = _run(FLUX, _plan(FLUX, arrow(8)))
    _, to = _forward(run)
    opts = {**to, "block_type": "double", "block_index": 0}
    cases = {
        "mask": (flux_qkv(), dict(mask=torch.full((21, 21), -1.0)), opts),  # regional: image columns masked
        "Lq != Lk": (flux_qkv(kv_seq=30), {}, opts),
        "unknown layer": (flux_qkv(), {}, {**opts, "block_index": 7}),
        "no block identity": (flux_qkv(), {}, to),
    }
    with caplog.at_level(logging.WARNING, logger="dfav2.nodes"):
        for _ in range(2):
            for name, ((q, k, v), extra, o) in cases.items():
                got = run(host_attention, q, k, v, 2, skip_reshape=True, transformer_options=o, **extra)
                assert torch.equal(got, host_attention(q, k, v, 2, skip_reshape=True, **extra)), name
    s = run.finish()
    assert s.fallbacks == {name: 2 for name in cases}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(cases)


def test_sd3_layer_counter_and_block_replace():
    run = _run(SD3, _plan(SD3, FULL))
    fwd, to = _forward(run)
    q = torch.randn(1, T + N, 32)
    run(host_attention, q, q, q, heads=2, transformer_options=to)
    run.end_forward(fwd)  # one call of two layers: a call never reached the override
    assert run.fallbacks == {"missed calls": 1}
    fwd, to = _forward(run)
    for _ in range(3):
        run(host_attention, q, q, q, heads=2, transformer_options=to)
    run.end_forward(fwd)  # three calls of two layers: a block ran twice, the counter is off
    assert run.fallbacks["layer count"] == 1 and run.fallbacks["unknown layer"] == 1
    fwd, to = _forward(run, patches_replace={"dit": {("double_block", 0): object()}})
    assert fwd.reason is not None and fwd.reason.kind == "block replace"
    run(host_attention, q, q, q, heads=2, transformer_options=to)
    assert run.fallbacks["block replace"] == 1


def test_calls_outside_a_forward_run_the_host_backend():
    run = _run(FLUX, _plan(FLUX, arrow(8)))
    q, k, v = flux_qkv()
    assert torch.equal(run(host_attention, q, k, v, 2, skip_reshape=True, transformer_options={}),
                       host_attention(q, k, v, 2, skip_reshape=True))
    assert run.finish().engine_calls == 0


def test_a_forward_with_fewer_calls_than_layers_counts_the_missing_calls(caplog):
    """Calls that never reach the override (an override on top that does not chain, skipped blocks) ran without
    the plan: counted per missing call, warned once per run; complete forwards add nothing."""
    run = _run(FLUX, _plan(FLUX, FULL))
    q, k, v = flux_qkv()
    with caplog.at_level(logging.WARNING, logger="dfav2.nodes"):
        for blocks in (("double", "single"), ("double",), (), ("double",)):
            fwd, to = _forward(run)
            for bt in blocks:
                run(host_attention, q, k, v, 2, skip_reshape=True,
                    transformer_options={**to, "block_type": bt, "block_index": 0})
            run.end_forward(fwd)
    s = run.finish()
    assert s.fallbacks == {"missed calls": 1 + 2 + 1}
    assert len([r for r in caplog.records if "2 attention calls" in r.getMessage()]) == 1


def test_dense_path_honours_a_preferred_attention_unless_an_override_is_chained():
    """A checkpoint's preferred backend reaches the dense path on hosts that pass it to overrides; a chained
    override wins over it, as in the host's own dispatch. The summary names the chained override."""
    calls = []

    class Preferred:
        def function(self, q, k, v, heads, **kw):
            calls.append("preferred")
            assert "preferred_attention" not in kw
            return host_attention(q, k, v, heads, **kw)

    q, k, v = flux_qkv()
    for prev in (None, lambda func, *a, **kw: (calls.append("prev"), func(*a, **kw))[1]):
        calls.clear()
        run = Run(FLUX, prev, consumer_for=lambda d: HeadwiseEngine(_plan(FLUX, FULL), backend="sdpa"),
                  position=lambda s: None)  # every call dense
        _, to = _forward(run)
        out = run(host_attention, q, k, v, 2, skip_reshape=True, preferred_attention=Preferred(),
                  transformer_options={**to, "block_type": "double", "block_index": 0})
        assert torch.equal(out, host_attention(q, k, v, 2, skip_reshape=True))
        assert calls == (["preferred"] if prev is None else ["prev"])
        line = run.finish().line()
        assert ("full heads and dense calls ran" in line) == (prev is not None), line


def test_lean_path_counts_bypassed_layers_like_the_engine():
    """Layers the plan keeps all full (and stores nothing of) go straight to the host, are counted once per
    forward, and the summary equals what the engine reports for the same calls when it runs them itself."""
    from dfav2.kernels.engine import CallContext, call_cost

    plan = Plan.uniform(FLUX.signature, [1.0, 0.5], arrow(8), first_full=True)
    run = _run(FLUX, plan)
    q, k, v = flux_qkv()
    for sigma, end in ((1.0, True), (0.5, False)):  # the second forward is never ended (benchmark callers)
        fwd, to = _forward(run, sigma)
        assert fwd.bypass == ((True, True) if sigma == 1.0 else (False, False))
        for bt in ("double", "single"):
            got = run(host_attention, q, k, v, 2, skip_reshape=True,
                      transformer_options={**to, "block_type": bt, "block_index": 0})
            if sigma == 1.0:
                assert torch.equal(got, host_attention(q, k, v, 2, skip_reshape=True))
        if end:
            run.end_forward(fwd)
    s = run.finish()
    expected_kept = expected_dense = 0
    for pos in (0, 1):
        for layer in (0, 1):
            c = call_cost(plan.decision(pos, layer), T, N, True)
            expected_kept += c.kept_pairs * 4 * 16
            expected_dense += c.dense_pairs * 4 * 16
    assert s.engine_calls == 4 and s.heads["full"] == 4 and s.heads["arrow"] == 4 and not s.fallbacks
    assert (s.kept_flops, s.dense_flops) == (expected_kept, expected_dense)
    assert isinstance(CallContext(0, 1, 2), tuple)


@pytest.mark.parametrize("layout", [FLUX, SD3])
def test_dense_fastest_serves_all_full_layers_and_full_heads(layout):
    """dense "fastest": the fast function serves calls the plan keeps all full (no host call) and the full heads
    of mixed layers, with the output in the host's layout; off its devices, and for masked calls, the host does."""
    served = []

    def fast(q, k, v, scale=None):
        served.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    plan = Plan.uniform(layout.signature, [1.0, 0.5], arrow(8), first_full=True)
    mixed = Plan(plan.model, (plan.positions[0], type(plan.positions[1])(0.5, tuple(
        LayerDecision((FULL, arrow(8))) for _ in layout.signature.layers))), None, "mixed")
    host_calls = []

    def host(*a, **kw):
        host_calls.append(1)
        return host_attention(*a, **kw)

    run = Run(layout, None, consumer_for=lambda d: HeadwiseEngine(mixed, backend="sdpa"),
              position=mixed.position_for_sigma, fast_dense=fast)
    run.fast_devices = ("cpu",)
    for sigma in (1.0, 0.5):
        _, to = _forward(run, sigma)
        for spec in layout.signature.layers:
            seq = (0 if spec.image_only else T) + N
            if layout is FLUX:
                q, k, v = flux_qkv(seq)
                got = run(host, q, k, v, 2, skip_reshape=True,
                          transformer_options={**to, "block_type": spec.name.split(".")[0], "block_index": 0})
                want = host_attention(q, k, v, 2, skip_reshape=True)
            else:
                q = torch.randn(1, seq, 32)
                got = run(host, q, q, q, heads=2, transformer_options=to)
                want = host_attention(q, q, q, 2)
            assert got.shape == want.shape
            if sigma == 1.0:
                torch.testing.assert_close(got, want)
    n = len(layout.signature.layers)
    assert not host_calls and len(served) == 2 * n  # all-full calls, then the one full head of each mixed layer
    assert [s[1] for s in served] == [2] * n + [1] * n
    s = run.finish()
    assert s.engine_calls == 2 * n and s.heads["full"] == 3 * n and s.heads["arrow"] == n and not s.fallbacks
    q, k, v = flux_qkv()
    run.fast_devices = ("cuda",)
    _, to = _forward(run, 1.0)
    run(host, q, k, v, 2, skip_reshape=True, transformer_options={**to, "block_type": "double", "block_index": 0})
    assert host_calls == [1]


def test_describe_override_names_the_core_nodes():
    from dfav2.nodes.peers import describe_override

    class ModelPatcher:  # the shape of ModelPatcher.set_model_optimized_attention's closure (ComfyUI >= 0.33)
        def set_model_optimized_attention(self, optimized_attention):
            def optimized_attention_override(_, *args, **kwargs):
                return optimized_attention(*args, **kwargs)
            return optimized_attention_override

    def attention_pytorch(*a, **kw):
        return None

    assert describe_override(ModelPatcher().set_model_optimized_attention(attention_pytorch)) == \
        "Model Attention Backend (attention_pytorch)"

    def override(func, *a, **kw):
        return func(*a, **kw)

    override.__module__ = "comfy_extras.nodes_sparse_attention"
    assert describe_override(override) == "Model Sparse Attention"

    class Sage:
        def __call__(self, func, *a, **kw):
            return func(*a, **kw)

    assert describe_override(Sage()).endswith("test_router.test_describe_override_names_the_core_nodes.<locals>.Sage")


def test_chaining_an_override_later_hands_it_every_full_head():
    """An override installed after the run began (hooks: Model Sparse Attention re-installing itself) serves the
    all-full calls and the full heads of mixed layers from then on, in engines made before and after."""
    plan = Plan.uniform(FLUX.signature, [1.0, 0.5], arrow(8), first_full=True)
    run = Run(FLUX, None, consumer_for=lambda d: HeadwiseEngine(plan, backend="sdpa"),
              position=plan.position_for_sigma, fast_dense=lambda q, k, v, scale=None: q)
    assert run.consumer(torch.device("cpu")).full_by_dense is False
    run.chain_dense(lambda func, *a, **kw: func(*a, **kw))
    assert run.fast_dense is None and run.consumer(torch.device("cpu")).full_by_dense is True
    assert run.consumer(torch.device("meta")).full_by_dense is True
    host_only = Run(FLUX, None, consumer_for=lambda d: HeadwiseEngine(plan, backend="sdpa"),
                    position=plan.position_for_sigma)
    assert host_only.consumer(torch.device("cpu")).full_by_dense is True
