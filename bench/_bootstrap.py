"""The one way benchmark scripts load the pack and the host: `load_pack()` imports the repository as the package
`dfav2` (the folder may have any name), `import_host(cpu)` imports ComfyUI in-process through `host_compat.py`
(COMFYUI_PATH, the pack's ComfyUI/custom_nodes parent, or the lean tree `.comfy/` in the repository root), and
`load_kernel()` loads kernels/arrow_triton.py standalone (its Triton decorators then see the current
TRITON_INTERPRET setting).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "load_pack", "host_compat", "import_host", "load_kernel"]


def _load(name: str, path: Path, package: bool = False) -> ModuleType:
    if name not in sys.modules:
        kw = {"submodule_search_locations": [str(path.parent)]} if package else {}
        spec = importlib.util.spec_from_file_location(name, path, **kw)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_pack(name: str = "dfav2") -> ModuleType:
    return _load(name, ROOT / "__init__.py", package=True)


def host_compat() -> ModuleType:
    return _load("dfav2_host_compat", ROOT / "host_compat.py")


def import_host(cpu: bool) -> str:
    """Import ComfyUI (CPU when `cpu`) before the pack's nodes; returns its version. Exits when none is found."""
    compat = host_compat()
    path, why = compat.find_comfyui(ROOT)
    if path is None and not os.environ.get("COMFYUI_PATH") and (ROOT / ".comfy" / "comfy" / "model_patcher.py").is_file():
        path = ROOT / ".comfy"
    if path is None:
        raise SystemExit(f"bench: {why}")
    compat.import_comfyui(path, cpu=cpu)
    return compat.host_version()


def load_kernel() -> ModuleType:
    return _load("_dfav2_arrow_triton_bench", ROOT / "kernels" / "arrow_triton.py")
