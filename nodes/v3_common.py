"""Schema pieces shared by the V3 node modules (v3.py, v3_tools.py): the category, the DFA_PLAN type, the plan
dropdown, the host's sampler and scheduler lists. Importing it registers the dfa_plans folder."""

from __future__ import annotations

import inspect
from typing import Any

from comfy_api.latest import io

from .plans import NO_PLAN, plan_options, register_plan_folder
from .report import register_routes

__all__ = ["CATEGORY", "DFA_PLAN", "advanced", "plan_combo", "sampler_names", "scheduler_names"]

CATEGORY = "model_patches/DiTFastAttnV2"
DFA_PLAN = io.Custom("DFA_PLAN")

register_plan_folder()
register_routes()  # GET /dfav2/plans for web/dfav2.js; nothing without a server


def advanced() -> dict[str, Any]:
    # `advanced=` (collapsed widget) exists on newer hosts only; older ones reject unknown keywords.
    try:
        ok = "advanced" in inspect.signature(io.Float.Input.__init__).parameters
    except (TypeError, ValueError):
        ok = False
    return {"advanced": True} if ok else {}


def plan_combo(default_none: bool = False) -> Any:
    options = plan_options()
    return io.Combo.Input(
        "plan",
        options=options,
        # default_none: a new node starts at 'none' (not the alphabetically first plan, which may be for another model).
        default=NO_PLAN if default_none else options[0],
        tooltip=(
            "Plan file (.json) from models/dfa_plans (or a dfa_plans folder in extra_model_paths.yaml). Each entry "
            "shows the plan's model family and calibration size; plans for another model than the last run's are "
            f"marked. '{NO_PLAN}': use the dfa_plan input. Editing the file re-runs the node."
        ),
    )


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
