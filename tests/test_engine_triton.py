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


def check(b, h, t, n, d, dtype, device, seed, tol):
    rng = random.Random(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, t + n, d, generator=g).to(device, dtype) for _ in range(3))
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
