"""torchvision op-schema shim for CPU-only test environments (no side effects on import).

PyPI torchvision wheels are CUDA builds; with a CPU torch their `_C` library fails to load and `import torchvision`
dies with "operator torchvision::nms does not exist". Defining the two schemas first lets it import; ComfyUI's model
code never calls these ops. Call `install_torchvision_shim()` before anything imports torchvision.
"""

import importlib.util
import os


def install_torchvision_shim() -> None:
    """CPU torch + a CUDA torchvision wheel: define the two op schemas torchvision needs at import.

    Does nothing when torchvision's own library loads or the ops already exist.
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
