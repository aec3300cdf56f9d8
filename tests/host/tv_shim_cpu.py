"""Compatibility name for bench/ scripts: the torchvision CPU shim now lives in nodes/_host_compat.py (one copy,
shared by the demo command, the host tests and the server launcher). Loaded by file path, no package import."""

import importlib.util
import sys
from pathlib import Path

_NAME = "dfav2_host_compat"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).resolve().parents[2] / "nodes" / "_host_compat.py")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)

install_torchvision_shim = sys.modules[_NAME].install_torchvision_shim

__all__ = ["install_torchvision_shim"]
