"""Where the head cache waits between steps (kernels/offload.py, HeadCache, the engine's `cache_offload`), and the
engine's `full_by_dense`. Offloading only acts on CUDA tensors: on CPU the store must pass tensors through
unchanged; on a GPU (`-m gpu`) an offloaded run must give bit-identical outputs with almost nothing left on the device."""

from __future__ import annotations

import random

import pytest
import torch

from dfav2.calibration import LayerSpec, ModelSignature, Plan, PlanPosition
from dfav2.kernels import CACHE, FULL, CallContext, HeadwiseEngine, LayerDecision, arrow
from dfav2.kernels.engine import headwise_attention
from dfav2.kernels.offload import OffloadStore

CHOICES = [FULL, CACHE, arrow(8), arrow(16)]


def _plan(layers: int, heads: int, steps: int, seed: int, last_all_cache: bool = False) -> Plan:
    rng = random.Random(seed)
    sig = ModelSignature("flux", tuple(LayerSpec(f"double.{i}", heads, 16) for i in range(layers)))
    sigmas = [1.0 - i / steps for i in range(steps)]
    positions = [PlanPosition(sigmas[0], tuple(LayerDecision.uniform(FULL, heads) for _ in range(layers)))]
    for s in sigmas[1:]:
        positions.append(PlanPosition(s, tuple(LayerDecision(tuple(rng.choice(CHOICES) for _ in range(heads)))
                                               for _ in range(layers))))
    if last_all_cache:  # the cache then holds every head of every layer at the end
        positions[-1] = PlanPosition(sigmas[-1], tuple(LayerDecision.uniform(CACHE, heads) for _ in range(layers)))
    return Plan(sig, tuple(positions), None, "random")


def _sample(engine: HeadwiseEngine, plan: Plan, qkv: list, txt: int) -> list[torch.Tensor]:
    outs = []
    for pos in range(len(plan.positions)):
        for layer in range(len(plan.model.layers)):
            q, k, v = qkv[pos][layer]
            outs.append(engine.attend(CallContext(layer, pos, txt, "cond"), q, k, v))
    return outs


def _inputs(plan: Plan, b: int, seq: int, device: str, dtype: torch.dtype, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    heads = plan.model.layers[0].heads
    return [[tuple(torch.randn(b, heads, seq, 16, generator=g).to(device, dtype) for _ in range(3))
             for _ in plan.model.layers] for _ in plan.positions]


def test_store_passes_cpu_tensors_through_and_forgets():
    store = OffloadStore(offload=True)
    t = torch.randn(2, 3, 5)
    store.put("a", t)
    assert "a" in store and len(store) == 1 and store.get("a") is t
    store.put("b", t)
    store.discard("b")
    assert "b" not in store and store.get("b") is None


@pytest.mark.parametrize("seed", [0, 1])
def test_offload_mode_changes_nothing_on_cpu(seed):
    plan = _plan(layers=3, heads=4, steps=5, seed=seed)
    qkv = _inputs(plan, 1, 7 + 24, "cpu", torch.float32, seed)
    a = _sample(HeadwiseEngine(plan, backend="sdpa", cache_offload="gpu"), plan, qkv, 7)
    b = _sample(HeadwiseEngine(plan, backend="sdpa", cache_offload="cpu"), plan, qkv, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_full_by_dense_sends_full_heads_to_the_dense_function():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 5 + 19, 16, generator=g) for _ in range(3))
    decision = LayerDecision((FULL, arrow(8), FULL, arrow(16)))
    seen = []

    def dense(q_, k_, v_):
        seen.append(q_.shape[1])
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_)

    out, _ = headwise_attention(q, k, v, 5, decision, dense=dense, backend="sdpa", full_by_dense=True)
    ref, _ = headwise_attention(q, k, v, 5, decision, backend="sdpa")
    assert seen == [2]
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed,backend", [(0, "triton"), (1, "flex"), (2, "sdpa")])
def test_offloaded_cache_is_bit_identical_and_leaves_the_gpu(seed, backend):
    plan = _plan(layers=5, heads=6, steps=6, seed=seed, last_all_cache=True)
    qkv = _inputs(plan, 2, 77 + 1000, "cuda", torch.bfloat16, seed)
    on_gpu = HeadwiseEngine(plan, backend=backend, cache_offload="gpu")
    offloaded = HeadwiseEngine(plan, backend=backend, cache_offload="cpu")
    a = _sample(on_gpu, plan, qkv, 77)
    b = _sample(offloaded, plan, qkv, 77)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert on_gpu.stats.cache_hits == offloaded.stats.cache_hits > 0
    entry = 2 * 6 * (77 + 1000) * 16 * 2  # one layer's heads, bf16
    assert on_gpu.cache.nbytes == 5 * entry and len(offloaded.cache) == 5
    assert offloaded.cache.nbytes <= entry  # at most the one prefetched layer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_offload_decides_from_the_projected_cache():
    plan = _plan(layers=2, heads=4, steps=3, seed=5)
    engine = HeadwiseEngine(plan, backend="sdpa", cache_offload="auto")
    _sample(engine, plan, _inputs(plan, 1, 40, "cuda", torch.bfloat16, 5), 8)
    assert engine.projected_cache_bytes is not None and not engine.cache.offload  # a few KB: stays on the GPU
