"""FP8 heads of the arrow kernel on one CUDA GPU: accuracy against float64, then time side by side (issue 11).

Accuracy (Flux-dev geometry, 4 heads): relative L2 and worst-row cosine of each variant against a float64 softmax
with the same mask -- ours bf16 and FP8 (full, arrow/8), cuDNN SDPA and comfy-kitchen's INT8 attention (full).
Time (CUDA events, median after warm-up, one process): cuDNN SDPA, comfy-kitchen INT8 (ComfyUI 0.33's
`comfy_kitchen_int8` backend), ours bf16 and FP8 for each plan as launched (kernel v3 on Hopper at head_dim 128,
else the Triton kernel) and the FP8 heads on the Triton kernel (`fp8 v2`); every FP8 time includes its pre-pass (K's
mean + the quantization kernel), which is also timed alone.
Inputs are random but attention-like: per-channel scales, a shared K offset (what smoothing removes), logits with
a standard deviation of about 3.
Usage: python bench/bench_fp8.py OUT.json [--quick]
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import load_kernel  # noqa: E402
from bench_arrow import FULL, SKIP, bench, kept_pairs, plan_windows  # noqa: E402

at = load_kernel()

SHAPES = [  # name, B, H, T, N, D
    ("flux1k_T256", 1, 24, 256, 4096, 128),
    ("flux1k_T512", 1, 24, 512, 4096, 128),
    ("flux2k_T256", 1, 24, 256, 16384, 128),
    ("flux2k_T512", 1, 24, 512, 16384, 128),
    ("sd35L_1k_T154", 1, 38, 154, 4096, 64),
]
PLANS = ["full", "arrow8", "arrow16", "mixed"]


def attention_like(B, H, L, D, gen, device):
    """q, k, v [B, H, L, D] bf16 with per-channel scales, outlier channels and a shared K offset."""
    def r(*s):
        return torch.randn(*s, generator=gen, device=device)
    ch = 0.5 + r(1, H, 1, D).abs()
    ch[..., :4] *= 4  # a few outlier channels, as in real q/k
    q = r(B, H, L, D) * ch
    k = r(B, H, L, D) * ch
    q = q * (3.0 / (q.std() * k.std()))  # logits q.k / sqrt(D) of standard deviation ~ 3
    k = k + 2.0 * r(1, H, 1, D)  # an offset shared by all keys: softmax-invariant, but it costs K quantization range
    v = r(B, H, L, D) * (0.5 + r(1, H, 1, D).abs())
    return [x.to(torch.bfloat16).contiguous() for x in (q, k, v)]


def reference64(q, k, v, w, T, rows=2048):
    """float64 softmax attention of one head [L, D] with the arrow keep mask of window w (FULL: none)."""
    L = q.shape[0]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    kk = torch.arange(L, device=q.device)[None, :]
    for r0 in range(0, L, rows):
        s = (q[r0:r0 + rows] @ k.T) / math.sqrt(q.shape[1])
        if w != FULL:
            qi = torch.arange(r0, min(r0 + rows, L), device=q.device)[:, None]
            s = s.masked_fill(~((qi < T) | (kk < T) | ((qi - kk).abs() <= w)), float("-inf"))
        out[r0:r0 + rows] = torch.softmax(s, -1) @ v
    return out


def errors(o, ref):
    o = o.double()
    rel = ((o - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(o, ref, dim=-1).min().item()
    return rel, cos


def route(v3=True):
    """Let the following launches use kernel v3 where it applies, or force the Triton kernel (cached plans dropped)."""
    at._PLANS.clear()
    at.GLUON = v3


def prepass(q):
    """The pre-pass of the cached FP8 plan for q's shape (kernel v3's or the Triton kernel's)."""
    for key, e in at._PLANS.items():
        if key[0] == "gluon" and e is not None and e[1] is not None and key[1][8] == q.shape:
            return e[1]
    return at._PLANS[next(key for key in at._PLANS if key[0] != "gluon" and key[6] and key[8] == q.shape)].qstep


def comfy_kitchen_int8():
    try:
        import comfy_kitchen

        if hasattr(comfy_kitchen, "int8_attention_is_available") and not comfy_kitchen.int8_attention_is_available():
            return None, "comfy_kitchen.int8_attention_is_available() is False"
        return comfy_kitchen.int8_attention, getattr(comfy_kitchen, "__version__", "?")
    except Exception as exc:  # not installed on this machine
        return None, f"{type(exc).__name__}: {exc}"


def accuracy(device, ck):
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for name, B, H, T, N, D in SHAPES[1::2][:2]:  # flux1k_T512, flux2k_T512
        L = T + N
        q, k, v = attention_like(B, 4, L, D, gen, device)
        for plan in ("full", "arrow8"):
            w = FULL if plan == "full" else N // 16
            hw = torch.full((4,), w, dtype=torch.int32, device=device)
            refs = [reference64(q[0, h], k[0, h], v[0, h], w, T) for h in range(4)]
            variants = {"ours bf16": at.arrow_attention_triton(q, k, v, hw, T),
                        "ours fp8": at.arrow_attention_triton(q, k, v, hw, T, head_quant=torch.ones_like(hw))}
            route(v3=False)
            variants["ours fp8 v2"] = at.arrow_attention_triton(q, k, v, hw, T, head_quant=torch.ones_like(hw))
            route()
            if plan == "full":
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    variants["cuDNN bf16"] = sdpa(q, k, v)
                if ck[0] is not None:
                    variants["comfy-kitchen int8"] = ck[0](q, k, v)
            for vname, o in variants.items():
                errs = [errors(o[0, h], refs[h]) for h in range(4)]
                row = dict(shape=name, plan=plan, variant=vname, rel_l2=max(e[0] for e in errs),
                           worst_row_cos=min(e[1] for e in errs), finite=bool(torch.isfinite(o).all()))
                rows.append(row)
                print(f"{name:14s} {plan:7s} {vname:20s} rel L2 {row['rel_l2']:.2e}  worst-row cos "
                      f"{row['worst_row_cos']:.5f}", flush=True)
        del q, k, v
    return rows


def timing(device, ck, quick):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = SHAPES if not quick else [SHAPES[1], SHAPES[3]]
    for name, B, H, T, N, D in shapes:
        L = T + N
        q, k, v = attention_like(B, H, L, D, gen, device)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = bench(lambda: sdpa(q, k, v))
        t_ck = bench(lambda: ck[0](q, k, v)) if ck[0] is not None else None
        out = torch.empty_like(q)
        ones = torch.ones(H, dtype=torch.int32, device=device)
        for plan in PLANS:
            windows = plan_windows(plan, H, N)
            hw = torch.tensor(windows, dtype=torch.int32, device=device)
            t_bf16 = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out))
            route(v3=False)
            t_v2 = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out, head_quant=ones))
            route()
            t_fp8 = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out, head_quant=ones))
            step = prepass(q)
            t_pre = bench(lambda: at._quantize(step, q, k, ones))
            density = sum(kept_pairs(w, L, T) for w in windows) / (H * L * L)
            row = dict(shape=name, plan=plan, density=density, cudnn_ms=t_cudnn, ck_int8_ms=t_ck, bf16_ms=t_bf16,
                       fp8_ms=t_fp8, fp8_v2_ms=t_v2, prepass_ms=t_pre, fp8_speedup=t_bf16 / t_fp8, v3=at.GLUON,
                       fp8_vs_cudnn=t_cudnn / t_fp8, fp8_vs_ck=(t_ck / t_fp8) if t_ck else None)
            rows.append(row)
            ck_s = f"{t_ck:7.3f}" if t_ck else "    n/a"
            print(f"{name:14s} {plan:7s} dens {density:5.3f} cuDNN {t_cudnn:7.3f} ck-int8 {ck_s} bf16 {t_bf16:7.3f} "
                  f"fp8 {t_fp8:7.3f} (pre {t_pre:6.3f}; v2 {t_v2:7.3f}) fp8/bf16 {t_bf16 / t_fp8:5.2f}x  vs cuDNN "
                  f"{t_cudnn / t_fp8:5.2f}x" + (f"  vs ck {t_ck / t_fp8:5.2f}x" if t_ck else ""), flush=True)
        del q, k, v, out
        torch.cuda.empty_cache()
    return rows


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    device = torch.device("cuda")
    ck = comfy_kitchen_int8()
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                comfy_kitchen=ck[1] if ck[0] is not None else f"unavailable ({ck[1]})")
    import triton
    info["triton"] = triton.__version__
    print(info, flush=True)
    acc = accuracy(device, ck)
    rows = timing(device, ck, quick)
    if args:
        pathlib.Path(args[0]).write_text(json.dumps(dict(info=info, accuracy=acc, timing=rows), indent=1))


if __name__ == "__main__":
    main()
