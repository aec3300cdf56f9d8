"""Config sweep of the FP8 heads (issue 11; kernels/NOTES.md): time of an all-FP8 launch per config, beside bf16.
Usage: python bench/sweep_fp8.py [OUT.json]"""
import json, pathlib, sys
import torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_arrow import bench, plan_windows  # noqa: E402
from bench_fp8 import at, attention_like  # noqa: E402

rows = []
gen = torch.Generator(device="cuda").manual_seed(0)
for name, T, N in (("flux2k_T512", 512, 16384), ("flux1k_T512", 512, 4096)):
    q, k, v = attention_like(1, 24, T + N, 128, gen, "cuda")
    out = torch.empty_like(q)
    ones = torch.ones(24, dtype=torch.int32, device="cuda")
    base = at._default_config(torch.device("cuda"), 128, torch.bfloat16)
    for plan in ("full", "mixed"):
        hw = torch.tensor(plan_windows(plan, 24, N), dtype=torch.int32, device="cuda")
        t16 = bench(lambda: at._launch(q, k, v, hw, T, "bhld", None, out, config=base))
        for cname, upd in (("default", {}), ("WS=False", dict(WS=False)), ("stages=2", dict(num_stages=2)),
                           ("BLOCK_N=64", dict(BLOCK_N=64)), ("TMA=False", dict(TMA=False)),
                           ("BN64,WS=False", dict(BLOCK_N=64, WS=False))):
            if plan == "mixed" and cname not in ("default", "WS=False"):
                continue
            cfg = dict(base); cfg.update(upd)
            try:
                t8 = bench(lambda: at._launch(q, k, v, hw, T, "bhld", None, out, config=cfg, head_quant=ones))
            except Exception as exc:
                print(name, plan, cname, "ERR", type(exc).__name__, str(exc)[:200], flush=True)
                continue
            rows.append(dict(shape=name, plan=plan, config=cname, bf16_ms=t16, fp8_ms=t8))
            print(f"{name} {plan:5s} {cname:14s} bf16 {t16:7.3f} fp8 {t8:7.3f}  {t16 / t8:5.2f}x", flush=True)
if len(sys.argv) > 1:
    pathlib.Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
