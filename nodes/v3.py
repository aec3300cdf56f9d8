"""V3 node definitions (comfy_api.latest): DFAApply, DFALoadPlan and DFACalibrate here, DFAPlanInfo and DFACompare in
v3_tools.py, shared schema pieces in v3_common.py; DFAExtension registers all five. Imported only inside ComfyUI."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io, ui

from ..calibration.cli import summarize
from ..calibration.plan import Plan
from ..calibration.prompts import DEFAULT_PROMPTS
from ..calibration.search import DEFAULT_DELTA
from ..kernels.dense import DENSE_MODES
from ..kernels.engine import CACHE_OFFLOAD_MODES
from .adapter import apply_dfa
from .calibrate import CANDIDATE_SETS, DEFAULT_CANDIDATE_SET, FP8_MODES, calibrate_plan_node
from .plans import NO_PLAN, load_plan_file, plan_fingerprint
from .refnodes import REF_NODES
from .v3_common import CATEGORY, DFA_PLAN, advanced, plan_combo, sampler_names, scheduler_names
from .v3_tools import DFACompare, DFAPlanInfo

__all__ = [
    "DFAApply", "DFALoadPlan", "DFACalibrate", "DFAPlanInfo", "DFACompare", "DFAExtension", "CATEGORY", "DFA_PLAN",
]


class DFAApply(io.ComfyNode):
    """Clone the model and run its attention head-wise (full / arrow / cached) as the plan says."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adv = advanced()
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
                plan_combo(default_none=True),
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
                io.Combo.Input(
                    "dense", options=list(DENSE_MODES), default=DENSE_MODES[0], optional=True,
                    tooltip=(
                        "Who computes the heads the plan keeps full. fastest: on NVIDIA GPUs, layers whose heads all "
                        "run full use cuDNN attention (faster than ComfyUI's default at 2K) and the full heads of "
                        "mixed layers run inside the arrow kernel. host: ComfyUI's own attention computes every full "
                        "head (an all-full plan is then bit-identical to no plan). Another attention node chained "
                        "before or after this one (Sage, Model Attention Backend) always serves the full heads. "
                        "Optional, so workflows saved before this option keep working."
                    ),
                    **adv,
                ),
                io.Combo.Input(
                    "cache_memory", options=list(CACHE_OFFLOAD_MODES), default="auto", optional=True,
                    tooltip=(
                        "Where cached head outputs wait for the next step. gpu: fastest, but a cache-heavy plan at "
                        "2K can hold several GB. cpu: pinned system memory, copied back one layer ahead. auto: cpu "
                        "when the plan's cache would take more than 2% of the GPU's memory."
                    ),
                    **adv,
                ),
                DFA_PLAN.Input(
                    "dfa_plan", optional=True,
                    tooltip="A plan from DFALoadPlan or a calibration node. When connected it wins over the dropdown.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched clone (or the input model when disabled).")],
            hidden=[io.Hidden.unique_id],  # the node id: each sampling run's report is shown on this node
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
        dense: str = DENSE_MODES[0],
        cache_memory: str = "auto",
        dfa_plan: Plan | None = None,
    ) -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(model)
        chosen = dfa_plan if dfa_plan is not None else load_plan_file(plan)
        label = "connected plan" if dfa_plan is not None else plan
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        patched = apply_dfa(
            model, plan=chosen, enabled=True, start_percent=start_percent, end_percent=end_percent, dense=dense,
            cache_offload=cache_memory, label=label, node_id=None if node_id is None else str(node_id),
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
            inputs=[plan_combo()],
            outputs=[
                DFA_PLAN.Output(display_name="dfa_plan", tooltip="The validated plan, for DFAApply's dfa_plan input."),
                io.String.Output(
                    display_name="summary",
                    tooltip="Model, calibration settings, share of each method and attention FLOPs kept.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, plan: str = NO_PLAN, **kwargs: Any) -> Any:
        return plan_fingerprint(plan)

    @classmethod
    def execute(cls, plan: str) -> io.NodeOutput:
        loaded = load_plan_file(plan)
        summary = f"plan: {plan}\n{summarize(loaded)}"
        return io.NodeOutput(loaded, summary, ui=ui.PreviewText(summary))  # shown on the node by web/dfav2.js


class DFACalibrate(io.ComfyNode):
    """Search a head-wise plan on sample prompts (one sampling pass) and write it to models/dfa_plans."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adv = advanced()
        samplers, schedulers = sampler_names(), scheduler_names()
        return io.Schema(
            node_id="DFACalibrate",
            display_name="DiTFastAttnV2 Calibrate",
            category=CATEGORY,
            description=(
                "Finds a DiTFastAttnV2 plan for this model: one sampling pass over the sample prompts in which every "
                "attention layer measures, per head, the error of arrow attention and of reusing the previous "
                "step's output (and, with fp8, of FP8 attention), and keeps the cheapest choice within the error "
                "budget delta. Writes "
                "models/dfa_plans/<plan_name>.json and outputs the plan for DFAApply. A re-run with the same model "
                "and settings loads that file instead of calibrating again. Can be queued on its own."
            ),
            is_output_node=True,  # a calibrate-only workflow is a valid prompt; the summary shows on the node
            inputs=[
                io.Model.Input("model", tooltip="Flux or SD3/SD3.5 model to calibrate. It is not changed."),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip="Text encoder for the prompt list (and the negative prompt). Not needed when 'positive' is "
                    "connected.",
                ),
                io.String.Input(
                    "prompts", multiline=True, default="\n".join(DEFAULT_PROMPTS),
                    tooltip="Calibration prompts, one per line (1-64), encoded with 'clip' and sampled as one batch. "
                    "Varied prompts give a plan that generalises; ignored when 'positive' is connected.",
                ),
                io.String.Input(
                    "negative_prompt", multiline=True, default="",
                    tooltip="Negative prompt, encoded with 'clip'; only matters when cfg > 1. Ignored when 'negative' "
                    "is connected.",
                ),
                io.Int.Input("width", default=1024, min=64, max=8192, step=16,
                             tooltip="Image width in pixels (multiple of 16). Calibrate at the size you will render."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=16,
                             tooltip="Image height in pixels (multiple of 16). Calibrate at the size you will render."),
                io.Int.Input("steps", default=28, min=2, max=200,
                             tooltip="Sampling steps (2-200). Use the step count, sampler and scheduler you will "
                             "render with: the plan is indexed by the sigmas of this schedule."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale. 1.0 (Flux-dev): no negative pass; > 1 samples "
                               "negative and positive (about twice the time)."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Flux guidance (as in FluxGuidance), used where the conditioning carries none. "
                               "Ignored for SD3/SD3.5."),
                io.Combo.Input("sampler_name", options=samplers, default="euler" if "euler" in samplers else samplers[0],
                               tooltip="Sampler of the calibration pass (the host's list)."),
                io.Combo.Input("scheduler", options=schedulers,
                               default="simple" if "simple" in schedulers else schedulers[0],
                               tooltip="Scheduler of the calibration pass (the host's list)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of the calibration pass; the same inputs and seed give the same plan."),
                io.Float.Input(
                    "delta", default=DEFAULT_DELTA, min=0.0, max=2.0, step=0.01,
                    tooltip="Error budget per layer and step: the sum of the compressed heads' relative squared errors "
                    f"may not exceed delta. 0 = every head full (no speed-up); {DEFAULT_DELTA:g} default (no visible "
                    "change on the reference models, about half the attention FLOPs); 0.2 saves more with small "
                    "changes; 0.4 and above visibly change details.",
                ),
                io.Combo.Input(
                    "candidates", options=list(CANDIDATE_SETS), default=DEFAULT_CANDIDATE_SET,
                    tooltip="Methods a head may use instead of full attention: 'cache' reuses the head's output of the "
                    "previous step; 'arrow f' keeps the text rows/columns plus an image band of 1/(2f) of the image "
                    "tokens on each side (8 = widest).",
                    **adv,
                ),
                io.String.Input(
                    "plan_name", default="my_plan",
                    tooltip="File name of the plan in models/dfa_plans (.json is added; characters other than letters, "
                    "digits, '_', '-' and '.' become '_').",
                ),
                io.Boolean.Input(
                    "overwrite", default=False,
                    tooltip="Off: if the plan file exists and was calibrated for this model with these settings "
                    "(prompts, size, steps, sampler, seed, delta, candidates) it is loaded in seconds instead of "
                    "calibrating again; if it differs the node fails and shows both records. On: calibrate and "
                    "replace the file (atomically, only after a successful calibration).",
                ),
                io.Conditioning.Input(
                    "positive", optional=True,
                    tooltip="Optional prompt conditioning (its batch = the calibration prompts). When connected it "
                    "wins over clip + prompts.",
                ),
                io.Conditioning.Input(
                    "negative", optional=True,
                    tooltip="Optional negative conditioning; wins over negative_prompt. Without it and without clip "
                    "the zeroed positive is used.",
                ),
                io.Combo.Input(
                    "fp8", options=list(FP8_MODES), default="off", optional=True,
                    tooltip="Also offer FP8 variants of full and of each arrow candidate: the head's Q.K^T computed "
                    "in FP8 (an error that the calibration measures like any other and keeps within delta). "
                    "Today's kernel runs FP8 heads about 7 % slower than bf16 on an H200, and the cost model "
                    "knows it, so on that GPU the search keeps bf16 heads: leave it off unless you are trying a "
                    "faster FP8 kernel. off: no FP8 heads. on: offer them (a plan made without FP8 tensor cores "
                    "measures FP8 by emulation; such heads run in bf16 on GPUs without FP8). auto: on when this "
                    "GPU has FP8 tensor cores. Optional, so workflows saved before this option keep working.",
                    **adv,
                ),
            ],
            outputs=[
                DFA_PLAN.Output(display_name="dfa_plan", tooltip="The calibrated plan, for DFAApply's dfa_plan input."),
                io.String.Output(
                    display_name="summary",
                    tooltip="Method shares, attention FLOPs kept, estimated attention speed-up, wall time, file.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: Any,
        prompts: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        guidance: float,
        sampler_name: str,
        scheduler: str,
        seed: int,
        delta: float,
        candidates: str,
        plan_name: str,
        overwrite: bool,
        clip: Any = None,
        positive: list | None = None,
        negative: list | None = None,
        fp8: str = "off",
    ) -> io.NodeOutput:
        result = calibrate_plan_node(
            model=model, clip=clip, prompts=prompts, positive=positive, negative_prompt=negative_prompt,
            negative=negative, width=width, height=height, steps=steps, cfg=cfg, guidance=guidance,
            sampler_name=sampler_name, scheduler=scheduler, seed=seed, delta=delta, candidates=candidates, fp8=fp8,
            plan_name=plan_name, overwrite=overwrite,
        )
        return io.NodeOutput(result.plan, result.summary, ui=ui.PreviewText(result.summary))


class DFAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [DFAApply, DFALoadPlan, DFACalibrate, DFAPlanInfo, DFACompare, *REF_NODES]
