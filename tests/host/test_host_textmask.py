"""Attention masks that touch only text key columns inside a real ComfyUI (CPU): the tiny Flux model samples with
conditioning from the host's own StyleModelApply node (strength_type "attn_bias": a bias on the Redux tokens, which
sit in the text block; the host upscales the mask to the image grid in Flux.extra_conds). DFAApply runs those calls
compressed (no fallback), an all-full plan stays bit-identical, arrow heads apply the mask, and DFACalibrate makes
a plan with the mask applied that DFAApply reproduces."""

import logging

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.nodes import layouts as Ly  # noqa: E402

T = 32  # text tokens of H.conditioning
REDUX = 9  # tokens the fake style model adds
STRENGTH = 0.05  # attn_bias log(0.05) ~ -3 on the Redux columns: a mask that changes the output clearly


@pytest.fixture(autouse=True)
def _flux_host():
    if HS.host_support().flux_error() is not None:
        pytest.skip(f"ComfyUI {H.host_version()} has no Flux block identity")


class FakeStyleModel:
    """What StyleModelApply needs of a STYLE_MODEL: get_cond(clip_vision_output) -> [1, n, context dim]."""

    def get_cond(self, clip_vision_output):
        g = torch.Generator().manual_seed(7)
        return torch.randn(1, REDUX, H.CONTEXT_DIM, generator=g)


def redux(conditioning, strength=STRENGTH, strength_type="attn_bias"):
    import nodes

    return nodes.StyleModelApply().apply_stylemodel(conditioning, FakeStyleModel(), None, strength, strength_type)[0]


def sample(model, pos, *, width=256, height=256, cfg=1.0, sampler="euler"):
    import nodes

    neg = H.conditioning("flux", T, 2)
    latent = H.empty_latent(width, height)
    return nodes.common_ksampler(model, 0, 4, cfg, sampler, "simple", pos, neg, latent)[0]["samples"]


def _no_dfa_warnings(caplog):
    return not [r for r in caplog.records if r.name.startswith("dfav2") and r.levelno >= logging.WARNING]


def test_style_model_attn_bias_mask_is_text_only():
    pos = redux(H.conditioning("flux", T, 1))
    mask = pos[0][1]["attention_mask"]
    n_txt = T + REDUX
    assert mask.shape == (1, n_txt + 1, n_txt + 1) and pos[0][0].shape[1] == n_txt
    assert torch.all(mask[:, :, n_txt:] == 0)  # image columns (one cell, upscaled to the grid by the host): no-ops
    assert torch.all(mask[:, :T, T:n_txt] < -2) and torch.all(mask[:, n_txt:, T:n_txt] < -2)  # the Redux bias


def test_all_full_plan_is_bit_identical_with_a_text_mask(models, caplog):
    model = models["flux"]
    sig = Ly.model_signature(model)
    full = H.all_full_plan(sig, H.schedule_sigmas(model))
    pos = redux(H.conditioning("flux", T, 1))
    ref = sample(model, pos, cfg=3.5)
    with caplog.at_level(logging.WARNING, logger="dfav2"):
        patched = A.apply_dfa(model, plan=full)
        out = sample(patched, pos, cfg=3.5)
    assert torch.equal(out, ref) and _no_dfa_warnings(caplog)
    s = H.last_summary(patched)
    assert s.fallbacks == {} and s.heads["full"] > 0 and s.heads["arrow"] == s.heads["cache"] == 0


def test_mixed_plan_runs_text_masked_calls_compressed(models, caplog):
    model = models["flux"]
    sig = Ly.model_signature(model)
    plan = H.arrow_cache_plan(sig, H.schedule_sigmas(model), factor=4)
    pos = redux(H.conditioning("flux", T, 1))
    dense = sample(model, pos)
    with caplog.at_level(logging.WARNING, logger="dfav2"):
        patched = A.apply_dfa(model, plan=plan, backend="sdpa")
        out = sample(patched, pos)
    s = H.last_summary(patched)
    assert _no_dfa_warnings(caplog)
    layers = len(sig.layers)
    assert s.fallbacks == {} and s.engine_calls == s.attention_calls == 4 * layers
    assert s.heads["arrow"] > 0 and s.heads["cache"] > 0
    assert s.text_mask_calls == 4 * layers  # the all-full first position keeps heads for the next: routed too
    assert "text-only mask" in s.line()
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert ((out - dense).norm() / dense.norm()).item() < 0.01  # measured 5e-4 (the tiny random model)


def test_arrow_heads_apply_the_text_mask(models):
    """At 2 image tokens an arrow/1 band keeps every pair: a plan of arrow and full heads must then reproduce the
    unpatched masked model up to rounding, which it cannot if the arrow heads dropped the Redux bias."""
    plan_mod, methods = H.plans_module()
    model = models["flux"]
    sig = Ly.model_signature(model)
    sigmas = [s for s in H.schedule_sigmas(model) if s > 0]
    mixed = methods.LayerDecision((methods.arrow(1), methods.FULL))
    plan = plan_mod.Plan(sig, tuple(plan_mod.PlanPosition(s, (mixed,) * len(sig.layers)) for s in sigmas), None,
                         "arrow/1 + full")
    pos = redux(H.conditioning("flux", T, 1))
    plain = redux(H.conditioning("flux", T, 1), 1.0, "multiply")
    dense = sample(model, pos, width=32, height=8)
    patched = A.apply_dfa(model, plan=plan, backend="sdpa")
    out = sample(patched, pos, width=32, height=8)
    s = H.last_summary(patched)
    assert s.fallbacks == {} and s.heads["arrow"] == s.heads["full"] == 4 * len(sig.layers)
    assert s.text_mask_calls == 4 * len(sig.layers)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    unmasked = sample(model, plain, width=32, height=8)
    assert (unmasked - dense).abs().max() > 100 * (out - dense).abs().max()


def test_calibration_with_a_text_mask_makes_a_plan_that_apply_reproduces(models):
    from dfav2.calibration.search import SearchConfig
    from dfav2.nodes.calibrate import calibrate_dfa

    model = models["flux"]
    pos = redux(H.conditioning("flux", T, 1))
    neg = H.conditioning("flux", T, 2)
    res = calibrate_dfa(model, positive=pos, negative=neg, width=256, height=256, steps=4, cfg=1.0,
                        sampler_name="euler", scheduler="simple", seed=0, config=SearchConfig(delta=20.0), backend="sdpa")
    plan = res.plan
    assert plan.calibration.txt_len == T + REDUX
    compressed = sum(len(plan.decision(p, li).arrow_heads) + len(plan.decision(p, li).cache_heads)
                     for p in range(len(plan.positions)) for li in range(len(plan.model.layers)))
    assert compressed > 0
    patched = A.apply_dfa(model, plan=plan)
    import nodes

    out = nodes.common_ksampler(patched, 0, 4, 1.0, "euler", "simple", pos, neg, H.empty_latent(256, 256))[0]["samples"]
    assert torch.equal(out, res.samples)
    s = H.last_summary(patched)
    assert s.fallbacks == {} and s.heads["arrow"] + s.heads["cache"] > 0 and s.text_mask_calls > 0
