"""Host-test environment: find a real ComfyUI, import it in-process on CPU, build tiny models, sample.

ComfyUI is found through ``COMFYUI_PATH`` or because this pack sits in ``ComfyUI/custom_nodes/<pack>``.
Without one, `SKIP_REASON` says why and every host test module skips itself at collection. A host that was asked
for (``COMFYUI_PATH`` set) but cannot be used FAILS the run instead: a broken host (e.g. ComfyUI 0.33 with a
too-old comfy-kitchen, which makes ``comfy`` fail to import) must not turn into a green run of skipped tests.

Nothing is written into the host tree: the in-process host gets a temporary ``--base-directory`` (as the server
does), so ComfyUI's folder_paths does not create ``input/`` (or anything else) next to its sources. The host tree
may be read-only (CI mounts it so).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _load_compat():
    # host_compat.py by file path: importing the `nodes` package would import ComfyUI before it is set up.
    name = "dfav2_host_compat"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "host_compat.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


compat = _load_compat()
COMFY_PATH, SKIP_REASON = compat.find_comfyui(PACK_ROOT)
#: COMFYUI_PATH is set: the caller asked for a host, so an unusable one is an error, never a skip.
HOST_REQUESTED = bool(os.environ.get("COMFYUI_PATH"))
if SKIP_REASON and not HOST_REQUESTED:
    SKIP_REASON += " to run the host tests"
_IMPORTED: dict = {}


def skip_module_without_host() -> None:
    """Module-level gate of every host test module: skip when no host is configured; fail collection (pytest exits
    non-zero and prints the reason) when COMFYUI_PATH is set but is not a ComfyUI tree."""
    import pytest

    if COMFY_PATH is not None:
        return
    if HOST_REQUESTED:
        pytest.fail(f"host tests: {SKIP_REASON}", pytrace=False)
    pytest.skip(SKIP_REASON, allow_module_level=True)


def _set_base_directory(comfy_path: Path, base_directory: Path) -> None:
    """What ``main.py --base-directory`` does, for the in-process host: set ``args.base_directory`` before
    ``folder_paths`` is imported (it reads it once, at import), so models/, input/, output/, temp/ and user/ live
    under `base_directory`. Without it, importing ``folder_paths`` creates ``<ComfyUI>/input``."""
    if "folder_paths" in sys.modules:
        raise RuntimeError("folder_paths was imported before the host tests could set its base directory")
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.base_directory = str(base_directory)


def import_host(base_directory: Path | None = None, *, cpu: bool | None = None) -> str | None:
    """Import ComfyUI in-process (once); returns None, or why the host cannot be used.

    base_directory: ComfyUI's base directory for this process (a temporary folder; see `_set_base_directory`).
    cpu: True forces ``--cpu``; None (the host tests) uses CUDA where there is a GPU, else CPU.
    Called at test time, not at collection, so that test modules which configure Triton before importing it
    (TRITON_INTERPRET) are collected before ComfyUI (comfy-kitchen) imports Triton.
    """
    if "error" in _IMPORTED:
        return _IMPORTED["error"]
    error = SKIP_REASON
    if COMFY_PATH is not None:
        try:
            if base_directory is not None:
                _set_base_directory(COMFY_PATH, base_directory)
            compat.import_comfyui(COMFY_PATH, cpu=cpu)
            if base_directory is not None:
                import folder_paths

                if Path(folder_paths.base_path).resolve() != Path(base_directory).resolve():
                    raise RuntimeError(f"ComfyUI ignored the base directory: folder_paths.base_path is {folder_paths.base_path}")
        except Exception as exc:  # noqa: BLE001
            import traceback

            # The last frames say which module failed (e.g. comfy_kitchen in comfy/ldm/modules/attention.py).
            tb = "".join(traceback.format_exception(exc, limit=-6))
            error = f"ComfyUI at {COMFY_PATH} could not be imported: {type(exc).__name__}: {exc}\n{tb}"
    _IMPORTED["error"] = error
    return error


def host_version() -> str:
    return compat.host_version()


# ------------------------------------------------------------------------------------- tiny models

FLUX_KW = dict(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256, mlp_ratio=4.0, num_heads=2,
    depth=2, depth_single_blocks=4, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
    guidance_embed=True, txt_ids_dims=[],
)
#: Flux 2 as ComfyUI detects it (model_detection: `double_stream_modulation_img` -> flux2, head_dim = sum(axes_dim)
#: = 128, patch 1 on 128-channel latents of 16x downscale), 2 heads, 1 double + 2 single blocks.
FLUX2_KW = dict(
    in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=64, hidden_size=256, mlp_ratio=3.0,
    num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False,
    guidance_embed=True, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
    default_ref_method="index", ref_index_scale=10.0,
)
SD3_KW = dict(
    depth=2, patch_size=2, in_channels=16, out_channels=16, adm_in_channels=64,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
    num_patches=4096, pos_embed_max_size=64, qk_norm="rms",
)
CONTEXT_DIM = 64
POOLED_DIM = {"flux": 32, "flux2": 32, "sd3": 64, "sd35m": 64}


def _real_key(k: str) -> str:
    # BFL checkpoints name Flux's QK-RMSNorm parameter ".scale"; newer ComfyUI calls it ".weight" in the module.
    return k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k


def _init(module, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k in sorted(params, key=_real_key):
            params[k].copy_(torch.randn(params[k].shape, generator=g) * 0.02)
    return module


def build_flux():
    import dataclasses

    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    fields = {f.name for f in dataclasses.fields(FluxParams)}
    kw = {k: v for k, v in FLUX_KW.items() if k in fields}
    return _init(Flux(operations=comfy.ops.disable_weight_init, **kw), 0)


def has_flux2() -> bool:
    """The host can build and detect Flux 2 (FluxParams with global modulation, supported_models.Flux2)."""
    import dataclasses

    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    fields = {f.name for f in dataclasses.fields(FluxParams)}
    return hasattr(comfy.supported_models, "Flux2") and set(FLUX2_KW) <= fields


def build_flux2():
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return _init(Flux(operations=comfy.ops.disable_weight_init, **FLUX2_KW), 5)


def build_sd3(attn2: bool):
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed

    kw = dict(SD3_KW, x_block_self_attn_layers=[0] if attn2 else [])
    m = _init(OpenAISignatureMMDITWrapper(operations=comfy.ops.disable_weight_init, **kw), 2 if attn2 else 1)
    pe = get_2d_sincos_pos_embed(m.pos_embed.shape[-1], SD3_KW["pos_embed_max_size"])
    with torch.no_grad():  # pos_embed is allocated with torch.empty; real checkpoints carry this table
        m.pos_embed.copy_(torch.from_numpy(pe).float().reshape(m.pos_embed.shape))
    return m


def save_model(module, path: Path) -> Path:
    import safetensors.torch

    sd = {_real_key(k): v.contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(sd, str(path))
    return path


def write_tiny_models(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "flux": save_model(build_flux(), folder / "tiny_flux.safetensors"),
        "sd3": save_model(build_sd3(False), folder / "tiny_sd3.safetensors"),
        "sd35m": save_model(build_sd3(True), folder / "tiny_sd35m.safetensors"),
    }


def load_model(family: str, path: Path):
    """The host's own loader; tiny Flux on hosts that hard-code Flux-dev dims goes the manual route."""
    import comfy.sd

    try:
        return comfy.sd.load_diffusion_model(str(path))
    except RuntimeError:
        if family != "flux":
            raise
    return load_flux_manual(path)


def load_flux_manual(path: Path):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    import torch

    sd = comfy.utils.load_torch_file(str(path))
    unet_config = {"image_model": "flux", **{k: v for k, v in FLUX_KW.items() if k != "txt_ids_dims"}}
    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


# ---------------------------------------------------------------------------------------- sampling


def conditioning(family: str, tokens: int = 32, seed: int = 0, **extra):
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, tokens, CONTEXT_DIM, generator=g)
    pooled = torch.randn(1, POOLED_DIM[family], generator=g)
    return [[ctx, {"pooled_output": pooled, "guidance": 3.5, **extra}]]


def empty_latent(width: int, height: int, batch: int = 1, family: str = "sd3") -> dict:
    """The host's empty-latent node of the family (Flux 2: 128 channels at 1/16, else 16 channels at 1/8)."""
    if family == "flux2":
        from comfy_extras.nodes_flux import EmptyFlux2LatentImage as Empty
    else:
        from comfy_extras.nodes_sd3 import EmptySD3LatentImage as Empty

    out = Empty.execute(width, height, batch)
    return out.args[0] if hasattr(out, "args") else out[0]


def ksample(model, family: str, *, sampler: str = "euler", cfg: float = 1.0, steps: int = 4, width: int = 256,
            height: int = 256, batch: int = 1, pos_tokens: int = 32, neg_tokens: int = 32, seed: int = 0,
            pos_extra: dict | None = None, neg_extra: dict | None = None):
    """The host's own KSampler (nodes.common_ksampler), scheduler 'simple'; returns the latent tensor."""
    import nodes

    pos = conditioning(family, pos_tokens, 1, **(pos_extra or {}))
    neg = conditioning(family, neg_tokens, 2, **(neg_extra or {}))
    latent = empty_latent(width, height, batch, family)
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, "simple", pos, neg, latent)[0]["samples"]


def schedule_sigmas(model, steps: int = 4) -> list[float]:
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    return [float(s) for s in comfy.samplers.calculate_sigmas(ms, "simple", steps)]


# ------------------------------------------------------------------------------------------- patched models


def last_summary(model):
    """The run summary DFAApply recorded on `model` (a patched ModelPatcher) for its last sampling run."""
    from dfav2.nodes import adapter

    s = model.model_options["transformer_options"][adapter.TO_PATCH].last_summary
    assert s is not None, "no sampling run was recorded"
    return s


def need_flux() -> None:
    """Skip the test where this host has no Flux block identity."""
    import pytest

    from dfav2.nodes import host

    if host.host_support().flux_error() is not None:
        pytest.skip(f"ComfyUI {host_version()} has no Flux block identity (needs >= {host.MIN_HOST_FLUX})")


def plan_pair(model):
    """(all-full plan, arrow + cache plan) for `model` at the default schedule."""
    from dfav2.nodes import layouts

    sig, sigmas = layouts.model_signature(model), schedule_sigmas(model)
    return all_full_plan(sig, sigmas), arrow_cache_plan(sig, sigmas)


# ------------------------------------------------------------------------------------------- plans


def plans_module():
    import dfav2.calibration.plan as plan_mod
    import dfav2.kernels.methods as methods

    return plan_mod, methods


def all_full_plan(signature, sigmas):
    plan_mod, methods = plans_module()
    return plan_mod.Plan.uniform(signature, [s for s in sigmas if s > 0], methods.FULL, description="all full")


def arrow_cache_plan(signature, sigmas, factor: int = 8):
    """Position 0 full; later positions: even layers (arrow/f, cache, ...), odd layers (cache, full, ...)."""
    plan_mod, methods = plans_module()
    positions = []
    for p, s in enumerate(x for x in sigmas if x > 0):
        layers = []
        for li, spec in enumerate(signature.layers):
            if p == 0:
                ms = [methods.FULL] * spec.heads
            elif li % 2 == 0:
                ms = [methods.arrow(factor) if h % 2 == 0 else methods.CACHE for h in range(spec.heads)]
            else:
                ms = [methods.CACHE if h % 2 == 0 else methods.FULL for h in range(spec.heads)]
            layers.append(methods.LayerDecision(tuple(ms)))
        positions.append(plan_mod.PlanPosition(float(s), tuple(layers)))
    return plan_mod.Plan(signature, tuple(positions), None, f"arrow/{factor} + cache test plan")


def expected_cache_counts(plan, forwards, skipped=None) -> tuple[int, int]:
    """(hits, misses) the plan implies for a run's forwards: a cached head hits iff the previous forward with the
    same cache key kept it (the engine keeps `plan.keep_heads` of each routed forward). `skipped(forward)`: the
    layer indices that forward never ran (blocks skipped, e.g. by Skip Layer Guidance)."""
    hits = misses = 0
    stored: dict = {}
    for f in forwards:
        if f.position is None:
            continue
        for li in range(len(plan.model.layers)):
            if skipped is not None and li in skipped(f):
                continue
            need = plan.decision(f.position, li).cache_heads
            have = stored.get((f.cache_key, li), ())
            if need:
                if set(need) <= set(have):
                    hits += len(need)
                else:
                    misses += len(need)
            stored[(f.cache_key, li)] = plan.keep_heads(f.position, li)
    return hits, misses
