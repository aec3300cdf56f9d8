"""DiTFastAttnV2 for ComfyUI: head-wise arrow attention and head-wise caching for Flux and SD3/SD3.5.

ComfyUI loads this package and calls `comfy_entrypoint` (V3 node API). Importing the package outside
ComfyUI only defines names: the host is imported lazily by `nodes/`.
"""

from __future__ import annotations

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY", "comfy_entrypoint", "__version__"]


async def comfy_entrypoint():  # -> comfy_api.latest.ComfyExtension
    from .nodes import DFAExtension

    return DFAExtension()
