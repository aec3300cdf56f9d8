"""Research only: kernel v3 timing with parts of the softmax removed (arrow_gluon.DIAG) and FP8 ring depths."""
import sys, pathlib
import torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_fp8 import attention_like, variant, at  # noqa
from bench_arrow import bench, plan_windows  # noqa
g = at._gluon()
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
for T, N in ((512, 16384), (512, 4096)):
    q, k, v = attention_like(1, 24, N + T, 128, gen, dev)
    out = torch.empty_like(q)
    for plan in ("full", "mixed"):
        hw = torch.tensor(plan_windows(plan, 24, N), dtype=torch.int32, device=dev)
        ones = torch.ones_like(hw)
        for diag in (0, 3):
            g.DIAG = diag
            variant()
            tb = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out))
            row = f"N{N} {plan:6s} diag {diag} bf16 {tb:6.3f}"
            for st in (3, 4, 5):
                g.STAGES8 = st
                variant(pv8=True)
                tf = bench(lambda: at.arrow_attention_triton(q, k, v, hw, T, out=out, head_quant=ones))
                for key, e in at._PLANS.items():
                    if key[0] == "gluon" and e is not None and e[1] is not None:
                        step = e[1]
                tp = bench(lambda: at._quantize(step, q, k, v, ones))
                row += f" | st{st} {tf:6.3f} (kernel {tf - tp:6.3f}) {tb / (tf - tp):4.2f}x"
            print(row + f" pre {tp:5.3f} v3 {at.GLUON}", flush=True)
    g.DIAG = 0
    g.STAGES8 = 5
