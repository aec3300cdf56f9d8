"""FP8 heads in plans and calibration (issue 11): plan files (old files stay valid, FP8 methods round-trip, an unknown
method is named and said to need a newer pack), the picture and summaries, and the progressive search with FP8
candidates (measured by emulation on CPU, weighed by the cost factor)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dfav2.calibration import CalibrationRecord, LayerSpec, ModelSignature, Plan, PlanError, PlanPosition
from dfav2.calibration import dumps_plan, load_plan, loads_plan
from dfav2.calibration.cli import flops_kept, summarize, time_kept
from dfav2.calibration.metric import head_rse
from dfav2.calibration.picture import draw_plan, method_colours
from dfav2.calibration.search import DEFAULT_CANDIDATES, ProgressiveCalibrator, SearchConfig, with_fp8
from dfav2.kernels import (
    CACHE,
    FULL,
    FULL_FP8,
    CallContext,
    Geometry,
    HeadMethod,
    HeadwiseEngine,
    LayerDecision,
    arrow,
    fp8_attention_reference,
    head_cost,
)
from dfav2.nodes.calibrate import CANDIDATE_SETS, FP8_MODES, search_candidates

FIXTURE = Path(__file__).parent / "fixtures" / "plan_v1_before_fp8.json"
FP8_METHODS = (FULL_FP8, arrow(8, fp8=True), arrow(16, fp8=True), arrow(32, fp8=True))


def fp8_plan(seed: int = 0, heads: int = 6, factor: float | None = 0.6) -> Plan:
    rng = np.random.default_rng(seed)
    model = ModelSignature("flux", (LayerSpec("double.0", heads, 64), LayerSpec("single.0", heads, 128)))
    choices = [FULL, CACHE, arrow(8), arrow(16), arrow(32), *FP8_METHODS]
    positions = []
    for p in range(5):
        layers = tuple(
            LayerDecision(tuple(FULL if p == 0 else choices[i] for i in rng.integers(0, len(choices), heads)))
            for _ in model.layers
        )
        positions.append(PlanPosition(1.0 - p / 5, layers))
    cal = CalibrationRecord(
        delta=0.2, candidates=("full",) + tuple(m.name for m in with_fp8(DEFAULT_CANDIDATES)), prompts=2, steps=5,
        sampler="euler", scheduler="simple", cfg=1.0, guidance=3.5, width=512, height=512, txt_len=64, seed=1,
        host_version="0.33.0", pack_version="test", date="2026-12-01T00:00:00Z", wall_time_s=1.0,
        fp8_cost_factor=factor,
    )
    return Plan(model, tuple(positions), cal, "fp8 plan")


# ---------------------------------------------------------------------------------------------- plan files


def test_a_plan_written_before_fp8_still_loads_and_writes_back_byte_identical():
    text = FIXTURE.read_text()
    plan = load_plan(FIXTURE)
    assert plan.calibration is not None and plan.calibration.fp8_cost_factor is None
    assert not any(m.fp8 for c in plan.layer_method_counts() for m in c)
    assert dumps_plan(plan) == text  # same legend codes, no new field for plans without FP8
    assert "fp8" not in text


@pytest.mark.parametrize("seed", range(4))
def test_fp8_plan_round_trips_with_the_preferred_codes(seed):
    plan = fp8_plan(seed)
    text = dumps_plan(plan)
    back = loads_plan(text)
    assert back == plan and back.calibration.fp8_cost_factor == 0.6
    legend = json.loads(text)["legend"]
    want = {"Q": "full+fp8", "A": "arrow/8+fp8", "B": "arrow/16+fp8", "E": "arrow/32+fp8"}
    assert {c: n for c, n in legend.items() if n.endswith("+fp8")} == {c: n for c, n in want.items()
                                                                       if n in legend.values()}
    counts = back.method_counts()
    assert sum(n for name, n in counts.items() if name.endswith("+fp8")) > 0
    assert counts == plan.method_counts()
    # decoded decisions carry the quant table the engine hands the kernel
    dec = back.decision(1, 0)
    assert dec.quant == tuple(int(m.fp8) for m in dec.methods)


def test_fp8_cost_factor_is_optional_and_validated():
    plan = fp8_plan(0, factor=None)
    assert "fp8_cost_factor" not in dumps_plan(plan) and loads_plan(dumps_plan(plan)).calibration.fp8_cost_factor is None
    bad = dumps_plan(fp8_plan(0, factor=0.6)).replace('"fp8_cost_factor": 0.6', '"fp8_cost_factor": -1')
    with pytest.raises(PlanError, match="fp8_cost_factor"):
        loads_plan(bad)


@pytest.mark.parametrize("name", ["arrow/8+int4", "full+fp4", "window/8", "cache+fp8"])
def test_an_unknown_method_is_named_and_said_to_need_a_newer_pack(name):
    doc = json.loads(FIXTURE.read_text())
    doc["legend"]["z"] = name
    with pytest.raises(PlanError) as err:
        loads_plan(json.dumps(doc))
    msg = str(err.value)
    assert msg.startswith("plan.legend.z: ") and repr(name) in msg and "newer version" in msg


def test_fp8_in_the_first_position_is_allowed_but_cache_is_not():
    plan = fp8_plan(1)
    first = PlanPosition(1.0, tuple(LayerDecision.uniform(FULL_FP8, s.heads) for s in plan.model.layers))
    ok = Plan(plan.model, (first,) + plan.positions[1:], plan.calibration)
    assert loads_plan(dumps_plan(ok)) == ok


# ---------------------------------------------------------------------------------------------- picture, summary


def test_fp8_variants_get_their_own_colours_next_to_their_method():
    methods = [FULL, CACHE, arrow(8), arrow(16), arrow(32), *FP8_METHODS, arrow(4, fp8=True)]
    colours = method_colours(methods)
    assert len(set(colours.values())) == len(methods)
    names = [m.name for m in colours]
    assert names[:3] == ["full", "full+fp8", "arrow/4+fp8"] and names[-1] == "cache"
    assert names.index("arrow/8+fp8") == names.index("arrow/8") + 1
    grey = colours[FULL_FP8]
    assert grey[0] == grey[1] == grey[2] and grey[0] < colours[FULL][0]  # darker grey than full
    # FP8 arrows darken with the band like the plain ones
    lum = [sum(colours[arrow(f, fp8=True)]) for f in (8, 16, 32)]
    assert lum == sorted(lum, reverse=True)


@pytest.mark.parametrize("seed", range(2))
def test_picture_cells_and_legend_show_fp8_heads(seed):
    plan = fp8_plan(seed)
    pic = draw_plan(plan)
    for name in plan.method_counts():
        assert name in pic.legend_boxes and name in pic.colours
    for p, pos in enumerate(plan.positions):
        for li, dec in enumerate(pos.layers):
            for h, m in enumerate(dec.methods):
                x0, y0, x1, y1 = pic.cell(p, li, h)
                assert np.all(pic.image[y0:y1, x0:x1] == pic.colours[m.name])


def test_summary_counts_fp8_heads_and_weighs_them_in_the_time_bound():
    plan = fp8_plan(2)
    cal = plan.calibration
    counts = plan.method_counts()
    share = sum(n for k, n in counts.items() if k.endswith("+fp8")) / sum(counts.values())
    text = summarize(plan)
    assert f"FP8 heads: {100 * share:.1f}% of all heads" in text and "0.6 of a bf16 pair" in text
    exact, tiled = flops_kept(plan, width=cal.width, height=cal.height, txt_len=cal.txt_len)
    cost = time_kept(plan, width=cal.width, height=cal.height, txt_len=cal.txt_len)
    assert cost < tiled  # FP8 pairs are cheaper than their FLOPs
    assert f"attention-time bound {1 / cost:.2f}x" in text
    assert time_kept(plan, width=cal.width, height=cal.height, txt_len=cal.txt_len, fp8_factor=1.0) == pytest.approx(tiled)
    # a plan without FP8 heads: no FP8 line, the bound is the tiled FLOP share as before
    old = load_plan(FIXTURE)
    assert "FP8" not in summarize(old)
    c = old.calibration
    assert time_kept(old, width=c.width, height=c.height, txt_len=c.txt_len) == flops_kept(
        old, width=c.width, height=c.height, txt_len=c.txt_len)[1]


# ---------------------------------------------------------------------------------------------- calibration


def test_with_fp8_adds_the_variants_once():
    got = with_fp8(DEFAULT_CANDIDATES)
    assert got[:4] == DEFAULT_CANDIDATES and got[4:] == FP8_METHODS
    assert with_fp8(got) == got and with_fp8((CACHE,)) == (CACHE, FULL_FP8)
    SearchConfig(delta=0.1, candidates=got)  # full+fp8 is a compressing candidate; plain full is not
    with pytest.raises(ValueError, match="implicit"):
        SearchConfig(delta=0.1, candidates=(FULL, FULL_FP8))
    with pytest.raises(ValueError, match="fp8_cost_factor"):
        SearchConfig(delta=0.1, fp8_cost_factor=float("nan"))


def test_node_fp8_option_builds_the_candidates():
    assert FP8_MODES == ("off", "on", "auto")
    for name, base in CANDIDATE_SETS.items():
        assert search_candidates(name, "off") == base
        assert search_candidates(name, "on") == with_fp8(base)
        assert search_candidates(name, "auto", torch.device("cpu")) == base  # no FP8 tensor cores on CPU
    with pytest.raises(ValueError, match="fp8"):
        search_candidates(next(iter(CANDIDATE_SETS)), "yes")
    with pytest.raises(ValueError, match="candidate set"):
        search_candidates("nope", "on")


MODEL = ModelSignature("flux", (LayerSpec("double.0", 4, 32), LayerSpec("single.0", 4, 32)))
T, N, B = 9, 119, 2  # odd sequence length
SIGMAS = [1.0, 0.75, 0.5, 0.25]


def inputs(step, layer, carry):
    """bf16 q/k/v with per-channel key offsets. Layer 0 attends locally (positional features of rising sharpness per
    head: arrow fits) and changes fast; layer 1 changes slowly (cache fits)."""
    g = torch.Generator().manual_seed(100 * layer + 5)
    q, k, v = torch.randn(3, B, 4, T + N, 32, generator=g)
    drift = torch.randn(3, B, 4, T + N, 32, generator=torch.Generator().manual_seed(7 * step + layer))
    q, k, v = (x + (0.6 if layer == 0 else 0.02) * step * d for x, d in zip((q, k, v), drift))
    if layer == 0:
        i = torch.arange(T + N, dtype=torch.float32)[:, None]
        freqs = torch.arange(1, 17, dtype=torch.float32)[None, :] / 60.0
        pos = torch.cat([torch.sin(i * freqs), torch.cos(i * freqs)], 1) * 3.0
        sharp = torch.tensor([0.5, 1.0, 1.5, 2.0])[:, None, None]
        q, k = q * 0.1 + pos * sharp, k * 0.1 + pos * sharp
    k = k + torch.linspace(-20, 20, 32)
    if carry is not None:
        v = v + 0.1 * carry.float()
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def calibrate(delta, candidates=with_fp8(DEFAULT_CANDIDATES), factor=0.6):
    cal = ProgressiveCalibrator(MODEL, SearchConfig(delta=delta, candidates=candidates, tile=16, fp8_cost_factor=factor),
                                backend="sdpa")
    for step, sigma in enumerate(SIGMAS):
        cal.begin_forward(sigma)
        carry = None
        for layer in range(2):
            q, k, v = inputs(step, layer, carry)
            carry = cal.attend(CallContext(layer, cal.position, T), q, k, v)
    return cal


def fp8_count(plan):
    return sum(n for name, n in plan.method_counts().items() if name.endswith("+fp8"))


def test_cpu_calibration_measures_the_fp8_error_by_emulation():
    cal = calibrate(0.5)
    cands = cal.config.candidates
    i_full8 = cands.index(FULL_FP8)
    i_a8, i_a8q = cands.index(arrow(8)), cands.index(arrow(8, fp8=True))
    for pos, layer, rse in cal.rse_log:
        assert np.all(rse[:, i_full8] > 1e-5)  # FP8's real error, not the zero of a bf16 stand-in
        assert np.all(rse[:, i_full8] < 0.1)
        assert np.all(rse[:, i_a8q] >= rse[:, i_a8] * 0.9)  # FP8 on top of the band adds error
    # the measured error is exactly head_rse of the emulation against dense (first searched call)
    q, k, v = inputs(1, 0, None)
    pos, layer, rse = cal.rse_log[0]
    assert (pos, layer) == (1, 0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    emulated = fp8_attention_reference(q, k, v, FULL_FP8.window(N), T)
    np.testing.assert_allclose(rse[:, i_full8], head_rse(emulated, dense).numpy(), rtol=1e-5)


def test_candidates_that_save_nothing_are_not_run_and_change_no_choice():
    # at an FP8 factor >= 1 full+fp8 saves nothing: the search skips it (inf, never run) and every choice is the one a
    # search without it makes
    cands = with_fp8(DEFAULT_CANDIDATES)
    cal = calibrate(0.5, cands, factor=1.01)
    i_full8 = cands.index(FULL_FP8)
    others = [i for i in range(len(cands)) if i != i_full8]
    assert cal.rse_log and all(np.all(np.isinf(rse[:, i_full8])) for _, _, rse in cal.rse_log)
    assert all(np.isfinite(rse[:, others]).all() for _, _, rse in cal.rse_log)  # the others measured
    without = calibrate(0.5, tuple(c for c in cands if c != FULL_FP8), factor=1.01)
    for (_, _, a), (_, _, b) in zip(cal.rse_log, without.rse_log):
        np.testing.assert_array_equal(a[:, others], b)
    assert cal.plan().positions == without.plan().positions


def test_fp8_calibration_gives_a_valid_plan_that_round_trips_and_applies():
    cal = calibrate(0.5)
    plan = cal.plan()
    assert fp8_count(plan) > 0
    assert loads_plan(dumps_plan(plan)) == plan
    assert all(m == FULL for dec in plan.positions[0].layers for m in dec.methods)
    assert cal.stats.fp8_heads > 0 and 0 < cal.stats.fp8_flops <= cal.stats.kept_flops
    # applied on CPU, FP8 heads run in bf16: the output is that of the plan without quantization
    plain = Plan(plan.model, tuple(PlanPosition(p.sigma, tuple(d.unquantized for d in p.layers)) for p in plan.positions))
    a, b = HeadwiseEngine(plan, backend="sdpa"), HeadwiseEngine(plain, backend="sdpa")
    for step, sigma in enumerate(SIGMAS):
        pos = plan.position_for_sigma(sigma)
        carry = None
        for layer in range(2):
            q, k, v = inputs(step, layer, carry)
            carry = a.attend(CallContext(layer, pos, T, "c"), q, k, v)
            assert torch.equal(carry, b.attend(CallContext(layer, pos, T, "c"), q, k, v))
    assert a.stats.fp8_heads == cal.stats.fp8_heads and a.stats.kept_flops == b.stats.kept_flops


def test_a_tiny_delta_takes_no_fp8_head_and_zero_keeps_every_head_full():
    # FP8 always costs some error; an arrow band wider than a local head's reach can cost none (bf16 exp underflow)
    assert fp8_count(calibrate(1e-7).plan()) == 0
    assert set(calibrate(0.0).plan().method_counts()) == {"full"}


def test_the_cost_factor_steers_the_choice():
    """full+fp8 saves (1 - factor) of a head, arrow/8 what its band drops: the search takes full+fp8 below the factor
    where the two savings cross and arrow/8 above it, on the local heads where both fit the budget."""
    geo = Geometry(T, N, 4, 32)
    cross = head_cost(geo, arrow(8), 16) / head_cost(geo, FULL, 16)  # (1 - f) · full == full - arrow/8
    assert 0.2 < cross < 0.8
    cands = (CACHE, arrow(8), FULL_FP8)
    below = calibrate(0.5, candidates=cands, factor=cross - 0.15).plan().method_counts()
    above = calibrate(0.5, candidates=cands, factor=cross + 0.15).plan().method_counts()
    assert below["full+fp8"] > 0 and below["arrow/8"] == 0
    assert above["arrow/8"] == below["full+fp8"] and above["full+fp8"] == 0
    assert below["cache"] == above["cache"]  # the slow layer's choice does not depend on the factor
    # with every FP8 variant offered, a lower factor never takes fewer FP8 heads; at 1 none (no saving, more error)
    counts = [fp8_count(calibrate(0.5, factor=f).plan()) for f in (0.1, 0.6, 1.0)]
    assert counts[0] >= counts[1] > 0 and counts[2] == 0
    only = calibrate(0.5, candidates=(FULL_FP8,), factor=0.6).plan()
    assert set(only.method_counts()) == {"full", "full+fp8"}


def test_cpu_calibration_of_a_later_chunk_follows_with_the_emulated_fp8_heads():
    """A second chunk (e.g. uncond) at a decided position reuses the decision; its FP8 heads are emulated too."""
    cal = calibrate(0.5)
    pos = len(cal.sigmas) - 1
    dec = cal._decisions[pos][0]
    assert dec.fp8_heads
    q, k, v = inputs(len(SIGMAS) - 1, 0, None)
    out = cal.attend(CallContext(0, pos, T, "uncond"), q, k, v)
    for m, heads in dec.fp8_groups:
        idx = list(heads)
        want = fp8_attention_reference(q[:, idx], k[:, idx], v[:, idx], m.window(N), T)
        assert torch.equal(out[:, idx], want)


def test_record_settings_carry_the_factor_only_with_fp8_candidates():
    """A calibration with FP8 candidates records the factor it searched with (a re-run with another factor is another
    calibration); without FP8 candidates nothing is recorded, so plans made before FP8 stay reusable."""
    from dfav2.calibration.plan import SETTINGS_FIELDS, settings_differences
    from dfav2.nodes.records import calibration_settings

    model = torch.nn.Linear(3, 2)
    cond = [[torch.randn(1, 5, 8), {"pooled_output": torch.randn(1, 4)}]]

    def settings(config):
        return calibration_settings(model, positive=cond, negative=cond, width=256, height=256, steps=4, cfg=1.0,
                                    sampler_name="euler", scheduler="simple", seed=0, config=config, guidance=3.5)

    on = settings(SearchConfig(delta=0.1, candidates=with_fp8(DEFAULT_CANDIDATES), fp8_cost_factor=0.45))
    off = settings(SearchConfig(delta=0.1, fp8_cost_factor=0.45))
    assert set(on) == set(SETTINGS_FIELDS) and on["fp8_cost_factor"] == 0.45 and off["fp8_cost_factor"] is None
    assert "full+fp8" in on["candidates"] and "full+fp8" not in off["candidates"]
    record = CalibrationRecord(**on, txt_len=5, host_version="x", pack_version="y", date="d", wall_time_s=1.0)
    again = settings(SearchConfig(delta=0.1, candidates=with_fp8(DEFAULT_CANDIDATES), fp8_cost_factor=0.6))
    assert settings_differences(record, again) == [("fp8_cost_factor", "0.45", "0.6")]
