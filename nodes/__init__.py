"""ComfyUI side of the pack: V3 nodes (v3.py; DFAPlanInfo and DFACompare in v3_tools.py; shared schema pieces in
v3_common.py), Apply, Calibrate and A/B glue (adapter.py, calibrate.py with records.py, compare.py), plan files
(plans.py), host probing (host.py), per-family layouts (layouts.py), the host-free attention router (router.py),
the wrapper/callback installation (hooks.py) and the `demo` command.

The only package that imports ComfyUI. Importing it without ComfyUI (or with a host older than the V3 node
API) never fails: `DFAExtension` is then a stand-in that raises ImportError with the reason (`IMPORT_ERROR`).
"""

from __future__ import annotations

import logging

__all__ = ["DFAExtension", "IMPORT_ERROR"]

IMPORT_ERROR: str | None = None


class _Unavailable:
    """Stand-in for DFAExtension when the nodes cannot be defined on this host."""

    def __init__(self) -> None:
        raise ImportError(IMPORT_ERROR)


try:
    import comfy_api.latest  # noqa: F401
except Exception as exc:  # ImportError on old hosts; anything the host's own imports raise elsewhere
    DFAExtension = _Unavailable  # type: ignore[assignment,misc]
    IMPORT_ERROR = (
        f"DiTFastAttnV2 nodes need ComfyUI's V3 node API (comfy_api.latest, ComfyUI >= 0.3.59; Flux needs "
        f">= 0.3.75): {exc}"
    )
else:
    try:
        from .v3 import DFAExtension
    except Exception as exc:  # keep the pack importable; ComfyUI shows the logged reason
        logging.getLogger(__name__).exception("DiTFastAttnV2: the nodes could not be defined")
        DFAExtension = _Unavailable  # type: ignore[assignment,misc]
        IMPORT_ERROR = f"DiTFastAttnV2 nodes could not be defined: {type(exc).__name__}: {exc}"
