"""Compile the arrow kernel for every GPU architecture it has a config for, without that GPU (and without any GPU).

For each architecture (sm80, sm86, sm89, sm90, sm100, sm120), head_dim 64 / 128, bf16 / fp16 and both layouts, the
kernel is compiled to a cubin exactly as `_launch` would call it there (kernels/arrow_triton.py
`_compile_for_target`: same config, same argument list, Triton's own specialisation), and the cubin is checked:
shared memory within the architecture's per-block limit, no register spills (ptxas -v of the same PTX), the
instructions expected for the architecture (wgmma / TMA on sm90, tcgen05 on sm100, mma.sync elsewhere); spills are
reported, not failed on (the chosen configs spill at most a few dozen bytes). A second
set compiles the shapes that used to fail (text length 1, one token) for every architecture. Nothing is run: a
compiled kernel is not a tested one (the GPU tests only run on the machine's own GPU).

Usage: python bench/compile_archs.py [out.json] [--quick] [--archs=80,90] [--candidates]
  --candidates: also compile alternative configs per architecture (how the defaults were chosen).
Runs on CPU (Triton's bundled ptxas); about 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, load_kernel  # noqa: E402

at = load_kernel()

ARCHS = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]
# alternatives compiled with --candidates (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = {
    128: [(128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 2), (128, 32, 4, 3), (64, 64, 4, 2),
          (64, 64, 4, 3), (128, 128, 8, 2)],
    64: [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
}


def ptxas_stats(ptx: str, cc: int) -> dict:
    """Registers and spill bytes from ptxas -v on the kernel's PTX (the same ptxas Triton used)."""
    from triton import knobs

    tool = knobs.nvidia.ptxas_blackwell if cc >= 100 else knobs.nvidia.ptxas
    arch = f"sm_{cc}{'a' if cc >= 90 else ''}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([tool.path, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spill_st = re.findall(r"(\d+) bytes spill stores", log)
    spill_ld = re.findall(r"(\d+) bytes spill loads", log)
    return dict(regs=max(map(int, regs)) if regs else None,
                spill_bytes=sum(map(int, spill_st)) + sum(map(int, spill_ld)))


def one(cap, *, D, dtype, layout, B=1, H=3, T=77, N=1000, config=None, zero_skip=False) -> dict:
    cc = cap[0] * 10 + cap[1]
    cfg = dict(config) if config is not None else at._arch_config(cap, D, dtype)
    row = dict(arch=f"sm{cc}", D=D, dtype=str(dtype).replace("torch.", ""), layout=layout, B=B, H=H, T=T, N=N,
               zero_skip=zero_skip, config=cfg)
    t0 = time.perf_counter()
    try:
        k = at._compile_for_target(cap, B=B, H=H, L=T + N, T=T, D=D, dtype=dtype, layout=layout, config=cfg,
                                   zero_skip=zero_skip)
    except Exception as exc:  # noqa: BLE001 - a failure is a result here
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-400:]}", seconds=time.perf_counter() - t0)
        return row
    ptx = k.asm["ptx"]
    limit = at.SMEM_LIMIT.get(cap)
    row.update(ok=True, seconds=time.perf_counter() - t0, smem=k.metadata.shared, smem_limit=limit,
               smem_ok=limit is None or k.metadata.shared <= limit,
               wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx, tcgen05="tcgen05" in ptx,
               mma_sync="mma.sync" in ptx, **ptxas_stats(ptx, cc))
    return row


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    archs = ARCHS
    sel = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--archs=")]
    if sel:
        want = {int(x) for x in sel[0].split(",")}
        archs = [c for c in ARCHS if c[0] * 10 + c[1] in want]
    out = Path(args[0]) if args else ROOT / "bench" / "results" / "compile_archs.json"
    rows = []
    for cap in archs:
        for D in (64, 128):
            for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)):
                for layout in (("bhld",) if quick else ("bhld", "blhd_flat")):
                    rows.append(one(cap, D=D, dtype=dtype, layout=layout))
                    _print(rows[-1])
            # the functional API's variant (skipped heads written as zeros), and the shapes that used to fail
            rows.append(one(cap, D=D, dtype=torch.bfloat16, layout="bhld", zero_skip=True))
            _print(rows[-1])
            for T, N, B, H in ((1, 1, 1, 1), (0, 1, 2, 1), (1, 129, 1, 24), (2, 1, 1, 38)):
                rows.append(one(cap, D=D, dtype=torch.bfloat16, layout="bhld" if H != 38 else "blhd_flat",
                                T=T, N=N, B=B, H=H))
                _print(rows[-1])
    cand = []
    if "--candidates" in sys.argv:
        for cap in archs:
            for D in (64, 128):
                for bm, bn, nw, ns in CANDIDATES[D]:
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)
                    cand.append(one(cap, D=D, dtype=torch.bfloat16, layout="bhld", config=cfg))
                    _print(cand[-1])
    res = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=triton.__version__,
               note="compiled only, never run on these architectures", rows=rows, candidates=cand)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    _table(rows)
    bad = [r for r in rows if not (r["ok"] and r["smem_ok"])]
    spills = max((r["spill_bytes"] for r in rows if r["ok"]), default=0)
    print(f"\n{len(rows) - len(bad)}/{len(rows)} compiled within the shared memory limit (largest spill: {spills} B); "
          f"wrote {out}")
    return 1 if bad else 0


def _print(r: dict) -> None:
    c = r["config"]
    cfg = f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{' TMA' if c.get('TMA') else ''}" \
          f"{' WS' if c.get('WS') else ''}"
    if not r["ok"]:
        print(f"{r['arch']:6s} D{r['D']:<4d} {r['dtype']:9s} {r['layout']:9s} T{r['T']:<3d} N{r['N']:<5d} {cfg:22s} "
              f"FAILED {r['error']}", flush=True)
        return
    print(f"{r['arch']:6s} D{r['D']:<4d} {r['dtype']:9s} {r['layout']:9s} T{r['T']:<3d} N{r['N']:<5d} B{r['B']} "
          f"H{r['H']:<3d}{' zs' if r['zero_skip'] else '   '} {cfg:22s} "
          f"smem {r['smem'] // 1024:4d}/{(r['smem_limit'] or 0) // 1024} KB "
          f"regs {r['regs']} spill {r['spill_bytes']} B {'wgmma ' if r['wgmma'] else ''}{'tma ' if r['tma'] else ''}"
          f"{'tcgen05 ' if r['tcgen05'] else ''}{'mma.sync ' if r['mma_sync'] else ''}{r['seconds']:.1f}s", flush=True)


def _table(rows: list[dict]) -> None:
    print("\n| arch | head_dim | config | compiled (cases) | smem KB / limit | regs | spills | instructions |")
    print("|---|---|---|---|---|---|---|---|")
    seen: dict = {}
    for r in rows:
        key = (r["arch"], r["D"])
        seen.setdefault(key, []).append(r)
    for (arch, D), rs in seen.items():
        ok = [r for r in rs if r["ok"]]
        c = rs[0]["config"]
        cfg = f"{c['BLOCK_M']}x{c['BLOCK_N']}, {c['num_warps']} warps, {c['num_stages']} stages" \
              f"{', TMA' if c.get('TMA') else ''}{', WS' if c.get('WS') else ''}"
        smem = max((r["smem"] for r in ok), default=0)
        lim = rs[0].get("smem_limit") or 0
        regs = max((r["regs"] or 0 for r in ok), default=0)
        spill = max((r["spill_bytes"] for r in ok), default=0)
        ins = sorted({k for r in ok for k in ("wgmma", "tma", "tcgen05", "mma_sync") if r[k]})
        print(f"| {arch} | {D} | {cfg} | {len(ok)}/{len(rs)} | {smem // 1024} / {lim // 1024} | {regs} | {spill} B "
              f"| {', '.join(ins)} |")


if __name__ == "__main__":
    raise SystemExit(main())
