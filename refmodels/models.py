"""The two reference models: geometry, the host-side glue (build, save, load, condition, decode).

Both are built from ComfyUI's own classes and saved under real checkpoint key names, so ComfyUI's loader
detects them like any Flux / SD3.5 checkpoint:

- `flux`: Flux layout (double + single blocks, RoPE, head_dim 128), 4 heads, 1 double + 3 single blocks
  (4 attention layers), guidance embedding (Flux-dev style, sampled at cfg 1).
- `sd35m`: SD3.5-Medium layout (joint blocks, QK RMSNorm, image-only `attn2` in blocks 0-1), depth 4 so 4 heads
  of 64 (the host ties heads to depth), 6 attention layers; sampled with classifier-free guidance.

Imports the host lazily: the pure parts of `refmodels` (scenes, codec, text) work without it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from . import codec, text

__all__ = ["SPECS", "Spec", "WEIGHTS_DIR", "weights_path", "build_module", "detect", "state_dict_for_saving",
           "save_weights", "FP8_MODELS", "load", "conditioning", "decode_samples"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str  # the plan family: "flux" or "sd3"
    kwargs: dict[str, Any]
    cfg: float  # how the model is sampled (and calibrated) by default
    guidance: float | None  # Flux guidance input
    file: str


SPECS: dict[str, Spec] = {
    "flux": Spec(
        family="flux",
        kwargs=dict(in_channels=16, out_channels=16, vec_in_dim=text.POOLED_DIM, context_in_dim=text.CONTEXT_DIM,
                    hidden_size=512, mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=3,
                    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                    txt_ids_dims=[]),
        cfg=1.0, guidance=3.5, file="dfa_ref_flux.safetensors",
    ),
    "sd35m": Spec(
        family="sd3",
        kwargs=dict(depth=4, patch_size=2, in_channels=16, out_channels=16, adm_in_channels=text.POOLED_DIM,
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": text.CONTEXT_DIM, "out_features": 256}},
                    num_patches=4096, pos_embed_max_size=64, qk_norm="rms", x_block_self_attn_layers=[0, 1]),
        cfg=4.0, guidance=None, file="dfa_ref_sd35m.safetensors",
    ),
}


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / SPECS[name].file


def _real_key(k: str) -> str:
    # BFL checkpoints name Flux's QK-RMSNorm parameter ".scale"; ComfyUI's module calls it ".weight".
    return k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k


def build_module(name: str) -> torch.nn.Module:
    """The bare diffusion module (host class) with a DiT-style initialisation: Xavier linears, zero biases,
    zero-initialised modulation and output layers (adaLN-zero), unit norms, the fixed sin-cos table for SD3."""
    import comfy.ops

    kw = dict(SPECS[name].kwargs)
    if name == "flux":
        from comfy.ldm.flux.model import Flux, FluxParams

        fields = {f.name for f in dataclasses.fields(FluxParams)}
        module: torch.nn.Module = Flux(operations=comfy.ops.disable_weight_init,
                                       **{k: v for k, v in kw.items() if k in fields})
    else:
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed

        module = OpenAISignatureMMDITWrapper(operations=comfy.ops.disable_weight_init, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mname, m in module.named_modules():
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.nn.Parameter):
                if w.dim() >= 2:
                    fan_out, fan_in = w.shape[0], w[0].numel()
                    bound = (6.0 / (fan_in + fan_out)) ** 0.5
                    w.uniform_(-bound, bound, generator=g)
                    if any(s in mname for s in ("modulation", "adaLN", "mod.lin", "final_layer.linear")):
                        w.zero_()
                else:
                    w.fill_(1.0)
            if isinstance(b, torch.nn.Parameter):
                b.zero_()
        if name != "flux":
            pe = get_2d_sincos_pos_embed(module.pos_embed.shape[-1], kw["pos_embed_max_size"])
            module.pos_embed.copy_(torch.from_numpy(pe).float().reshape(module.pos_embed.shape))
    return module


def state_dict_for_saving(module: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    return {_real_key(k): v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}


def detect(sd: dict[str, torch.Tensor]) -> Any:
    """The host's own model config for a state dict (what its loader would pick)."""
    import comfy.model_detection

    cfg = comfy.model_detection.model_config_from_unet(sd, "")
    if cfg is None:
        raise RuntimeError("ComfyUI's model detection did not recognise the reference state dict")
    return cfg


#: Flux ships as the host's scaled-fp8 checkpoint format (fp16 would put both models over the 64 MB budget).
FP8_MODELS = ("flux",)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def save_weights(module: torch.nn.Module, path: Path, fp8: bool = False) -> None:
    """Safetensors under real key names: fp16, or with ``fp8`` the host's scaled-fp8 format for every linear
    weight of the blocks (per-tensor scale ``<layer>.scale_weight``, marker ``scaled_fp8`` of 2 elements =
    de-quantise and multiply in the compute dtype); biases, norms and embedders stay fp16."""
    import safetensors.torch

    sd = state_dict_for_saving(module, torch.float32)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        layer = k[: -len(".weight")]
        if fp8 and k.endswith(".weight") and v.dim() == 2 and k.startswith(("double_blocks.", "single_blocks.")):
            scale = v.abs().max().clamp_min(1e-12) / FP8_MAX
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[layer + ".scale_weight"] = scale.reshape(()).float()
        else:
            out[k] = v.to(torch.float16)
    if fp8:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(out, str(tmp), metadata={"dfav2_reference": "DiTFastAttnV2 reference model"})
    tmp.replace(path)


def load(name: str, path: Path | None = None) -> Any:
    """The reference model through ComfyUI's loader (`comfy.sd.load_diffusion_model`): a ModelPatcher."""
    import comfy.sd

    p = Path(path) if path is not None else weights_path(name)
    if not p.is_file():
        raise FileNotFoundError(f"reference weights not found: {p} (train them with: python -m refmodels.train)")
    return comfy.sd.load_diffusion_model(str(p))


def conditioning(name: str, captions: list[str], min_length: int = text.MIN_LENGTH) -> list:
    """ComfyUI CONDITIONING for captions: [[context, {"pooled_output": ..., ("guidance": ...)}]]."""
    ctx, pooled = text.encode_text(captions, min_length=min_length)
    extra: dict[str, Any] = {"pooled_output": pooled}
    if SPECS[name].guidance is not None:
        extra["guidance"] = SPECS[name].guidance
    return [[ctx, extra]]


def decode_samples(model_patcher: Any, samples: torch.Tensor) -> torch.Tensor:
    """KSampler output (the host's latent space) -> images `[B, 3, H, W]` in [0, 1]: the family's own
    `process_in` gives the normalised codec latents the model was trained on."""
    return codec.decode(model_patcher.model.latent_format.process_in(samples.float().cpu()))
