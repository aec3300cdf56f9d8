"""DFAApply's host adapter inside a real ComfyUI (in-process, CPU): tiny Flux / SD3 / SD3.5-M-like models loaded
by the host's own loader, sampled by the host's own KSampler (nodes.common_ksampler)."""

import logging

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.nodes import hooks as K  # noqa: E402
from dfav2.nodes import layouts as Ly  # noqa: E402

FAMILIES = ("flux", "sd3", "sd35m")
SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_sde")


def _flux_ok() -> bool:
    return HS.host_support().flux_error() is None


def _need(family):
    if family == "flux" and not _flux_ok():
        pytest.skip(f"ComfyUI {H.host_version()} has no Flux block identity (needs >= {HS.MIN_HOST_FLUX}); see test_version_gate")


def test_signatures(models):
    names = {f: [l.name for l in Ly.model_signature(models[f]).layers] for f in FAMILIES}
    assert names["flux"] == ["double.0", "double.1", "single.0", "single.1", "single.2", "single.3"]
    assert names["sd3"] == ["joint.0", "joint.1"]
    assert names["sd35m"] == ["joint.0", "joint.0.attn2", "joint.1"]
    sig = Ly.model_signature(models["sd35m"])
    assert [l.image_only for l in sig.layers] == [False, True, False]
    assert {(l.heads, l.head_dim) for l in Ly.model_signature(models["flux"]).layers} == {(2, 128)}
    assert {(l.heads, l.head_dim) for l in sig.layers} == {(2, 64)}


@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plans_on_host_ksampler(models, family, sampler, cfg):
    """all-full plan: bit-identical latent; arrow+cache plan: completes, differs, cache hits as the plan says."""
    _need(family)
    model = models[family]
    full_plan, ac_plan = H.plan_pair(model)
    ref = H.ksample(model, family, sampler=sampler, cfg=cfg)

    full = A.apply_dfa(model, plan=full_plan)
    out = H.ksample(full, family, sampler=sampler, cfg=cfg)
    assert torch.equal(out, ref), f"all-full plan changed the latent (max diff {(out - ref).abs().max().item()})"
    s = H.last_summary(full)
    assert s.fallbacks == {} and s.attention_calls == len(s.forwards) * len(full_plan.model.layers)
    assert len(s.forwards) == (7 if sampler in ("heun", "dpmpp_sde") else 4)

    ac = A.apply_dfa(model, plan=ac_plan)
    out = H.ksample(ac, family, sampler=sampler, cfg=cfg)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    s = H.last_summary(ac)
    assert s.fallbacks == {}
    hits, misses = H.expected_cache_counts(ac_plan, s.forwards)
    assert hits > 0
    assert (s.cache_hits, s.cache_misses) == (hits, misses)
    assert s.heads["arrow"] > 0 and s.heads["cache"] == hits
    assert 0.0 < s.flops_saved < 1.0


def test_disabled_is_the_input_model(models):
    model = models["sd3"]
    full_plan, ac_plan = H.plan_pair(model)
    assert A.apply_dfa(model, plan=ac_plan, enabled=False) is model
    from dfav2.nodes.v3 import DFAApply

    out = DFAApply.execute(model=model, plan="none", enabled=False, start_percent=0.0, end_percent=1.0, dfa_plan=ac_plan)
    assert out.args[0] is model
    assert K.SLOT not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("family", ["flux", "sd35m"])
def test_batch_two(models, family):
    _need(family)
    model = models[family]
    full_plan, ac_plan = H.plan_pair(model)
    ref = H.ksample(model, family, cfg=3.5, batch=2)
    assert ref.shape[0] == 2
    assert torch.equal(H.ksample(A.apply_dfa(model, plan=full_plan), family, cfg=3.5, batch=2), ref)
    ac = A.apply_dfa(model, plan=ac_plan)
    out = H.ksample(ac, family, cfg=3.5, batch=2)
    s = H.last_summary(ac)
    assert not torch.equal(out, ref) and s.fallbacks == {}
    assert all(f.cache_key[2] == 4 for f in s.forwards)  # cond + uncond of 2 images in one call
    assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(ac_plan, s.forwards)


@pytest.mark.parametrize("size", [(1024, 768), (1000, 760)], ids=["1024x768", "1000x760"])
@pytest.mark.parametrize("family", ["flux", "sd35m"])
def test_resolutions(models, family, size):
    """Image tokens come from the latent grid, partial 2x2 patches included (1000x760 -> 63x48 tokens)."""
    _need(family)
    width, height = size
    model = models[family]
    full_plan, ac_plan = H.plan_pair(model)
    ref = H.ksample(model, family, width=width, height=height, steps=3)
    assert ref.shape[-2:] == (height // 8, width // 8)
    full = A.apply_dfa(model, plan=full_plan)
    assert torch.equal(H.ksample(full, family, width=width, height=height, steps=3), ref)
    ac = A.apply_dfa(model, plan=ac_plan)
    out = H.ksample(ac, family, width=width, height=height, steps=3)
    s = H.last_summary(ac)
    assert s.fallbacks == {}, s.fallbacks
    assert s.engine_calls > 0 and not torch.equal(out, ref)
    assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(ac_plan, s.forwards)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cond_uncond_of_different_text_lengths(models, family):
    """Different text lengths force separate cond / uncond forwards; each keeps its own cache."""
    _need(family)
    model = models[family]
    full_plan, ac_plan = H.plan_pair(model)
    kw = dict(cfg=3.5, pos_tokens=300 if family == "flux" else 154, neg_tokens=40)
    ref = H.ksample(model, family, **kw)
    assert torch.equal(H.ksample(A.apply_dfa(model, plan=full_plan), family, **kw), ref)
    ac = A.apply_dfa(model, plan=ac_plan)
    H.ksample(ac, family, **kw)
    s = H.last_summary(ac)
    assert s.fallbacks == {}
    assert len(s.forwards) == 8 and len({f.cache_key for f in s.forwards}) == 2
    assert all(f.cache_key[2] == 1 for f in s.forwards)
    assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(ac_plan, s.forwards)


def _call_override(to, func, *args, **kwargs):
    return to[K.SLOT](func, *args, transformer_options=to, _inside_attn_wrapper=True, **kwargs)


def test_override_fallbacks_are_exact_and_warned_once(models, caplog):
    """Calls the plan does not describe run the host's backend unchanged: a regional mask, Lq != Lk, head or layout mismatch,
    unknown layer; one warning per kind per run; no exception ever leaves the override."""
    _need("flux")
    import comfy.ldm.modules.attention as attention

    func = attention.attention_basic.__wrapped__  # the undecorated backend, as wrap_attn hands it over
    model = models["flux"]
    _, ac_plan = H.plan_pair(model)
    base = A.standalone_run(model, ac_plan, backend="sdpa")
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 16, 32, 32)
    ctx = torch.zeros(1, 32, 64)
    to = K.forward_options(base, x, torch.tensor([0.5]), ctx)
    to = {**to, "block_type": "double", "block_index": 0}

    def qkv(heads=2, seq=288, dim=128, kv_seq=None):
        q = torch.randn(1, heads, seq, dim, generator=g)
        k = torch.randn(1, heads, kv_seq or seq, dim, generator=g)
        return q, k, torch.randn_like(k)

    cases = {
        "mask": (qkv(), dict(mask=torch.full((288, 288), -1.0)), to),  # regional (image columns); text-only masks route
        "Lq != Lk": (qkv(kv_seq=300), {}, to),
        "head mismatch": (qkv(heads=2, dim=64), {}, to),
        "layout": (qkv(seq=300), {}, to),
        "unknown layer": (qkv(), {}, {**to, "block_index": 7}),
    }
    with caplog.at_level(logging.WARNING, logger="dfav2.nodes"):
        for _ in range(2):
            for name, ((q, k, v), extra, opts) in cases.items():
                heads = q.shape[1]
                got = _call_override(opts, func, q, k, v, heads, skip_reshape=True, **extra)
                want = func(q, k, v, heads, skip_reshape=True, **extra)
                assert torch.equal(got, want), name
    summary = A.finish_run(base)
    assert set(summary.fallbacks) == set(cases) and all(n == 2 for n in summary.fallbacks.values())
    ours = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("dfav2")]
    assert len(ours) == len(cases)


def test_chaining_previous_and_later_overrides(models):
    """An override installed before DFAApply serves the dense heads; one installed after it is chained too."""
    _need("flux")
    model = models["flux"]
    full_plan, ac_plan = H.plan_pair(model)
    ref = H.ksample(model, "flux")

    class Counting:
        def __init__(self):
            self.calls = 0

        def __deepcopy__(self, memo):
            return self

        def __call__(self, func, *args, **kwargs):
            self.calls += 1
            return func(*args, **kwargs)

    before = Counting()
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[K.SLOT] = before
    patched = A.apply_dfa(m, plan=full_plan)
    assert torch.equal(H.ksample(patched, "flux"), ref)
    assert before.calls == H.last_summary(patched).attention_calls == 24
    before.calls = 0
    patched = A.apply_dfa(m, plan=ac_plan)
    H.ksample(patched, "flux")
    assert before.calls > 0 and H.last_summary(patched).engine_calls > 0

    after = Counting()  # a non-chaining node placed after DFAApply takes the slot
    later = A.apply_dfa(model, plan=full_plan).clone()
    later.model_options["transformer_options"][K.SLOT] = after
    assert torch.equal(H.ksample(later, "flux"), ref)
    assert after.calls == 24 and H.last_summary(later).attention_calls == 24


def test_two_patched_models_do_not_interfere(models):
    """Two clones with different plans, sampled alternately: each run is reproducible and follows its own plan;
    the input model is never modified."""
    _need("flux")
    model = models["flux"]
    sig = Ly.model_signature(model)
    sigmas = H.schedule_sigmas(model)
    plan_a, plan_b = H.arrow_cache_plan(sig, sigmas, 8), H.arrow_cache_plan(sig, sigmas, 32)
    a, b = A.apply_dfa(model, plan=plan_a), A.apply_dfa(model, plan=plan_b)
    out_a1 = H.ksample(a, "flux", cfg=3.5)
    out_b1 = H.ksample(b, "flux", cfg=3.5)
    out_a2 = H.ksample(a, "flux", cfg=3.5)
    assert torch.equal(out_a1, out_a2) and not torch.equal(out_a1, out_b1)
    for m, plan in ((a, plan_a), (b, plan_b)):
        s = H.last_summary(m)
        assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(plan, s.forwards)
    assert K.SLOT not in model.model_options.get("transformer_options", {})
    import comfy.patcher_extension

    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, K.WRAPPER_KEY)


@pytest.mark.parametrize("start,end", [(0.5, 1.0), (0.0, 0.5)])
def test_percent_range(models, start, end):
    model = models["sd3"]
    _, ac_plan = H.plan_pair(model)
    ac = A.apply_dfa(model, plan=ac_plan, start_percent=start, end_percent=end)
    H.ksample(ac, "sd3", steps=4)
    s = H.last_summary(ac)
    ms = model.get_model_object("model_sampling")
    lo = float(ms.percent_to_sigma(end)) if end < 1 else -1.0
    hi = float(ms.percent_to_sigma(start)) if start > 0 else 2.0
    for f in s.forwards:
        assert (f.position is not None) == (lo < f.sigma <= hi), (f, lo, hi)
    assert any(f.position is None for f in s.forwards) and any(f.position is not None for f in s.forwards)
    assert (s.cache_hits, s.cache_misses) == H.expected_cache_counts(ac_plan, s.forwards)


def test_apply_errors(models):
    sd3_plan, _ = H.plan_pair(models["sd3"])
    with pytest.raises(ValueError, match="start_percent"):
        A.apply_dfa(models["sd3"], plan=sd3_plan, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError) as err:
        A.apply_dfa(models["sd35m"], plan=sd3_plan)
    assert "plan has 2 attention layers but the model has 3" in str(err.value)
    if _flux_ok():
        with pytest.raises(ValueError) as err:
            A.apply_dfa(models["flux"], plan=sd3_plan)
        assert "plan is for sd3 but the model is flux" in str(err.value)


def test_version_gate(models):
    old = HS.HostSupport("0.3.64", override=True, flux_block_identity=False)
    assert "0.3.75" in old.flux_error() and old.sd3_error() is None
    assert "0.3.59" in HS.HostSupport("0.3.50", override=False, flux_block_identity=False).sd3_error()
    support = HS.host_support()
    assert support.override  # both test hosts have the override hook
    if not support.flux_block_identity:  # the real old host: Flux is refused with the version, SD3 works
        plan, _ = H.plan_pair(models["sd3"])
        sig = Ly.model_signature(models["flux"])
        flux_plan = H.all_full_plan(sig, H.schedule_sigmas(models["flux"]))
        with pytest.raises(RuntimeError, match=r"0\.3\.75"):
            A.apply_dfa(models["flux"], plan=flux_plan)
        assert A.apply_dfa(models["sd3"], plan=plan) is not models["sd3"]


def test_nodes_execute_with_plan_files(models, tmp_path, monkeypatch):
    import folder_paths

    from dfav2.calibration.plan import save_plan
    from dfav2.nodes import plans as P
    from dfav2.nodes.v3 import DFAApply, DFALoadPlan, DFAExtension

    monkeypatch.setitem(folder_paths.folder_names_and_paths, P.FOLDER, ([str(tmp_path)], {".json"}))
    model = models["sd3"]
    full_plan, ac_plan = H.plan_pair(model)
    save_plan(ac_plan, tmp_path / "sd3_ac.json")
    (tmp_path / "notes.txt").write_text("not a plan")
    schema = DFAApply.define_schema()
    combo = next(i for i in schema.inputs if i.id == "plan")
    assert combo.options == ["sd3_ac.json", P.NO_PLAN]
    assert all(i.tooltip for i in schema.inputs)
    assert schema.node_id == "DFAApply" and schema.display_name == "DiTFastAttnV2 Apply"

    fp1 = DFAApply.fingerprint_inputs(plan="sd3_ac.json")
    out = DFAApply.execute(model=model, plan="sd3_ac.json", enabled=True, start_percent=0.0, end_percent=1.0)
    patched = out.args[0]
    assert patched is not model and patched.model_options["transformer_options"][A.TO_PATCH].plan == ac_plan
    save_plan(full_plan, tmp_path / "sd3_ac.json", overwrite=True)  # editing the file re-runs the node
    assert DFAApply.fingerprint_inputs(plan="sd3_ac.json") != fp1

    out = DFAApply.execute(model=model, plan=P.NO_PLAN, enabled=True, start_percent=0.0, end_percent=1.0,
                           dfa_plan=ac_plan)  # the connected plan wins
    assert out.args[0].model_options["transformer_options"][A.TO_PATCH].plan == ac_plan
    with pytest.raises(ValueError, match="no plan selected"):
        DFAApply.execute(model=model, plan=P.NO_PLAN, enabled=True, start_percent=0.0, end_percent=1.0)
    (tmp_path / "broken.json").write_text('{"format": "dfav2-plan"}')
    with pytest.raises(ValueError, match="broken.json"):
        DFAApply.execute(model=model, plan="broken.json", enabled=True, start_percent=0.0, end_percent=1.0)

    loaded, summary = DFALoadPlan.execute(plan="sd3_ac.json").args
    assert loaded == full_plan and "sd3" in summary
    import asyncio

    assert asyncio.run(DFAExtension().get_node_list())[:2] == [DFAApply, DFALoadPlan]


@pytest.mark.parametrize("family,sampler,cfg", [("flux", "euler", 1.0), ("sd35m", "heun", 3.5)])
def test_calibration_pass_then_apply_reproduces_it(models, family, sampler, cfg):
    """DFACalibrate's pass (CalibrationPatch through the same hooks) and DFAApply of the resulting plan give the
    same latent: the plan replays exactly what calibration measured."""
    _need(family)
    # Imported unguarded: the calibration node ships with the pack, so an ImportError here is a failure, not a skip.
    from dfav2.calibration.search import SearchConfig
    from dfav2.nodes.calibrate import calibrate_dfa

    model = models[family]
    pos, neg = H.conditioning(family, 32, 1), H.conditioning(family, 32, 2)
    res = calibrate_dfa(model, positive=pos, negative=neg, width=256, height=256, steps=4, cfg=cfg,
                        sampler_name=sampler, scheduler="simple", seed=0, config=SearchConfig(delta=0.5), backend="sdpa")
    assert res.plan.model == Ly.model_signature(model) and res.plan.calibration.txt_len == 32
    patched = A.apply_dfa(model, plan=res.plan)
    out = H.ksample(patched, family, sampler=sampler, cfg=cfg)
    assert torch.equal(out, res.samples)
    s = H.last_summary(patched)
    assert s.fallbacks == {} and (s.cache_hits, s.cache_misses) == H.expected_cache_counts(res.plan, s.forwards)


def test_run_that_differs_from_the_calibration_warns_once(models, caplog):
    """README's mapping rule: a run with another step count or resolution than the plan's calibration works
    (mapped by sigma) and says so once per run."""
    import dataclasses

    from dfav2.calibration.plan import CalibrationRecord

    model = models["sd3"]
    full_plan, _ = H.plan_pair(model)
    record = CalibrationRecord(
        delta=0.4, candidates=("full", "cache"), prompts=1, steps=28, sampler="euler", scheduler="simple", cfg=1.0,
        guidance=None, width=1024, height=1024, txt_len=154, seed=0, host_version="test", pack_version="test",
        date="2026-11-24", wall_time_s=1.0,
    )
    patched = A.apply_dfa(model, plan=dataclasses.replace(full_plan, calibration=record))
    with caplog.at_level(logging.WARNING):
        H.ksample(patched, "sd3")
    notes = [r.getMessage() for r in caplog.records if "differs from the plan's calibration" in r.getMessage()]
    assert len(notes) == 1
    assert "4 steps instead of 28" in notes[0] and "instead of 4096 (1024x1024)" in notes[0]
    caplog.clear()
    same = dataclasses.replace(record, steps=4, width=256, height=256)
    patched = A.apply_dfa(model, plan=dataclasses.replace(full_plan, calibration=same))
    with caplog.at_level(logging.WARNING):
        H.ksample(patched, "sd3")
    assert not [r for r in caplog.records if "differs from the plan's calibration" in r.getMessage()]
