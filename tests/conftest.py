"""Test set-up: import the repository root as the package `dfav2` (the folder name may be anything)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if "dfav2" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("dfav2", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["dfav2"] = _mod
    _spec.loader.exec_module(_mod)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "host: needs a real ComfyUI (COMFYUI_PATH); skipped without one")
