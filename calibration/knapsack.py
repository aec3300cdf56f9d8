"""Per-layer, per-step multiple-choice knapsack of DiTFastAttnV2 (method.md §4.3–4.4).

Each head takes at most one compressing candidate (or stays full). Maximise the attention cost saved
subject to the sum of the chosen candidates' relative squared errors staying within the budget δ;
pairs whose error reaches the per-head cap c·δ/H are dropped first.

Solved by a greedy shortcut (each head's largest saving: optimal whenever it fits the budget) and
otherwise an exact dynamic programme over integer savings (least total error for every reachable
saving). Savings are counted in units of 1/`resolution` of the largest candidate saving, so the DP is
exact for savings up to `resolution` units and exact on savings rounded to 0.8 % of one head's cost
beyond (method.md §4.4). HiGHS (`scipy.optimize.milp`) was tried first: 50-400 ms per binding
instance at 24 heads, against about 1 ms here, and it prints to stdout.
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
    resolution: int = 128,
) -> NDArray[np.int64]:
    """Choose at most one candidate per head.

    Parameters
    ----------
    rse : [H, M] float, relative squared error of candidate m on head h (NaN/inf = not allowed).
    saving : [H, M] or [M] non-negative integers, cost saved by candidate m (e.g. score tiles).
    delta : error budget of this layer at this step (sum of the chosen RSEs must be <= delta).
    head_cap_factor : a pair is a candidate only if rse < head_cap_factor * delta / H.
    resolution : saving units per largest candidate saving in the DP (see module docstring).

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
    return _dp(r, s, allowed, delta, resolution)


def solve_layer_uniform(rse: ArrayLike, saving: ArrayLike, delta: float) -> NDArray[np.int64]:
    """Layer granularity (DiTFastAttn v1): one candidate for every head of the layer, or all full.

    Picks the candidate with the largest summed saving whose summed head error stays within `delta`
    (ties: lower error, then lower index); no per-head cap. Same inputs and output as `solve_layer`.
    """
    r = np.asarray(rse, dtype=np.float64)
    heads, cands = r.shape
    s = np.broadcast_to(np.asarray(saving, dtype=np.float64), (heads, cands)).sum(0)
    total = np.where(np.isfinite(r).all(0), r.sum(0), np.inf)
    ok = np.flatnonzero((total <= delta) & (s > 0))
    if len(ok) == 0:
        return np.full(heads, -1, dtype=np.int64)
    best = ok[np.lexsort((ok, total[ok], -s[ok]))[0]]
    return np.full(heads, best, dtype=np.int64)


def _dp(r: NDArray[np.float64], s: NDArray[np.int64], allowed: NDArray[np.bool_], delta: float, resolution: int) -> NDArray[np.int64]:
    """Exact DP over integer savings: for every reachable total saving, the least total error."""
    heads, cands = r.shape
    unit = max(1, -(-int(s[allowed].max()) // resolution))
    units = np.where(allowed, np.rint(s / unit).astype(np.int64), 0)
    allowed = allowed & (units > 0)
    live = [h for h in range(heads) if allowed[h].any()]
    top = int(sum(units[h].max() for h in live))
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    picks = np.full((heads, top + 1), -1, dtype=np.int8)
    reach = 0
    for h in live:
        new = best.copy()
        for m in np.flatnonzero(allowed[h]):
            u = int(units[h, m])
            cand = best[: reach + 1] + r[h, m]
            cur = new[u : u + reach + 1]
            better = cand < cur  # strict: on equal error the earlier option (full, lower index) stays
            cur[better] = cand[better]
            picks[h, u : u + reach + 1][better] = m
        reach += int(units[h].max())
        best = new
    feasible = np.flatnonzero(best <= delta)
    total = int(feasible.max())  # 0 (all full) is always feasible
    choice = np.full(heads, -1, dtype=np.int64)
    for h in reversed(live):
        pick = int(picks[h, total])
        choice[h] = pick
        if pick >= 0:
            total -= int(units[h, pick])
    return choice
