"""Per-family layout adapters (Flux, Flux 2, SD3/SD3.5): layer identity, text/image token counts from the model's
latent format, and what makes a family's forward unroutable (e.g. block-replace patches on SD3).

Plain Python: only `model_layout` looks at the host's model classes (imported when it is called).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration.plan import LayerSpec, ModelSignature
from ..kernels.cost import grid_tokens, image_tokens

__all__ = ["Layout", "model_layout", "model_signature", "weights_fingerprint", "Reason"]


class Reason(str):
    """Why a call or forward runs dense: a human-readable sentence whose `kind` groups warnings and counters."""

    kind: str

    def __new__(cls, kind: str, detail: str | None = None) -> Reason:
        obj = super().__new__(cls, detail or kind)
        obj.kind = kind
        return obj


@dataclass(frozen=True)
class Layout:
    """How one model family lays out attention: the signature, the patchify, the latent scale, layer identity.

    patch_size: latent cells per token side; latent_scale: pixels per latent cell (the latent format's spatial
    downscale); register_length: tokens prepended to the text (SD3 registers; 0 for released checkpoints).
    """

    signature: ModelSignature
    patch_size: int
    latent_scale: int = 8
    register_length: int = 0
    _block_layers: dict[tuple[str, int], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        blocks: dict[tuple[str, int], int] = {}
        if self.signature.family in ("flux", "flux2"):
            for i, spec in enumerate(self.signature.layers):
                block_type, index = spec.name.split(".")
                blocks[(block_type, int(index))] = i
        object.__setattr__(self, "_block_layers", blocks)

    @property
    def family(self) -> str:
        return self.signature.family

    @property
    def counts_calls(self) -> bool:
        """True when layer identity is a per-forward call counter (SD3: the host names no block)."""
        return not self._block_layers

    def latent_tokens(self, latent_h: int, latent_w: int) -> int:
        """Image tokens of a latent of latent_h × latent_w cells."""
        return grid_tokens(latent_h, latent_w, self.patch_size)

    def image_tokens(self, width: int, height: int) -> int:
        """Image tokens of a width × height picture (pixels) for this family."""
        return image_tokens(width, height, vae_scale=self.latent_scale, patch=self.patch_size)

    def text_tokens(self, context_len: int) -> int:
        return context_len + self.register_length

    def reference_tokens(self, ref_latents: Any) -> tuple[int, ...] | Reason:
        """Reference tokens of a forward's `ref_latents` (Kontext / Flux 2 edit): the Flux families patchify each
        reference latent like the image and append its tokens after the image tokens, in order (the host's
        ``reference_image_num_tokens``, which it sets only inside the model, after our forward wrapper ran). One
        count per reference latent, in order."""
        if self.family not in ("flux", "flux2"):
            return Reason("reference latents", f"reference latents are not part of the {self.family} layout")
        counts = []
        try:
            for ref in ref_latents:
                if not torch.is_tensor(ref) or ref.dim() < 3:
                    return Reason("reference latents", "a reference latent is not a [B, C, H, W] tensor")
                counts.append(self.latent_tokens(int(ref.shape[-2]), int(ref.shape[-1])))
        except TypeError:
            return Reason("reference latents", "reference latents are not a list of tensors")
        return tuple(counts)

    def forward_reason(self, transformer_options: dict) -> Reason | None:
        """Why a whole forward cannot be routed for this family, or None."""
        if self.counts_calls:
            dit = (transformer_options.get("patches_replace") or {}).get("dit") or {}
            if any(isinstance(k, tuple) and k and k[0] == "double_block" for k in dit):
                return Reason("block replace", "block replace patches (e.g. Skip Layer Guidance) make SD3 layer "
                              "identity unreliable")
        return None

    def block_layer(self, transformer_options: dict) -> int | Reason:
        """Signature index of the calling layer from the host's block identity (Flux families)."""
        bt, bi = transformer_options.get("block_type"), transformer_options.get("block_index")
        if bt is None or bi is None:
            return Reason("no block identity", "the host gives no Flux block_type/block_index (needs ComfyUI >= 0.3.75)")
        layer = self._block_layers.get((bt, bi))
        if layer is None:
            return Reason("unknown layer", f"unknown Flux layer {bt}.{bi}")
        return layer


def model_layout(model: Any) -> Layout:
    """The layout of a ComfyUI MODEL (ModelPatcher, BaseModel or diffusion model).

    Flux / Flux 2: ``double.<i>`` then ``single.<i>``; SD3/SD3.5: ``joint.<i>`` and, for SD3.5-Medium's blocks with
    a second image-only self-attention, ``joint.<i>.attn2`` (image_only) right after it. Raises ValueError for any
    other model family.
    """
    patcher_model = getattr(model, "model", model)
    dm = getattr(patcher_model, "diffusion_model", patcher_model)
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    latent_format = getattr(patcher_model, "latent_format", None)
    scale = int(getattr(latent_format, "spacial_downscale_ratio", 8) or 8)
    if isinstance(dm, Flux):
        heads = int(dm.num_heads)
        head_dim = int(dm.hidden_size) // heads
        layers = [LayerSpec(f"double.{i}", heads, head_dim) for i in range(len(dm.double_blocks))]
        layers += [LayerSpec(f"single.{i}", heads, head_dim) for i in range(len(dm.single_blocks))]
        # Flux 2 runs the same block classes on 16x-downscaled latents with patch 1 (host.md §0.1).
        family = "flux2" if type(patcher_model).__name__ == "Flux2" else "flux"
        return Layout(ModelSignature(family, tuple(layers)), int(dm.patch_size), scale)  # type: ignore[arg-type]
    if isinstance(dm, MMDiT):
        layers = []
        for i, block in enumerate(dm.joint_blocks):
            xb = block.x_block
            layers.append(LayerSpec(f"joint.{i}", int(xb.attn.num_heads), int(xb.attn.head_dim)))
            if getattr(xb, "x_block_self_attn", False):
                layers.append(LayerSpec(f"joint.{i}.attn2", int(xb.attn2.num_heads), int(xb.attn2.head_dim), True))
        return Layout(ModelSignature("sd3", tuple(layers)), int(dm.patch_size), scale,
                      int(getattr(dm, "register_length", 0)))
    raise ValueError(
        f"DiTFastAttnV2 supports Flux and SD3/SD3.5 models; this model is {type(dm).__name__} "
        f"({type(patcher_model).__name__}). Connect a Flux or SD3 model."
    )


def model_signature(model: Any) -> ModelSignature:
    """The attention layers of a ComfyUI MODEL in forward order (see `model_layout`)."""
    return model_layout(model).signature


def weights_fingerprint(model: Any, samples: int = 64) -> str | None:
    """A cheap fingerprint of a model's weights: a hash of `samples` values at the start and end of four of its
    parameters (first, two inner, last in name order). Tells finetunes of one architecture apart in
    milliseconds; None when the weights cannot be read (e.g. a quantized tensor type)."""
    patcher_model = getattr(model, "model", model)
    dm = getattr(patcher_model, "diffusion_model", patcher_model)
    try:
        params = sorted(dm.named_parameters(), key=lambda kv: kv[0])
        if not params:
            return None
        n = len(params)
        h = hashlib.sha256()
        for i in sorted({0, n // 3, (2 * n) // 3, n - 1}):
            name, p = params[i]
            flat = p.detach().reshape(-1)
            picked = torch.cat([flat[:samples], flat[-samples:]]).to("cpu", torch.float32)
            h.update(name.encode())
            h.update(picked.numpy().tobytes())
        return "w1:" + h.hexdigest()[:16]
    except Exception:  # noqa: BLE001 - a fingerprint is a courtesy, never a failure
        return None
