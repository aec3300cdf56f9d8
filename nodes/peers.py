"""Other users of the attention override slot (host.md §0.1, §9) and how DFA shares it with them.

One slot, `transformer_options["optimized_attention_override"]`. DFA keeps its run on top for every forward of
the patched model (hooks.py) and chains whatever else holds the slot, before or after DFAApply, as the backend of
the heads the plan keeps full and of the calls it runs dense:

- core `ModelAttentionBackend` (ComfyUI >= 0.33, `ModelPatcher.set_model_optimized_attention`): does not chain;
  placed after DFAApply it would take every call; DFA chains it instead.
- core "Model Sparse Attention" (`comfy_extras/nodes_sparse_attention.py`, after 0.33): chains the previous
  override and re-installs itself on top at every ON_PREPARE_STATE; DFA re-takes the top per forward, so the
  sparse kernel serves the full heads in either node order instead of bypassing the plan.
- SageAttention / KJ nodes: earlier overrides, chained as at install time.

Plain Python, no host import (router.py uses `describe_override` for the run summary).
"""

from __future__ import annotations

from typing import Any

__all__ = ["describe_override"]


def _closure_function_name(fn: Any, var: str) -> str | None:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells or var not in code.co_freevars:
        return None
    try:
        value = cells[code.co_freevars.index(var)].cell_contents
    except ValueError:  # empty cell
        return None
    return getattr(value, "__name__", None)


def describe_override(override: Any) -> str:
    """A name a user recognises for an override in the slot: the core node that installed it where known, else
    the callable's module and qualified name."""
    module = str(getattr(override, "__module__", "") or "")
    qualname = str(getattr(override, "__qualname__", "") or type(override).__qualname__)
    if "set_model_optimized_attention" in qualname:
        backend = _closure_function_name(override, "optimized_attention")
        return f"Model Attention Backend ({backend})" if backend else "Model Attention Backend"
    if module.endswith("nodes_sparse_attention"):
        return "Model Sparse Attention"
    if not callable(override) or getattr(override, "__qualname__", None) is None:
        module = type(override).__module__
    return f"{module}.{qualname}" if module else qualname
