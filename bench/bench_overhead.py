"""Overhead of the DFAApply host adapter on ComfyUI's own Flux class (issue 3 §8).

One Flux-dev-geometry forward (19 double + 38 single blocks, 24 × 128 heads, random bf16 weights, 2048², text 512)
per timed call, side by side in one process:

  unpatched          the model as loaded (host attention, no override)
  hook_passthrough   a bare override that calls the host backend (cost of the host hook itself)
  dfa_all_full       the adapter with an all-full plan, dense "host" (routing + per-forward set-up; must be <= 1 %
                     over unpatched, and bit-identical on CPU)
  dfa_all_full_fastest  the same plan with dense "fastest" (all-full layers on cuDNN-first SDPA)
  unpatched_cudnn    host attention forced to cuDNN SDPA (the faster dense baseline; baselines.md item 3)
  dfa_arrow8_<be>    the adapter with a uniform arrow/8 plan (engine backend "flex" or "triton")
  dfa_mixed_<be>     a third of the heads full, a third arrow/16, a third cached (repeated forwards hit the cache);
                     `_host`: the same with dense "host"
  dfa_arrow8_fp8_triton / dfa_mixed_fp8_triton  the arrow/8 and mixed plans with their computed heads in FP8
                     (e4m3 Q.K^T, issue 11)
  dfa_cacheheavy_<be>  full at the timed position, every head cached at the next (the cache holds every head of
                     every layer: the worst case for memory), cache on the GPU; `_cpu`: in pinned CPU memory

Peak VRAM per variant: torch.cuda.max_memory_allocated over two forwards after a reset (weights included).

GPU: `triton.testing.do_bench` median. `--tiny`: a tiny Flux on CPU (wall-clock median), to check the script runs.
ComfyUI comes from COMFYUI_PATH or the lean tree `.comfy/` in the repository root.

    python bench/bench_overhead.py                 # H200: prints a table, writes $OUT/bench_overhead.json
    python bench/bench_overhead.py --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, import_host, load_pack  # noqa: E402

FLUX_DEV: dict[str, Any] = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
FLUX_TINY: dict[str, Any] = dict(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4)


def _timer(device_type: str, warmup_ms: float, rep_ms: float):
    if device_type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    def wall(fn, reps: int = 7):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Flux on CPU (smoke run)")
    ap.add_argument("--res", type=int, default=2048, help="image side in pixels (default 2048)")
    ap.add_argument("--txt", type=int, default=512, help="text tokens (default 512)")
    ap.add_argument("--backends", default="flex,triton", help="arrow backends of the engine, comma separated")
    ap.add_argument("--rep-ms", type=float, default=5000.0, help="do_bench rep time per variant in ms")
    ap.add_argument("--paired", type=int, default=0,
                    help="rounds of the paired check: unpatched and each all-full variant alternately, 2 forwards each, "
                         "timed with CUDA events; reports the median per-round ratio (0: skip)")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_overhead.json or bench/results/)")
    a = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not a.tiny
    host_version = import_host(cpu=not cuda)
    load_pack()
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    from dfav2.calibration.plan import Plan, PlanPosition
    from dfav2.kernels.methods import CACHE, FULL, LayerDecision, arrow
    from dfav2.nodes.adapter import finish_run, standalone_run
    from dfav2.nodes.hooks import forward_options
    from dfav2.nodes.layouts import model_signature

    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    res, txt = (256, 32) if a.tiny else (a.res, a.txt)
    cfg = FLUX_TINY if a.tiny else FLUX_DEV
    torch.manual_seed(0)
    m = Flux(dtype=dt, device=dev, operations=comfy.ops.disable_weight_init, **cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m.eval()
    sig = model_signature(m)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    full_plan = Plan.uniform(sig, sigmas, FULL, first_full=False, description="all full")
    arrow_plan = Plan.uniform(sig, sigmas, arrow(8), first_full=False, description="uniform arrow/8")
    third = sig.layers[0].heads // 3
    mixed = LayerDecision((FULL,) * third + (arrow(16),) * third + (CACHE,) * (sig.layers[0].heads - 2 * third))
    mixed_plan = Plan(sig, tuple(
        PlanPosition(s_, tuple(LayerDecision.uniform(FULL, l.heads) if i == 0 else mixed for l in sig.layers))
        for i, s_ in enumerate(sigmas)), None, "mixed: 1/3 full, 1/3 arrow/16, 1/3 cache")
    # the same mixes with their computed heads in FP8 (issue 11): full+fp8 and arrow/16+fp8 beside the cached third
    mixed8 = LayerDecision(tuple(m.with_fp8() if m != CACHE else m for m in mixed.methods))
    mixed8_plan = Plan(sig, tuple(
        PlanPosition(s_, tuple(LayerDecision.uniform(FULL, l.heads) if i == 0 else mixed8 for l in sig.layers))
        for i, s_ in enumerate(sigmas)), None, "mixed with FP8: 1/3 full+fp8, 1/3 arrow/16+fp8, 1/3 cache")
    arrow8_fp8_plan = Plan.uniform(sig, sigmas, arrow(8, fp8=True), first_full=False, description="uniform arrow/8+fp8")
    cache_plan = Plan(sig, tuple(
        PlanPosition(s_, tuple(LayerDecision.uniform(FULL if i % 2 == 0 else CACHE, l.heads) for l in sig.layers))
        for i, s_ in enumerate(sigmas)), None, "cache-heavy: full, all cached, full (timed), all cached")
    backends = [b for b in a.backends.split(",") if b]
    if not cuda:
        backends = [b for b in backends if b != "triton"] or ["sdpa"]

    x = torch.randn(1, 16, res // 8, res // 8, device=dev, dtype=dt)
    ctx = torch.randn(1, txt, cfg["context_in_dim"], device=dev, dtype=dt)
    y = torch.randn(1, cfg["vec_in_dim"], device=dev, dtype=dt)
    g = torch.tensor([3.5], device=dev, dtype=dt)
    t = torch.tensor([0.5], device=dev, dtype=dt)  # sigma 0.5 -> plan position 2
    sigma = torch.tensor([0.5], device=dev, dtype=torch.float32)

    def passthrough(func, *args, **kwargs):
        return func(*args, **kwargs)

    runs = {"dfa_all_full": standalone_run(m, full_plan, backend=backends[0], dense="host"),
            "dfa_all_full_fastest": standalone_run(m, full_plan, backend=backends[0], dense="fastest")}
    for be in backends:
        runs[f"dfa_arrow8_{be}"] = standalone_run(m, arrow_plan, backend=be)
        runs[f"dfa_mixed_{be}"] = standalone_run(m, mixed_plan, backend=be)
        runs[f"dfa_mixed_{be}_host"] = standalone_run(m, mixed_plan, backend=be, dense="host")
        if be == "triton":
            runs["dfa_arrow8_fp8_triton"] = standalone_run(m, arrow8_fp8_plan, backend=be)
            runs["dfa_mixed_fp8_triton"] = standalone_run(m, mixed8_plan, backend=be)
        runs[f"dfa_cacheheavy_{be}"] = standalone_run(m, cache_plan, backend=be, cache_offload="gpu")
        runs[f"dfa_cacheheavy_{be}_cpu"] = standalone_run(m, cache_plan, backend=be, cache_offload="cpu")

    def cudnn(func, q, k, v, heads, *args, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        # The host pins SDPA's priority FLASH > CUDNN inside `func`, so call SDPA here with cuDNN only.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not skip_reshape or mask is not None:
            return func(q, k, v, heads, *args, mask=mask, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o if skip_output_reshape else o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    def forward(to):
        with torch.no_grad():
            return m(x, t, ctx, y=y, guidance=g, transformer_options=to)

    t_next = torch.tensor([0.25], device=dev, dtype=dt)
    sigma_next = torch.tensor([0.25], device=dev, dtype=torch.float32)

    def with_run(base):
        return lambda: forward(forward_options(base, x, sigma, ctx))

    def store_then_reuse(base):
        """Two forwards: sigma 0.5 stores every head, sigma 0.25 reuses them all (timed together, reported per
        forward). The second forward's attention is skipped entirely, so the row is a plan's average, not a cost."""
        def two():
            forward(forward_options(base, x, sigma, ctx))
            with torch.no_grad():
                return m(x, t_next, ctx, y=y, guidance=g, transformer_options=forward_options(base, x, sigma_next, ctx))
        return two

    variants = {
        "unpatched": lambda: forward({}),
        "hook_passthrough": lambda: forward({"optimized_attention_override": passthrough}),
        **({"unpatched_cudnn": lambda: forward({"optimized_attention_override": cudnn})} if cuda else {}),
        **{name: (store_then_reuse if "cacheheavy" in name else with_run)(base) for name, base in runs.items()},
    }
    bench = _timer(dev.type, warmup_ms=1000.0, rep_ms=a.rep_ms)
    with torch.no_grad():
        ref = forward({})
        checks = {name: (fn() - ref).abs().max().item() for name, fn in variants.items()}  # also compiles flex
    from dfav2.nodes.hooks import TO_RUN

    def release_all() -> None:  # each run's head cache lives until released: measure one variant's alone
        for base in runs.values():
            base[TO_RUN].release()

    peak_gib: dict[str, float | None] = {}
    for name, fn in variants.items():
        if cuda:
            release_all()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            fn()
            torch.cuda.synchronize()
            peak_gib[name] = torch.cuda.max_memory_allocated() / 2**30
            release_all()
        else:
            peak_gib[name] = None
    times = {}
    for name, fn in variants.items():  # interleave a second pass to expose drift
        times[name] = bench(fn)
    second = {name: bench(fn) for name, fn in variants.items()} if cuda else {}
    paired: dict[str, dict[str, float]] = {}
    if cuda and a.paired > 0:
        def ms_of(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 2
        for name in ("hook_passthrough", "dfa_all_full", "dfa_all_full_fastest"):
            ratios = []
            for r in range(a.paired):
                pair = (variants["unpatched"], variants[name]) if r % 2 == 0 else (variants[name], variants["unpatched"])
                pair_ms = [ms_of(fn) for fn in pair]
                ratios.append(pair_ms[1] / pair_ms[0] if r % 2 == 0 else pair_ms[0] / pair_ms[1])
            ratios.sort()
            paired[name] = {"median_pct": 100.0 * (statistics.median(ratios) - 1.0),
                            "iqr_pct": [100.0 * (ratios[len(ratios) // 4] - 1.0), 100.0 * (ratios[(3 * len(ratios)) // 4] - 1.0)]}
            print(f"paired {name} vs unpatched: median {paired[name]['median_pct']:+.2f}% "
                  f"(IQR {paired[name]['iqr_pct'][0]:+.2f}% .. {paired[name]['iqr_pct'][1]:+.2f}%, {a.paired} rounds)")
    summaries = {name: finish_run(base) for name, base in runs.items()}

    best = {name: (times[name] if not second else min(times[name], second[name])) for name in variants}
    base_ms = best["unpatched"]
    cudnn_ms = best.get("unpatched_cudnn")
    rows = []
    for name in variants:
        ms = best[name] / (2 if "cacheheavy" in name else 1)
        rows.append({
            "variant": name, "ms": ms, "ms_pass1": times[name], "ms_pass2": second.get(name),
            "vs_unpatched_pct": 100.0 * (ms / base_ms - 1.0),
            "speedup_vs_unpatched": base_ms / ms,
            "speedup_vs_cudnn": None if cudnn_ms is None else cudnn_ms / ms,
            "max_abs_diff_vs_unpatched": checks[name],
            "peak_gib": peak_gib[name],
            "peak_vs_unpatched_pct": None if peak_gib[name] is None else 100.0 * (peak_gib[name] / peak_gib["unpatched"] - 1.0),
        })
    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "comfyui": host_version,
        "host_attention": attention.optimized_attention.__name__,
        "geometry": {"res": res, "txt_len": txt, "img_tokens": (res // 16) ** 2, "heads": cfg["num_heads"],
                     "head_dim": cfg["hidden_size"] // cfg["num_heads"], "double": cfg["depth"],
                     "single": cfg["depth_single_blocks"], "dtype": str(dt).replace("torch.", "")},
        "timer": "triton do_bench median" if cuda else "wall-clock median of 7",
        "rows": rows,
        "paired_vs_unpatched": paired,
        "engine": {name: {"engine_calls": s.engine_calls, "fallbacks": s.fallbacks, "flops_saved": s.flops_saved}
                   for name, s in summaries.items()},
    }
    print(f"# DFAApply overhead, ComfyUI {host_version} Flux class, {info['device']}, {res}², text {txt}, "
          f"{info['geometry']['dtype']}, host attention {info['host_attention']}, {info['timer']}")
    print("| variant | ms / forward | vs unpatched | speed-up vs unpatched | vs cuDNN-unpatched | peak GiB | peak vs unpatched | max abs diff vs unpatched |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vc = "—" if r["speedup_vs_cudnn"] is None else f"{r['speedup_vs_cudnn']:.2f}x"
        pk = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} | {r['peak_vs_unpatched_pct']:+.1f}%"
        print(f"| {r['variant']} | {r['ms']:.2f} | {r['vs_unpatched_pct']:+.2f}% | {r['speedup_vs_unpatched']:.2f}x | {vc} | "
              f"{pk if r['peak_gib'] is not None else '— | —'} | {r['max_abs_diff_vs_unpatched']:.3g} |")
    for name, s in summaries.items():
        print(f"{name}: {s.line()}")
    out = Path(a.out) if a.out else Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "bench_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")
    bad = [n for n, s in summaries.items() if s.fallbacks]
    # On CUDA the unpatched model itself is not bitwise reproducible between calls (its own row shows the
    # jitter), so the all-full plan must stay within that jitter; on CPU it must be exact.
    if checks["dfa_all_full"] > checks["unpatched"] or bad:
        print(f"FAILED: all-full diff {checks['dfa_all_full']} (unpatched vs itself {checks['unpatched']}), fallbacks in {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
