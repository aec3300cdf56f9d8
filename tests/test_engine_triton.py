"""The engine's Triton fast path against the engine's reference path (masked SDPA), every method mix.

CPU: Triton's interpreter at small odd sizes (fp32, <= 1e-5). GPU (`-m gpu`): real sizes in bf16."""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

import dfav2.kernels.arrow_triton as arrow_triton  # noqa: E402
from dfav2.kernels import CACHE, FULL, CachedHeads, LayerDecision, arrow, headwise_attention  # noqa: E402

importlib.reload(arrow_triton)  # re-decorate the kernels under the interpreter setting chosen above
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CHOICES = [FULL, CACHE, arrow(8), arrow(16), arrow(32), arrow(2)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b, h, seq, d, dtype, device, g, sd3=False):
    """q, k, v [B, H, L, D] as the engine receives them: Flux's [B, H, L, D] tensors, or (sd3) ComfyUI SD3's
    [B, L, H*D] inputs viewed as [B, L, H, D] and transposed (strides (L*H*D, D, H*D, 1))."""
    if sd3:
        return [torch.randn(b, seq, h * d, generator=g).to(device, dtype).view(b, seq, h, d).transpose(1, 2)
                for _ in range(3)]
    return [torch.randn(b, h, seq, d, generator=g).to(device, dtype) for _ in range(3)]


def check(b, h, t, n, d, dtype, device, seed, tol, sd3=False, decision=None):
    rng = random.Random(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = qkv(b, h, t + n, d, dtype, device, g, sd3)
    if decision is None:
        decision = LayerDecision(tuple(rng.choice(CHOICES) for _ in range(h)))
    stored = torch.randn(b, len(decision.cache_heads), t + n, d, generator=g).to(device, dtype)
    cached = CachedHeads(decision.cache_heads, stored)
    fast, hit = headwise_attention(q, k, v, t, decision, cached=cached, backend="triton")
    ref, _ = headwise_attention(q.float(), k.float(), v.float(), t, decision,
                                cached=CachedHeads(cached.heads, stored.float()), backend="sdpa")
    assert hit and torch.isfinite(fast).all()
    for i, hd in enumerate(decision.cache_heads):  # pasted, not recomputed
        assert torch.equal(fast[:, hd], stored[:, i])
    assert rel_err(fast, ref) <= tol, decision


@pytest.mark.skipif(not INTERP, reason="interpreter tier runs only without CUDA")
@pytest.mark.parametrize("shape", [(1, 5, 0, 67, 16), (2, 4, 13, 70, 32), (1, 3, 33, 98, 64)])
def test_triton_path_matches_reference_engine_on_cpu(shape):
    check(*shape, torch.float32, "cpu", seed=sum(shape), tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(1, 24, 256, 4096, 128), (2, 24, 154, 4096, 64), (1, 24, 333, 1000, 128)])
def test_triton_path_matches_reference_engine_on_gpu(shape):
    check(*shape, torch.bfloat16, "cuda", seed=sum(shape), tol=1e-2)


# issue 10 item 3: every text length of T = 0, 1, 2, 77, 154, 333 with N = 1, 129, 1000 image tokens, both layouts
# as the engine receives them (Flux [B, H, L, D]; SD3 [B, L, H*D] viewed as [B, H, L, D]), batch 1 and 2
ODD = [(t, n) for t in (0, 1, 2, 77, 154, 333) for n in (1, 129, 1000)]


@pytest.mark.skipif(not INTERP, reason="interpreter tier runs only without CUDA")
@pytest.mark.parametrize("t,n", ODD)
def test_odd_lengths_match_reference_engine_on_cpu(t, n):
    d = 128 if (t, n) == (77, 129) else 64
    # one full, one cached and one arrow head per case, in varying order
    mixes = [(FULL, CACHE, arrow(8)), (arrow(2), FULL, CACHE), (CACHE, arrow(8), FULL), (arrow(16), CACHE, FULL)]
    decision = LayerDecision(mixes[(t + n) % 4])
    check(2 if t + n < 256 else 1, 3, t, n, d, torch.float32, "cpu", seed=t * 1009 + n, tol=1e-5,
          sd3=(t + n) % 2 == 0, decision=decision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t,n", ODD)
def test_odd_lengths_match_reference_engine_on_gpu(t, n, d):
    check(2 if n == 129 else 1, 24 if d == 128 else 38, t, n, d, torch.bfloat16, "cuda", seed=t * 1009 + n + d,
          tol=1e-2, sd3=(t + n) % 2 == 0)


@pytest.mark.gpu
@pytest.mark.skipif(INTERP or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an FP8 GPU (sm89+)")
@pytest.mark.parametrize("shape", [(1, 24, 512, 4096, 128), (2, 6, 77, 1000, 64)])
def test_fp8_heads_through_the_engine_on_gpu(shape):
    """A decision with FP8 heads: the engine hands the quant table to the kernel (its FP8 heads match the scheme's
    reference), bf16 heads are exactly those of the same decision without FP8, cached heads are pasted."""
    from dfav2.kernels import FULL_FP8
    from dfav2.kernels.quant import fp8_attention_reference

    b, h, t, n, d = shape
    g = torch.Generator(device="cpu").manual_seed(h + n)
    q, k, v = qkv(b, h, t + n, d, torch.bfloat16, "cuda", g)
    pattern = [FULL_FP8, arrow(16, fp8=True), FULL, arrow(8), CACHE, arrow(32, fp8=True)]
    decision = LayerDecision(tuple(pattern[i % len(pattern)] for i in range(h)))
    stored = torch.randn(b, len(decision.cache_heads), t + n, d, generator=g).to("cuda", torch.bfloat16)
    out, hit = headwise_attention(q, k, v, t, decision, cached=CachedHeads(decision.cache_heads, stored),
                                  backend="triton")
    plain, _ = headwise_attention(q, k, v, t, decision.unquantized, cached=CachedHeads(decision.cache_heads, stored),
                                  backend="triton")
    assert hit and torch.isfinite(out).all()
    for hd in range(h):
        m = decision.methods[hd]
        if hd in decision.cache_heads:
            assert torch.equal(out[:, hd], stored[:, decision.cache_heads.index(hd)])
        elif m.fp8:
            block_m = arrow_triton._default_config(q.device, d, q.dtype, t + n)["BLOCK_M"]
            ref = fp8_attention_reference(q[:, hd:hd + 1], k[:, hd:hd + 1], v[:, hd:hd + 1], m.window(n), t,
                                          q_block=block_m)
            assert rel_err(out[:, hd:hd + 1], ref) < 0.03, (hd, m)
            assert rel_err(out[:, hd], plain[:, hd]) > 1e-3  # really quantized, not the bf16 head
        else:
            assert torch.equal(out[:, hd], plain[:, hd]), (hd, m)
