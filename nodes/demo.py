"""``python <pack folder> demo``: calibrate -> apply -> sample on a small model the pack builds with the host's classes.

Headless and in-process (CPU or GPU). The host is imported by ``__main__.py`` through ``_host_compat`` before this
module (the ``nodes`` package needs it). The model has random weights (no trained reference model yet): the demo
shows the machinery, the plan summary and timings, not image quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "build_model", "MODELS"]

log = logging.getLogger(__name__)

#: Small demo geometries. Flux: head_dim 128 as the host's detection needs; SD3: hidden = 64 x depth, heads = depth.
MODELS: dict[str, dict[str, Any]] = {
    "flux": dict(
        in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=512, mlp_ratio=4.0,
        num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed=True, txt_ids_dims=[],
    ),
    "sd3": dict(
        depth=4, patch_size=2, in_channels=16, out_channels=16, adm_in_channels=64,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 256}},
        num_patches=4096, pos_embed_max_size=64, qk_norm="rms", x_block_self_attn_layers=[0, 1],
    ),
}
CONTEXT_DIM = 64
POOLED_DIM = {"flux": 32, "sd3": 64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python <pack folder> demo",
        description=(
            "DiTFastAttnV2 demo on a small random-weight model built with ComfyUI's own classes: calibrate a plan, "
            "apply it, sample, print the plan summary and the unpatched/patched sampling times. Finds ComfyUI via "
            "COMFYUI_PATH or because the pack sits in ComfyUI/custom_nodes."
        ),
    )
    p.add_argument("--model", choices=sorted(MODELS), default="flux", help="model family (default: flux)")
    p.add_argument("--size", type=int, default=256, help="image width = height in pixels, multiple of 16 (default: 256)")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default: 8)")
    p.add_argument("--delta", type=float, default=0.4, help="calibration error budget delta (default: 0.4)")
    p.add_argument("--prompts", type=int, default=2, help="calibration batch: random text conditionings (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="noise and weight seed (default: 0)")
    p.add_argument("--out", help="folder for the plan file (default: a new temporary folder)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    return p


def _real_key(k: str) -> str:
    # BFL checkpoints call Flux's QK-RMSNorm parameter ".scale"; newer ComfyUI names it ".weight" in the module.
    return k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k


def build_model(family: str, seed: int = 0) -> Any:
    """The host's own Flux / MMDiT class at the demo geometry, weights ~ N(0, 0.02) in sorted key order."""
    import comfy.ops
    import torch

    kw = dict(MODELS[family])
    if family == "flux":
        from comfy.ldm.flux.model import Flux, FluxParams

        fields = {f.name for f in dataclasses.fields(FluxParams)}
        module = Flux(operations=comfy.ops.disable_weight_init, **{k: v for k, v in kw.items() if k in fields})
    else:
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed

        module = OpenAISignatureMMDITWrapper(operations=comfy.ops.disable_weight_init, **kw)
    g = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k in sorted(params, key=_real_key):
            params[k].copy_(torch.randn(params[k].shape, generator=g) * 0.02)
        if family == "sd3":  # allocated with torch.empty; real checkpoints carry the sin-cos table
            pe = get_2d_sincos_pos_embed(module.pos_embed.shape[-1], kw["pos_embed_max_size"])
            module.pos_embed.copy_(torch.from_numpy(pe).float().reshape(module.pos_embed.shape))
    return module


def _save_and_load(module: Any, path: Path) -> Any:
    """Save under real checkpoint key names and load with the host's loader (model detection included)."""
    import comfy.sd
    import safetensors.torch

    safetensors.torch.save_file({_real_key(k): v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return comfy.sd.load_diffusion_model(str(path))


def _conditioning(family: str, batch: int, tokens: int, seed: int) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, tokens, CONTEXT_DIM, generator=g)
    pooled = torch.randn(batch, POOLED_DIM[family], generator=g)
    extra: dict[str, Any] = {"pooled_output": pooled}
    if family == "flux":
        extra["guidance"] = 3.5
    return [[ctx, extra]]


def _sample(model: Any, pos: list, neg: list, *, size: int, batch: int, steps: int, seed: int) -> tuple[Any, float]:
    import comfy.model_management
    import nodes
    import torch

    latent = {"samples": torch.zeros([batch, 16, size // 8, size // 8])}
    comfy.model_management.soft_empty_cache()
    t0 = time.perf_counter()
    out = nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size < 64 or args.size % 16 or args.steps < 2 or args.prompts < 1 or not 0 <= args.delta <= 2:
        print("demo: need --size >= 64 and a multiple of 16, --steps >= 2, --prompts >= 1, 0 <= --delta <= 2", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # a CLI, not import time
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars between the printed lines

    from .adapter import TO_PATCH
    from .calibrate import calibrate_plan_node, host_version
    from .plans import FOLDER
    from .v3 import DFAApply

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dfav2_demo_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths[FOLDER] = ([str(out_dir.resolve())], {".json"})
    device = comfy.model_management.get_torch_device()
    print(f"DiTFastAttnV2 demo: ComfyUI {host_version()}, device {device}, torch {torch.__version__}")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dfav2_demo_model_") as tmp:
        model = _save_and_load(build_model(args.model, args.seed), Path(tmp) / f"demo_{args.model}.safetensors")
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(
        f"model: {args.model}, {n_params / 1e6:.1f} M random parameters, built with the host's classes and loaded with "
        f"its loader in {time.perf_counter() - t0:.1f} s; {args.size}x{args.size}, {args.steps} steps euler/simple, "
        f"batch {args.prompts}"
    )
    pos = _conditioning(args.model, args.prompts, 64, args.seed + 1)
    neg = _conditioning(args.model, args.prompts, 64, args.seed + 2)
    plan_name = f"demo_{args.model}_{args.size}px_{args.steps}steps_delta{args.delta:g}"

    result = calibrate_plan_node(
        model=model, positive=pos, negative=neg, width=args.size, height=args.size, steps=args.steps, cfg=1.0,
        sampler_name="euler", scheduler="simple", seed=args.seed, delta=args.delta, plan_name=plan_name,
        overwrite=True,
    )
    print("--- plan summary")
    print(result.summary)

    _sample(model, pos, neg, size=args.size, batch=args.prompts, steps=2, seed=args.seed)  # warm-up
    ref, t_ref = _sample(model, pos, neg, size=args.size, batch=args.prompts, steps=args.steps, seed=args.seed)
    patched = DFAApply.execute(model=model, plan="none", enabled=True, start_percent=0.0, end_percent=1.0,
                               dfa_plan=result.plan).args[0]
    out, t_dfa = _sample(patched, pos, neg, size=args.size, batch=args.prompts, steps=args.steps, seed=args.seed)
    run = patched.model_options["transformer_options"][TO_PATCH].last_summary
    same = (out.float() - result.samples.float().to(out.device)).abs().max().item()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    print("--- sampling")
    print(f"unpatched: {t_ref:.2f} s")
    print(f"patched:   {t_dfa:.2f} s ({t_ref / max(t_dfa, 1e-9):.2f}x)")
    if run is not None:
        print(run.line())
    print(f"patched vs calibration pass: max |diff| {same:.3g}; patched vs unpatched: relative L2 {rel:.3g}")
    if device.type != "cuda":
        print("note: on CPU arrow heads run a masked dense reference, so only cached heads save time; the fused "
              "kernel needs CUDA + Triton")
    print(f"plan file: {result.path}")
    print("demo: OK")
    return 0
