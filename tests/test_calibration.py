"""Calibration core: RSE metric, knapsack vs brute force, progressive search on a synthetic model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dfav2.calibration import LayerSpec, ModelSignature, loads_plan, dumps_plan
from dfav2.calibration.knapsack import solve_layer
from dfav2.calibration.metric import head_rse
from dfav2.calibration.search import ProgressiveCalibrator, SearchConfig
from dfav2.kernels import FULL, CallContext, HeadwiseEngine, LayerDecision, decision_flops, Geometry


def test_head_rse_definition():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 17, 8, generator=g)
    cand = ref + 0.1 * torch.randn(2, 3, 17, 8, generator=g)
    got = head_rse(cand, ref)
    for h in range(3):
        r, c = ref[:, h].double(), cand[:, h].double()
        expected = ((c - r) ** 2).mean() / ((r - r.mean()) ** 2).mean()
        assert got[h].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.all(head_rse(ref, ref) == 0)


def brute_force(rse, saving, delta, cap_factor=1.5):
    heads, cands = rse.shape
    cap = cap_factor * delta / heads
    best = (-1, 0.0)
    for combo in itertools.product(range(-1, cands), repeat=heads):
        s = r = 0.0
        ok = True
        for h, c in enumerate(combo):
            if c < 0:
                continue
            if not (rse[h, c] < cap and saving[h, c] > 0):
                ok = False
                break
            s += saving[h, c]
            r += rse[h, c]
        if ok and r <= delta and (s > best[0] or (s == best[0] and r < best[1])):
            best = (s, r)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    heads, cands = rng.integers(1, 6), rng.integers(1, 5)
    rse = rng.exponential(0.05, size=(heads, cands))
    rse[rng.random((heads, cands)) < 0.1] = np.inf
    saving = rng.integers(0, 20, size=(heads, cands))
    delta = float(rng.choice([0.0, 0.02, 0.1, 0.3, 1.0]))
    choice = solve_layer(rse, saving, delta)
    chosen = [(h, c) for h, c in enumerate(choice) if c >= 0]
    total_r = sum(rse[h, c] for h, c in chosen)
    total_s = sum(saving[h, c] for h, c in chosen)
    assert total_r <= delta + 1e-12
    assert all(rse[h, c] < 1.5 * delta / heads for h, c in chosen)
    best_s, best_r = brute_force(rse, saving, delta)
    assert total_s == best_s
    assert total_r == pytest.approx(best_r, abs=1e-9)
    assert np.array_equal(solve_layer(rse, saving, delta), choice)  # deterministic


def test_knapsack_delta_zero_is_all_full_and_bad_input_rejected():
    assert np.all(solve_layer(np.zeros((4, 3)) + 1e-3, np.ones(3, dtype=int), 0.0) == -1)
    with pytest.raises(ValueError, match="delta"):
        solve_layer(np.zeros((2, 2)), np.ones(2, dtype=int), float("nan"))
    with pytest.raises(ValueError, match="integers"):
        solve_layer(np.zeros((2, 2)), np.array([0.5, 1.0]), 0.1)


# --- progressive search on a synthetic two-layer "model" ------------------------------------------

MODEL = ModelSignature("flux", (LayerSpec("double.0", 4, 16), LayerSpec("single.0", 4, 16)))
T, N, B = 9, 120, 2
SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2]


def synthetic_inputs(step, layer, carry):
    """q/k/v that depend on the previous layer's output (progressive). Layer 0 attends locally and
    changes fast between steps (arrow should win), layer 1 changes slowly (cache should win)."""
    g = torch.Generator().manual_seed(1000 * layer + 7)
    qkv = torch.randn(3, B, 4, T + N, 16, generator=g)
    drift = torch.randn(3, B, 4, T + N, 16, generator=torch.Generator().manual_seed(step * 31 + layer))
    qkv = qkv + (1.0 if layer == 0 else 0.02) * step * drift
    if layer == 0:  # positional features: q_i . k_j large only for |i - j| small
        i = torch.arange(T + N, dtype=torch.float32)[:, None]
        freqs = torch.arange(1, 9, dtype=torch.float32)[None, :] / 40.0
        pos = torch.cat([torch.sin(i * freqs), torch.cos(i * freqs)], 1) * 3.0
        qkv[0] = qkv[0] * 0.1 + pos
        qkv[1] = qkv[1] * 0.1 + pos
    if carry is not None:
        qkv = qkv + 0.1 * carry
    return qkv[0], qkv[1], qkv[2]


def run_calibration(delta):
    cal = ProgressiveCalibrator(MODEL, SearchConfig(delta=delta, tile=16), backend="sdpa")
    outs = []
    for step, sigma in enumerate(SIGMAS):
        cal.begin_forward(sigma)
        carry = None
        for layer in range(2):
            q, k, v = synthetic_inputs(step, layer, carry)
            carry = cal.attend(CallContext(layer, cal.position, T), q, k, v)
            outs.append(carry.clone())
    return cal.plan(), outs


def kept_fraction(plan):
    kept = dense = 0
    for pos in plan.positions:
        for dec in pos.layers:
            k, d = decision_flops(Geometry(T, N, 4, 16), dec, 16)
            kept, dense = kept + k, dense + d
    return kept / dense


def test_delta_zero_gives_all_full_plan():
    plan, _ = run_calibration(0.0)
    assert set(plan.method_counts()) == {"full"}


def test_rising_delta_never_keeps_more_flops():
    fractions = [kept_fraction(run_calibration(d)[0]) for d in (0.0, 0.05, 0.2, 0.8, 3.0)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] < fractions[0]  # something was compressed


def test_first_position_full_and_plan_deterministic_and_serialisable():
    plan1, _ = run_calibration(0.8)
    plan2, _ = run_calibration(0.8)
    assert plan1 == plan2
    assert all(m == FULL for dec in plan1.positions[0].layers for m in dec.methods)
    assert loads_plan(dumps_plan(plan1)) == plan1
    assert len(plan1.positions) == len(SIGMAS)


def test_applying_the_plan_reproduces_the_calibration_outputs():
    plan, cal_outs = run_calibration(0.8)
    counts = plan.method_counts()
    assert counts["cache"] > 0 and sum(v for k, v in counts.items() if k.startswith("arrow")) > 0
    engine = HeadwiseEngine(plan, backend="sdpa")
    outs = []
    for step, sigma in enumerate(SIGMAS):
        pos = plan.position_for_sigma(sigma)
        carry = None
        for layer in range(2):
            q, k, v = synthetic_inputs(step, layer, carry)
            carry = engine.attend(CallContext(layer, pos, T, "cond"), q, k, v)
            outs.append(carry)
    assert engine.stats.cache_misses == 0
    for a, b in zip(outs, cal_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_repeated_sigma_reuses_the_position_and_rising_sigma_is_refused():
    cal = ProgressiveCalibrator(MODEL, SearchConfig(delta=0.5), backend="sdpa")
    cal.begin_forward(1.0)
    cal.begin_forward(1.0)
    cal.begin_forward(0.5)
    assert cal.sigmas == [1.0, 0.5]
    with pytest.raises(ValueError, match="decreasing"):
        cal.begin_forward(0.7)


def test_search_config_validation():
    with pytest.raises(ValueError, match="delta"):
        SearchConfig(delta=-1)
    with pytest.raises(ValueError, match="implicit"):
        SearchConfig(delta=0.1, candidates=(FULL,))


def milp_optimum(rse, saving, delta, cap_factor=1.5):
    """Independent exact oracle at realistic size: HiGHS on the same 0/1 programme."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    heads, cands = rse.shape
    allowed = (rse < cap_factor * delta / heads) & (saving > 0)
    hs, ms = np.nonzero(allowed)
    if len(hs) == 0:
        return 0
    one = np.zeros((heads, len(hs)))
    one[hs, np.arange(len(hs))] = 1
    res = milp(-saving[hs, ms].astype(float), integrality=np.ones(len(hs)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one, -np.inf, 1), LinearConstraint(rse[hs, ms][None], -np.inf, delta)],
               options={"mip_rel_gap": 0.0})
    return round(-res.fun)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_milp_at_24_heads(seed):
    rng = np.random.default_rng(100 + seed)
    rse = rng.uniform(0.005, 0.03, size=(24, 4))
    saving = np.broadcast_to(rng.integers(60, 128, size=4), (24, 4))  # <= resolution: the DP is exact
    choice = solve_layer(rse, saving, 0.4)
    got = sum(saving[h, c] for h, c in enumerate(choice) if c >= 0)
    assert sum(rse[h, c] for h, c in enumerate(choice) if c >= 0) <= 0.4
    assert got == milp_optimum(rse, saving, 0.4)


def test_knapsack_rounded_savings_lose_at_most_half_a_unit_per_head():
    rng = np.random.default_rng(7)
    for _ in range(5):
        rse = rng.uniform(0.005, 0.03, size=(24, 4))
        saving = np.broadcast_to(np.array([16900, 14283, 15244, 15750]), (24, 4))
        choice = solve_layer(rse, saving, 0.4)
        got = sum(saving[h, c] for h, c in enumerate(choice) if c >= 0)
        unit = -(-16900 // 128)
        assert got >= milp_optimum(rse, saving, 0.4) - 24 * unit / 2
