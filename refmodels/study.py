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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python <pack> study", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flux,sd35m")
    p.add_argument("--res", type=int, default=512, help="study resolution (512: 1024 image tokens)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib", type=int, default=8, help="calibration prompts")
    p.add_argument("--eval", type=int, default=32, help="evaluation prompts")
    p.add_argument("--deltas", default=",".join(map(str, DELTAS)))
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new items after this many seconds")
    p.add_argument("--skip", default="", help="comma-separated items to skip: structure,layerwise,baselines,transfer")
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

    def calibrate(self, delta: float, setting: tuple, granularity: str = "head") -> Any:
        from ..calibration.search import SearchConfig
        from ..nodes.calibrate import calibrate_dfa

        res, steps, sampler = setting
        caps = [s.caption for s in self.cal]
        return calibrate_dfa(
            self.mp, positive=models.conditioning(self.name, caps), negative=models.conditioning(self.name, [""] * len(caps)),
            width=res, height=res, steps=steps, cfg=self.spec.cfg, sampler_name=sampler, scheduler="simple",
            seed=CAL_SEED, config=SearchConfig(delta=float(delta), granularity=granularity),  # type: ignore[arg-type]
            guidance=self.spec.guidance, description=f"reference {self.name}, delta {delta} ({granularity})",
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
