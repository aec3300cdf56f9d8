"""The Gluon research kernel (bench/gluon_dense_proto.py) still compiles for sm90 on this machine, without a GPU:
within Hopper's shared memory, no register spills, and no ptxas wgmma serialisation (C7514/C7515), which would
silently undo the overlap the prototype measures. Compiled in a child process (Triton must not have been imported
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
