"""``python <pack> train-ref --model flux|sd35m``: train a reference model, reproducibly, with the host's own classes.

Everything that decides the result is here or in the repository: the seed, the configuration (`CONFIGS`), the
data (`scenes`, fresh procedural scenes every `refresh` steps), the codec and the text encoder. The model is the
host's own model object (`model_config.get_model`, found by ComfyUI's detection from the state dict), trained
through its own `apply_model` and noise parametrisation (`model_sampling`: flow matching, x_t = (1 - s) x0 + s e,
the sigma schedule and shift of the family), so what ComfyUI's KSampler does at inference is what the model learnt.

Loss: v-prediction MSE, i.e. ||(denoised - x0) / sigma||^2, with logit-normal timesteps mapped through the host's
`sigma()`; AdamW, warm-up + cosine, bf16 autocast, gradient clipping, EMA of the weights (the EMA is what ships).
Two resolutions (the study size and twice it), so that the transfer study is run on a model that has seen both.

Output: `<out>/<file>` (fp16 safetensors, real key names) and `<out>/train_<model>.json` (config, loss curve, time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import codec, models, scenes, text

#: Per model: steps, batch at the base resolution, learning rate. One H200 trains both at once in about 8 minutes.
CONFIGS = {
    "flux": dict(steps=3000, batch=48, lr=4e-4),
    "sd35m": dict(steps=3600, batch=64, lr=5e-4),
}
BASE_RES = 512  # 32 x 32 = 1024 image tokens
HIRES = 1024  # every HIRES_EVERY-th step, batch // 4 at 1024 px (4096 tokens: same token count per step)
HIRES_EVERY = 4
CAPTION_DROPOUT = 0.1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python <pack> train-ref", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(models.SPECS), required=True)
    p.add_argument("--steps", type=int, help="override CONFIGS[model]['steps'] (smoke runs)")
    p.add_argument("--batch", type=int, help="override the batch size (smoke runs)")
    p.add_argument("--res", type=int, default=BASE_RES)
    p.add_argument("--hires", type=int, default=HIRES, help="second training resolution (0: none)")
    p.add_argument("--pool", type=int, default=8192, help="scenes rendered per refresh")
    p.add_argument("--refresh", type=int, default=500, help="steps between fresh scene pools")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(models.WEIGHTS_DIR))
    p.add_argument("--cpu", action="store_true")
    return p


class _Pool:
    """Rendered, encoded scenes of one resolution on the device, refreshed from a new seed."""

    def __init__(self, n: int, res: int, device: torch.device, seed: int, epoch: int) -> None:
        self.epoch = epoch
        self.scenes = scenes.sample_scenes(n, seed)
        lat = []
        for i in range(0, n, 256):
            lat.append(codec.encode(scenes.render(self.scenes[i:i + 256], res, device)).to(torch.bfloat16))
        self.z = torch.cat(lat)

    def batch(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self.scenes), (b,), generator=g)
        caps = [self.scenes[i].caption if torch.rand((), generator=g) >= CAPTION_DROPOUT else "" for i in idx.tolist()]
        return self.z[idx.to(self.z.device)].float(), caps


def _checkpoint_blocks(net: torch.nn.Module) -> None:
    """Run each Flux block under non-reentrant activation checkpointing on a copy of its input, as ComfyUI's own
    trainer does: the host's blocks add residuals in place (``img += ...``), which plain autograd rejects."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def fresh(v: object) -> object:
        return v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    for block in [*getattr(net, "double_blocks", []), *getattr(net, "single_blocks", [])]:
        def fwd(*args: object, _orig=block.forward, **kw: object) -> object:
            def run(*a: object, **k: object) -> object:
                return _orig(*map(fresh, a), **{n: fresh(v) for n, v in k.items()})
            # the recompute may pick another SDPA backend than the forward (same maths): skip the metadata check
            return checkpoint(run, *args, use_reentrant=False, determinism_check="none", **kw)
        block.forward = functools.wraps(block.forward)(fwd)


def train(name: str, *, steps: int, batch: int, lr: float, res: int, hires: int, pool: int, refresh: int,
          seed: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    import comfy.model_management
    import comfy.ops

    # The host's SDPA wrapper lets cuDNN attention serve some calls; its backward fails on the checkpoint
    # recompute in this process (saved statistics of another layout). Training only: flash / efficient serve all.
    prio = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    if prio is not None:
        from torch.nn.attention import SDPBackend

        prio[:] = [b for b in prio if b != SDPBackend.CUDNN_ATTENTION]
    torch.manual_seed(seed)
    module = models.build_module(name)
    sd = models.state_dict_for_saving(module, torch.float32)
    model_config = models.detect(sd)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    model.to(device).train()
    net = model.diffusion_model
    net.requires_grad_(True)  # the host freezes inference models
    _checkpoint_blocks(net)
    ms = model.model_sampling
    mult = float(getattr(ms, "multiplier", 1.0))
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    g = torch.Generator().manual_seed(seed)
    comfy.model_management.in_training = True  # the host's differentiable RoPE path
    spec = models.SPECS[name]
    pools: dict[int, _Pool] = {}
    losses: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    amp = device.type == "cuda"
    log_every = max(1, min(250, steps // 10))
    for step in range(steps):
        hi = hires > 0 and step % HIRES_EVERY == HIRES_EVERY - 1
        r, b = (hires, max(1, batch // 4)) if hi else (res, batch)
        epoch = step // refresh
        if r not in pools or pools[r].epoch != epoch:
            pools[r] = _Pool(max(pool // 4, 64) if hi else pool, r, device, seed * 100003 + epoch * 7 + r, epoch)
        z, caps = pools[r].batch(b, g)
        ctx, pooled = text.encode_text(caps)
        u = torch.sigmoid(torch.randn(b, generator=g))
        sigma = ms.sigma(u * mult).to(device).clamp_min(1e-3)
        noise = torch.randn(z.shape, generator=g).to(device)
        x = ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, z)
        kw = {"y": pooled.to(device)}
        if spec.guidance is not None:
            kw["guidance"] = torch.full((b,), spec.guidance, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            den = model.apply_model(x, sigma, c_crossattn=ctx.to(device), **kw)
        loss = (((den.float() - z) / sigma.view(-1, 1, 1, 1)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema, net.parameters()):
                e.lerp_(p.detach(), 1 - d)
        if (step + 1) % log_every == 0 or step == steps - 1:
            losses.append((step + 1, round(loss.item(), 5)))
            print(f"{name} step {step + 1}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    comfy.model_management.in_training = False
    with torch.no_grad():
        for e, p in zip(ema, net.parameters()):
            p.copy_(e)
    net.eval()
    info = dict(model=name, steps=steps, batch=batch, lr=lr, res=res, hires=hires, hires_every=HIRES_EVERY,
                pool=pool, refresh=refresh, seed=seed, caption_dropout=CAPTION_DROPOUT,
                train_s=round(time.perf_counter() - t0, 1), losses=losses,
                params=sum(p.numel() for p in net.parameters()),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    return net, info


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cfg = dict(CONFIGS[a.model])
    if a.steps:
        cfg["steps"] = a.steps
    if a.batch:
        cfg["batch"] = a.batch
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    net, info = train(a.model, res=a.res, hires=a.hires, pool=a.pool, refresh=a.refresh, seed=a.seed,
                      device=device, **cfg)
    out = Path(a.out)
    path = out / models.SPECS[a.model].file
    models.save_weights(net, path, fp8=a.model in models.FP8_MODELS)
    info["file"] = path.name
    info["bytes"] = path.stat().st_size
    (out / f"train_{a.model}.json").write_text(json.dumps(info, indent=1))
    print(f"saved {path} ({info['bytes'] / 2**20:.1f} MiB, {info['params'] / 1e6:.2f} M parameters) "
          f"in {info['train_s']:.0f} s")
    return 0
