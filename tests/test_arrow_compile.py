"""The kernel compiles for every architecture it has a config for, on this machine, without that GPU.

`_compile_for_target` compiles `_arrow_fwd` to a cubin for a GPUTarget exactly as `_launch` would call it there
(same config, arguments and Triton specialisation: an int argument equal to 1 becomes a constant, which is what
broke T = 1 / L = 1). Checked: it compiles, fits the architecture's shared memory, and uses the expected
instructions (wgmma + TMA on sm90, mma.sync on sm80/86/89/120). Needs Triton's bundled ptxas; nothing is run.

The compiles run in a child process: Triton decorates its own library (tl.sum, ...) for the interpreter or for
real targets once, when it is first imported, and the interpreter tests of this session import it with
TRITON_INTERPRET=1 (importing it here first would break them, and the reverse breaks these compiles).
The full matrix with register / spill counts: bench/compile_archs.py (kernels/NOTES.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

# (capability, head_dim, layout, T, N, B, H): T = 1 and L = 1 are the shapes that used to fail
CASES = [
    ((8, 0), 128, "bhld", 1, 129, 1, 3),
    ((8, 6), 128, "blhd_flat", 1, 1, 1, 1),
    ((8, 9), 64, "bhld", 0, 1, 2, 1),
    ((9, 0), 128, "bhld", 1, 129, 1, 24),
    ((9, 0), 64, "blhd_flat", 1, 1, 1, 38),
    ((12, 0), 128, "bhld", 1, 1, 1, 3),
]

CHILD = r"""
import importlib.util, json, sys, pathlib
import torch
from triton import knobs
if not pathlib.Path(knobs.nvidia.ptxas.path).is_file():
    print(json.dumps({"skip": "no ptxas in this Triton install"})); sys.exit(0)
spec = importlib.util.spec_from_file_location("_dfav2_arrow_triton_compile", sys.argv[1])
at = importlib.util.module_from_spec(spec); spec.loader.exec_module(at)
out = {}
for cap, D, layout, T, N, B, H in json.loads(sys.argv[2]):
    cap = tuple(cap)
    key = json.dumps([list(cap), D, layout, T, N, B, H])
    try:
        k = at._compile_for_target(cap, B=B, H=H, L=T + N, T=T, D=D, layout=layout)
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        continue
    ptx = k.asm["ptx"]
    out[key] = {"cubin": len(k.asm["cubin"]), "smem": k.metadata.shared, "limit": at.SMEM_LIMIT[cap],
                "wgmma": "wgmma" in ptx, "tma": "cp.async.bulk.tensor" in ptx, "mma_sync": "mma.sync" in ptx}
configs = {}
for cap in [*at.SMEM_LIMIT, (8, 7), (10, 3), (11, 0), (12, 1)]:
    for D in (16, 32, 64, 128):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            configs[f"{cap}-{D}-{dtype}"] = [list(cap), at._arch_config(cap, D, dtype)]
print(json.dumps({"cases": out, "configs": configs}))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "kernels" / "arrow_triton.py"), json.dumps(CASES)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


@pytest.mark.parametrize("cap,D,layout,T,N,B,H", CASES)
def test_compiles_for_target(compiled, cap, D, layout, T, N, B, H):
    r = compiled["cases"][json.dumps([list(cap), D, layout, T, N, B, H])]
    assert "error" not in r, r.get("error")
    assert r["cubin"] > 0
    assert r["smem"] <= r["limit"], r
    if cap[0] == 9:
        assert r["wgmma"] and r["tma"], r  # Hopper: wgmma and TMA loads
    else:
        assert r["mma_sync"] and not r["wgmma"] and not r["tma"], r


def test_every_architecture_gets_a_config(compiled):
    # known and unknown capabilities: a config with tiles, TMA only on sm90 (Triton lowers descriptors to pointers
    # below sm90; sm120 has TMA but its config stays on pointer loads, untested there)
    for name, (cap, c) in compiled["configs"].items():
        assert c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["num_warps"] in (4, 8), (name, c)
        assert not c.get("TMA") or cap[0] == 9, (name, c)
