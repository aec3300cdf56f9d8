"""What one calibration search step costs per candidate: a layer call at Flux geometry (B prompts, 24 × 128 heads,
text + image), timed per candidate as the calibrator runs it (`headwise_attention` of a uniform decision under
`emulate_fp8`), and the metric's two parts (the dense output's variance, once per call; one candidate's error, per
candidate; beside it the torch form the error had before kernels/head_error.py). CUDA events, median after warm-up.

    python bench/bench_candidates.py [--res 1024] [--batch 4] [--txt 256]   # prints a table, writes $OUT/bench_candidates.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ROOT, load_pack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--txt", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    load_pack()
    from dfav2.calibration.metric import HeadRse
    from dfav2.kernels.head_error import head_sq_err
    from dfav2.calibration.search import DEFAULT_CANDIDATES, with_fp8
    from dfav2.kernels import FULL, LayerDecision, arrow
    from dfav2.kernels.engine import KernelTables, emulate_fp8, headwise_attention

    dev = torch.device("cuda")
    B, H, D, T, N = a.batch, 24, 128, a.txt, (a.res // 16) ** 2
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, T + N, D, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3))
    tables = KernelTables()

    def run(m):
        with emulate_fp8():
            return headwise_attention(q, k, v, T, LayerDecision.uniform(m, H), tables=tables)[0]

    def timed(fn):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(a.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return sorted(ts)[len(ts) // 2]

    dense = run(FULL)
    rows = [("full (dense reference)", timed(lambda: run(FULL)))]
    meter = HeadRse(dense)
    other = run(arrow(8))  # a candidate's output, for the metric rows
    rows.append(("metric: reference variance (once per call)", timed(lambda: HeadRse(dense))))
    rows.append(("metric: error of one candidate (Triton, one read)", timed(lambda: meter(other))))
    rows.append(("metric: error of one candidate (torch elementwise, before)",
                 timed(lambda: head_sq_err(other, dense, use_triton=False))))
    for m in with_fp8(DEFAULT_CANDIDATES):
        if m.kind.name != "CACHE":
            rows.append((m.name, timed(lambda m=m: run(m))))
    print(f"# one calibration search call, B {B}, {H} x {D} heads, text {T} + image {N}, {torch.cuda.get_device_name()}")
    print("| candidate | ms |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    out = Path(a.out) if a.out else Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "bench_candidates.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "B": B, "H": H, "D": D, "txt": T, "img": N,
                               "ms": dict(rows)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
