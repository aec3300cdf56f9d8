"""DFAPlanInfo and DFACompare inside a real ComfyUI (in-process, CPU) on tiny Flux / SD3.5-M-like models: the plan
picture as an IMAGE, and A/B sampling through the host's KSampler path and VAEDecode node."""

import asyncio
from pathlib import Path

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfav2.calibration.picture import draw_plan  # noqa: E402
from dfav2.calibration.plan import save_plan  # noqa: E402
from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import hooks as K  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.refmodels import models as RM  # noqa: E402


def _need(family):
    if family == "flux" and HS.host_support().flux_error() is not None:
        pytest.skip(f"ComfyUI {H.host_version()} has no Flux block identity (needs >= {HS.MIN_HOST_FLUX})")


@pytest.fixture
def plans_dir(tmp_path, monkeypatch):
    import folder_paths

    import dfav2.nodes.v3  # noqa: F401 - registers the real folder at import: do it before redirecting it
    from dfav2.nodes import plans as P

    d = tmp_path / "dfa_plans"
    d.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, P.FOLDER, ([str(d)], {".json"}))
    return d


class CodecVAE:
    """A VAE for the tiny models: the reference models' fixed 8x8-patch codec (refmodels/codec.py), which maps the
    host's 16-channel latents to RGB; ComfyUI's VAEDecode node calls its `decode` as it calls a real VAE's."""

    def __init__(self, model):
        self.model = model

    def decode(self, samples):
        return RM.decode_samples(self.model, samples).clamp(0, 1).movedim(1, -1)  # IMAGE [B, H, W, 3]


def _untouched(model):
    to = model.model_options.get("transformer_options", {})
    assert K.SLOT not in to and A.TO_PATCH not in to and K.TO_RUN not in to


@pytest.mark.parametrize("family", ["flux", "sd35m"])
def test_plan_info_returns_the_picture_as_an_image(models, family, plans_dir):
    import folder_paths

    from dfav2.nodes.v3 import DFAExtension
    from dfav2.nodes.v3_tools import DFAPlanInfo

    _need(family)
    schema = DFAPlanInfo.define_schema()
    assert schema.node_id == "DFAPlanInfo" and schema.is_output_node and all(i.tooltip for i in schema.inputs)
    assert DFAPlanInfo in asyncio.run(DFAExtension().get_node_list())
    _, plan = H.plan_pair(models[family])
    save_plan(plan, plans_dir / "p.json")
    for kw in (dict(plan="p.json"), dict(plan="none", dfa_plan=plan)):
        out = DFAPlanInfo.execute(**kw)
        image, summary = out.args
        assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
        assert 0.0 <= image.min() and image.max() <= 1.0
        want = draw_plan(plan).image
        assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8), want)
        assert "methods: full" in summary and "attention FLOPs kept at 1024x1024" in summary  # no record: 1024
        ui = out.ui
        assert ui["text"] == (summary,) and len(ui["images"]) == 1
        saved = ui["images"][0]
        assert (Path(folder_paths.get_temp_directory()) / saved["subfolder"] / saved["filename"]).is_file()
    out = DFAPlanInfo.execute(plan="p.json", width=2048, height=2048)
    assert "attention FLOPs kept at 2048x2048" in out.args[1]
    with pytest.raises(ValueError, match="no plan selected"):
        DFAPlanInfo.execute(plan="none")


def _compare(model, family, plan, **kw):
    from dfav2.nodes.v3_tools import DFACompare

    args = dict(model=model, plan="none", dfa_plan=plan, positive=H.conditioning(family, 32, 1),
                negative=H.conditioning(family, 32, 2), vae=CodecVAE(model), latent_image=H.empty_latent(256, 256),
                seed=0, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    args.update(kw)
    return DFACompare.execute(**args)


@pytest.mark.parametrize("family,cfg", [("flux", 1.0), ("sd35m", 3.5)])
def test_compare_with_an_all_full_plan_gives_identical_images(models, family, cfg):
    _need(family)
    from dfav2.nodes.v3_tools import DFACompare

    schema = DFACompare.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert schema.is_output_node and all(i.tooltip for i in schema.inputs)
    assert (inputs["steps"].default, inputs["cfg"].default, inputs["denoise"].default) == (20, 8.0, 1.0)
    assert {k for k, i in inputs.items() if i.optional} == {"dfa_plan"}
    model = models[family]
    full, _ = H.plan_pair(model)
    out = _compare(model, family, full, cfg=cfg)
    unc, comp, diff, report = out.args
    assert unc.shape == (1, 256, 256, 3) and torch.equal(unc, comp) and diff.abs().max() == 0
    # the uncompressed image is what KSampler + VAEDecode give for these inputs
    ref = CodecVAE(model).decode(H.ksample(model, family, cfg=cfg))
    assert torch.equal(unc, ref)
    assert "identical images (PSNR inf, SSIM 1)" in report and "speed-up" in report and "dense fallbacks 0" in report
    assert out.ui["text"] == (report,) and len(out.ui["images"]) == 3
    _untouched(model)


@pytest.mark.parametrize("family,size,batch", [("flux", (256, 256), 1), ("sd35m", (320, 192), 2)])
def test_compare_with_a_compressed_plan_differs_by_finite_amounts(models, family, size, batch):
    _need(family)
    import nodes

    from dfav2.calibration.quality import psnr_ssim

    model = models[family]
    _, ac = H.plan_pair(model)
    latent = H.empty_latent(*size, batch=batch)
    out = _compare(model, family, ac, latent_image=latent, cfg=3.5, seed=3)
    unc, comp, diff, report = out.args
    assert unc.shape == comp.shape == diff.shape == (batch, size[1], size[0], 3)
    assert not torch.equal(unc, comp) and torch.isfinite(comp).all()
    psnr, ssim = psnr_ssim(comp, unc)
    # tiny random-weight models barely react to attention changes: finite PSNR, SSIM may round to 1
    assert all(0 < p < float("inf") for p in psnr) and all(-1 < s <= 1 for s in ssim), (psnr, ssim)
    assert torch.allclose(diff, ((comp - unc).abs() * 4).clamp(0, 1))
    assert f"PSNR {sum(psnr) / batch:.2f}" in report and f"SSIM {sum(ssim) / batch:.4f}" in report
    assert ("(min " in report) == (batch > 1) and "cache hits" in report and "time: uncompressed" in report
    # the compressed image is DFAApply + KSampler + VAEDecode for the same inputs
    patched = A.apply_dfa(model, plan=ac)
    lat = nodes.common_ksampler(patched, 3, 4, 3.5, "euler", "simple", H.conditioning(family, 32, 1),
                                H.conditioning(family, 32, 2), latent)[0]
    assert torch.equal(comp, CodecVAE(model).decode(lat["samples"]))
    _untouched(model)


def test_compare_on_the_trained_reference_model_reports_real_differences():
    """The shipped SD3.5-M-like reference model (trained, meaningful images) with an arrow + cache plan at 256 px:
    the report's numbers are those of a visible but bounded change."""
    from dfav2.calibration.quality import psnr_ssim
    from dfav2.refmodels import scenes

    name = "sd35m"
    model = RM.load(name)
    _, ac = H.plan_pair(model)
    caps = [s.caption for s in scenes.sample_scenes(2, 2000)]
    out = _compare(model, name, ac, positive=RM.conditioning(name, caps), negative=RM.conditioning(name, ["", ""]),
                   latent_image=H.empty_latent(256, 256, batch=2), cfg=RM.SPECS[name].cfg, steps=4, seed=5)
    unc, comp, diff, report = out.args
    psnr, ssim = psnr_ssim(comp, unc)
    assert all(8 < p < 60 for p in psnr) and all(0 < s < 0.999 for s in ssim), (psnr, ssim)
    assert diff.max() > 0.25 and f"SSIM {sum(ssim) / 2:.4f} (min {min(ssim):.4f})" in report
    _untouched(model)


def test_compare_refuses_a_wrong_plan_or_a_patched_model_before_sampling(models):
    _need("flux")
    import comfy.utils

    _, flux_plan = H.plan_pair(models["flux"])
    calls = []
    hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: calls.append(a))
    try:
        with pytest.raises(ValueError, match="the plan does not fit this model"):
            _compare(models["sd35m"], "sd35m", flux_plan)
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
    assert calls == []
    _untouched(models["sd35m"])
    # a model that already runs a plan has no uncompressed run to compare with
    applied = A.apply_dfa(models["flux"], plan=flux_plan)
    with pytest.raises(ValueError, match="already runs a DiTFastAttnV2 plan"):
        _compare(applied, "flux", flux_plan)
