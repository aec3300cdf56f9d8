"""Command line for plan files: ``validate PLAN`` and ``inspect PLAN [--png OUT.png]`` (run as ``python <pack folder>
...``).

Exit codes: 0 valid, 2 invalid or unreadable (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..kernels.cost import FP8_COST_FACTOR, Geometry, head_cost, image_tokens, kernel_tile
from ..kernels.methods import FULL
from .plan import Plan, PlanError, load_plan

__all__ = ["main", "summarize", "flops_kept", "time_kept", "plan_fp8_factor"]

_DEFAULT_TXT = {"flux": 256, "flux2": 512, "sd3": 154}
#: Pixels per latent cell and latent cells per patch side, per family (what `image_tokens` needs).
_FAMILY_SCALE = {"flux": (8, 2), "flux2": (16, 1), "sd3": (8, 2)}


def plan_image_tokens(plan: Plan, width: int, height: int) -> int:
    """Image tokens of a width × height picture for the plan's model family."""
    vae_scale, patch = _FAMILY_SCALE[plan.model.family]
    return image_tokens(width, height, vae_scale=vae_scale, patch=patch)


def flops_kept(plan: Plan, *, width: int, height: int, txt_len: int, tile: int | None = None,
               n_img: int | None = None) -> tuple[float, float]:
    """Share of the dense attention FLOPs a plan keeps over all positions and layers, at one image size and text
    length: (token-exact, tile-granular). Tiles: `tile` tokens, or None (default) for the kernel's tile of each
    layer's head_dim (`kernels.cost.kernel_tile`, what the search optimised). 1.0 = all full; the tiled share
    bounds the attention-time gain. `n_img`: the image tokens where the caller knows the model's latent format
    (the host side); else from the plan's family."""
    return _kept_shares(plan, width, height, txt_len, tile, n_img, 1.0)  # an FP8 pair is a FLOP pair like any other


def plan_fp8_factor(plan: Plan) -> float:
    """The FP8 cost factor a plan was calibrated with (its record), else today's `FP8_COST_FACTOR`."""
    cal = plan.calibration
    return cal.fp8_cost_factor if cal is not None and cal.fp8_cost_factor is not None else FP8_COST_FACTOR


def time_kept(plan: Plan, *, width: int, height: int, txt_len: int, tile: int | None = None, n_img: int | None = None,
              fp8_factor: float | None = None) -> float:
    """Share of the dense attention time a plan keeps by the cost model, tile-granular (`flops_kept`'s tiled share
    with each FP8 pair weighed by `fp8_factor`, default `plan_fp8_factor`): what the search minimised, and the
    bound on the attention speed-up. Equals the tiled FLOP share for plans without FP8 heads."""
    factor = plan_fp8_factor(plan) if fp8_factor is None else fp8_factor
    return _kept_shares(plan, width, height, txt_len, tile, n_img, factor)[1]


def _kept_shares(plan: Plan, width: int, height: int, txt_len: int, tile: int | None, n_img: int | None,
                 fp8_factor: float) -> tuple[float, float]:
    if n_img is None:
        n_img = plan_image_tokens(plan, width, height)
    kept = [0, 0]
    dense = [0, 0]
    # A head's cost depends only on its layer's geometry and its method: count methods per layer once.
    for spec, counts in zip(plan.model.layers, plan.layer_method_counts()):
        geo = Geometry(0 if spec.image_only else txt_len, n_img, 1, spec.head_dim)
        scale = 4 * spec.head_dim
        for i, t in enumerate((None, tile or kernel_tile(spec.head_dim))):
            full = head_cost(geo, FULL, t)
            for method, n in counts.items():
                kept[i] += head_cost(geo, method, t, fp8_factor=fp8_factor) * n * scale
                dense[i] += full * n * scale
    return kept[0] / dense[0], kept[1] / dense[1]


def tile_label(plan: Plan, tile: int | None = None) -> str:
    """How the summaries name the tile rule: '128-token tiles', or the per-head_dim kernel tiles in use."""
    if tile:
        return f"{tile}-token tiles"
    tiles = sorted({kernel_tile(l.head_dim) for l in plan.model.layers})
    return "/".join(str(t) for t in tiles) + "-token kernel tiles"


def summarize(plan: Plan, *, width: int | None = None, height: int | None = None, txt_len: int | None = None, tile: int | None = None) -> str:
    """Human-readable summary: layers, positions, share of each method, attention FLOPs kept."""
    cal = plan.calibration
    width = width or (cal.width if cal else 1024)
    height = height or (cal.height if cal else 1024)
    if txt_len is None:
        txt_len = cal.txt_len if cal else _DEFAULT_TXT[plan.model.family]
    lines = [f"model: {plan.model.describe()}"]
    if plan.description:
        lines.append(f"description: {plan.description}")
    if cal:
        guidance = "" if cal.guidance is None else f", guidance {cal.guidance:g}"
        lines.append(
            f"calibrated: delta {cal.delta:g}, candidates {', '.join(cal.candidates)}; {cal.prompts} prompt(s), "
            f"{cal.steps} steps {cal.sampler}/{cal.scheduler}, cfg {cal.cfg:g}{guidance}, {cal.width}x{cal.height}, "
            f"text {cal.txt_len} tokens, seed {cal.seed}; {cal.date}, {cal.wall_time_s:.0f} s "
            f"(host {cal.host_version}, pack {cal.pack_version})"
        )
    sig = plan.sigmas
    lines.append(f"positions: {len(sig)} (sigma {sig[0]:.4g} -> {sig[-1]:.4g})")
    counts = plan.method_counts()
    total = sum(counts.values())
    order = sorted(counts, key=lambda n: (n != "full", n != "cache", n))
    lines.append("methods: " + ", ".join(f"{n} {100 * counts[n] / total:.1f}%" for n in order))
    exact, tiled = flops_kept(plan, width=width, height=height, txt_len=txt_len, tile=tile)
    cost = time_kept(plan, width=width, height=height, txt_len=txt_len, tile=tile)
    lines.append(
        f"attention FLOPs kept at {width}x{height} (text {txt_len} tokens): {100 * exact:.1f}% token-exact, "
        f"{100 * tiled:.1f}% at {tile_label(plan, tile)} (attention-time bound {1 / max(cost, 1e-9):.2f}x)"
    )
    fp8 = sum(n for name, n in counts.items() if name.endswith("+fp8"))
    if fp8:
        lines.append(
            f"FP8 heads: {100 * fp8 / total:.1f}% of all heads; the time bound weighs an FP8 score pair as "
            f"{plan_fp8_factor(plan):g} of a bf16 pair (cost model); they run in FP8 only on GPUs with FP8 tensor "
            "cores (compute capability 8.9+), in bf16 elsewhere"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dfav2", description="Validate or inspect DiTFastAttnV2 plan files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_val = sub.add_parser("validate", help="exit 0 if PLAN is a valid plan file, else print one line and exit 2")
    p_val.add_argument("plan")
    p_ins = sub.add_parser("inspect", help="print a summary of PLAN")
    p_ins.add_argument("plan")
    p_ins.add_argument("--width", type=int, help="image width for the FLOP estimate (default: calibration width)")
    p_ins.add_argument("--height", type=int, help="image height (default: calibration height)")
    p_ins.add_argument("--txt-len", type=int, help="text tokens (default: calibration text length)")
    p_ins.add_argument("--png", metavar="OUT.png", help="also draw the plan (steps x layers x heads, one colour per "
                       "method, shares and FLOPs kept) into this PNG file")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
    except (PlanError, OSError) as exc:
        print(f"invalid plan {args.plan}: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"valid plan: {plan.model.describe()}, {len(plan.positions)} positions")
        return 0
    try:
        print(summarize(plan, width=args.width, height=args.height, txt_len=args.txt_len))
    except ValueError as exc:
        print(f"cannot inspect {args.plan}: {exc}", file=sys.stderr)
        return 2
    if args.png:
        from .picture import save_plan_picture

        try:
            path = save_plan_picture(plan, args.png, width=args.width, height=args.height, txt_len=args.txt_len)
        except (OSError, ValueError) as exc:  # unwritable path, unknown image extension
            print(f"cannot write the picture {args.png}: {exc}", file=sys.stderr)
            return 2
        print(f"picture: {path}")
    return 0
