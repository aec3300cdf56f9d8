"""Side-by-side benchmark of the head-wise arrow kernel (kernels/arrow_triton.py) on one CUDA GPU.

Rows: cuDNN SDPA (dense), default SDPA (FLASH, dense), FlexAttention with the same per-head masks
(BlockMask built once, outside timing; torch.compile(flex_attention)), ours (+ config/TMA variants).
Plans: all full, arrow/8, /16, /32 on all heads, mixed (h % 3: full / arrow16 / skip).
Usage: python bench/bench_arrow.py [out.json] [--quick] [--sweep] [--variants] [--shapes=a,b] [--plans=x,y]
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ROOT, load_kernel  # noqa: E402

at = load_kernel()

FULL, SKIP = -1, -2
SHAPES = [  # name, B, H, T, N, D, layout for ours
    ("flux1k_T256", 1, 24, 256, 4096, 128, "bhld"),
    ("flux1k_T512", 1, 24, 512, 4096, 128, "bhld"),
    ("flux2k_T256", 1, 24, 256, 16384, 128, "bhld"),
    ("flux2k_T512", 1, 24, 512, 16384, 128, "bhld"),
    ("sd35L_1k_T154", 1, 38, 154, 4096, 64, "blhd_flat"),
]
PLANS = ["full", "arrow8", "arrow16", "arrow32", "mixed"]


def plan_windows(plan: str, H: int, N: int) -> list[int]:
    if plan == "full":
        return [FULL] * H
    if plan.startswith("arrow"):
        return [N // (2 * int(plan[5:]))] * H
    return [(FULL, N // 32, SKIP)[h % 3] for h in range(H)]


def kept_pairs(w: int, L: int, T: int) -> int:
    """Token-exact kept (q, k) pairs of one head (0 for skipped heads)."""
    if w == SKIP:
        return 0
    if w == FULL:
        return L * L
    N = L - T
    band = 0
    for i in range(N):  # image rows: band inside the image region
        band += min(N - 1, i + w) - max(0, i - w) + 1
    return T * L + N * T + band


def tiles_visited(w: int, L: int, T: int, BM: int, BN: int) -> int:
    """Key tiles our kernel visits for one head (same arithmetic as the kernel)."""
    if w == SKIP:
        return 0
    tot = 0
    Tc = -(-T // BN) * BN
    for m0 in range(0, L, BM):
        if w == FULL or m0 + BM <= T:
            tot += -(-L // BN)
        elif m0 < T:
            tot += -(-L // BN)
        else:
            s0 = max(m0 - w, Tc)
            e0 = min(m0 + BM + w, L)
            tot += T // BN + (T % BN != 0) + max(0, -(-(e0 - s0) // BN))
    return tot


def bench(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_bench(fn, warmup=25, rep=100):
    """Kernel time without host launch cost: one call captured in a CUDA graph, replay timed by do_bench."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t = bench(g.replay, warmup=warmup, rep=rep)
    del g
    return t


def host_us(fn, n=200):
    """Host cost per call (µs): n back-to-back calls of a launch whose kernel does nothing (all heads skipped)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def to_bhld(x, layout, H):
    if layout == "bhld":
        return x
    B, L, HD = x.shape
    return x.view(B, L, H, HD // H).transpose(1, 2)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    sweep = "--sweep" in sys.argv
    variants = "--variants" in sys.argv
    out_path = pathlib.Path(args[0]) if args else ROOT / "bench" / "results" / "bench_arrow.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    props = torch.cuda.get_device_properties(dev)
    res = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "dtype": "bf16", "rows": [], "sweep": [], "variants": []}
    n_sets = 2
    shapes = SHAPES[3:4] if quick else SHAPES
    only = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--shapes=")]
    if only:
        shapes = [s for s in SHAPES if s[0] in only[0]]
    plans_sel = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--plans=")]
    for name, B, H, T, N, D, layout in shapes:
        L = T + N
        gen = torch.Generator(device=dev).manual_seed(0)
        sets = []
        for _ in range(n_sets):
            qkv = [torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=gen) for _ in range(3)]
            if layout == "blhd_flat":
                ours_in = [x.transpose(1, 2).contiguous().view(B, L, H * D) for x in qkv]
            else:
                ours_in = qkv
            sets.append((qkv, ours_in))
        dense_flops = 4.0 * B * H * L * L * D
        default_cfg = at._default_config(dev, D, dtype)

        def t_sets(make):
            return sum(bench(make(i)) for i in range(n_sets)) / n_sets

        t_cudnn = t_sets(lambda i: (lambda: _sdpa(sets[i][0], SDPBackend.CUDNN_ATTENTION)))
        t_flash = t_sets(lambda i: (lambda: _sdpa(sets[i][0], SDPBackend.FLASH_ATTENTION)))
        print(f"[{name}] L={L} cuDNN {t_cudnn:.3f} ms ({dense_flops / t_cudnn / 1e9:.0f} TFLOP/s) "
              f"FLASH {t_flash:.3f} ms", flush=True)
        # host cost per call: cached plan (public path) vs rebuilding it every call (session-2 host path)
        hw_skip = torch.full((H,), SKIP, dtype=torch.int32, device=dev)
        qo, ko, vo = sets[0][1]
        o_skip = torch.empty_like(qo)
        h_fast = host_us(lambda: at.arrow_attention_triton(qo, ko, vo, hw_skip, T, layout=layout, out=o_skip))
        h_slow = host_us(lambda: at._launch(qo, ko, vo, hw_skip, T, layout, None, o_skip, fast=False))
        res.setdefault("host_us", []).append(dict(shape=name, cached=h_fast, uncached=h_slow))
        print(f"  host per call: cached plan {h_fast:.1f} us, rebuilt every call {h_slow:.1f} us", flush=True)
        for plan in plans_sel[0] if plans_sel else (PLANS if not quick else ["full", "arrow16", "mixed"]):
            wins = plan_windows(plan, H, N)
            hw = torch.tensor(wins, dtype=torch.int32, device=dev)
            uniq = {w: kept_pairs(w, L, T) for w in set(wins)}
            kept = sum(uniq[w] for w in wins)
            density = kept / (H * L * L)
            BM, BN = default_cfg["BLOCK_M"], default_cfg["BLOCK_N"]
            tv = {w: tiles_visited(w, L, T, BM, BN) for w in set(wins)}
            block_density = sum(tv[w] for w in wins) * BM * BN / (H * L * L)
            # FlexAttention with the same masks (BlockMask built once)
            win_t = hw.clone()

            def mask_mod(b, h, qi, ki):
                w = win_t[h]
                band = (qi < T) | (ki < T) | ((qi - ki).abs() <= w)
                return (w == FULL) | ((w >= 0) & band)
            bm = create_block_mask(mask_mod, None, H, L, L, device=dev, BLOCK_SIZE=128)
            flex_density = 1.0 - bm.sparsity() / 100.0
            t_flex = t_sets(lambda i: (lambda: flex(*sets[i][0], block_mask=bm)))
            outs = [torch.empty_like(sets[i][1][0]) for i in range(n_sets)]

            def ours(i, **kw):
                qo, ko, vo = sets[i][1]
                if kw:
                    return lambda: at._launch(qo, ko, vo, hw, T, layout, None, outs[i], **kw)
                return lambda: at.arrow_attention_triton(qo, ko, vo, hw, T, layout=layout, out=outs[i])
            t_ours = t_sets(lambda i: ours(i))
            t_ours_graph = sum(graph_bench(ours(i)) for i in range(n_sets)) / n_sets
            # sanity: ours vs flex on computed heads
            ref = flex(*sets[0][0], block_mask=bm)
            at.arrow_attention_triton(*sets[0][1], hw, T, layout=layout, out=outs[0])
            ob = to_bhld(outs[0], layout, H)
            live = [h for h, w in enumerate(wins) if w != SKIP]
            err = ((ob[:, live].float() - ref[:, live].float()).norm() / ref[:, live].float().norm()).item()
            row = dict(shape=name, B=B, H=H, L=L, T=T, D=D, layout=layout, plan=plan, density=density,
                       block_density_ours=block_density, block_density_flex128=flex_density,
                       t_cudnn_dense=t_cudnn, t_flash_dense=t_flash, t_flex=t_flex, t_ours=t_ours,
                       t_ours_graph=t_ours_graph,
                       ours_vs_cudnn=t_cudnn / t_ours, sparse_eff=density * t_cudnn / t_ours,
                       flex_sparse_eff=density * t_cudnn / t_flex, ours_vs_flex=t_flex / t_ours,
                       eff_tflops_ours=4.0 * kept * B * D / t_ours / 1e9, rel_err_vs_flex=err,
                       config=default_cfg)
            res["rows"].append(row)
            print(f"  {plan:8s} dens {density:.3f} (blk {block_density:.3f}, flex {flex_density:.3f}) "
                  f"flex {t_flex:.3f} ours {t_ours:.3f} (graph {t_ours_graph:.3f}) ms  eff {row['sparse_eff']:.2f} "
                  f"x cuDNN {row['ours_vs_cudnn']:.2f} x flex {row['ours_vs_flex']:.2f} err {err:.1e}", flush=True)
            if variants:
                for vname, over in (VARIANTS if D == 128 else VARIANTS_D64):
                    cfg = dict(default_cfg, **over)
                    try:
                        tg = sum(graph_bench(ours(i, config=cfg), warmup=10, rep=50) for i in range(n_sets)) / n_sets
                        at._launch(*sets[0][1], hw, T, layout, None, outs[0], config=cfg)
                        ob = to_bhld(outs[0], layout, H)
                        verr = ((ob[:, live].float() - ref[:, live].float()).norm()
                                / ref[:, live].float().norm()).item()
                    except Exception as e:  # noqa: BLE001 - report and continue
                        print(f"    variant {vname} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    res["variants"].append(dict(shape=name, plan=plan, variant=vname, cfg=cfg, t_graph=tg,
                                                t_graph_default=t_ours_graph, t_flex=t_flex, t_cudnn=t_cudnn,
                                                rel_err_vs_flex=verr,
                                                sparse_eff=density * t_cudnn / tg, x_flex=t_flex / tg))
                    print(f"    variant {vname:14s} graph {tg:.3f} ms (default {t_ours_graph:.3f}, "
                          f"{t_ours_graph / tg:.3f}x)  eff {density * t_cudnn / tg:.2f} x cuDNN {t_cudnn / tg:.2f} "
                          f"x flex {t_flex / tg:.2f} err {verr:.1e}", flush=True)
            if sweep and name in ("flux2k_T512", "sd35L_1k_T154", "flux1k_T512") and plan in ("full", "arrow16"):
                for cfg in _sweep_configs(D):
                    tma = cfg["TMA"]
                    if True:
                        try:
                            t = t_sets(lambda i: ours(i, config=cfg))
                        except Exception as e:  # noqa: BLE001 - report and continue the sweep
                            print(f"    cfg {cfg} tma={tma} failed: {type(e).__name__}: {str(e)[:200]}")
                            continue
                        res["sweep"].append(dict(shape=name, plan=plan, cfg=cfg, tma=tma, t=t,
                                                 x_cudnn=t_cudnn / t))
                        print(f"    cfg {cfg} tma={tma}: {t:.3f} ms  x cuDNN {t_cudnn / t:.3f}", flush=True)
        torch.cuda.empty_cache()
    out_path.write_text(json.dumps(res, indent=1))
    _table(res)


def _sdpa(qkv, backend):
    with sdpa_kernel(backend):
        return sdpa(*qkv)


VARIANTS = [  # D = 128 (timed with CUDA-graph replay): on Hopper the default launch is kernel v3 (Gluon); an explicit
    # config runs the Triton kernel (v2) instead. The research variants (persistent walks, head-order switches, the
    # 2026-11-29 overlap switches) left the kernels: kernels/NOTES.md has their numbers.
    ("triton_v2", dict()),
    ("triton_v2_ws_off", dict(WS=False)),
]
VARIANTS_D64 = [
    ("tma_off", dict(TMA=False)),
    ("bm128", dict(BLOCK_M=128, num_warps=8)),
]


def _sweep_configs(D):
    c = []
    for bm, bn, wp, st, tma, ws in ((128, 128, 8, 3, True, False), (128, 128, 8, 2, True, False),
                                    (128, 64, 8, 3, True, False), (128, 128, 8, 3, False, False),
                                    (128, 128, 8, 2, True, True), (128, 128, 8, 3, True, True),
                                    (128, 128, 4, 3, True, True), (128, 64, 4, 3, True, True),
                                    (128, 128, 8, 4, True, False), (64, 64, 4, 3, True, False)):
        if D == 128 and st == 4 and bn == 128:
            continue
        c.append(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=wp, num_stages=st, TMA=tma, WS=ws))
    return c


def _table(res):
    print("\n| shape | plan | density (token / our blocks) | cuDNN dense ms | FLASH dense ms | flex ms | ours ms "
          "| ours graph ms | ours x cuDNN | sparse eff (ours / flex) | ours x flex |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['shape']} | {r['plan']} | {r['density']:.3f} / {r['block_density_ours']:.3f} "
              f"| {r['t_cudnn_dense']:.3f} | {r['t_flash_dense']:.3f} | {r['t_flex']:.3f} | {r['t_ours']:.3f} "
              f"| {r['t_ours_graph']:.3f} "
              f"| {r['ours_vs_cudnn']:.2f} | {r['sparse_eff']:.2f} / {r['flex_sparse_eff']:.2f} "
              f"| {r['ours_vs_flex']:.2f} |")


if __name__ == "__main__":
    main()
