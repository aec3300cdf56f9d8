"""Test-only ComfyUI nodes for the pack's server tests (copied into <base>/custom_nodes by the test).

DFATestZeroConditioning: seeded random text conditioning without a CLIP (tiny Flux/SD3 models).
DFATestTinyFluxLoader:   loads a tiny Flux without auto-detection (ComfyUI 0.3.64 hard-codes Flux-dev dims).
"""

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths


class DFATestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": ("INT", {"default": 32, "min": 1, "max": 4096}),
            "context_dim": ("INT", {"default": 64, "min": 1, "max": 8192}),
            "pooled_dim": ("INT", {"default": 64, "min": 1, "max": 8192}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens, context_dim, pooled_dim, seed):
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return ([[ctx, {"pooled_output": pooled, "guidance": 3.5}]],)


class DFATestTinyFluxLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        hidden = sd["img_in.weight"].shape[0]
        count = lambda p: len({k.split(".")[1] for k in sd if k.startswith(p)})  # noqa: E731
        unet_config = {
            "image_model": "flux", "in_channels": sd["img_in.weight"].shape[1] // 4, "out_channels": 16,
            "vec_in_dim": sd["vector_in.in_layer.weight"].shape[1], "context_in_dim": sd["txt_in.weight"].shape[1],
            "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": hidden // 128,
            "depth": count("double_blocks."), "depth_single_blocks": count("single_blocks."),
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True,
            "guidance_embed": "guidance_in.in_layer.weight" in sd,
        }
        model_config = comfy.supported_models.Flux(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model(sd, "")
        model.load_model_weights(sd, "")
        return (comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                 offload_device=comfy.model_management.unet_offload_device()),)


NODE_CLASS_MAPPINGS = {"DFATestConditioning": DFATestConditioning, "DFATestTinyFluxLoader": DFATestTinyFluxLoader}
