"""Everything that decides: the plan model and its JSON file format, the per-head error metric, the
knapsack solver and the progressive calibration search. Never imports the host (ComfyUI)."""

from __future__ import annotations

from .knapsack import solve_layer
from .metric import head_rse
from .search import DEFAULT_CANDIDATES, ProgressiveCalibrator, SearchConfig
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
    "DEFAULT_CANDIDATES",
    "ProgressiveCalibrator",
    "SearchConfig",
    "head_rse",
    "solve_layer",
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
