"""Research prototype (issue 10 item 1): dense attention in Gluon with a TMA producer warp and two consumer
warpgroups that synchronise only through mbarriers, to measure whether that structure closes the gap to cuDNN that
the Triton kernel's single-stream loop leaves (kernels/NOTES.md, 2026-11-29). Not a production path: dense heads
only, contiguous [B, H, L, D] bf16, L a multiple of 128, head_dim 128.

Why this structure: in the Triton kernel both warpgroups of a CTA run one instruction stream and meet at the
pipeline's CTA-wide barriers every key tile, so one group's softmax overlaps the other's matmuls only by chance.
Here each consumer owns 64 query rows and runs its own loop; the producer keeps a ring of K/V tiles full; the two
consumers drift apart up to the ring depth, so the tensor cores see one group's Q·Kᵀ / P·V while the other runs
exp2 (the ping-pong FlashAttention-3 enforces with named barriers, left to the warp scheduler here).

Usage: python bench/gluon_dense_proto.py --compile          (CPU: compile for sm90, print registers / spills)
       python bench/gluon_dense_proto.py OUT.json           (H200: check vs float64, time vs cuDNN and ours)
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

BM = 64        # query rows per consumer warpgroup (the CTA owns 2 * BM)
BN = 128       # keys per tile
D = 128
_LOG2E = 1.4426950408889634


@gluon.jit
def _producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row, n_kv,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [q_row, 0], q_bar, q_smem)
    for j in range(n_kv):
        s = j % STAGES
        # a slot is free once both consumers released it; the first pass through the ring does not wait
        mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(s), desc_k.block_type.nbytes + desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [kv_row + j * BLOCK_N, 0], kv_ready.index(s), k_smem.index(s))
        tma.async_copy_global_to_shared(desc_v, [kv_row + j * BLOCK_N, 0], kv_ready.index(s), v_smem.index(s))


@gluon.jit
def _consumer(desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, n_kv, qk_scale,
              WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_smem.slice(WG * BLOCK_M, BLOCK_M, dim=0)
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, s_row)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, s_row)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    for j in range(n_kv):
        s = j % STAGES
        mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
        sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(0, deps=[sc])
        m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
        p = gl.exp2(sc * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * gl.convert_layout(alpha, o_row)[:, None]
        pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(pb, v_smem.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(kv_empty.index(s), count=1)
        m_i = m_new
    o = acc / gl.convert_layout(l_i, o_row)[:, None]
    q.store(o.to(gl.bfloat16))   # this group's Q rows are dead: stage the output there
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_o, [q_row + WG * BLOCK_M, 0], q)
    tma.store_wait(0)


@gluon.jit
def _consumer_pp(desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, q_row, n_kv, qk_scale,
                 WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                 STAGES: gl.constexpr):
    """FlashAttention-3's schedule: Q·Kᵀ(j) and P·V(j−1) issued together, the softmax of tile j runs while
    P·V(j−1) is in flight, and the two consumers take turns issuing (mbarrier ping-pong), so the tensor cores run
    one group's products while the other group's exp2s run."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_smem.slice(WG * BLOCK_M, BLOCK_M, dim=0)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    # tile 0: scores and softmax, no P·V yet
    mbarrier.wait(kv_ready.index(0), 0)
    mbarrier.wait(turn.index(WG), 0)
    sc = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    sc = warpgroup_mma_wait(0, deps=[sc])
    m_i = gl.max(sc, axis=1) * qk_scale
    p = gl.exp2(sc * qk_scale - m_i[:, None])
    l_i = gl.sum(p, axis=1)
    pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    for j in range(1, n_kv):
        s = j % STAGES
        sp = (j - 1) % STAGES
        mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
        mbarrier.wait(turn.index(WG), j & 1)
        sc = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(pb, v_smem.index(sp), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        sc = warpgroup_mma_wait(1, deps=[sc])
        m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
        p = gl.exp2(sc * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(kv_empty.index(sp), count=1)
        acc = acc * gl.convert_layout(alpha, o_row)[:, None]
        pb = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        m_i = m_new
    sl = (n_kv - 1) % STAGES
    mbarrier.wait(turn.index(WG), n_kv & 1)
    acc = warpgroup_mma(pb, v_smem.index(sl), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(kv_empty.index(sl), count=1)
    o = acc / gl.convert_layout(l_i, o_row)[:, None]
    q.store(o.to(gl.bfloat16))
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_o, [q_row + WG * BLOCK_M, 0], q)
    tma.store_wait(0)


@gluon.jit
def _attn_fwd(desc_q, desc_k, desc_v, desc_o, L, qk_scale,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              PINGPONG: gl.constexpr):
    bh = gl.program_id(1)
    q_row = bh * L + gl.program_id(0) * (2 * BLOCK_M)
    kv_row = bh * L
    n_kv = L // BLOCK_N
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [2 * BLOCK_M, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    if PINGPONG:
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)   # consumer 0 issues first
        gl.warp_specialize([
            (_consumer_pp, (desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, q_row, n_kv, qk_scale,
                            0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
            (_consumer_pp, (desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, q_row, n_kv, qk_scale,
                            1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
            (_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row,
                         n_kv, BLOCK_N, STAGES)),
        ], [4, 1], [232, 40])
    else:
        _ws_plain(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row,
                  n_kv, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)


@gluon.jit
def _ws_plain(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row,
              n_kv, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    gl.warp_specialize([
        (_consumer, (desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, n_kv, qk_scale,
                     0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
        (_consumer, (desc_o, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, n_kv, qk_scale,
                     1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
        (_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, q_row, kv_row,
                     n_kv, BLOCK_N, STAGES)),
    ], [4, 1], [232, 40])


def _descs(q, k, v, o):
    B, H, L, Dh = q.shape
    flat = [x.view(B * H * L, Dh) for x in (q, k, v, o)]
    lay = lambda rows: gl.NVMMASharedLayout.get_default_for([rows, Dh], gl.bfloat16)  # noqa: E731
    return (TensorDescriptor.from_tensor(flat[0], [2 * BM, Dh], lay(2 * BM)),
            TensorDescriptor.from_tensor(flat[1], [BN, Dh], lay(BN)),
            TensorDescriptor.from_tensor(flat[2], [BN, Dh], lay(BN)),
            TensorDescriptor.from_tensor(flat[3], [BM, Dh], lay(BM)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stages: int = 3, pingpong: bool = False) -> torch.Tensor:
    B, H, L, Dh = q.shape
    assert Dh == D and L % (2 * BM) == 0 and L % BN == 0 and q.is_contiguous()
    o = torch.empty_like(q)
    grid = (L // (2 * BM), B * H)
    _attn_fwd[grid](*_descs(q, k, v, o), L, _LOG2E / math.sqrt(Dh), BM, BN, D, stages, pingpong, num_warps=4)
    return o


def compile_sm90(stages: int = 3, L: int = 4608, B: int = 1, H: int = 24, pingpong: bool = False):
    """Compile for sm90 on this CPU (no GPU): registers, spills, shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton.experimental.gluon._runtime import GluonASTSource

    x = torch.empty(B, H, L, D, dtype=torch.bfloat16)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = _attn_fwd
    args = (*_descs(x, x, x, x), L, _LOG2E / math.sqrt(D), BM, BN, D, stages, pingpong)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, num_warps=4)
    options, signature, constexprs, attrs = fn._pack_args(backend, {"num_warps": 4}, bound, specialization, options)
    k = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    from triton import knobs
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(k.asm["ptx"])
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    return dict(shared=k.metadata.shared, ptxas=[ln for ln in log.splitlines() if "Used" in ln or "spill" in ln
                                                 or "C75" in ln])


def main() -> int:
    if "--compile" in sys.argv:
        for st, pp in ((2, False), (3, False), (3, True)):
            print(f"stages {st} pingpong {pp}:", compile_sm90(st, pingpong=pp), flush=True)
        return 0
    out = Path([a for a in sys.argv[1:] if not a.startswith("--")][0])
    dev = torch.device("cuda")
    from _bootstrap import load_kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    at = load_kernel()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"), rows=[])
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, L in (("flux1k_T512", 4608), ("flux2k_T512", 16896), ("flux1k_T256", 4352), ("flux2k_T256", 16640)):
        H = 24
        q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        # correctness first: two heads against a float64 softmax
        o = attention(q, k, v)
        ref = torch.softmax((q[0, :2].double() @ k[0, :2].double().transpose(-1, -2)) / math.sqrt(D), -1) @ v[0, :2].double()
        err = ((o[0, :2].double() - ref).norm() / ref.norm()).item()
        hw = torch.full((H,), -1, dtype=torch.int32, device=dev)
        out_t = torch.empty_like(q)

        def t(fn, rep=200):
            for _ in range(10):
                fn()
            ts = []
            for _ in range(rep if L < 8192 else 40):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            ts.sort()
            return ts[len(ts) // 2]

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = t(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        t_ours = t(lambda: at.arrow_attention_triton(q, k, v, hw, 0, out=out_t))
        row = dict(shape=name, L=L, rel_err_vs_f64=err, cudnn_ms=t_cudnn, triton_ms=t_ours)
        for st, pp in ((3, False), (3, True)):
            key = f"gluon_s{st}{'_pingpong' if pp else ''}"
            try:
                o = attention(q, k, v, st, pp)
                row[key + "_err"] = ((o[0, :2].double() - ref).norm() / ref.norm()).item()
                row[key + "_ms"] = t(lambda: attention(q, k, v, st, pp))
            except Exception as e:  # noqa: BLE001 - report
                row[key + "_ms"] = None
                print(f"  {key} failed: {type(e).__name__}: {str(e)[:300]}")
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
