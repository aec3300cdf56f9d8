"""Per-layer, per-step multiple-choice knapsack of DiTFastAttnV2 (method.md §4.3–4.4).

Each head takes at most one compressing candidate (or stays full). Maximise the attention cost saved
subject to the sum of the chosen candidates' relative squared errors staying within the budget δ;
pairs whose error reaches the per-head cap c·δ/H are dropped first. Solved exactly with HiGHS
(`scipy.optimize.milp`) after a greedy shortcut that is optimal whenever it fits the budget.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["HEAD_CAP_FACTOR", "solve_layer"]

#: c in the per-head cap c·δ/H (paper default; ablation in method.md §6.5).
HEAD_CAP_FACTOR = 1.5


def solve_layer(
    rse: ArrayLike,
    saving: ArrayLike,
    delta: float,
    *,
    head_cap_factor: float = HEAD_CAP_FACTOR,
) -> NDArray[np.int64]:
    """Choose at most one candidate per head.

    Parameters
    ----------
    rse : [H, M] float, relative squared error of candidate m on head h (NaN/inf = not allowed).
    saving : [H, M] or [M] non-negative integers, cost saved by candidate m (e.g. score tiles).
    delta : error budget of this layer at this step (sum of the chosen RSEs must be <= delta).
    head_cap_factor : a pair is a candidate only if rse < head_cap_factor * delta / H.

    Returns
    -------
    int64 [H]: chosen candidate index per head, -1 = full attention. Among optimal choices the one
    with the lower total error wins (deterministic for a given input).
    """
    r = np.asarray(rse, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rse must be [heads, candidates], got shape {r.shape}")
    heads, cands = r.shape
    s = np.broadcast_to(np.asarray(saving), (heads, cands))
    if not np.issubdtype(s.dtype, np.integer):
        if not np.all(np.isfinite(s)) or np.any(s != np.round(s)):
            raise ValueError("saving must be integers (cost units such as tiles)")
        s = s.astype(np.int64)
    if np.any(s < 0):
        raise ValueError("saving must be >= 0")
    if not (np.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")
    choice = np.full(heads, -1, dtype=np.int64)
    cap = head_cap_factor * delta / heads
    allowed = np.isfinite(r) & (r >= 0) & (r < cap) & (s > 0)
    if not allowed.any():
        return choice

    # Greedy: each head's largest saving (ties: lower error, then lower index). Optimal if it fits.
    key_s = np.where(allowed, s, -1)
    best = np.full(heads, -1, dtype=np.int64)
    for h in range(heads):
        if allowed[h].any():
            order = np.lexsort((np.arange(cands), r[h], -key_s[h]))
            best[h] = order[0]
    picked = best >= 0
    if r[picked, best[picked]].sum() <= delta:
        return best

    from scipy.optimize import Bounds, LinearConstraint, milp

    hs, ms = np.nonzero(allowed)
    n = len(hs)
    sv, rv = s[hs, ms].astype(np.float64), r[hs, ms]
    # Lexicographic objective: savings are integers, and eps * (total error <= delta) < 1/2, so the
    # error term only breaks ties between equal savings.
    eps = 0.5 / (delta * 2 + 1e-300)
    c = -sv + eps * rv
    one_per_head = np.zeros((heads, n))
    one_per_head[hs, np.arange(n)] = 1.0
    constraints = [
        LinearConstraint(one_per_head, -np.inf, 1.0),
        LinearConstraint(rv[None, :], -np.inf, delta),
    ]
    res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:  # pragma: no cover - the all-full point is always feasible
        raise RuntimeError(f"knapsack solver failed: {res.message}")
    x = res.x > 0.5
    choice[hs[x]] = ms[x]
    # HiGHS works to a feasibility tolerance; never exceed the budget because of it.
    while r[choice >= 0, choice[choice >= 0]].sum() > delta:
        worst = np.flatnonzero(choice >= 0)
        drop = worst[np.argmax(r[worst, choice[worst]])]
        choice[drop] = -1
    return choice
