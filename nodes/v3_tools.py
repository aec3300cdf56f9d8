"""V3 nodes for judging a plan: DFAPlanInfo (the plan as a picture and a summary) and DFACompare (A/B sampling
with PSNR / SSIM and timings). Registered by v3.DFAExtension; imported only inside ComfyUI."""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io, ui

from ..calibration.cli import summarize
from ..calibration.picture import draw_plan
from ..calibration.plan import Plan
from .compare import compare_dfa
from .plans import NO_PLAN, load_plan_file, plan_fingerprint
from .v3_common import CATEGORY, DFA_PLAN, advanced, plan_combo, sampler_names, scheduler_names

__all__ = ["DFAPlanInfo", "DFACompare"]

_WIRED_PLAN_TOOLTIP = "A plan from DFALoadPlan or DFACalibrate. When connected it wins over the dropdown."


def _chosen_plan(plan: str, dfa_plan: Plan | None) -> tuple[Plan, str]:
    if dfa_plan is not None:
        return dfa_plan, "connected plan"
    return load_plan_file(plan), plan


def _previews(images: torch.Tensor, cls: type[io.ComfyNode], text: str) -> dict:
    # The images as temporary previews on the node plus the text, in one ui result (the web extension shows it).
    return {**ui.PreviewImage(images, cls=cls).as_dict(), "text": (text,)}


class DFAPlanInfo(io.ComfyNode):
    """A plan as a picture (steps x layers x heads, one colour per method) and its text summary."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adv = advanced()
        return io.Schema(
            node_id="DFAPlanInfo",
            display_name="DiTFastAttnV2 Plan Info",
            category=CATEGORY,
            description=(
                "Shows what a DiTFastAttnV2 plan does: a heat map with one row per sampling step and one column per "
                "attention head (grouped by layer), coloured by method (full, arrow/8/16/32, cache), with each "
                "method's share and the attention FLOPs kept. Outputs the picture as an IMAGE and the summary text."
            ),
            is_output_node=True,
            inputs=[
                plan_combo(),
                io.Int.Input("width", default=0, min=0, max=16384, step=16,
                             tooltip="Image width in pixels for the FLOPs estimate. 0: the plan's calibration width.",
                             **adv),
                io.Int.Input("height", default=0, min=0, max=16384, step=16,
                             tooltip="Image height in pixels for the FLOPs estimate. 0: the plan's calibration height.",
                             **adv),
                DFA_PLAN.Input("dfa_plan", optional=True, tooltip=_WIRED_PLAN_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="picture",
                                tooltip="The plan as a heat map with legend, shares and attention FLOPs kept."),
                io.String.Output(display_name="summary",
                                 tooltip="Model, calibration settings, share of each method and attention FLOPs kept."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, plan: str = NO_PLAN, **kwargs: Any) -> Any:
        return plan_fingerprint(plan)

    @classmethod
    def execute(cls, plan: str, width: int = 0, height: int = 0, dfa_plan: Plan | None = None) -> io.NodeOutput:
        chosen, label = _chosen_plan(plan, dfa_plan)
        size = dict(width=int(width) or None, height=int(height) or None)
        picture = torch.from_numpy(draw_plan(chosen, **size).image).float().div(255.0).unsqueeze(0)
        summary = f"plan: {label}\n{summarize(chosen, **size)}"
        return io.NodeOutput(picture, summary, ui=_previews(picture, cls, summary))


class DFACompare(io.ComfyNode):
    """Sample once uncompressed and once with a plan (same seed), decode both, report the difference and the time."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adv = advanced()
        samplers, schedulers = sampler_names(), scheduler_names()
        return io.Schema(
            node_id="DFACompare",
            display_name="DiTFastAttnV2 A/B Compare",
            category=CATEGORY,
            description=(
                "Judges a plan on your model and prompt: samples the latent once with the model as is and once with "
                "the plan applied (as DFAApply does, on a copy), with the same seed and noise, decodes both and "
                "outputs both images, an amplified difference image and a report with PSNR, SSIM and the measured "
                "time of both runs. Takes about twice a KSampler's time."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="Flux or SD3/SD3.5 model, without DFAApply. It is not changed."),
                plan_combo(default_none=True),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning, as for KSampler."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, as for KSampler (unused at cfg 1)."),
                io.Vae.Input("vae", tooltip="VAE that decodes both latents."),
                io.Latent.Input("latent_image", tooltip="Latent to denoise (e.g. an empty latent), as for KSampler."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed, shared by both runs."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Sampling steps of both runs (1-10000). The plan is mapped by sigma; use the "
                             "steps it was calibrated with for its intended quality."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of both runs (1.0 for Flux-dev)."),
                io.Combo.Input("sampler_name", options=samplers, tooltip="Sampler of both runs (the host's list)."),
                io.Combo.Input("scheduler", options=schedulers, tooltip="Scheduler of both runs (the host's list)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to denoise, as for KSampler (1.0: from pure noise)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="As in DFAApply: share of the schedule before which every head stays dense.",
                               **adv),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="As in DFAApply: share of the schedule after which every head is dense again.",
                               **adv),
                io.Float.Input("difference_gain", default=4.0, min=1.0, max=100.0, step=0.5,
                               tooltip="The difference image is |compressed - uncompressed| times this, clipped: 4 "
                               "shows a difference of a quarter of the range as white.", **adv),
                DFA_PLAN.Input("dfa_plan", optional=True, tooltip=_WIRED_PLAN_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="image_uncompressed", tooltip="Decoded image of the model as is."),
                io.Image.Output(display_name="image_compressed", tooltip="Decoded image with the plan applied."),
                io.Image.Output(display_name="difference",
                                tooltip="|compressed - uncompressed| x difference_gain, clipped (black = equal)."),
                io.String.Output(display_name="report",
                                 tooltip="PSNR, SSIM, both sampling times and the speed-up, the plan's run summary."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, plan: str = NO_PLAN, **kwargs: Any) -> Any:
        return plan_fingerprint(plan)

    @classmethod
    def execute(
        cls,
        model: Any,
        plan: str,
        positive: list,
        negative: list,
        vae: Any,
        latent_image: dict,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        denoise: float,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        difference_gain: float = 4.0,
        dfa_plan: Plan | None = None,
    ) -> io.NodeOutput:
        chosen, label = _chosen_plan(plan, dfa_plan)
        res = compare_dfa(
            model=model, plan=chosen, positive=positive, negative=negative, vae=vae, latent_image=latent_image,
            seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            start_percent=start_percent, end_percent=end_percent, difference_gain=difference_gain, label=label,
        )
        shown = torch.cat([res.uncompressed, res.compressed, res.difference])
        return io.NodeOutput(res.uncompressed, res.compressed, res.difference, res.report,
                             ui=_previews(shown, cls, res.report))
