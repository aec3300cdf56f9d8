"""Calibration cost on ComfyUI's own Flux class (issue 4 §4): wall time and peak GPU memory of a DFACalibrate
pass against a plain sampling pass of the same batch, side by side in one process; then the calibrated plan
applied with DFAApply against the unpatched model.

Flux-dev geometry (19 double + 38 single blocks, 24 × 128 heads), random bf16 weights, 1024², 4 prompts
(random text conditioning, 256 tokens), 28 euler steps, cfg 1. Random weights make the plan itself
meaningless for quality; the timings and memory are what this script is for.

    python bench/bench_calibration.py            # H200: prints a table, writes $OUT/bench_calibration.json
    python bench/bench_calibration.py --tiny     # CPU smoke run (tiny Flux)
    python bench/bench_calibration.py --fp8      # the same with the FP8 candidates (DFACalibrate's `fp8` on)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, import_host, load_pack  # noqa: E402
from bench_overhead import FLUX_DEV, FLUX_TINY  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--txt", type=int, default=256)
    ap.add_argument("--deltas", default="0.4,20", help="comma-separated budgets; a large one forces compression "
                    "(random weights give large errors) so the solver and the apply path are exercised")
    ap.add_argument("--fp8", action="store_true", help="also search the FP8 variants of the candidates (issue 11: "
                    "calibration time stays <= 1.5x a plain pass with them)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not a.tiny
    host_version = import_host(cpu=not cuda)
    load_pack()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from dfav2.calibration.cli import summarize
    from dfav2.calibration.search import DEFAULT_CANDIDATES, SearchConfig, with_fp8
    from dfav2.nodes.adapter import apply_dfa
    from dfav2.nodes.calibrate import calibrate_dfa

    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    cfg = FLUX_TINY if a.tiny else FLUX_DEV
    res, steps, txt = (256, 4, 32) if a.tiny else (a.res, a.steps, a.txt)
    unet_config = {"image_model": "flux", **cfg}
    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(dt, None)
    torch.manual_seed(0)
    base = model_config.get_model({}, "", device=dev)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    model = comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=comfy.model_management.unet_offload_device())

    g = torch.Generator().manual_seed(1)
    b = a.prompts
    positive = [[torch.randn(b, txt, cfg["context_in_dim"], generator=g),
                 {"pooled_output": torch.randn(b, cfg["vec_in_dim"], generator=g), "guidance": 3.5}]]
    negative = [[torch.zeros(b, txt, cfg["context_in_dim"]), {"pooled_output": torch.zeros(b, cfg["vec_in_dim"]), "guidance": 3.5}]]
    latent = torch.zeros(b, 16, res // 8, res // 8)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(fn):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        sync()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        return out, wall, peak

    def plain(m, n_steps):
        noise = comfy.sample.prepare_noise(latent, 0, None)
        return comfy.sample.sample(m, noise, n_steps, 1.0, "euler", "simple", positive, negative, latent,
                                   denoise=1.0, disable_pbar=True, seed=0)

    def calibrate(n_steps, delta):
        return calibrate_dfa(model, positive=positive, negative=negative, width=res, height=res, steps=n_steps,
                             cfg=1.0, sampler_name="euler", scheduler="simple", seed=0,
                             config=SearchConfig(delta=delta, candidates=candidates), guidance=3.5, prompts=b,
                             pack_version=sys.modules["dfav2"].__version__)

    candidates = with_fp8(DEFAULT_CANDIDATES) if a.fp8 else DEFAULT_CANDIDATES
    deltas = [float(d) for d in a.deltas.split(",")]
    # Warm-up (compilation, cuDNN/Triton autotuning, allocator) outside the timed runs.
    plain(model, 2)
    calibrate(2, deltas[-1])

    _, p1, pk1 = measure(lambda: plain(model, steps))
    runs = []
    for delta in deltas:
        r: dict = {"delta": delta}
        result, r["calib_s"], r["calib_peak"] = measure(lambda: calibrate(steps, delta))
        patched = apply_dfa(model, plan=result.plan)
        plain(patched, 2)  # warm-up of the apply path
        _, r["apply_s"], r["apply_peak"] = measure(lambda: plain(patched, steps))
        r["plan_summary"] = summarize(result.plan, width=res, height=res, txt_len=txt)
        runs.append(r)
    _, p2, pk2 = measure(lambda: plain(model, steps))
    plain_s, plain_peak = min(p1, p2), max(pk1, pk2)
    for r in runs:
        r["calib_time_ratio"] = r["calib_s"] / plain_s
        r["calib_peak_ratio"] = (r["calib_peak"] / plain_peak) if plain_peak else None
        r["apply_speedup"] = plain_s / r["apply_s"]
    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "comfyui": host_version,
        "fp8_candidates": a.fp8, "candidates": [str(c) for c in candidates],
        "geometry": {"res": res, "prompts": b, "steps": steps, "txt_len": txt, "dtype": str(dt).replace("torch.", "")},
        "plain_s": [p1, p2], "plain_peak": plain_peak, "runs": runs,
    }
    gib = 1024 ** 3
    print(f"# DFACalibrate cost, ComfyUI {host_version} Flux class, {info['device']}, {res}², {b} prompts, "
          f"{steps} steps, text {txt}{', FP8 candidates' if a.fp8 else ''}; plain sampling {p1:.2f} / {p2:.2f} s (before / after), peak {plain_peak / gib:.2f} GiB")
    print("| delta | calibration s | time ratio | peak GiB | memory ratio | sampling with plan s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        pr = "n/a" if r["calib_peak_ratio"] is None else f"{r['calib_peak_ratio']:.2f}"
        print(f"| {r['delta']:g} | {r['calib_s']:.2f} | {r['calib_time_ratio']:.2f} | {r['calib_peak'] / gib:.2f} | {pr} | "
              f"{r['apply_s']:.2f} | {r['apply_speedup']:.2f}x |")
    for r in runs:
        print(f"delta {r['delta']:g}: " + r["plan_summary"].replace("\n", "\n  "))
    out = Path(a.out) if a.out else Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "bench_calibration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
