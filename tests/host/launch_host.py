"""Start a real ComfyUI server for the host tests: `python launch_host.py <ComfyUI dir> <main.py args...>`.

Installs the torchvision CPU shim (host_compat.py) right before the first `import torchvision` (see dfa_hostenv), then runs
ComfyUI's main.py with runpy. Test-only.
"""

import importlib.abc
import importlib.util
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_COMPAT = os.path.join(HERE, "..", "..", "host_compat.py")  # the one copy of the torchvision shim


class _ShimOnTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            spec = importlib.util.spec_from_file_location("dfav2_host_compat", PACK_COMPAT)
            compat = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(compat)
            compat.install_torchvision_shim()
        return None


if __name__ == "__main__":
    comfy = os.path.abspath(sys.argv[1])
    sys.meta_path.insert(0, _ShimOnTorchvision())
    sys.argv = [os.path.join(comfy, "main.py")] + sys.argv[2:]
    sys.path.insert(0, comfy)
    os.environ.pop("COMFYUI_PATH", None)
    runpy.run_path(sys.argv[0], run_name="__main__")
