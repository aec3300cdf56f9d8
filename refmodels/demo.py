"""``python <pack folder> demo``: calibrate -> apply -> sample on a trained reference model, and show the result.

Headless and in-process (CPU or GPU). Loads a shipped reference model with ComfyUI's own loader, calibrates a plan
with DFACalibrate's code on a few scene captions, samples *other* captions and seeds uncompressed and with
DFAApply, and writes a side-by-side PNG (uncompressed | compressed | difference x4) with PSNR, SSIM, ground-truth
accuracy, the plan summary and both timings.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ..calibration.search import DEFAULT_DELTA
    from . import models

    p = argparse.ArgumentParser(
        prog="python <pack folder> demo",
        description=(
            "DiTFastAttnV2 demo on a trained reference model: calibrate a plan, apply it, sample other prompts, write "
            "uncompressed | compressed | difference as a PNG with PSNR/SSIM, the plan summary and timings. Finds "
            "ComfyUI via COMFYUI_PATH or because the pack sits in ComfyUI/custom_nodes."
        ),
    )
    p.add_argument("--model", choices=sorted(models.SPECS), default="flux", help="reference model (default: flux)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, multiple of 16 (default: 512, the "
                   "models' study size; they were trained at 512 and 1024)")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default: 8)")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help=f"error budget (default: {DEFAULT_DELTA:g})")
    p.add_argument("--prompts", type=int, default=2, help="calibration captions (default: 2)")
    p.add_argument("--images", type=int, default=2, help="evaluation captions, other than the calibration ones (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="scene and noise seed (default: 0)")
    p.add_argument("--out", help="folder for the plan file and the PNG (default: a new temporary folder)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size < 64 or args.size % 16 or args.steps < 2 or args.prompts < 1 or args.images < 1 \
            or not 0 <= args.delta <= 2:
        print("demo: need --size >= 64 and a multiple of 16, --steps >= 2, --prompts >= 1, --images >= 1, "
              "0 <= --delta <= 2", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # a CLI, not import time
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import torch

    from ..calibration.quality import difference_map, psnr_ssim
    from ..nodes.adapter import TO_PATCH
    from ..nodes.calibrate import calibrate_plan_node, host_version
    from ..nodes.plans import FOLDER
    from ..nodes.v3 import DFAApply
    from . import evaluate, models, scenes

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars between the printed lines
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dfav2_demo_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[FOLDER] = ([str(out_dir.resolve())], {".json"})
    device = comfy.model_management.get_torch_device()
    print(f"DiTFastAttnV2 demo: ComfyUI {host_version()}, device {device}, torch {torch.__version__}")

    t0 = time.perf_counter()
    name, spec = args.model, models.SPECS[args.model]
    model = models.load(name)
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"model: reference {name} ({n_params / 1e6:.1f} M parameters, trained; {models.weights_path(name).name}) "
          f"loaded by ComfyUI's loader in {time.perf_counter() - t0:.1f} s; {args.size}x{args.size}, {args.steps} "
          f"steps euler/simple, cfg {spec.cfg:g}")
    cal = scenes.sample_scenes(args.prompts, 1000 + args.seed)
    ev = scenes.sample_scenes(args.images, 2000 + args.seed)
    caps = [s.caption for s in cal]
    plan_name = f"demo_{name}_{args.size}px_{args.steps}steps_delta{args.delta:g}"
    result = calibrate_plan_node(
        model=model, positive=models.conditioning(name, caps), negative=models.conditioning(name, [""] * len(caps)),
        width=args.size, height=args.size, steps=args.steps, cfg=spec.cfg, guidance=spec.guidance or 3.5,
        sampler_name="euler", scheduler="simple", seed=args.seed, delta=args.delta, plan_name=plan_name,
        overwrite=True,
    )
    print("--- plan summary (calibrated on:", "; ".join(caps) + ")")
    print(result.summary)

    kw = dict(res=args.size, steps=args.steps, seed=5000 + args.seed, batch=args.images)
    evaluate.sample_images(model, name, ev, res=args.size, steps=2, seed=0, batch=args.images)  # warm-up
    t1 = time.perf_counter()
    ref = evaluate.sample_images(model, name, ev, **kw)
    t_ref = time.perf_counter() - t1
    patched = DFAApply.execute(model=model, plan="none", enabled=True, start_percent=0.0, end_percent=1.0,
                               dfa_plan=result.plan).args[0]
    t1 = time.perf_counter()
    out = evaluate.sample_images(patched, name, ev, **kw)
    t_dfa = time.perf_counter() - t1
    run = patched.model_options["transformer_options"][TO_PATCH].last_summary
    psnr, ssim = psnr_ssim(out.movedim(1, -1), ref.movedim(1, -1))
    acc_ref, acc_out = scenes.score(ref, ev), scenes.score(out, ev)
    png = evaluate.grid_png([ref, out, difference_map(out, ref, 4.0)], out_dir / f"{plan_name}.png",
                            ["uncompressed", f"DFAApply, delta {args.delta:g}", "|difference| x 4"], tile=224)
    print(f"--- sampling {args.images} other captions (first: {ev[0].caption})")
    print(f"unpatched: {t_ref:.2f} s")
    print(f"patched:   {t_dfa:.2f} s ({t_ref / max(t_dfa, 1e-9):.2f}x)")
    if run is not None:
        print(run.line())
    print(f"compressed vs uncompressed: PSNR {sum(psnr) / len(psnr):.1f} dB (min {min(psnr):.1f}), "
          f"SSIM {sum(ssim) / len(ssim):.3f} (min {min(ssim):.3f})")
    print(f"ground truth (colour / count / background): uncompressed {acc_ref['color']:.2f} / {acc_ref['count']:.2f} / "
          f"{acc_ref['background']:.2f}, compressed {acc_out['color']:.2f} / {acc_out['count']:.2f} / "
          f"{acc_out['background']:.2f}")
    if device.type != "cuda":
        print("note: on CPU arrow heads run a masked dense reference, so only cached heads save time; the fused "
              "kernel needs CUDA + Triton")
    print(f"plan file: {result.path}")
    print(f"picture: {png}")
    print("demo: OK")
    return 0
