"""Kernel v3's FP8 heads, first run: odd shapes against the scheme's reference (e4m3 P·V) and float64, then one
timing at Flux 2K. Prints; exits non-zero on a mismatch."""
import sys, pathlib, math
import torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import load_kernel, load_pack  # noqa
at = load_kernel()
load_pack()
from dfav2.kernels.quant import fp8_attention_reference  # noqa
from bench_fp8 import attention_like, reference64, variant  # noqa
from bench_arrow import bench  # noqa

FULL, SKIP = -1, -2
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
bad = 0
for B, H, T, N, layout in [(1, 6, 77, 1000, "bhld"), (2, 6, 0, 333, "blhd_flat"), (1, 6, 512, 4096, "bhld"), (1, 3, 1, 129, "bhld")]:
    L = T + N
    D = 128
    q, k, v = attention_like(B, H, L, D, gen, dev)
    windows = [FULL, N // 16, 37, SKIP, FULL, 5][:H]
    quant = [1, 1, 1, 1, 0, 1][:H]
    hw = torch.tensor(windows, dtype=torch.int32, device=dev)
    hq = torch.tensor(quant, dtype=torch.int32, device=dev)
    if layout == "blhd_flat":
        qf, kf, vf = (x.transpose(1, 2).reshape(B, L, H * D) for x in (q, k, v))
    else:
        qf, kf, vf = q, k, v
    for pv8, pp8 in ((True, True), (False, True), (True, False)):
        variant(pv8=pv8, pp8=pp8)
        o = at.arrow_attention_triton(qf, kf, vf, hw, T, layout=layout, head_quant=hq, zero_skip=True)
        torch.cuda.synchronize()
        if layout == "blhd_flat":
            o = o.unflatten(-1, (H, D)).transpose(1, 2)
        served = [key for key, e in at._PLANS.items() if key[0] == "gluon" and e is not None]
        emu = fp8_attention_reference(q, k, v, windows, T, q_block=128, pv8=pv8).double()
        plain = at.arrow_attention_triton(q, k, v, hw, T, zero_skip=True).double()
        for h in range(H):
            if windows[h] == SKIP:
                continue
            ref = reference64(q[0, h], k[0, h], v[0, h], windows[h], T)
            e_emu = ((o[:, h].double() - emu[:, h]).norm() / emu[:, h].norm()).item()
            e_ex = ((o[0, h].double() - ref).norm() / ref.norm()).item()
            e_pl = ((plain[0, h] - ref).norm() / ref.norm()).item()
            ok = math.isfinite(e_emu) and (e_emu < 0.05 if quant[h] else True) and e_ex < 0.2
            bad += not ok
            print(f"B{B} H{H} T{T} N{N} {layout:9s} pv8={pv8:d} pp8={pp8:d} v3={bool(served) and at.GLUON} head {h} w {windows[h]:5d} "
                  f"fp8 {quant[h]} vs-emu {e_emu:.4f} vs-f64 {e_ex:.4f} (bf16 {e_pl:.4f}) {'ok' if ok else 'BAD'}",
                  flush=True)
variant()
from bench_arrow import plan_windows  # noqa
for name, T, N in (("flux2k", 512, 16384), ("flux1k", 512, 4096)):
    q, k, v = attention_like(1, 24, N + T, 128, gen, dev)
    out = torch.empty_like(q)
    for plan in ("full", "mixed", "arrow8"):
        hw = torch.tensor(plan_windows(plan, 24, N), dtype=torch.int32, device=dev)
        ones = torch.ones_like(hw)
        variant()
        tb = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out))
        row = f"{name} {plan:6s} bf16 {tb:6.3f}"
        for pv8, pp8 in ((True, True), (True, False), (False, True), (False, False)):
            variant(pv8=pv8, pp8=pp8)
            tf = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out, head_quant=ones))
            row += f" | pv8={pv8:d} pp={pp8:d} {tf:6.3f} {tb / tf:4.2f}x"
        print(row + f" v3 {at.GLUON}", flush=True)
    del q, k, v, out
sys.exit(1 if bad else 0)
