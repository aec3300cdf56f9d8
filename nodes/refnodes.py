"""Nodes for the trained reference models shipped in refmodels/weights (README: Reference models), so that an
example workflow runs as-is without downloading anything: a loader (ComfyUI's own `load_diffusion_model` on the
shipped file), the models' fixed caption encoder and their fixed latent decoder (neither model has a CLIP or a
VAE; the stock KSampler, EmptySD3LatentImage and Save/Preview nodes do the rest).
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..refmodels import text
from ..refmodels import models as R

__all__ = ["REF_CATEGORY", "DFARefModelLoader", "DFARefTextEncode", "DFARefDecode", "REF_NODES"]

REF_CATEGORY = "model_patches/DiTFastAttnV2/reference models"


class DFARefModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DFARefModelLoader",
            display_name="DiTFastAttnV2 Reference Model",
            category=REF_CATEGORY,
            description=(
                "Loads one of the pack's small trained reference models (refmodels/weights) with ComfyUI's own "
                "diffusion-model loader, to try calibration and the speed/quality trade-off without downloading a "
                "model. They draw coloured shapes on textured backgrounds from captions like 'a large red circle "
                "in the center, on a striped blue background'."
            ),
            inputs=[
                io.Combo.Input(
                    "model", options=list(R.SPECS), default="sd35m",
                    tooltip="sd35m: SD3.5-Medium layout (6 attention layers, sample at cfg 4). flux: Flux layout "
                    "(4 attention layers, sample at cfg 1). Both were trained at 512 and 1024 pixels.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The reference model, for DFACalibrate, DFAApply and KSampler.")],
        )

    @classmethod
    def execute(cls, model: str) -> io.NodeOutput:
        return io.NodeOutput(R.load(model))


class DFARefTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DFARefTextEncode",
            display_name="DiTFastAttnV2 Reference Text Encode",
            category=REF_CATEGORY,
            description="The reference models' fixed caption encoder (they have no CLIP): one caption per line, "
            "all lines as one batch.",
            inputs=[
                io.String.Input(
                    "captions", multiline=True, default="a large red circle in the center, on a plain blue background",
                    tooltip="One caption per line; several lines give a batch (e.g. DFACalibrate's prompts). Words: "
                    "counts (a, two, three), sizes (small, large), colours, shapes (circle, square, triangle, diamond), "
                    "'striped', positions (top left ... bottom right, center), backgrounds (plain, striped, checkered, "
                    "gradient). An empty text is the unconditional input (negative).",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for KSampler or DFACalibrate's positive/negative.")],
        )

    @classmethod
    def execute(cls, captions: str) -> io.NodeOutput:
        lines = [line.strip() for line in captions.splitlines() if line.strip()] or [""]
        ctx, pooled = text.encode_text(lines)
        return io.NodeOutput([[ctx, {"pooled_output": pooled}]])


class DFARefDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DFARefDecode",
            display_name="DiTFastAttnV2 Reference Decode",
            category=REF_CATEGORY,
            description="The reference models' fixed latent decoder (they have no VAE): latents to images.",
            inputs=[
                io.Model.Input("model", tooltip="The reference model that made the latents (its latent format)."),
                io.Latent.Input("samples", tooltip="KSampler output of a reference model."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded images.")],
        )

    @classmethod
    def execute(cls, model: Any, samples: dict) -> io.NodeOutput:
        images = R.decode_samples(model, samples["samples"])  # [B, 3, H, W] in [0, 1]
        return io.NodeOutput(images.permute(0, 2, 3, 1).contiguous())  # ComfyUI's IMAGE: [B, H, W, 3]


REF_NODES: list[type[io.ComfyNode]] = [DFARefModelLoader, DFARefTextEncode, DFARefDecode]
