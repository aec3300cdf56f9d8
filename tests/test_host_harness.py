"""The host-test harness (tests/host) only skips when no host is configured: a COMFYUI_PATH that is set but is not a
ComfyUI tree, or whose ComfyUI does not import (e.g. ComfyUI 0.33 with a comfy-kitchen older than 0.2.31), makes
pytest exit non-zero and print why. Runs everywhere (no host needed): pytest runs on tests/host in a subprocess.

The "broken" tree below is not a stand-in for ComfyUI in any host test: it is the smallest tree the harness accepts
as ComfyUI (comfy/model_patcher.py present) whose import then fails, to check how the harness reports that.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One host module is enough: all of them use the same gate (skip_module_without_host) and `host` fixture.
TARGET = "tests/host/test_host_adapter.py"


def _pytest_host(comfyui_path: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTEST_ADDOPTS")}
    if comfyui_path is not None:
        env["COMFYUI_PATH"] = comfyui_path
    # -x: the first failing test is enough; no cache provider: nothing written into the checkout.
    return subprocess.run([sys.executable, "-m", "pytest", TARGET, "-x", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT), env=env)


def test_comfyui_path_that_is_not_comfyui_fails(tmp_path):
    r = _pytest_host(str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode not in (0, 5), out[-3000:]
    assert "is not a ComfyUI tree" in out and str(tmp_path) in out, out[-3000:]
    assert " passed" not in r.stdout.strip().splitlines()[-1], out[-3000:]


def test_comfyui_that_does_not_import_fails_with_the_import_error(tmp_path):
    comfy = tmp_path / "ComfyUI" / "comfy"
    comfy.mkdir(parents=True)
    (comfy / "__init__.py").write_text("")
    (comfy / "model_patcher.py").write_text("")  # what find_comfyui looks for
    # The first host module the harness imports; the message mimics ComfyUI 0.33 with comfy-kitchen 0.2.27.
    (comfy / "options.py").write_text(
        "raise AttributeError(\"module 'comfy_kitchen' has no attribute 'int8_attention_is_available' (harness test)\")\n")
    r = _pytest_host(str(tmp_path / "ComfyUI"))
    out = r.stdout + r.stderr
    assert r.returncode not in (0, 5), out[-3000:]
    assert "could not be imported" in out and "int8_attention_is_available' (harness test)" in out, out[-3000:]
    assert "skipped" not in r.stdout.strip().splitlines()[-1], out[-3000:]


def test_no_host_configured_skips(tmp_path):
    if ROOT.parent.name == "custom_nodes" and (ROOT.parent.parent / "comfy" / "model_patcher.py").is_file():
        pytest.skip("this checkout sits in ComfyUI/custom_nodes, so a host is always configured")
    r = _pytest_host(None)
    out = r.stdout + r.stderr
    # 5 = nothing collected: a module-level skip of the only module given (the whole suite exits 0).
    assert r.returncode in (0, 5), out[-3000:]
    assert "skipped" in r.stdout.strip().splitlines()[-1] and "set COMFYUI_PATH" in out, out[-3000:]
