"""``python <pack> study``: attention structure and the fidelity study on the trained reference models.

1. **Structure** (one uncompressed sampling pass, a probe in the host's attention override slot): per layer and
   head, the share of image->image attention mass inside the arrow/8, /16, /32 bands (and what uniform attention
   would give), the mass on text keys, and the cosine similarity of each head's output between consecutive steps.
2. **Fidelity**: calibrate with DFACalibrate's own code (`calibrate_dfa`) on one prompt set, evaluate on other
   prompts and seeds, against the uncompressed model with the same seed: PSNR, SSIM (scikit-image), ground-truth
   accuracy (`scenes.score`), attention FLOPs kept (token-exact and at the kernel's tiles), method shares.
   - a delta sweep of the head-wise search, and the same sweep at layer granularity (DiTFastAttn v1);
   - baselines at matched tile FLOPs: uniform arrow, whole-step caching (all heads cached on spread steps),
     random head assignment with the calibrated plan's method histogram;
   - transfer: the plan calibrated at the study setting applied at 2x resolution, other step counts and another
     sampler, against a plan calibrated in that setting.
   - fp8 (issue 11): the head-wise delta sweep with three candidate sets -- sparsity alone (the default candidates),
     joint with the FP8 variants at the measured cost factor (`FP8_COST_FACTOR`), and joint at a hypothetical factor
     (`HYPOTHETICAL_FP8_FACTOR`, a future FP8 kernel) -- applied with FP8 heads emulated where FP8 cannot run
     (`kernels.engine.emulate_fp8`: exactly `fp8_attention_reference`, so a CPU run measures FP8's error too),
     compared at equal modeled attention time (`time_kept` at each set's factor).

Writes `<out>/study.json` (after every item, so a partial run keeps what it measured) and PNG plots. Items are run
most-important first under a time budget; skipped items are listed in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.quality import psnr_ssim
from . import evaluate, models, scenes, text

CAL_SEED, EVAL_SEED, NOISE_SEED = 1000, 2000, 5000
DELTAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5)
MATCH_DELTAS = (0.2, 0.4, 1.0)  # calibrated plans whose FLOPs the baselines match
TRANSFER_DELTA = 0.4
FP8_DELTAS = (0.1, 0.2, 0.4, 0.7, 1.0)
#: FP8 cost factor of a hypothetical FP8 kernel (~1.7x a bf16 pair's speed); the measured one is FP8_COST_FACTOR.
HYPOTHETICAL_FP8_FACTOR = 0.6


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python <pack> study", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flux,sd35m")
    p.add_argument("--res", type=int, default=512, help="study resolution (512: 1024 image tokens)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib", type=int, default=8, help="calibration prompts")
    p.add_argument("--eval", type=int, default=32, help="evaluation prompts")
    p.add_argument("--deltas", default=",".join(map(str, DELTAS)))
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new items after this many seconds")
    p.add_argument("--fp8-deltas", default=",".join(map(str, FP8_DELTAS)), help="deltas of the fp8 item's sweeps")
    p.add_argument("--fp8-series", default="sparsity,measured,hypothetical",
                   help="the fp8 item's candidate sets: sparsity (default candidates), measured (joint with FP8 at "
                        "FP8_COST_FACTOR), hypothetical (joint at HYPOTHETICAL_FP8_FACTOR)")
    p.add_argument("--skip", default="",
                   help="comma-separated items to skip: structure,headwise,layerwise,baselines,transfer,fp8")
    p.add_argument("--out", default="study_out")
    p.add_argument("--cpu", action="store_true")
    return p


# ------------------------------------------------------------------------------------------ structure


class _Probe:
    """Attention override that measures, then runs the host's own attention unchanged."""

    def __init__(self, n_layers: int, n_img: int, rows: int = 128) -> None:
        self.n_layers, self.n_img, self.rows = n_layers, n_img, rows
        self.calls = 0
        self.band: dict[int, list[np.ndarray]] = {}  # layer -> [per step [3, H]] band share for f = 8, 16, 32
        self.uniform = np.zeros(3)
        self.text: dict[int, list[np.ndarray]] = {}
        self.sim: dict[int, list[np.ndarray]] = {}
        self._prev: dict[tuple, torch.Tensor] = {}

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        out = func(*args, **kwargs)
        layer = self.calls % self.n_layers
        self.calls += 1
        with torch.no_grad():
            if kwargs.get("skip_reshape", False):
                qh, kh = q, k
            else:
                b, L, _ = q.shape
                qh = q.view(b, L, heads, -1).transpose(1, 2)
                kh = k.view(b, L, heads, -1).transpose(1, 2)
            b, h, L, d = qh.shape
            n = self.n_img
            t = L - n
            idx = torch.linspace(t, L - 1, min(self.rows, n), device=q.device).round().long()
            p = torch.softmax((qh[:, :, idx].float() @ kh.float().transpose(-1, -2)) / math.sqrt(d), -1)
            self.text.setdefault(layer, []).append(p[..., :t].sum(-1).mean((0, 2)).cpu().numpy())
            pi = p[..., t:]
            qi = (idx - t).view(-1, 1)
            dist = (qi - torch.arange(n, device=q.device).view(1, -1)).abs()
            shares = []
            for j, f in enumerate((8, 16, 32)):
                band = (dist <= n // (2 * f)).float()
                shares.append(((pi * band).sum(-1) / pi.sum(-1).clamp_min(1e-12)).mean((0, 2)).cpu().numpy())
                self.uniform[j] = band.mean().item()
            self.band.setdefault(layer, []).append(np.stack(shares))
            o = out if kwargs.get("skip_output_reshape", False) else out.view(b, L, h, -1).transpose(1, 2)
            o = o.float().transpose(0, 1).reshape(h, -1)
            key = (layer, o.shape)  # cond and uncond of different text lengths run as separate forwards
            if key in self._prev:
                self.sim.setdefault(layer, []).append(torch.nn.functional.cosine_similarity(o, self._prev[key], 1).cpu().numpy())
            self._prev[key] = o
        return out


def structure(mp: Any, name: str, sc: Sequence[scenes.Scene], res: int, steps: int) -> dict:
    from ..nodes.layouts import model_signature

    sig = model_signature(mp)
    n_img = (res // 16) ** 2
    probe = _Probe(len(sig.layers), n_img)
    m = mp.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    evaluate.sample_images(m, name, sc, res=res, steps=steps, seed=NOISE_SEED, batch=len(sc))
    band = np.stack([np.mean(probe.band[i], 0) for i in range(len(sig.layers))])  # [layers, 3, H]
    return dict(
        layers=[l.name for l in sig.layers], image_only=[l.image_only for l in sig.layers],
        band_share=band.tolist(), band_share_uniform=probe.uniform.tolist(),
        text_share=np.stack([np.mean(probe.text[i], 0) for i in range(len(sig.layers))]).tolist(),
        step_similarity=[np.stack(probe.sim[i]).tolist() for i in range(len(sig.layers))],  # [layer][step][head]
    )


# ------------------------------------------------------------------------------------------ fidelity


class _Study:
    def __init__(self, mp: Any, name: str, a: argparse.Namespace, cal: list[scenes.Scene], ev: list[scenes.Scene]):
        self.mp, self.name, self.a, self.cal, self.ev = mp, name, a, cal, ev
        self.spec = models.SPECS[name]
        self.refs: dict[tuple, torch.Tensor] = {}

    def setting(self, res: int | None = None, steps: int | None = None, sampler: str = "euler") -> tuple:
        return (res or self.a.res, steps or self.a.steps, sampler)

    def images(self, model: Any, setting: tuple) -> tuple[torch.Tensor, float]:
        res, steps, sampler = setting
        t0 = time.perf_counter()
        imgs = evaluate.sample_images(model, self.name, self.ev, res=res, steps=steps, seed=NOISE_SEED,
                                      batch=len(self.ev), sampler=sampler)
        return imgs, time.perf_counter() - t0

    def reference(self, setting: tuple) -> dict:
        imgs, wall = self.images(self.mp, setting)
        self.refs[setting] = imgs
        return dict(setting=list(setting), wall_s=round(wall, 3), accuracy=scenes.score(imgs, self.ev))

    def calibrate(self, delta: float, setting: tuple, granularity: str = "head", fp8_factor: float | None = None
                  ) -> Any:
        """DFACalibrate's search on the calibration prompts; `fp8_factor`: with the FP8 variants of the default
        candidates (`with_fp8`), weighed by this cost factor."""
        from ..calibration.search import DEFAULT_CANDIDATES, SearchConfig, with_fp8
        from ..nodes.calibrate import calibrate_dfa

        res, steps, sampler = setting
        caps = [s.caption for s in self.cal]
        config = SearchConfig(delta=float(delta), granularity=granularity)  # type: ignore[arg-type]
        desc = f"reference {self.name}, delta {delta} ({granularity})"
        if fp8_factor is not None:
            config = SearchConfig(delta=float(delta), candidates=with_fp8(DEFAULT_CANDIDATES),
                                  fp8_cost_factor=float(fp8_factor))
            desc += f", fp8 at cost factor {fp8_factor}"
        return calibrate_dfa(
            self.mp, positive=models.conditioning(self.name, caps), negative=models.conditioning(self.name, [""] * len(caps)),
            width=res, height=res, steps=steps, cfg=self.spec.cfg, sampler_name=sampler, scheduler="simple",
            seed=CAL_SEED, config=config, guidance=self.spec.guidance, description=desc,
        ).plan

    def measure(self, plan: Any, setting: tuple, label: str) -> dict:
        from ..calibration.cli import flops_kept
        from ..nodes.adapter import TO_PATCH, apply_dfa

        res = setting[0]
        patched = apply_dfa(self.mp, plan=plan)
        imgs, wall = self.images(patched, setting)
        ref = self.refs[setting]
        psnr, ssim = psnr_ssim(imgs.movedim(1, -1), ref.movedim(1, -1))
        txt = text.encode_text([s.caption for s in self.ev])[0].shape[1]
        tok, tiled = flops_kept(plan, width=res, height=res, txt_len=txt, tile=_tile(plan))
        counts = plan.method_counts()
        total = sum(counts.values())
        summary = patched.model_options["transformer_options"][TO_PATCH].last_summary
        return dict(
            label=label, setting=list(setting), flops_kept_token=round(tok, 4), flops_kept_tile=round(tiled, 4),
            psnr=round(float(np.mean(psnr)), 3), psnr_min=round(float(np.min(psnr)), 3),
            ssim=round(float(np.mean(ssim)), 4), ssim_min=round(float(np.min(ssim)), 4),
            accuracy=scenes.score(imgs, self.ev), wall_s=round(wall, 3),
            shares={k: round(v / total, 4) for k, v in sorted(counts.items())},
            run=summary.line() if summary is not None else None,
        ), imgs


def _tile(plan: Any) -> int:
    # the kernel's (and the search's) tile for the model's head_dim
    return 64 if plan.model.layers[0].head_dim <= 64 else 128


def _plan_with(plan: Any, rows: list[list[Any]]) -> Any:
    """A plan on `plan`'s model and sigmas with new per-position, per-layer decisions."""
    from ..calibration.plan import Plan, PlanPosition
    from ..kernels.methods import LayerDecision

    return Plan(plan.model, tuple(PlanPosition(p.sigma, tuple(LayerDecision(tuple(m)) for m in row))
                                  for p, row in zip(plan.positions, rows)))


def uniform_arrow(plan: Any, factor: int, start: int) -> Any:
    from ..kernels.methods import FULL, arrow

    return _plan_with(plan, [[[arrow(factor) if i >= max(start, 1) else FULL] * l.heads for l in plan.model.layers]
                             for i in range(len(plan.positions))])


def step_cache(plan: Any, n_cached: int) -> Any:
    """All heads cached at `n_cached` positions spread evenly over 1..P-1, full elsewhere."""
    from ..kernels.methods import CACHE, FULL

    p = len(plan.positions)
    chosen = set(np.unique(np.linspace(1, p - 1, n_cached).round().astype(int)).tolist()) if n_cached else set()
    return _plan_with(plan, [[[CACHE if i in chosen else FULL] * l.heads for l in plan.model.layers] for i in range(p)])


def random_assignment(plan: Any, seed: int) -> Any:
    """Per position, the plan's methods shuffled over all (layer, head) slots: same histogram, random heads."""
    rng = np.random.default_rng(seed)
    rows = []
    for pos in plan.positions:
        flat = [m for dec in pos.layers for m in dec.methods]
        order = rng.permutation(len(flat))
        flat = [flat[i] for i in order]
        row, j = [], 0
        for dec in pos.layers:
            row.append(flat[j:j + dec.heads])
            j += dec.heads
        rows.append(row)
    return _plan_with(plan, rows)


def fp8_row(st: _Study, plan: Any, setting: tuple, label: str, factor: float | None, reuse: dict | None = None
            ) -> tuple[dict, Any]:
    """`measure` with FP8 heads emulated where FP8 cannot run (`emulate_fp8`), plus the cost model's attention time
    kept (tile-granular, FP8 pairs weighed by `factor`, and at both study factors) and the FP8 shares. `reuse`: an
    already measured row of a plan without FP8 heads (the emulation changes nothing there)."""
    from ..calibration.cli import time_kept
    from ..kernels.cost import FP8_COST_FACTOR
    from ..kernels.engine import emulate_fp8

    res = setting[0]
    if reuse is not None:
        row, imgs = {k: v for k, v in reuse.items() if k not in ("delta", "calibration_s")}, None
        row["label"] = label
    else:
        with emulate_fp8():
            row, imgs = st.measure(plan, setting, label)
    txt = text.encode_text([s.caption for s in st.ev])[0].shape[1]

    def kept(f: float) -> float:
        return time_kept(plan, width=res, height=res, txt_len=txt, tile=_tile(plan), fp8_factor=f)

    counts = plan.method_counts()
    fp8_dense = kept(2.0) - kept(1.0)  # tile FLOPs computed in FP8, as a share of dense (time is linear in f)
    row.update(
        fp8_cost_factor=factor, time_kept=round(kept(factor if factor is not None else 1.0), 4),
        time_kept_at={str(f): round(kept(f), 4) for f in (FP8_COST_FACTOR, HYPOTHETICAL_FP8_FACTOR)},
        fp8_head_share=round(sum(n for m, n in counts.items() if m.endswith("+fp8")) / sum(counts.values()), 4),
        fp8_flops_share=round(fp8_dense / row["flops_kept_tile"], 4) if row["flops_kept_tile"] else 0.0,
    )
    return row, imgs


def _same_methods(a: Any, b: Any) -> bool:
    """Two plans with the same method for every (position, layer, head)."""
    return len(a.positions) == len(b.positions) and all(
        [d.methods for d in pa.layers] == [d.methods for d in pb.layers] for pa, pb in zip(a.positions, b.positions))


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Piecewise-linear y(x) through the points sorted by x; None outside their range."""
    pts = sorted(zip(xs, ys))
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def fp8_compare(series: dict[str, list[dict]]) -> list[dict]:
    """Each joint point against the sparsity-alone curve at the same modeled time (linear interpolation of PSNR and
    SSIM in `time_kept`; points outside the sparsity curve's time range are listed without a difference)."""
    base = series.get("sparsity", [])
    xs = [r["time_kept"] for r in base]
    rows = []
    for key, pts in series.items():
        if key == "sparsity":
            continue
        for r in pts:
            p = _interp(xs, [b["psnr"] for b in base], r["time_kept"])
            q = _interp(xs, [b["ssim"] for b in base], r["time_kept"])
            rows.append(dict(series=key, delta=r["delta"], time_kept=r["time_kept"], psnr=r["psnr"], ssim=r["ssim"],
                             fp8_head_share=r["fp8_head_share"],
                             sparsity_psnr=None if p is None else round(p, 3),
                             sparsity_ssim=None if q is None else round(q, 4),
                             d_psnr=None if p is None else round(r["psnr"] - p, 3),
                             d_ssim=None if q is None else round(r["ssim"] - q, 4)))
    return rows


def _closest(cands: list[tuple[Any, Any]], target: float, key: Any) -> Any:
    return min(cands, key=lambda c: abs(key(c[1]) - target))


def run_model(name: str, a: argparse.Namespace, out: dict, deadline: float, save: Any, skip: set[str]) -> dict[str, Any]:
    from ..calibration.cli import flops_kept

    mp = models.load(name)
    cal = scenes.sample_scenes(a.calib, CAL_SEED)
    ev = scenes.sample_scenes(a.eval, EVAL_SEED)
    st = _Study(mp, name, a, cal, ev)
    rec = out.setdefault(name, {"skipped": []})
    pics: dict[str, Any] = {}

    def due(item: str) -> bool:
        if item.split(" ")[0] in skip or time.perf_counter() > deadline:
            rec["skipped"].append(item)
            save()
            return False
        return True

    base = st.setting()
    if due("structure"):
        rec["structure"] = structure(mp, name, ev[:8], a.res, a.steps)
        save()
    rec["reference"] = st.reference(base)
    pics["ref"] = st.refs[base]
    rec["headwise"], rec["layerwise"], rec["baselines"], rec["transfer"] = [], [], [], []
    plans: dict[float, Any] = {}
    for d in [float(x) for x in a.deltas.split(",")]:
        if not due(f"headwise {d}"):
            continue
        t0 = time.perf_counter()
        plans[d] = st.calibrate(d, base)
        row, imgs = st.measure(plans[d], base, f"head-wise delta {d}")
        row["delta"], row["calibration_s"] = d, round(time.perf_counter() - t0 - row["wall_s"], 3)
        rec["headwise"].append(row)
        pics[f"delta {d}"] = imgs
        save()
    for d in [float(x) for x in a.deltas.split(",")]:
        if d == 0 or not due(f"layerwise {d}"):
            continue
        row, _ = st.measure(st.calibrate(d, base, "layer"), base, f"layer-wise delta {d}")
        row["delta"] = d
        rec["layerwise"].append(row)
        save()
    txt = text.encode_text([s.caption for s in ev])[0].shape[1]

    def tiled(p: Any) -> float:
        return flops_kept(p, width=a.res, height=a.res, txt_len=txt, tile=_tile(p))[1]

    for d in MATCH_DELTAS:
        if d not in plans or not due(f"baselines {d}"):
            continue
        target = tiled(plans[d])
        npos = len(plans[d].positions)
        arrows = [((f, s), uniform_arrow(plans[d], f, s)) for f in (8, 16, 32) for s in range(1, npos)]
        (f, s), ua = _closest(arrows, target, tiled)
        caches = [(n, step_cache(plans[d], n)) for n in range(0, npos)]
        n, sc_plan = _closest(caches, target, tiled)
        for label, plan in ((f"uniform arrow/{f} from step {s}", ua), (f"step cache: {n} of {npos} steps", sc_plan),
                            ("random heads, same histogram", random_assignment(plans[d], seed=int(d * 1000)))):
            row, _ = st.measure(plan, base, label)
            row["matches_delta"], row["target_flops_kept_tile"] = d, round(target, 4)
            rec["baselines"].append(row)
            save()
    if TRANSFER_DELTA in plans:
        for setting in (st.setting(res=2 * a.res), st.setting(steps=a.steps // 2), st.setting(steps=2 * a.steps),
                        st.setting(sampler="dpmpp_2m")):
            if not due(f"transfer {setting}"):
                continue
            ref = st.reference(setting)
            moved, _ = st.measure(plans[TRANSFER_DELTA], setting, f"calibrated at {list(base)}")
            direct, _ = st.measure(st.calibrate(TRANSFER_DELTA, setting), setting, f"calibrated at {list(setting)}")
            rec["transfer"].append(dict(setting=list(setting), delta=TRANSFER_DELTA, reference=ref,
                                        transferred=moved, direct=direct))
            del st.refs[setting]
            save()
    from ..kernels.cost import FP8_COST_FACTOR
    from ..kernels.quant import fp8_supported

    fp8_deltas = [float(x) for x in a.fp8_deltas.split(",") if x]
    series: dict[str, list[dict]] = {"sparsity": [], f"fp8 x{FP8_COST_FACTOR:g}": [],
                                     f"fp8 x{HYPOTHETICAL_FP8_FACTOR:g} (hypothetical)": []}
    rec["fp8"] = dict(deltas=fp8_deltas, measured_factor=FP8_COST_FACTOR, hypothetical_factor=HYPOTHETICAL_FP8_FACTOR,
                      apply=("FP8 kernel" if fp8_supported(mp.load_device) else
                             "FP8 heads emulated with fp8_attention_reference (no FP8 tensor cores here)"),
                      series=series)
    wanted = {x for x in a.fp8_series.split(",") if x}
    factors = {key: f for key, f, name in zip(series, (None, FP8_COST_FACTOR, HYPOTHETICAL_FP8_FACTOR),
                                              ("sparsity", "measured", "hypothetical")) if name in wanted}
    rec["fp8"]["series_not_run"] = [key for key in series if key not in factors]
    # the sparsity curve also takes the headwise sweep's other deltas (> 0): measured already, they cost nothing more
    for d in sorted(set(fp8_deltas) | ({x for x in plans if x > 0} if None in factors.values() else set())):
        sparse_plan = None
        for key, factor in factors.items():
            free = factor is None and d in plans  # taken even past the time budget
            if not free and (d not in fp8_deltas or not due(f"fp8 {key} {d}")):
                continue
            reuse = None
            if factor is None and d in plans:
                plan = sparse_plan = plans[d]
                reuse = next(r for r in rec["headwise"] if r["delta"] == d)
                cal_s = reuse["calibration_s"]
            else:
                t0 = time.perf_counter()
                plan = st.calibrate(d, base, fp8_factor=factor)
                cal_s = round(time.perf_counter() - t0, 3)
                if factor is None:
                    sparse_plan = plan
                elif sparse_plan is not None and _same_methods(plan, sparse_plan):
                    reuse = next(r for r in series["sparsity"] if r["delta"] == d)  # same plan: no FP8 head chosen
            row, _ = fp8_row(st, plan, base, f"{key}, delta {d}", factor, reuse)
            row.update(delta=d, calibration_s=cal_s, same_plan_as_sparsity=reuse is not None and factor is not None)
            series[key].append(row)
            rec["fp8"]["compare"] = fp8_compare(series)
            save()
    return pics


# ------------------------------------------------------------------------------------------ plots


def plot(out: dict, folder: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("study: the plots need matplotlib (pip install matplotlib); study.json is written") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    names = [n for n in out if isinstance(out[n], dict) and "reference" in out[n]]
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 9), squeeze=False)
    series = [("headwise", "head-wise (DFAv2)", "o-"), ("layerwise", "layer-wise (v1 granularity)", "s--")]
    for j, n in enumerate(names):
        r = out[n]
        for k, (metric, ylabel) in enumerate((("psnr", "PSNR vs uncompressed (dB)"), ("ssim", "SSIM vs uncompressed"))):
            ax = axes[k][j]
            for key, label, style in series:
                rows = [x for x in r.get(key, []) if x.get("delta", 1) > 0]
                if rows:
                    ax.plot([x["flops_kept_tile"] for x in rows], [x[metric] for x in rows], style, label=label)
                    for x in rows:
                        ax.annotate(f"δ{x['delta']:g}", (x["flops_kept_tile"], x[metric]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3))
            for marker, prefix in (("^", "uniform arrow"), ("v", "step cache"), ("x", "random heads")):
                rows = [x for x in r.get("baselines", []) if x["label"].startswith(prefix)]
                if rows:
                    ax.scatter([x["flops_kept_tile"] for x in rows], [min(x[metric], 60) for x in rows],
                               marker=marker, s=50, label=prefix)
            ax.set_xlabel("attention FLOPs kept (kernel tiles)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{n}: fidelity vs attention cost")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(folder / "pareto.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    names_f = [n for n in names if any(out[n].get("fp8", {}).get("series", {}).values())]
    if names_f:
        fig, axes = plt.subplots(2, len(names_f), figsize=(5.2 * len(names_f), 7), squeeze=False)
        for j, n in enumerate(names_f):
            f8 = out[n]["fp8"]
            for k, (metric, ylabel) in enumerate((("psnr", "PSNR vs uncompressed (dB)"), ("ssim", "SSIM vs uncompressed"))):
                ax = axes[k][j]
                for (key, rows), style, colour in zip(f8["series"].items(), ("o-", "s--", "^:"), ("C0", "C1", "C2")):
                    rows = sorted(rows, key=lambda x: x["time_kept"])
                    if not rows:
                        continue
                    ax.plot([x["time_kept"] for x in rows], [x[metric] for x in rows], style, color=colour, label=key)
                    for x in rows:
                        tag = f"δ{x['delta']:g}" + (f" fp8 {x['fp8_head_share']:.0%}" if x["fp8_head_share"] else "")
                        ax.annotate(tag, (x["time_kept"], x[metric]), fontsize=6, textcoords="offset points",
                                    xytext=(3, 3))
                ax.set_xlabel("modeled attention time kept (tiles, FP8 pairs x factor)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{n}: sparsity alone vs joint with FP8", fontsize=9)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(folder / "fp8.png")
        fig.savefig(files[-1], dpi=80)
        plt.close(fig)

    names_s = [n for n in names if "structure" in out[n]]
    if names_s:
        fig, axes = plt.subplots(len(names_s), 4, figsize=(20, 4.2 * len(names_s)), squeeze=False)
        for i, n in enumerate(names_s):
            s = out[n]["structure"]
            band = np.asarray(s["band_share"])  # [layers, 3, H]
            uni = np.asarray(s["band_share_uniform"])
            for j, f in enumerate((8, 16)):
                ax = axes[i][j]
                im = ax.imshow(band[:, j, :], vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_title(f"{n}: image→image mass inside arrow/{f} band\n(uniform attention: {uni[j]:.2f})")
                ax.set_yticks(range(len(s["layers"])), s["layers"], fontsize=7)
                ax.set_xlabel("head")
                fig.colorbar(im, ax=ax)
            ax = axes[i][2]
            im = ax.imshow(np.asarray(s["text_share"]), vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_title(f"{n}: attention mass on text keys")
            ax.set_yticks(range(len(s["layers"])), s["layers"], fontsize=7)
            ax.set_xlabel("head")
            fig.colorbar(im, ax=ax)
            ax = axes[i][3]
            for li, sims in enumerate(s["step_similarity"]):
                arr = np.asarray(sims)  # [steps, H]
                for h in range(arr.shape[1]):
                    ax.plot(range(1, arr.shape[0] + 1), arr[:, h], color=plt.cm.tab10(li % 10), alpha=0.7, lw=1,
                            label=s["layers"][li] if h == 0 else None)
            ax.set_title(f"{n}: cos(head output, previous forward)")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(folder / "structure.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    deadline = t0 + a.budget_s
    dev = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    out: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
        args={k: v for k, v in vars(a).items()}, calib_seed=CAL_SEED, eval_seed=EVAL_SEED, noise_seed=NOISE_SEED)
    try:
        from comfyui_version import __version__ as host

        out["host"] = host
    except ImportError:
        pass

    def save() -> None:
        out["elapsed_s"] = round(time.perf_counter() - t0, 1)
        tmp = folder / "study.json.tmp"
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(folder / "study.json")

    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # hundreds of sampling passes: no tqdm bars in the log
    skip = {s for s in a.skip.split(",") if s}
    for name in a.models.split(","):
        pics = run_model(name, a, out, deadline, save, skip)
        rows = [pics["ref"][:6]]
        labels = [f"{name}: uncompressed"]
        for d in (0.2, 0.4, 1.0):
            if f"delta {d}" in pics:
                rows += [pics[f"delta {d}"][:6], ((pics[f"delta {d}"][:6] - pics["ref"][:6]).abs() * 4).clamp(0, 1)]
                labels += [f"{name}: head-wise delta {d}", f"|difference| x4 (delta {d})"]
        evaluate.grid_png(rows, folder / f"samples_{name}.png", labels, tile=160)
    save()
    for f in plot(out, folder):
        print(f"wrote {f}")
    print(f"wrote {folder / 'study.json'} in {time.perf_counter() - t0:.0f} s")
    return 0
