"""Host compatibility helpers: find a ComfyUI tree, import it in-process outside its own main.py (the `demo`
command, the host tests, the benchmarks), and read its version (the one version probe of the pack).

Standalone on purpose: only the standard library and torch, no relative imports, nothing at import time. Scripts
load it by file path before the pack's `nodes` package is imported, because that package imports ComfyUI's V3
API at import time and so needs the host on sys.path (and `--cpu` set) first; `nodes/host.py` imports it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["install_torchvision_shim", "find_comfyui", "import_comfyui", "host_version"]


def install_torchvision_shim() -> None:
    """CPU torch + a CUDA torchvision wheel: define the two op schemas torchvision needs at import.

    PyPI torchvision wheels are CUDA builds; with a CPU torch their `_C` library fails to load and
    `import torchvision` dies with "operator torchvision::nms does not exist". ComfyUI imports torchvision but its
    model code never calls these ops. Call before anything imports torchvision. Does nothing when torchvision's own
    library loads or the ops already exist.
    """
    import torch

    def has(name: str) -> bool:
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::" + name, "")
            return True
        except Exception:  # noqa: BLE001
            return False

    if has("nms") or getattr(torch, "_tv_shim_lib", None) is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for d in spec.submodule_search_locations:
        for f in os.listdir(d):
            if f.startswith("_C.") and f.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(d, f))
                    if has("nms"):
                        return
                except Exception:  # noqa: BLE001
                    pass
    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        if not has(name):
            lib.define(name + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torch._tv_shim_lib = lib  # keep the schemas alive


def find_comfyui(pack_root: str | os.PathLike[str]) -> tuple[Path | None, str | None]:
    """The ComfyUI tree from ``COMFYUI_PATH``, or the one whose ``custom_nodes`` holds the pack.

    Returns (path, None) or (None, why not).
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        if (p / "comfy" / "model_patcher.py").is_file():
            return p, None
        return None, f"COMFYUI_PATH={env} is not a ComfyUI tree (no comfy/model_patcher.py)"
    parent = Path(pack_root).resolve().parent
    if parent.name == "custom_nodes" and (parent.parent / "comfy" / "model_patcher.py").is_file():
        return parent.parent, None
    return None, (
        "no ComfyUI found: set COMFYUI_PATH=/path/to/ComfyUI or put this pack into ComfyUI/custom_nodes"
    )


def import_comfyui(path: str | os.PathLike[str], *, cpu: bool | None = None) -> str:
    """Import the ComfyUI tree at `path` in-process (comfy.sd, nodes, comfy_api.latest) without parsing argv.

    cpu: True forces CPU (``--cpu``); None picks CPU when CUDA is unavailable. Must run before anything else
    imports ComfyUI modules (``args.cpu`` has to be set before comfy.model_management is imported).
    Returns the device name ComfyUI will use ("cpu" or "cuda").
    """
    install_torchvision_shim()
    path = str(Path(path).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy_api.latest  # noqa: F401
    import nodes  # noqa: F401

    return "cpu" if cpu else "cuda"


def host_version() -> str:
    """The running ComfyUI's version ("unknown" when it does not say)."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown"
    return str(__version__)
