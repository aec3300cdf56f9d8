"""Everything that decides: the plan model and its JSON file format, the per-head error metric, the
knapsack solver and the progressive calibration search. Never imports the host (ComfyUI)."""

from __future__ import annotations

from .plan import (
    CalibrationRecord,
    LayerSpec,
    ModelSignature,
    Plan,
    PlanError,
    PlanPosition,
    dumps_plan,
    load_plan,
    loads_plan,
    save_plan,
)

__all__ = [
    "CalibrationRecord",
    "LayerSpec",
    "ModelSignature",
    "Plan",
    "PlanError",
    "PlanPosition",
    "dumps_plan",
    "load_plan",
    "loads_plan",
    "save_plan",
]
