"""Kernel v3 (kernels/arrow_gluon.py) and the Gluon research prototype (bench/gluon_dense_proto.py) compile for sm90
on this machine, without a GPU, exactly as they are launched there: within Hopper's shared memory, no register
spills, and no ptxas wgmma serialisation (C7514/C7515), which would silently undo the overlap they exist for. Kernel
v3 at the shapes that used to break the Triton kernel (T = 1, L = 1, odd lengths), both layouts, fp16 and bf16 and
the zero-skip variant. Compiled in a child process (Triton must not have been imported
under TRITON_INTERPRET=1 there; see tests/test_arrow_compile.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.experimental.gluon") is None:
    pytest.skip("triton with Gluon is not installed", allow_module_level=True)

CHILD = r"""
import importlib.util, json, sys, pathlib
from triton import knobs
if not pathlib.Path(knobs.nvidia.ptxas.path).is_file():
    print(json.dumps({"skip": "no ptxas in this Triton install"})); sys.exit(0)
sys.path.insert(0, str(pathlib.Path(sys.argv[1]).parent))
spec = importlib.util.spec_from_file_location("_dfav2_gluon_proto", sys.argv[1])
g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
print(json.dumps({str(pp): g.compile_sm90(3, L=1152, H=2, pingpong=pp) for pp in (False, True)}))
"""


CHILD_V3 = r"""
import importlib.util, json, subprocess, sys, tempfile, pathlib
import torch
from triton import knobs
if not pathlib.Path(knobs.nvidia.ptxas.path).is_file():
    print(json.dumps({"skip": "no ptxas in this Triton install"})); sys.exit(0)
spec = importlib.util.spec_from_file_location("_dfav2_arrow_gluon", sys.argv[1])
g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
out = {}
for B, H, L, T, layout, zs, dt, quant in json.loads(sys.argv[2]):
    dtype = torch.float16 if dt == "fp16" else torch.bfloat16
    key = json.dumps([B, H, L, T, layout, zs, dt, quant])
    try:
        k = g.compile_sm90(B=B, H=H, L=L, T=T, layout=layout, zero_skip=zs, dtype=dtype, quant=quant)
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        continue
    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d) / "k.ptx"
        src.write_text(k.asm["ptx"])
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(pathlib.Path(d) / "k.o")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    out[key] = {"shared": k.metadata.shared, "ptxas": [ln for ln in log.splitlines() if "Used" in ln or "spill" in ln or "C75" in ln],
                "tma": "cp.async.bulk.tensor" in k.asm["ptx"], "wgmma": "wgmma.mma_async" in k.asm["ptx"],
                "setmaxnreg": "setmaxnreg" in k.asm["ptx"], "e4m3": "e4m3.e4m3" in k.asm["ptx"]}
print(json.dumps(out))
"""

V3_CASES = [  # B, H, L, T, layout, zero_skip, dtype, FP8 heads in the launch
    (1, 24, 4608, 512, "bhld", False, "bf16", False),
    (2, 3, 1000, 77, "blhd_flat", False, "fp16", False),
    (1, 1, 1, 1, "bhld", True, "bf16", False),
    (2, 5, 130, 0, "blhd_flat", True, "bf16", False),
    (1, 128, 300, 20, "bhld", False, "bf16", False),   # MAX_HEADS: the head ranking's 128 x 128 tile
    (1, 24, 4608, 512, "bhld", False, "bf16", True),
    (2, 3, 1000, 77, "blhd_flat", False, "fp16", True),
]


def test_kernel_v3_compiles_for_sm90_as_launched():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CHILD_V3, str(ROOT / "kernels" / "arrow_gluon.py"), json.dumps(V3_CASES)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert len(res) == len(V3_CASES)
    for case, info in res.items():
        assert "error" not in info, (case, info)
        assert info["shared"] <= 232448, (case, info)
        log = "\n".join(info["ptxas"])
        assert "0 bytes spill stores, 0 bytes spill loads" in log, (case, log)
        assert "C7514" not in log and "C7515" not in log, (case, log)
        assert info["tma"] and info["wgmma"] and info["setmaxnreg"], (case, info)
        assert info["e4m3"] == json.loads(case)[-1], (case, info)   # e4m3 wgmma exactly where FP8 heads can run


def test_gluon_prototype_compiles_for_sm90_without_spills_or_serialisation():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "bench" / "gluon_dense_proto.py")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    for variant, info in res.items():
        assert info["shared"] <= 232448, (variant, info)
        log = "\n".join(info["ptxas"])
        assert "Used" in log, (variant, log)
        assert "0 bytes spill stores, 0 bytes spill loads" in log, (variant, log)
        assert "C7514" not in log and "C7515" not in log, (variant, log)
