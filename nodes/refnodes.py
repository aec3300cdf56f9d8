"""Nodes for the trained reference models shipped in refmodels/weights (README: Reference models), so that an
example workflow runs as-is without downloading anything: a loader (ComfyUI's own `load_diffusion_model` on the
shipped file) that also outputs the models' fixed latent decoder as a decode-only VAE, and their fixed caption
encoder (neither model has a CLIP or a real VAE; the stock KSampler, EmptySD3LatentImage, VAEDecode and
Save/Preview nodes do the rest).
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from ..refmodels import text
from ..refmodels import models as R

__all__ = ["REF_CATEGORY", "RefDecoder", "DFARefModelLoader", "DFARefTextEncode", "REF_NODES"]

REF_CATEGORY = "model_patches/DiTFastAttnV2/reference models"


class RefDecoder:
    """The reference models' latent decoder (refmodels/codec.py) where ComfyUI expects a VAE: `decode` is what
    VAEDecode (and DFACompare) call. Nothing else of a VAE is there; other VAE nodes fail with a message."""

    def __init__(self, model: Any) -> None:
        self.latent_format = model.model.latent_format
        self._model = model

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        images = R.decode_samples(self._model, samples)  # [B, 3, H, W] in [0, 1]
        return images.permute(0, 2, 3, 1).contiguous()  # ComfyUI's IMAGE: [B, H, W, 3]

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"the DiTFastAttnV2 reference model's VAE output can only decode (VAEDecode, DFACompare); '{name}' is not "
            "available. Use VAEDecode on its latents.")


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
            outputs=[
                io.Model.Output(tooltip="The reference model, for DFACalibrate, DFAApply and KSampler."),
                io.Vae.Output(tooltip="Its fixed latent decoder, for VAEDecode (decode only: the model has no real VAE)."),
            ],
        )

    @classmethod
    def execute(cls, model: str) -> io.NodeOutput:
        patcher = R.load(model)
        return io.NodeOutput(patcher, RefDecoder(patcher))


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


REF_NODES: list[type[io.ComfyNode]] = [DFARefModelLoader, DFARefTextEncode]
