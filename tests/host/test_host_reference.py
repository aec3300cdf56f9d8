"""Kontext / edit reference latents inside a real ComfyUI (CPU): the tiny Flux model samples with a reference latent
added by the host's own ReferenceLatent node; DFAApply compresses those forwards (band per image segment), an
all-full plan stays bit-identical to the unpatched model, and DFACalibrate makes a plan with the reference present."""

import logging

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.kernels.engine import call_cost  # noqa: E402
from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.nodes import layouts as Ly  # noqa: E402

T = 32  # text tokens of H.conditioning
RES = 256  # 32x32 latent, patch 2: 256 image tokens


@pytest.fixture(autouse=True)
def _flux_host():
    if HS.host_support().flux_error() is not None:
        pytest.skip(f"ComfyUI {H.host_version()} has no Flux block identity")


def with_reference(conditioning, *latents):
    """`conditioning` through the host's ReferenceLatent node, once per latent."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    for lat in latents:
        out = ReferenceLatent.execute(conditioning, {"samples": lat})
        conditioning = out.args[0] if hasattr(out, "args") else out[0]
    return conditioning


def ksample_ref(model, *latents, cfg=1.0, sampler="euler"):
    import nodes

    pos = with_reference(H.conditioning("flux", T, 1), *latents)
    neg = with_reference(H.conditioning("flux", T, 2), *latents)
    latent = H.empty_latent(RES, RES)
    return nodes.common_ksampler(model, 0, 4, cfg, sampler, "simple", pos, neg, latent)[0]["samples"]


def refs(*sides):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 16, h, w, generator=g) for h, w in sides]


@pytest.mark.parametrize("sides", [((32, 32),), ((32, 32), (20, 26))], ids=["one", "two"])
def test_reference_latents_are_compressed(models, sides, caplog):
    model = models["flux"]
    sig = Ly.model_signature(model)
    sigmas = H.schedule_sigmas(model)
    plan = H.arrow_cache_plan(sig, sigmas, factor=4)
    lat = refs(*sides)
    dense = ksample_ref(model, *lat)
    with caplog.at_level(logging.WARNING, logger="dfav2"):
        patched = A.apply_dfa(model, plan=plan, backend="sdpa")
        out = ksample_ref(patched, *lat)
    s = H.last_summary(patched)
    assert not [r for r in caplog.records if r.name.startswith("dfav2") and r.levelno >= logging.WARNING]
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert s.fallbacks == {} and s.engine_calls == s.attention_calls == 4 * len(sig.layers)
    assert s.heads["arrow"] > 0 and s.heads["cache"] > 0
    # the summary's FLOPs count the reference tokens: (T + N + R)² dense pairs per head and call
    ref_tokens = tuple(-(-h // 2) * -(-w // 2) for h, w in sides)
    seq = T + 256 + sum(ref_tokens)
    assert s.dense_flops == 4 * len(sig.layers) * 2 * seq * seq * 4 * 128
    kept = 0
    for f in s.forwards:
        for li in range(len(sig.layers)):
            kept += call_cost(plan.decision(f.position, li), T, 256, True, ref_tokens).kept_pairs * 4 * 128
    assert s.kept_flops == kept < s.dense_flops


def test_all_full_plan_is_bit_identical_with_a_reference(models):
    model = models["flux"]
    sig = Ly.model_signature(model)
    full = H.all_full_plan(sig, H.schedule_sigmas(model))
    lat = refs((32, 32))
    ref = ksample_ref(model, *lat, cfg=3.5)
    patched = A.apply_dfa(model, plan=full)
    out = ksample_ref(patched, *lat, cfg=3.5)
    assert torch.equal(out, ref)
    s = H.last_summary(patched)
    assert s.fallbacks == {} and s.heads["full"] > 0 and s.heads["arrow"] == s.heads["cache"] == 0


def test_calibration_with_a_reference_makes_a_plan_that_apply_reproduces(models):
    from dfav2.calibration.search import SearchConfig
    from dfav2.nodes.calibrate import calibrate_dfa

    model = models["flux"]
    lat = refs((32, 32))
    pos = with_reference(H.conditioning("flux", T, 1), *lat)
    neg = with_reference(H.conditioning("flux", T, 2), *lat)
    # a large budget: the tiny random model's errors are large, and the plan must compress something
    res = calibrate_dfa(model, positive=pos, negative=neg, width=RES, height=RES, steps=4, cfg=1.0,
                        sampler_name="euler", scheduler="simple", seed=0, config=SearchConfig(delta=20.0), backend="sdpa")
    plan = res.plan
    assert plan.model == Ly.model_signature(model) and plan.calibration.txt_len == T
    compressed = sum(len(plan.decision(p, li).arrow_heads) + len(plan.decision(p, li).cache_heads)
                     for p in range(len(plan.positions)) for li in range(len(plan.model.layers)))
    assert compressed > 0
    patched = A.apply_dfa(model, plan=plan)
    import nodes

    out = nodes.common_ksampler(patched, 0, 4, 1.0, "euler", "simple", pos, neg, H.empty_latent(RES, RES))[0]["samples"]
    assert torch.equal(out, res.samples)
    s = H.last_summary(patched)
    assert s.fallbacks == {} and s.heads["arrow"] + s.heads["cache"] > 0
