"""DFACalibrate inside a real ComfyUI (in-process, CPU): tiny Flux / SD3.5-M-like models loaded by the host's loader,
the calibration pass run by the host's sampler, plan files in a temporary dfa_plans folder, and the `demo` command.
(Knapsack vs brute force and the metric are covered host-free in tests/test_calibration.py.)"""

import asyncio
import os
import subprocess
import sys

import pytest

import dfa_hostenv as H

H.skip_module_without_host()
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("host")]

import torch  # noqa: E402

from dfav2.calibration.cli import flops_kept  # noqa: E402
from dfav2.calibration.plan import load_plan  # noqa: E402
from dfav2.nodes import adapter as A  # noqa: E402
from dfav2.nodes import host as HS  # noqa: E402
from dfav2.nodes import hooks as K  # noqa: E402

FAMILIES = ("flux", "sd35m")


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


def _calibrate(model, family, *, batch=2, **kw):
    from dfav2.nodes.calibrate import calibrate_plan_node

    args = dict(model=model, positive=_batch_cond(family, batch, 1), negative=H.conditioning(family, 32, 2),
                width=256, height=256, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", seed=0,
                delta=0.4, plan_name="p", overwrite=False, backend="sdpa")
    args.update(kw)
    return calibrate_plan_node(**args)


def _batch_cond(family, batch, seed):
    conds = [H.conditioning(family, 32, seed + 10 * i)[0] for i in range(batch)]
    extra = dict(conds[0][1], pooled_output=torch.cat([c[1]["pooled_output"] for c in conds]))
    return [[torch.cat([c[0] for c in conds]), extra]]


def _untouched(model):
    """The input model carries none of our patch: no override, no dfav2 wrappers or callbacks."""
    to = model.model_options.get("transformer_options", {})
    assert K.SLOT not in to and A.TO_PATCH not in to and K.TO_RUN not in to
    for group in ("wrappers", "callbacks"):
        for per_type in to.get(group, {}).values():
            assert K.WRAPPER_KEY not in per_type, (group, per_type.keys())


@pytest.mark.parametrize("family,size,candidates", [
    ("flux", 256, "cache + arrow 8/16/32 (default)"),
    ("sd35m", 256, "cache + arrow 8/16/32 (default)"),
    ("sd35m", 512, "arrow 8/16/32 only"),  # 1024 image tokens: arrows save whole 128-token tiles
])
def test_delta_zero_is_all_full_and_rising_delta_never_keeps_more(models, family, size, candidates, plans_dir):
    _need(family)
    tiled, exact, arrows = [], [], 0
    for i, delta in enumerate((0.0, 0.02, 0.1, 0.5, 2.0)):
        res = _calibrate(models[family], family, delta=delta, plan_name=f"d{i}", candidates=candidates, width=size,
                         height=size)
        if delta == 0:
            assert set(res.plan.method_counts()) == {"full"}
            assert "methods: full 100.0%" in res.summary
        c = res.plan.calibration
        e, t = flops_kept(res.plan, width=c.width, height=c.height, txt_len=c.txt_len)
        tiled.append(t)
        exact.append(e)
        arrows += sum(n for m, n in res.plan.method_counts().items() if m.startswith("arrow"))
    assert tiled[0] == exact[0] == 1.0 and tiled[-1] < 1.0, tiled
    assert all(b <= a + 1e-12 for a, b in zip(tiled, tiled[1:])), tiled
    assert all(b <= a + 1e-12 for a, b in zip(exact, exact[1:])), exact
    if candidates.startswith("arrow"):
        assert arrows > 0


@pytest.mark.parametrize("family,sampler,cfg", [("flux", "euler", 1.0), ("sd35m", "heun", 3.5)])
def test_calibrated_plan_applied_reproduces_the_calibration_latent(models, family, sampler, cfg, plans_dir):
    """DFAApply (the node) with the plan from the node function, same prompts (batch 2) and seed, through the host's
    KSampler: the latent equals the calibration pass's bit for bit (the plan replays what calibration fed forward)."""
    _need(family)
    import nodes

    from dfav2.nodes.v3 import DFAApply

    model = models[family]
    res = _calibrate(model, family, sampler_name=sampler, cfg=cfg, delta=1.0, seed=7)
    counts = res.plan.method_counts()
    assert counts["full"] < sum(counts.values())  # something was compressed
    patched = DFAApply.execute(model=model, plan="none", enabled=True, start_percent=0.0, end_percent=1.0,
                               dfa_plan=res.plan).args[0]
    latent = H.empty_latent(256, 256, 2)
    out = nodes.common_ksampler(patched, 7, 4, cfg, sampler, "simple", _batch_cond(family, 2, 1),
                                H.conditioning(family, 32, 2), latent)[0]["samples"]
    assert torch.equal(out, res.samples), (out - res.samples).abs().max()
    s = patched.model_options["transformer_options"][A.TO_PATCH].last_summary
    assert s.fallbacks == {} and (s.cache_hits, s.cache_misses) == H.expected_cache_counts(res.plan, s.forwards)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_on_calibrates_fp8_heads_by_emulation_and_applies_them_in_bf16(models, family, plans_dir, caplog,
                                                                          monkeypatch):
    """fp8 "on" without FP8 tensor cores (here: CPU): the search measures FP8 by emulation, so the plan may hold FP8
    heads; the record carries the cost factor; a re-run reuses the file; DFAApply runs the FP8 heads in bf16 (one
    warning), exactly as the same plan without quantization. With today's measured factor (1.01: FP8 heads no
    faster than bf16 on an H200) the search never picks FP8, so this test models a faster FP8 kernel (factor 0.6)."""
    _need(family)
    import logging

    import nodes

    from dfav2.calibration.plan import Plan, PlanPosition
    from dfav2.kernels import cost
    from dfav2.nodes.v3 import DFAApply

    monkeypatch.setattr(cost, "FP8_COST_FACTOR", 0.6)
    FP8_COST_FACTOR = 0.6

    model = models[family]
    kw = dict(delta=1.0, seed=3, candidates="arrow 8/16/32 only", plan_name="f8")  # cache would win every head here
    res = _calibrate(model, family, fp8="on", **kw)
    cal = res.plan.calibration
    assert cal.fp8_cost_factor == FP8_COST_FACTOR and "full+fp8" in cal.candidates
    fp8 = sum(n for m, n in res.plan.method_counts().items() if m.endswith("+fp8"))
    assert fp8 > 0 and "FP8 heads:" in res.summary
    again = _calibrate(model, family, fp8="on", **kw)
    assert again.samples is None and again.plan == res.plan  # the same calibration: loaded
    monkeypatch.setattr(cost, "FP8_COST_FACTOR", 1.08)
    with pytest.raises(ValueError, match="fp8_cost_factor"):
        _calibrate(model, family, fp8="on", **kw)  # another cost model: another calibration, refused
    monkeypatch.setattr(cost, "FP8_COST_FACTOR", 0.6)
    with pytest.raises(ValueError, match="candidates"):
        _calibrate(model, family, fp8="off", **kw)  # another calibration: refused

    plain = Plan(res.plan.model, tuple(PlanPosition(p.sigma, tuple(d.unquantized for d in p.layers))
                                       for p in res.plan.positions))
    outs = []
    with caplog.at_level(logging.WARNING):
        for plan in (res.plan, plain):
            patched = DFAApply.execute(model=model, plan="none", enabled=True, start_percent=0.0, end_percent=1.0,
                                       dfa_plan=plan).args[0]
            outs.append(nodes.common_ksampler(patched, 3, 4, 1.0, "euler", "simple", _batch_cond(family, 2, 1),
                                              H.conditioning(family, 32, 2), H.empty_latent(256, 256, 2))[0]["samples"])
            s = patched.model_options["transformer_options"][A.TO_PATCH].last_summary
            assert s.fallbacks == {} and (s.fp8_heads > 0) == (plan is res.plan)
    assert torch.equal(outs[0], outs[1])
    assert len([r for r in caplog.records if "FP8 heads run in" in r.getMessage()]) <= 1


def test_same_inputs_same_plan_and_file_loads_in_a_fresh_process(models, plans_dir):
    fam = "sd35m"
    a = _calibrate(models[fam], fam, plan_name="a", delta=0.5)
    b = _calibrate(models[fam], fam, plan_name="b", delta=0.5)
    assert a.plan.positions == b.plan.positions and a.plan.model == b.plan.model
    assert torch.equal(a.samples, b.samples)
    assert a.path == plans_dir / "a.json" and load_plan(a.path).positions == a.plan.positions
    r = subprocess.run([sys.executable, str(H.PACK_ROOT), "validate", str(a.path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("valid plan: sd3"), (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, str(H.PACK_ROOT), "inspect", str(a.path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "attention FLOPs kept" in r.stdout, r.stderr


def test_existing_file_is_not_replaced_without_overwrite(models, plans_dir):
    fam = "sd35m"
    taken = plans_dir / "taken.json"
    taken.write_text("precious")
    steps = []
    with pytest.raises(ValueError, match="already exists but is not a readable DiTFastAttnV2 plan .*no calibration was run"):
        _calibrate(models[fam], fam, plan_name="taken", on_step=lambda s, t: steps.append(s))
    assert taken.read_text() == "precious" and steps == []  # refused before sampling
    res = _calibrate(models[fam], fam, plan_name="taken.json", overwrite=True)
    assert res.path == taken and load_plan(taken).positions == res.plan.positions
    assert sorted(p.name for p in plans_dir.iterdir()) == ["taken.json"]  # no temp files left
    # names are sanitised: no path separators, no leading dots
    res = _calibrate(models[fam], fam, plan_name="../evil/na me")
    assert res.path == plans_dir / "evil_na_me.json"
    with pytest.raises(ValueError, match="no usable characters"):
        _calibrate(models[fam], fam, plan_name="../")


def test_rerun_with_same_settings_loads_the_file_and_changed_settings_fail_with_both_records(models, plans_dir):
    """Calibrate once: the same model and settings load the existing file (no sampling, fast); anything that changes
    the calibration fails before sampling and shows both records; overwrite on calibrates again."""
    import time

    fam = "sd35m"
    model = models[fam]
    kw = dict(plan_name="once", delta=0.5, cfg=2.0)
    first = _calibrate(model, fam, **kw)
    path = plans_dir / "once.json"
    text = path.read_text()
    assert first.samples is not None and "calibration: " in first.summary
    assert first.plan.calibration.conditioning.startswith("c1:")

    steps = []
    t0 = time.perf_counter()
    again = _calibrate(model, fam, on_step=lambda s, t: steps.append(s), **kw)
    elapsed = time.perf_counter() - t0
    assert steps == [] and again.samples is None and elapsed < 2.0, elapsed
    assert again.path == path and path.read_text() == text  # not rewritten
    assert again.plan.positions == first.plan.positions and again.plan.calibration == first.plan.calibration
    assert "loaded, not calibrated again" in again.summary and "attention FLOPs kept" in again.summary

    changed = {
        "delta": (dict(delta=0.2), "delta: file 0.5, now 0.2"),
        "steps": (dict(steps=3), "steps: file 4, now 3"),
        "seed": (dict(seed=5), "seed: file 0, now 5"),
        "size": (dict(width=128), "width: file 256, now 128"),
        "sampler": (dict(sampler_name="heun"), "sampler: file euler, now heun"),
        "candidates": (dict(candidates="cache only"), "candidates: file full/cache/arrow/8/arrow/16/arrow/32, now full/cache"),
        "prompts": (dict(positive=_batch_cond(fam, 2, 4)), "conditioning: file c1:"),
        "negative at cfg 2": (dict(negative=H.conditioning(fam, 32, 9)), "conditioning: file c1:"),
    }
    for what, (change, needle) in changed.items():
        with pytest.raises(ValueError) as err:
            _calibrate(model, fam, on_step=lambda s, t: steps.append(s), **{**kw, **change})
        msg = str(err.value)
        assert needle in msg, (what, msg)
        assert "overwrite is off" in msg and "\nfile: sd3 (" in msg and "\nnow:  sd3 (" in msg, msg
        assert "delta 0.5" in msg.split("\nfile: ")[1].split("\n")[0]  # the file's whole record
        assert steps == [] and path.read_text() == text, what
    with pytest.raises(ValueError, match="model: plan has 3 attention layers but the model has 2"):
        _calibrate(models["sd3"], "sd3", **kw)
    # at cfg 1 the negative is never sampled: another negative is still the same calibration
    one = _calibrate(model, fam, plan_name="cfg1", delta=0.5)
    assert _calibrate(model, fam, plan_name="cfg1", delta=0.5, negative=H.conditioning(fam, 32, 9)).samples is None

    redo = _calibrate(model, fam, on_step=lambda s, t: steps.append(s), **{**kw, "delta": 0.2, "overwrite": True})
    assert steps == [1, 2, 3, 4] and redo.samples is not None and redo.plan.calibration.delta == 0.2
    assert load_plan(path).calibration == redo.plan.calibration and one.samples is not None


def test_node_rerun_with_clip_loads_the_file(models, plans_dir):
    from dfav2.nodes.v3 import DFACalibrate

    kw = dict(model=models["sd35m"], clip=_FakeClip(), prompts="a fox\na lighthouse", negative_prompt="", width=128,
              height=128, steps=3, cfg=1.0, guidance=3.5, sampler_name="euler", scheduler="simple", seed=1, delta=0.4,
              candidates="cache only", plan_name="node_once", overwrite=False)
    first = DFACalibrate.execute(**kw)
    again = DFACalibrate.execute(**kw)
    assert again.args[0].positions == first.args[0].positions
    assert "loaded, not calibrated again" in again.args[1] and again.ui.as_dict()["text"] == (again.args[1],)
    with pytest.raises(ValueError, match="conditioning: file c1:"):
        DFACalibrate.execute(**{**kw, "prompts": "a fox\na cathedral"})


@pytest.mark.parametrize("how", ["callback", "host interrupt flag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_interrupt_leaves_no_file_and_the_model_unpatched(models, family, plans_dir, how, monkeypatch, caplog):
    _need(family)
    import comfy.model_management as mm
    import comfy.utils

    model = models[family]
    ref = H.ksample(model, family)
    seen = []

    def on_step(step, total):
        seen.append(step)
        if step == 2:
            if how == "callback":
                raise mm.InterruptProcessingException()
            mm.interrupt_current_processing()  # what POST /interrupt does; the server's progress hook raises

    if how != "callback":
        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda *a, **k: mm.throw_exception_if_processing_interrupted())
    with caplog.at_level("WARNING"), pytest.raises(mm.InterruptProcessingException):
        _calibrate(model, family, plan_name="never", on_step=on_step)
    mm.interrupt_current_processing(False)
    assert seen[-1] in (2, 3) and list(plans_dir.iterdir()) == []
    assert "no plan was written" in caplog.text
    _untouched(model)
    assert torch.equal(H.ksample(model, family), ref)  # the input model samples exactly as before


def test_out_of_memory_mid_calibration(models, plans_dir, monkeypatch):
    from dfav2.calibration.search import ProgressiveCalibrator

    fam = "sd35m"
    model = models[fam]
    ref = H.ksample(model, fam)
    orig = ProgressiveCalibrator.attend

    def attend(self, *a, **k):
        if self.position >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return orig(self, *a, **k)

    monkeypatch.setattr(ProgressiveCalibrator, "attend", attend)
    steps = []
    with pytest.raises(torch.OutOfMemoryError, match="No plan was written") as err:
        _calibrate(model, fam, plan_name="oom", on_step=lambda s, t: steps.append(s))
    assert "ran out of memory" in str(err.value) and "80.00 GiB" in str(err.value)
    assert steps == [1, 2]  # stopped at the first step after the failure, not after the whole pass
    monkeypatch.setattr(ProgressiveCalibrator, "attend", orig)

    def host_oom(step, total):  # an OOM outside our attention path (the host's own layers)
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (host layer)")

    with pytest.raises(torch.OutOfMemoryError, match="No plan was written"):
        _calibrate(model, fam, plan_name="oom", on_step=host_oom)
    assert list(plans_dir.iterdir()) == []
    _untouched(model)
    assert torch.equal(H.ksample(model, fam), ref)


class _FakeClip:
    """Stands in for a CLIP: deterministic per-prompt conditioning, text length depending on the prompt."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)) % 10_000)
        length = 16 + len(tokens) % 17
        return [[torch.randn(1, length, H.CONTEXT_DIM, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]


def test_node_schema_and_execute_with_clip_and_prompt_list(models, plans_dir):
    from dfav2.calibration.prompts import DEFAULT_PROMPTS
    from dfav2.calibration.search import DEFAULT_DELTA
    from dfav2.nodes.calibrate import CANDIDATE_SETS
    from dfav2.nodes.v3 import CATEGORY, DFACalibrate, DFAExtension

    schema = DFACalibrate.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == ("DFACalibrate", "DiTFastAttnV2 Calibrate", CATEGORY)
    assert schema.is_output_node  # a calibrate-only workflow can be queued
    inputs = {i.id: i for i in schema.inputs}
    assert all(i.tooltip for i in schema.inputs)
    assert inputs["prompts"].default.splitlines() == list(DEFAULT_PROMPTS) and len(DEFAULT_PROMPTS) == 8
    assert inputs["delta"].default == DEFAULT_DELTA and (inputs["delta"].min, inputs["delta"].max) == (0.0, 2.0)
    assert inputs["candidates"].options == list(CANDIDATE_SETS)
    assert (inputs["sampler_name"].default, inputs["scheduler"].default) == ("euler", "simple")
    assert (inputs["width"].default, inputs["height"].default, inputs["steps"].default) == (1024, 1024, 28)
    assert inputs["overwrite"].default is False and inputs["plan_name"].default == "my_plan"
    assert {k for k, i in inputs.items() if i.optional} == {"clip", "positive", "negative", "fp8"}
    assert inputs["fp8"].options == ["off", "on", "auto"] and inputs["fp8"].default == "off"  # API workflows: unchanged
    assert DFACalibrate in asyncio.run(DFAExtension().get_node_list())

    out = DFACalibrate.execute(
        model=models["sd35m"], clip=_FakeClip(), prompts="a fox\n\n  a cathedral \na lighthouse", negative_prompt="",
        width=128, height=128, steps=3, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="simple", seed=1,
        delta=0.4, candidates="cache only", plan_name="from_clip", overwrite=False)
    plan, summary = out.args
    assert plan.calibration.prompts == 3 and plan.calibration.guidance is None  # SD3: no guidance recorded
    assert set(plan.method_counts()) <= {"full", "cache"}
    assert "estimated attention speed-up" in summary and "from_clip.json" in summary
    assert "attention FLOPs kept" in summary and load_plan(plans_dir / "from_clip.json").positions == plan.positions
    with pytest.raises(ValueError, match="needs prompts"):
        DFACalibrate.execute(
            model=models["sd35m"], prompts="x", negative_prompt="", width=128, height=128, steps=3, cfg=1.0,
            guidance=3.5, sampler_name="euler", scheduler="simple", seed=1, delta=0.4, candidates="cache only",
            plan_name="none_given", overwrite=False)


def test_demo_command(tmp_path):
    """The README's main job on a shipped reference model (SD3.5-M, the smaller one), small enough for CPU CI."""
    env = dict(os.environ, COMFYUI_PATH=str(H.COMFY_PATH))
    # `python <pack> demo ...` through launch_demo.py, which only moves ComfyUI's base directory to a temporary
    # folder (otherwise importing ComfyUI creates <ComfyUI>/input in the host tree).
    base = tmp_path / "comfy_base"
    r = subprocess.run([sys.executable, str(H.HERE / "launch_demo.py"), str(base), str(H.PACK_ROOT), "demo",
                        "--model", "sd35m", "--steps", "4", "--images", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = r.stdout
    for needle in ("DiTFastAttnV2 demo: ComfyUI", "reference sd35m", "attention FLOPs kept at 512x512", "methods: full",
                   "unpatched: ", "patched:   ", "dense fallbacks 0", "compressed vs uncompressed: PSNR",
                   "ground truth", "demo: OK"):
        assert needle in out, (needle, out)
    plans = list(tmp_path.glob("demo_*.json"))
    assert len(plans) == 1 and load_plan(plans[0]).model.family == "sd3"
    pngs = list(tmp_path.glob("demo_*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
