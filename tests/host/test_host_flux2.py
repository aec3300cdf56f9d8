"""Flux 2 inside a real ComfyUI (in-process, CPU): a tiny Flux 2 (real key names, detected as `Flux2` by the host's
own loader: 128-channel latents at 1/16, patch 1, text padded to 512 tokens) calibrated with DFACalibrate's node
function and applied with DFAApply through the host's KSampler. Image tokens come from the model's latent format:
a plan calibrated at 256x256 sees 16x16 = 256 image tokens, not the 32x32 an 8x latent would give."""

import logging

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.nodes import layouts as Ly  # noqa: E402

SIZE = 256


@pytest.fixture(scope="module")
def flux2(host, tmp_path_factory):
    if not H.has_flux2():
        pytest.skip(f"ComfyUI {H.host_version()} has no Flux 2 (supported_models.Flux2 with global modulation)")
    if HS.host_support().flux_error() is not None:
        pytest.skip(f"ComfyUI {H.host_version()} has no Flux block identity (needs >= {HS.MIN_HOST_FLUX})")
    path = H.save_model(H.build_flux2(), tmp_path_factory.mktemp("flux2") / "tiny_flux2.safetensors")
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))


def test_flux2_layout_comes_from_the_models_latent_format(flux2):
    assert type(flux2.model).__name__ == "Flux2"
    layout = Ly.model_layout(flux2)
    assert layout.family == "flux2" and layout.patch_size == 1
    assert layout.latent_scale == flux2.model.latent_format.spacial_downscale_ratio == 16
    assert [(l.name, l.heads, l.head_dim) for l in layout.signature.layers] == [
        ("double.0", 2, 128), ("single.0", 2, 128), ("single.1", 2, 128)]
    assert layout.image_tokens(SIZE, SIZE) == 256 and layout.image_tokens(1024, 1024) == 4096


def test_flux2_all_full_is_bit_exact_and_a_mixed_plan_compresses(flux2):
    sig = Ly.model_signature(flux2)
    sigmas = H.schedule_sigmas(flux2)
    ref = H.ksample(flux2, "flux2", width=SIZE, height=SIZE)
    assert ref.shape == (1, 128, SIZE // 16, SIZE // 16)
    full = A.apply_dfa(flux2, plan=H.all_full_plan(sig, sigmas))
    assert torch.equal(H.ksample(full, "flux2", width=SIZE, height=SIZE), ref)
    s = H.last_summary(full)
    assert s.fallbacks == {} and s.attention_calls == len(s.forwards) * 3 and s.heads["full"] > 0

    plan = H.arrow_cache_plan(sig, sigmas)
    ac = A.apply_dfa(flux2, plan=plan)
    out = H.ksample(ac, "flux2", width=SIZE, height=SIZE)
    s = H.last_summary(ac)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert s.fallbacks == {} and s.heads["arrow"] > 0 and s.heads["cache"] > 0
    assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(plan, s.forwards)
    assert "arrow" in s.line() and 0.0 < s.flops_saved < 1.0


def test_flux2_calibrate_then_apply(flux2, tmp_path, monkeypatch, caplog):
    """DFACalibrate's node function builds its latent at the model's 1/16 (256 image tokens at 256x256); DFAApply of
    the plan at the same settings reproduces the calibration latent bit for bit, shows compressed heads in the run
    summary and does not warn that the run differs from the calibration (an 8x latent would have 4x the tokens)."""
    import folder_paths

    import dfav2.nodes.v3  # noqa: F401 - registers the plan folder before it is redirected
    from dfav2.nodes import plans as P
    from dfav2.nodes.calibrate import calibrate_plan_node

    monkeypatch.setitem(folder_paths.folder_names_and_paths, P.FOLDER, ([str(tmp_path)], {".json"}))
    pos, neg = H.conditioning("flux2", 32, 1), H.conditioning("flux2", 32, 2)
    res = calibrate_plan_node(model=flux2, positive=pos, negative=neg, width=SIZE, height=SIZE, steps=4, cfg=1.0,
                              sampler_name="euler", scheduler="simple", seed=3, delta=1.0, plan_name="flux2",
                              backend="sdpa")
    cal = res.plan.calibration
    assert res.plan.model == Ly.model_signature(flux2) and res.plan.model.family == "flux2"
    assert res.samples.shape == (1, 128, SIZE // 16, SIZE // 16)
    assert (cal.width, cal.height) == (SIZE, SIZE) and cal.txt_len == 512  # Flux 2 pads text to 512 tokens
    counts = res.plan.method_counts()
    assert counts["full"] < sum(counts.values()), counts  # something was compressed
    assert res.path.exists() and "flux2" in res.summary

    patched = A.apply_dfa(flux2, plan=res.plan)
    with caplog.at_level(logging.WARNING, logger="dfav2.nodes"):
        out = H.ksample(patched, "flux2", width=SIZE, height=SIZE, seed=3)
    assert torch.equal(out, res.samples), (out - res.samples).abs().max()
    assert not [r for r in caplog.records if r.name.startswith("dfav2")], [r.getMessage() for r in caplog.records]
    s = H.last_summary(patched)
    assert s.fallbacks == {} and (s.cache_hits, s.cache_misses) == H.expected_cache_counts(res.plan, s.forwards)
    assert s.heads["full"] < sum(s.heads.values()) and s.flops_saved > 0.0
