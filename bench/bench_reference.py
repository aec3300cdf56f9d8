"""Which arrow layout for reference tokens (Kontext / edit): per-head error at equal cost, on the trained reference
Flux model with a reference latent present (CPU).

The host appends each reference latent's tokens after the image: [text T, image N, ref R]. Two layouts:

- (a) ``ref_as_text``: reference rows and columns full (like text), image x image inside the band |q - k| <= w
  (defined here: the measurement rejected it).
- (b) ``segment_band``: a band per image segment: text rows/columns full; an image or reference token q keeps key k
  iff |o(q) - o(k)| <= w, o = the token's offset inside its own segment (the image, or its reference). So each
  segment gets its own band, and image <-> reference pairs at the same (aligned) position are kept too. What
  kernels/masks.py implements (and the cost model counts).

Both with w = N // (2 f). One sampling pass of the reference model with the reference latent in the conditioning
(the ReferenceLatent node's key); every attention call runs dense (the pass is exact) and, per call and head, each
layout's RSE against the dense output (calibration.metric.head_rse, what the calibrator uses) and its token-exact
kept share are recorded. The table compares the layouts at equal cost: (b)'s mean RSE interpolated (in log RSE,
linear in cost) at each of (a)'s cost points.

    python bench/bench_reference.py [--res 256] [--steps 8] [--out bench/results/cpu_reference_layouts.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, import_host, load_pack  # noqa: E402

FACTORS_A = (2, 4, 8, 16, 32)
FACTORS_B = (1, 2, 4, 8, 16, 32)


def ref_as_text_keep(t: int, n: int, r: int, w: int):
    """Layout (a)'s keep matrix [L, L]: text and reference rows/columns full, image x image in |q - k| <= w."""
    import torch

    seq = t + n + r
    idx = torch.arange(seq)
    q, k = idx[:, None], idx[None, :]
    dense = (q < t) | (k < t) | (q >= t + n) | (k >= t + n)
    return dense | ((q - k).abs() <= w)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_reference_layouts.json"))
    a = ap.parse_args()

    import torch

    host_version = import_host(cpu=True)
    load_pack()
    import nodes

    from dfav2.calibration.metric import head_rse
    from dfav2.kernels.cost import kept_pairs
    from dfav2.kernels.engine import EngineStats
    from dfav2.kernels.masks import arrow_keep
    from dfav2.kernels.methods import arrow
    from dfav2.nodes.hooks import HostPatch, install_patch
    from dfav2.nodes.layouts import model_layout
    from dfav2.nodes.router import Run
    from dfav2.refmodels import codec, models, scenes

    torch.manual_seed(a.seed)
    model = models.load("flux")
    layout = model_layout(model)
    caption = scenes.sample_scenes(1, seed=a.seed)[0].caption
    # The reference: the model's own picture of the caption (an edit's input resembles its output).
    ref_latent, _ = _sample(nodes, models, codec, model, caption, a, None)

    rows: dict[tuple[str, int], list] = {}  # (layout, factor) -> [(rse [H], kept share)]

    class Recorder:
        """An attention consumer that measures both layouts and returns the dense output."""

        def __init__(self) -> None:
            self.stats = EngineStats()
            self.masks: dict = {}

        @torch.no_grad()
        def attend(self, ctx, q, k, v, dense=None, scale=None):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
            t, refs = ctx.txt_len, ctx.refs
            seq = q.shape[2]
            n = seq - t - sum(refs)
            for name, factors in (("ref_as_text", FACTORS_A), ("segment_band", FACTORS_B)):
                for f in factors:
                    key = (name, f, t, n, refs)
                    if key not in self.masks:
                        w = arrow(f).window(n)
                        if name == "segment_band":
                            keep = arrow_keep(t, seq, w, refs=refs)
                            assert int(keep.sum()) == kept_pairs(t, n, arrow(f), refs)
                        else:
                            keep = ref_as_text_keep(t, n, sum(refs), w)
                        self.masks[key] = (keep, int(keep.sum()) / seq**2)
                    keep, share = self.masks[key]
                    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
                    rows.setdefault((name, f), []).append((head_rse(y, out), share))
            self.stats.calls += 1
            return out

    recorder = Recorder()

    class Measure(HostPatch):
        def new_run(self, prev, model_sampling):
            return Run(self.layout, prev, consumer_for=lambda d: recorder, position=lambda s: 0)

    patch = Measure(layout=layout, backend="sdpa")
    patched = install_patch(model, patch)
    _sample(nodes, models, codec, patched, caption, a, ref_latent)
    summary = patch.last_summary
    assert summary is not None and not summary.fallbacks, summary and summary.fallbacks
    r_tokens = sum(layout.reference_tokens([ref_latent]))
    n_tokens = layout.latent_tokens(*ref_latent.shape[-2:])

    table = {}
    for (name, f), vals in sorted(rows.items()):
        rse = torch.stack([v[0] for v in vals])  # [calls, H]
        table[f"{name}/{f}"] = {
            "layout": name, "factor": f, "kept_share": vals[0][1], "mean_rse": float(rse.mean()),
            "median_rse": float(rse.median()), "p90_rse": float(rse.flatten().quantile(0.9)),
        }
    print(f"reference Flux model, {a.res}² ({n_tokens} image + {r_tokens} reference tokens), {a.steps} steps, "
          f"{recorder.stats.calls} attention calls, host {host_version}")
    print(f"{'layout':>14} {'f':>3} {'kept':>7} {'mean RSE':>10} {'median':>10} {'p90':>10}")
    for row in table.values():
        print(f"{row['layout']:>14} {row['factor']:>3} {100 * row['kept_share']:6.1f}% {row['mean_rse']:10.4f} "
              f"{row['median_rse']:10.4f} {row['p90_rse']:10.4f}")
    # Equal cost: the two curves barely overlap in kept share, so each point of one layout is compared with the
    # other layout's lowest error at no more cost (kept share <= this point's), and with its interpolated error
    # where this point's cost lies inside the other's range.
    def curve(name):
        return sorted((r["kept_share"], r["mean_rse"]) for r in table.values() if r["layout"] == name)

    def interp(pts, x):
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                u = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
                return math.exp(math.log(max(y0, 1e-12)) * (1 - u) + math.log(max(y1, 1e-12)) * u)
        return None

    equal = []
    print("\nat equal or lower cost (mean per-head RSE):")
    for mine, other in (("ref_as_text", "segment_band"), ("segment_band", "ref_as_text")):
        for share, err in curve(mine):
            cheaper = [e for s_, e in curve(other) if s_ <= share]
            best = min(cheaper) if cheaper else None
            o = interp(curve(other), share)
            equal.append({"at": mine, "kept_share": share, mine: err, f"{other}_best_at_no_more_cost": best,
                          f"{other}_interpolated": o})
            print(f"  kept {100 * share:5.1f}%: {mine} {err:.4f}; {other} at no more cost: "
                  + ("none" if best is None else f"{best:.4f}") + ("" if o is None else f", interpolated {o:.4f}"))
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": host_version, "model": "refmodels flux (dfa_ref_flux)", "res": a.res, "steps": a.steps, "seed": a.seed,
        "image_tokens": n_tokens, "reference_tokens": r_tokens, "attention_calls": recorder.stats.calls,
        "caption": caption, "rows": list(table.values()), "equal_cost": equal,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _sample(nodes, models, codec, model, caption, a, ref_latent):
    """KSampler on one caption; with `ref_latent`, the conditioning carries it as the ReferenceLatent node does."""
    import torch

    pos = models.conditioning("flux", [caption])
    neg = models.conditioning("flux", [""])
    if ref_latent is not None:
        pos = [[c[0], {**c[1], "reference_latents": [ref_latent]}] for c in pos]
        neg = [[c[0], {**c[1], "reference_latents": [ref_latent]}] for c in neg]
    latent = {"samples": torch.zeros([1, codec.CHANNELS, a.res // codec.PATCH, a.res // codec.PATCH])}
    out = nodes.common_ksampler(model, a.seed, a.steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    return out, None


if __name__ == "__main__":
    raise SystemExit(main())
