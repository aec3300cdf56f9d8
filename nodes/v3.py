"""V3 node definitions (comfy_api.latest): DFAApply and DFALoadPlan. Imported only inside ComfyUI."""

from __future__ import annotations

import inspect
from typing import Any

from comfy_api.latest import ComfyExtension, io

from ..calibration.plan import Plan
from .adapter import apply_dfa
from .plans import NO_PLAN, load_plan_file, plan_fingerprint, plan_options, register_plan_folder

__all__ = ["DFAApply", "DFALoadPlan", "DFAExtension", "CATEGORY", "DFA_PLAN"]

CATEGORY = "model_patches/DiTFastAttnV2"
DFA_PLAN = io.Custom("DFA_PLAN")

register_plan_folder()


def _advanced() -> dict[str, Any]:
    # `advanced=` (collapsed widget) exists on newer hosts only; older ones reject unknown keywords.
    try:
        ok = "advanced" in inspect.signature(io.Float.Input.__init__).parameters
    except (TypeError, ValueError):
        ok = False
    return {"advanced": True} if ok else {}


def _plan_combo() -> Any:
    options = plan_options()
    return io.Combo.Input(
        "plan",
        options=options,
        default=options[0],
        tooltip=(
            "Plan file (.json) from models/dfa_plans (or a dfa_plans folder in extra_model_paths.yaml). "
            f"'{NO_PLAN}': use the dfa_plan input. Editing the file re-runs the node."
        ),
    )


class DFAApply(io.ComfyNode):
    """Clone the model and run its attention head-wise (full / arrow / cached) as the plan says."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adv = _advanced()
        return io.Schema(
            node_id="DFAApply",
            display_name="DiTFastAttnV2 Apply",
            category=CATEGORY,
            description=(
                "Speeds up Flux and SD3/SD3.5 sampling with a calibrated DiTFastAttnV2 plan: per layer, head and "
                "step, attention runs full, as an arrow (text + local image band) or reuses the head's output of "
                "the previous step. Place between the model loader and the sampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="Flux or SD3/SD3.5 model. It is cloned; the input model is not changed."),
                _plan_combo(),
                io.Boolean.Input(
                    "enabled", default=True,
                    tooltip="Off: the model passes through unchanged, exactly as if the node were bypassed.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip=(
                        "Share of the sampling schedule (0 = first step, 1 = end) before which every head stays "
                        "dense. 0: the plan is used from the first step."
                    ),
                    **adv,
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip=(
                        "Share of the schedule after which every head is dense again. 1: the plan is used to the "
                        "end. Must be >= start_percent."
                    ),
                    **adv,
                ),
                DFA_PLAN.Input(
                    "dfa_plan", optional=True,
                    tooltip="A plan from DFALoadPlan or a calibration node. When connected it wins over the dropdown.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone (or the input model when disabled).")],
        )

    @classmethod
    def fingerprint_inputs(cls, plan: str = NO_PLAN, **kwargs: Any) -> Any:
        return plan_fingerprint(plan)

    @classmethod
    def execute(
        cls,
        model: Any,
        plan: str,
        enabled: bool,
        start_percent: float,
        end_percent: float,
        dfa_plan: Plan | None = None,
    ) -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(model)
        chosen = dfa_plan if dfa_plan is not None else load_plan_file(plan)
        label = "connected plan" if dfa_plan is not None else plan
        patched = apply_dfa(
            model, plan=chosen, enabled=True, start_percent=start_percent, end_percent=end_percent, label=label
        )
        return io.NodeOutput(patched)


class DFALoadPlan(io.ComfyNode):
    """Load a plan file as a DFA_PLAN value (validated), for wiring and for a readable summary."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DFALoadPlan",
            display_name="DiTFastAttnV2 Load Plan",
            category=CATEGORY,
            description="Loads and validates a DiTFastAttnV2 plan file from models/dfa_plans.",
            inputs=[_plan_combo()],
            outputs=[
                DFA_PLAN.Output(display_name="dfa_plan", tooltip="The validated plan, for DFAApply's dfa_plan input."),
                io.String.Output(display_name="summary", tooltip="Model family, layers, heads and method shares."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, plan: str = NO_PLAN, **kwargs: Any) -> Any:
        return plan_fingerprint(plan)

    @classmethod
    def execute(cls, plan: str) -> io.NodeOutput:
        loaded = load_plan_file(plan)
        counts = loaded.method_counts()
        total = sum(counts.values()) or 1
        shares = ", ".join(f"{name} {100.0 * n / total:.1f}%" for name, n in sorted(counts.items()))
        summary = f"{plan}: {loaded.model.describe()}, {len(loaded.positions)} positions; {shares}"
        return io.NodeOutput(loaded, summary)


class DFAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [DFAApply, DFALoadPlan]
