"""Host capability probing: which ComfyUI is running and what it offers (found by feature detection, probed once).
The one place that asks the host for its version."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from ..host_compat import host_version

__all__ = ["MIN_HOST_OVERRIDE", "MIN_HOST_FLUX", "SLOT", "HostSupport", "host_support", "host_version",
           "preferred_attention_mode"]

#: First ComfyUI release with `transformer_options["optimized_attention_override"]` (PR #9639).
MIN_HOST_OVERRIDE = "0.3.59"
#: First ComfyUI release whose Flux passes `block_type` / `block_index` to attention (PR #10841).
MIN_HOST_FLUX = "0.3.75"
#: The override slot in transformer_options.
SLOT = "optimized_attention_override"


@dataclass(frozen=True)
class HostSupport:
    """What the running ComfyUI offers; each flag is found by feature detection, not by version number."""

    version: str
    override: bool  # optimized_attention_override honoured by the attention backends
    flux_block_identity: bool  # Flux writes block_type / block_index into transformer_options
    #: How the host treats a checkpoint's `preferred_attention` (per-layer backend from checkpoint metadata, after
    #: 0.33): "none" (the host has none: 0.30, 0.33), "passed" (it reaches an override, which honours it on the
    #: dense path: router.Run._dense), "stripped" (wrap_attn drops it before any override: dense heads under DFA run
    #: the global backend; DFAApply warns once).
    preferred_attention: str = "none"

    def flux_error(self) -> str | None:
        if not self.override:
            return (
                f"DiTFastAttnV2 needs ComfyUI >= {MIN_HOST_OVERRIDE} (attention override hook) and >= {MIN_HOST_FLUX} "
                f"for Flux; this is ComfyUI {self.version}. Update ComfyUI."
            )
        if not self.flux_block_identity:
            return (
                f"DiTFastAttnV2 on Flux needs ComfyUI >= {MIN_HOST_FLUX} (Flux block_type/block_index in "
                f"transformer_options); this is ComfyUI {self.version}. Update ComfyUI (SD3/SD3.5 work from "
                f"{MIN_HOST_OVERRIDE})."
            )
        return None

    def sd3_error(self) -> str | None:
        if not self.override:
            return (
                f"DiTFastAttnV2 needs ComfyUI >= {MIN_HOST_OVERRIDE} (transformer_options "
                f"'optimized_attention_override'); this is ComfyUI {self.version}. Update ComfyUI."
            )
        return None

    def error_for(self, family: str) -> str | None:
        """Why this host cannot run `family` ("flux", "flux2", "sd3"), or None."""
        return self.sd3_error() if family == "sd3" else self.flux_error()


def _source_mentions(obj: Any, needle: str) -> bool | None:
    try:
        return needle in inspect.getsource(obj)
    except (OSError, TypeError):
        return None


def preferred_attention_mode(wrap_attn_source: str | None) -> str:
    """"none", "passed" or "stripped" (see HostSupport.preferred_attention) from the source of `wrap_attn`."""
    if not wrap_attn_source or "preferred_attention" not in wrap_attn_source:
        return "none"
    compact = wrap_attn_source.replace("'", '"').replace(" ", "")
    return "stripped" if 'kwargs.pop("preferred_attention"' in compact else "passed"


@functools.lru_cache(maxsize=1)
def host_support() -> HostSupport:
    """Probe the host once (imports ComfyUI modules; call only inside ComfyUI)."""
    import comfy.ldm.modules.attention as attention

    wrap = getattr(attention, "wrap_attn", None)
    override = wrap is not None and _source_mentions(wrap, SLOT) is not False
    try:
        wrap_source: str | None = inspect.getsource(wrap) if wrap is not None else None
    except (OSError, TypeError):
        wrap_source = None
    try:
        from comfy.ldm.flux.model import Flux

        flux_ids = _source_mentions(Flux.forward_orig, "block_index")
    except ImportError:
        flux_ids = False
    return HostSupport(host_version(), bool(override), flux_ids is not False, preferred_attention_mode(wrap_source))
