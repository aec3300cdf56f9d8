"""Command line for plan files: ``validate PLAN`` and ``inspect PLAN`` (run as ``python <pack folder> ...``).

Exit codes: 0 valid, 2 invalid or unreadable (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..kernels.cost import Geometry, decision_flops, image_tokens
from .plan import Plan, PlanError, load_plan

__all__ = ["main", "summarize", "flops_kept"]

_DEFAULT_TXT = {"flux": 256, "sd3": 154}


def flops_kept(plan: Plan, *, width: int, height: int, txt_len: int, tile: int = 128) -> tuple[float, float]:
    """Share of the dense attention FLOPs a plan keeps over all positions and layers, at one image size and text
    length: (token-exact, at `tile`-token tiles). 1.0 = all full; the tiled share bounds the attention-time gain."""
    n_img = image_tokens(width, height)
    kept = {None: 0, tile: 0}
    dense = {None: 0, tile: 0}
    for pos in plan.positions:
        for spec, dec in zip(plan.model.layers, pos.layers):
            geo = Geometry(0 if spec.image_only else txt_len, n_img, spec.heads, spec.head_dim)
            for t in kept:
                k, d = decision_flops(geo, dec, t)
                kept[t] += k
                dense[t] += d
    return kept[None] / dense[None], kept[tile] / dense[tile]


def summarize(plan: Plan, *, width: int | None = None, height: int | None = None, txt_len: int | None = None, tile: int = 128) -> str:
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
    lines.append(
        f"attention FLOPs kept at {width}x{height} (text {txt_len} tokens): {100 * exact:.1f}% token-exact, "
        f"{100 * tiled:.1f}% at {tile}-token tiles (attention-time bound {1 / max(tiled, 1e-9):.2f}x)"
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
    return 0
