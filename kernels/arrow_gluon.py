"""Head-wise arrow attention on Hopper (sm90, head_dim 128, fp16/bf16), written in Gluon: kernel v3.

Same contract and work items as `arrow_triton._arrow_fwd` (one program per (head, batch, 128-row query tile), long
items first; per item the interior key tiles run unmasked and the edge tiles token-exactly masked; skipped heads
write nothing, or zeros with `ZERO_SKIP`), but each program is warp-specialised the way FlashAttention-3 is:
- a 1-warp producer streams the item's Q tile and its key tiles (K and V) into a 3-deep shared-memory ring by TMA,
  paced by `ready` / `empty` mbarriers;
- two 4-warp consumers own 64 query rows each and run Q·Kᵀ(j) together with P·V(j−1), the softmax of tile j while
  P·V(j−1) is still on the tensor cores, and take turns *issuing* (two mbarriers: ping-pong), so one consumer's
  products run while the other's exp2s run.
FP8 heads (`QUANT` launches, the head table HQ): e4m3 Q·Kᵀ (wgmma k32) on the pre-pass's e4m3 Q and K, loaded into the
first half of the same buffers, each key's scale brought by TMA into a small ring beside its tile, the query tile's
scale folded into the exponent's multiply; P·V in bf16 as for other heads (`kernels/quant.py` is the scheme).
Why Gluon and not Triton: the ping-pong is what closes the ≈ 10 % gap to cuDNN at Flux 2K, and Triton's pipeliner
cannot express it (kernels/NOTES.md, 2026-11-29: the Triton overlap variants measured slower, the Gluon prototype
`bench/gluon_dense_proto.py` 1.03× cuDNN). Loaded standalone (like arrow_triton.py): no package imports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["BLOCK_M", "BLOCK_N", "HEAD_DIM", "STAGES", "build", "launch", "supported"]

BLOCK_M = 128   # query rows per program (64 per consumer warpgroup)
BLOCK_N = 128   # keys per tile
HEAD_DIM = 128
STAGES = 3      # K/V ring depth (3 × 64 KB + the 32 KB Q tile: 224 KB of Hopper's 227 KB)
_LOG2E = 1.4426950408889634


@gluon.jit
def _tile_start(t, nu, nu1, u2, na1, na2, a1, a2, a3, BN: gl.constexpr):
    """First key of the item's t-th tile: tiles [0, nu) are the unmasked segments (nu1 tiles from 0, then from u2),
    tiles [nu, nu + na) the masked ones (from a1, a2, a3); the same segments as `arrow_triton._work`."""
    su = t * BN + (t >= nu1).to(gl.int32) * (u2 - nu1 * BN)
    j = t - nu
    sa = (j * BN + a1 + (j >= na1).to(gl.int32) * (a2 - na1 * BN - a1)
          + (j >= na1 + na2).to(gl.int32) * (a3 - na2 * BN - a2))
    un = (t < nu).to(gl.int32)
    return un * su + (1 - un) * sa


@gluon.jit
def _load_tile(desc, b, h, row, bar, dst, FLAT: gl.constexpr):
    if FLAT:
        tma.async_copy_global_to_shared(desc, [b, row, h, 0], bar, dst)
    else:
        tma.async_copy_global_to_shared(desc, [b, h, row, 0], bar, dst)


@gluon.jit
def _k8(k_smem, s, desc_k8):
    """e4m3 K of ring slot s: the first half of the bf16 slot."""
    return k_smem.index(s)._reinterpret(desc_k8.dtype, desc_k8.block_type.shape, desc_k8.layout)


@gluon.jit
def _produce(desc_k, desc_v, desc_k8, desc_sk, k_smem, v_smem, sk_smem, kv_ready, kv_empty,
             b, h, n, nu, nu1, u2, na1, na2, a1, a2, a3,
             BN: gl.constexpr, NSTAGE: gl.constexpr, FLAT: gl.constexpr, FP8: gl.constexpr):
    for t in range(n):
        s = t % NSTAGE
        # a slot is free once both consumers released it; the first pass through the ring does not wait
        mbarrier.wait(kv_empty.index(s), ((t // NSTAGE) & 1) ^ 1)
        start = _tile_start(t, nu, nu1, u2, na1, na2, a1, a2, a3, BN)
        if FP8:   # e4m3 K [B, H, L, D] into the first half of the K slot, its per-key scales beside it, bf16 V
            mbarrier.expect(kv_ready.index(s), desc_k8.block_type.nbytes + desc_sk.block_type.nbytes
                            + desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_sk, [b, h, start], kv_ready.index(s), sk_smem.index(s))
            tma.async_copy_global_to_shared(desc_k8, [b, h, start, 0], kv_ready.index(s), _k8(k_smem, s, desc_k8))
        else:
            mbarrier.expect(kv_ready.index(s), desc_k.block_type.nbytes + desc_v.block_type.nbytes)
            _load_tile(desc_k, b, h, start, kv_ready.index(s), k_smem.index(s), FLAT)
        _load_tile(desc_v, b, h, start, kv_ready.index(s), v_smem.index(s), FLAT)


@gluon.jit
def _producer(desc_q, desc_k, desc_v, desc_q8, desc_k8, desc_sk, q_smem, k_smem, v_smem, sk_smem, q_bar,
              kv_ready, kv_empty, b, h, m0, n, nu, nu1, u2, na1, na2, a1, a2, a3, fp8,
              QH: gl.constexpr, BN: gl.constexpr, NSTAGE: gl.constexpr, FLAT: gl.constexpr, QUANT: gl.constexpr):
    if n > 0:  # the two consumers' 64-row halves of the query tile
        if QUANT and fp8 != 0:  # e4m3 Q from the pre-pass ([B, H, L, D]) into the first half of each bf16 buffer
            mbarrier.expect(q_bar, 2 * desc_q8.block_type.nbytes)
            for i in gl.static_range(2):
                dst = q_smem.index(i)._reinterpret(desc_q8.dtype, desc_q8.block_type.shape, desc_q8.layout)
                tma.async_copy_global_to_shared(desc_q8, [b, h, m0 + i * QH, 0], q_bar, dst)
        else:
            mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes)
            _load_tile(desc_q, b, h, m0, q_bar, q_smem.index(0), FLAT)
            _load_tile(desc_q, b, h, m0 + QH, q_bar, q_smem.index(1), FLAT)
    if QUANT and fp8 != 0:
        _produce(desc_k, desc_v, desc_k8, desc_sk, k_smem, v_smem, sk_smem, kv_ready, kv_empty,
                 b, h, n, nu, nu1, u2, na1, na2, a1, a2, a3, BN, NSTAGE, FLAT, True)
    else:
        _produce(desc_k, desc_v, desc_k8, desc_sk, k_smem, v_smem, sk_smem, kv_ready, kv_empty,
                 b, h, n, nu, nu1, u2, na1, na2, a1, a2, a3, BN, NSTAGE, FLAT, False)


@gluon.jit
def _scores(sc, start, nu, t, T, lo, hi, qk_scale, m_i, l_i, s_layout: gl.constexpr, BN: gl.constexpr):
    """Online-softmax step on finished scores `sc` of tile t: mask it if it is an edge tile (keep(q, k) = k < T or
    lo_q <= k <= hi_q), then (p, alpha, m, l)."""
    if t >= nu:
        kk = start + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        keep = (kk < T)[None, :] | ((kk[None, :] >= lo[:, None]) & (kk[None, :] <= hi[:, None]))
        sc = gl.where(keep, sc, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * qk_scale)
    p = gl.exp2(sc * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _qk(q_smem, k_smem, s, zero_s, desc_q8, desc_k8, WG: gl.constexpr, WM: gl.constexpr, BN: gl.constexpr,
        D: gl.constexpr, FP8: gl.constexpr):
    """Issue Q·Kᵀ of the tile in ring slot s (async): bf16 operands, or the e4m3 copies the producer put in the first
    half of the same buffers (FP8 items)."""
    if FP8:
        q = q_smem.index(WG)._reinterpret(desc_q8.dtype, desc_q8.block_type.shape, desc_q8.layout).reshape([WM, D])
        k = _k8(k_smem, s, desc_k8).reshape([BN, D])
    else:
        q = q_smem.index(WG).reshape([WM, D])
        k = k_smem.index(s).reshape([BN, D])
    return warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)


@gluon.jit
def _item(desc_o, q_smem, k_smem, v_smem, sk_smem, q_bar, kv_ready, kv_empty, turn, desc_q8, desc_k8, SQ,
          b, h, m0, w, n, nu, nu1, u2, na1, na2, a1, a2, a3, H, L, T, qk_scale,
          WG: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NSTAGE: gl.constexpr,
          FLAT: gl.constexpr, FP8: gl.constexpr):
    """This consumer's 64 rows of one work item with n >= 1 key tiles. FP8: e4m3 Q·Kᵀ, each score times its key's
    scale (from the ring beside the keys) and the query tile's scale (softmax scale included; it takes the place of
    the softmax scale in the exponent's multiply), P·V in bf16 as for other heads."""
    WM: gl.constexpr = 64
    dtype: gl.constexpr = desc_o.dtype
    KW: gl.constexpr = 32 if FP8 else 16   # wgmma's K step: 32 for e4m3 operands, 16 for 16-bit ones
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, KW])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_col: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)

    row0 = m0 + WG * WM
    # per-row key range of the element mask: [0, L-1] for text rows / full heads, [q - w, q + w] for image rows
    offs_m = row0 + gl.arange(0, WM, layout=s_row)
    wp = gl.maximum(w, 0)
    img_row = (offs_m >= T) & (w >= 0)
    lo = gl.where(img_row, offs_m - wp, 0)
    hi = gl.minimum(gl.where(img_row, offs_m + wp, L - 1), L - 1)
    zero_s = gl.zeros([WM, BN], gl.float32, s_layout)
    acc = gl.zeros([WM, D], gl.float32, o_layout)
    m_i = gl.full([WM], -1.0e30, gl.float32, s_row)   # finite: a fully masked tile adds exactly 0, no NaN
    l_i = gl.full([WM], 0.0, gl.float32, s_row)
    if FP8:   # this query tile's scale (softmax scale included) replaces the softmax scale
        scale = gl.load(SQ + (b.to(gl.int64) * H + h) * gl.cdiv(L, BM) + m0 // BM)
    else:
        scale = qk_scale
    mbarrier.wait(q_bar, 0)
    # tile 0: scores and softmax only
    mbarrier.wait(kv_ready.index(0), 0)
    mbarrier.wait(turn.index(WG), 0)
    sc = _qk(q_smem, k_smem, 0, zero_s, desc_q8, desc_k8, WG, WM, BN, D, FP8)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    sc = warpgroup_mma_wait(0, deps=[sc])
    start = _tile_start(0, nu, nu1, u2, na1, na2, a1, a2, a3, BN)
    if FP8:
        sc = sc * sk_smem.index(0).reshape([BN]).load(s_col)[None, :]
    p, alpha, m_i, l_i = _scores(sc, start, nu, 0, T, lo, hi, scale, m_i, l_i, s_layout, BN)
    pb = gl.convert_layout(p.to(dtype), p_layout)
    for t in range(1, n):
        s = t % NSTAGE
        sp = (t - 1) % NSTAGE
        mbarrier.wait(kv_ready.index(s), (t // NSTAGE) & 1)
        mbarrier.wait(turn.index(WG), t & 1)
        sc = _qk(q_smem, k_smem, s, zero_s, desc_q8, desc_k8, WG, WM, BN, D, FP8)
        acc = warpgroup_mma(pb, v_smem.index(sp).reshape([BN, D]), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        start = _tile_start(t, nu, nu1, u2, na1, na2, a1, a2, a3, BN)
        sc = warpgroup_mma_wait(1, deps=[sc])
        if FP8:  # the tile's key scales (the producer's TMA put them beside the keys; zeros past L), read only now:
            # 32 more live registers during the wait spill beside the bf16 P operand
            sc = sc * sk_smem.index(s).reshape([BN]).load(s_col)[None, :]
        p, alpha, m_i, l_i = _scores(sc, start, nu, t, T, lo, hi, scale, m_i, l_i, s_layout, BN)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(kv_empty.index(sp), count=1)
        acc = acc * gl.convert_layout(alpha, o_row)[:, None]
        pb = gl.convert_layout(p.to(dtype), p_layout)
    sl = (n - 1) % NSTAGE
    mbarrier.wait(turn.index(WG), n & 1)
    acc = warpgroup_mma(pb, v_smem.index(sl).reshape([BN, D]), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(kv_empty.index(sl), count=1)
    # rows past L may hold 0/0: the TMA store clips them
    o = acc / gl.convert_layout(l_i, o_row)[:, None]
    q_tile = q_smem.index(WG)   # this group's Q rows are dead: stage the output there
    q_tile.reshape([WM, D]).store(o.to(dtype))
    fence_async_shared()
    _store_rows(desc_o, b, h, row0, q_tile, FLAT)
    tma.store_wait(0)


@gluon.jit
def _consumer(desc_o, q_smem, k_smem, v_smem, sk_smem, q_bar, kv_ready, kv_empty, turn, desc_q8, desc_k8, SQ,
              b, h, m0, w, n, nu, nu1, u2, na1, na2, a1, a2, a3, fp8, H, L, T, qk_scale,
              WG: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NSTAGE: gl.constexpr,
              FLAT: gl.constexpr, ZERO_SKIP: gl.constexpr, QUANT: gl.constexpr):
    if n > 0:
        if QUANT and fp8 != 0:
            _item(desc_o, q_smem, k_smem, v_smem, sk_smem, q_bar, kv_ready, kv_empty, turn, desc_q8, desc_k8, SQ,
                  b, h, m0, w, n, nu, nu1, u2, na1, na2, a1, a2, a3, H, L, T, qk_scale,
                  WG, BM, BN, D, NSTAGE, FLAT, True)
        else:
            _item(desc_o, q_smem, k_smem, v_smem, sk_smem, q_bar, kv_ready, kv_empty, turn, desc_q8, desc_k8, SQ,
                  b, h, m0, w, n, nu, nu1, u2, na1, na2, a1, a2, a3, H, L, T, qk_scale,
                  WG, BM, BN, D, NSTAGE, FLAT, False)
    elif ZERO_SKIP:
        # functional API: a skipped head's rows come back as zeros
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        q_tile = q_smem.index(WG)
        q_tile.reshape([64, D]).store(gl.zeros([64, D], desc_o.dtype, o_layout))
        fence_async_shared()
        _store_rows(desc_o, b, h, m0 + WG * 64, q_tile, FLAT)
        tma.store_wait(0)


@gluon.jit
def _store_rows(desc, b, h, row, src, FLAT: gl.constexpr):
    if FLAT:
        tma.async_copy_shared_to_global(desc, [b, row, h, 0], src)
    else:
        tma.async_copy_shared_to_global(desc, [b, h, row, 0], src)


@gluon.jit
def _rank_heads(HW, H, H_PAD: gl.constexpr):
    """Heavy-first rank of every head (full > wider arrow > narrower > skip; ties by head index), as
    `arrow_triton._rank_heads`: an H_PAD x H_PAD comparison on the device table, no host sync."""
    lay: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [4, 1], [1, 0])
    rows = gl.arange(0, H_PAD, layout=gl.SliceLayout(1, lay))
    cols = gl.arange(0, H_PAD, layout=gl.SliceLayout(0, lay))
    w_r = gl.load(HW + rows, mask=rows < H, other=-2)
    w_c = gl.load(HW + cols, mask=cols < H, other=-2)
    k_r = gl.where(w_r == -1, 1 << 30, gl.where(w_r < -1, -2, w_r))
    k_c = gl.where(w_c == -1, 1 << 30, gl.where(w_c < -1, -2, w_c))
    before = (k_c[None, :] > k_r[:, None]) | ((k_c[None, :] == k_r[:, None]) & (cols[None, :] < rows[:, None]))
    rank = gl.sum(before.to(gl.int32), axis=1)
    n_full = gl.sum(((w_r == -1) & (rows < H)).to(gl.int32), axis=0)
    n_arrow = gl.sum(((w_r >= 0) & (rows < H)).to(gl.int32), axis=0)
    return rows, rank, n_full, n_arrow


@gluon.jit
def _arrow_fwd_gluon(desc_q, desc_k, desc_v, desc_o, HW, desc_q8, desc_k8, desc_sk, SQ, HQ, B, H, L, T, qk_scale,
                     H_PAD: gl.constexpr, FLAT: gl.constexpr, ZERO_SKIP: gl.constexpr,
                     BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, NSTAGE: gl.constexpr,
                     QUANT: gl.constexpr):
    pid = gl.program_id(0)
    rows, rank, n_full, n_arrow = _rank_heads(HW, H, H_PAD)
    # ---- item -> (head, batch, query tile): long items first, exactly as arrow_triton._work ----
    n_qt = gl.cdiv(L, BM)
    n_tq = gl.minimum(gl.cdiv(T, BM), n_qt)
    n_iq = n_qt - n_tq
    seg_a = n_full * B * n_qt
    seg_b = n_arrow * B * n_tq
    seg_c = n_arrow * B * n_iq
    in_a = (pid < seg_a).to(gl.int32)
    in_b = ((pid >= seg_a) & (pid < seg_a + seg_b)).to(gl.int32)
    in_c = ((pid >= seg_a + seg_b) & (pid < seg_a + seg_b + seg_c)).to(gl.int32)
    in_d = 1 - in_a - in_b - in_c
    base = in_b * seg_a + in_c * (seg_a + seg_b) + in_d * (seg_a + seg_b + seg_c)
    per = gl.maximum(in_a * n_qt + in_b * n_tq + in_c * n_iq + in_d * n_qt, 1)
    p_loc = pid - base
    qt = p_loc % per + in_c * n_tq
    r = p_loc // per
    b = r % B
    slot = r // B + (in_b + in_c) * n_full + in_d * (n_full + n_arrow)
    h = gl.sum(gl.where(rank == slot, rows, 0), axis=0)
    w = gl.load(HW + h)
    live = (w >= -1).to(gl.int32)
    m0 = qt * BM
    # ---- key-tile segments (the comments of arrow_triton._work apply) ----
    Lfl = (L // BN) * BN
    Tfl = (T // BN) * BN
    Tc = gl.cdiv(T, BN) * BN
    di = ((w == -1) | (m0 + BM <= T)).to(gl.int32)
    si = ((w >= 0) & (m0 < T) & (m0 + BM > T)).to(gl.int32)
    ii = (1 - di) * (1 - si)
    wp = gl.maximum(w, 0)
    if QUANT:  # this head's Q·Kᵀ in e4m3 (HQ[h] = 1)
        fp8 = gl.load(HQ + h)
    else:
        fp8 = 0
    s0 = gl.maximum(m0 - wp, Tc)
    # an FP8 head's band starts on a multiple of 4 keys: TMA copies the tile's key scales from there, and a box may only
    # start on a 16-byte boundary of its innermost dimension (the element mask stays token-exact)
    s0 = s0 - (s0 % 4) * (fp8 != 0).to(gl.int32)
    e0 = gl.minimum(m0 + BM + wp, L)
    nb = gl.maximum(gl.cdiv(gl.maximum(e0 - s0, 0), BN), 0)
    fk_lo = gl.maximum(m0 + BM - 1 - wp, s0)
    fk_hi = gl.minimum(m0 + wp, L - 1)
    j_lo = gl.minimum(gl.cdiv(fk_lo - s0, BN), nb)
    j_hi = gl.maximum(gl.minimum(gl.maximum(fk_hi - s0 + 1, 0) // BN, nb), j_lo)
    t_part = gl.cdiv(T, BN) - T // BN
    l_part = gl.cdiv(L, BN) - L // BN
    nu1 = (di * (L // BN) + ii * (T // BN)) * live
    nu2 = ii * (j_hi - j_lo) * live
    a1 = di * Lfl + ii * Tfl
    na1 = (di * l_part + si * gl.cdiv(L, BN) + ii * t_part) * live
    na2 = ii * j_lo * live
    na3 = ii * (nb - j_hi) * live
    u2 = s0 + j_lo * BN
    a2 = s0
    a3 = s0 + j_hi * BN
    nu = nu1 + nu2
    n = nu + na1 + na2 + na3

    if FLAT:
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [2, 1, BM // 2, 1, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [NSTAGE, 1, BN, 1, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [NSTAGE, 1, BN, 1, D], desc_v.layout)
    else:
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [2, 1, 1, BM // 2, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [NSTAGE, 1, 1, BN, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [NSTAGE, 1, 1, BN, D], desc_v.layout)
    if QUANT:   # the K scales of each ring slot's tile (FP8 items)
        sk_smem = gl.allocate_shared_memory(gl.float32, [NSTAGE, 1, 1, BN], desc_sk.layout)
    else:
        sk_smem = gl.allocate_shared_memory(gl.float32, [1, 1, 1, 4], gl.NVMMASharedLayout(0, 32, rank=3))
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NSTAGE, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NSTAGE):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.arrive(turn.index(0), count=1)   # consumer 0 issues first
    gl.warp_specialize([
        (_consumer, (desc_o, q_smem, k_smem, v_smem, sk_smem, q_bar, kv_ready, kv_empty, turn, desc_q8, desc_k8, SQ,
                     b, h, m0, w, n, nu, nu1, u2, na1, na2, a1, a2, a3, fp8, H, L, T, qk_scale,
                     0, BM, BN, D, NSTAGE, FLAT, ZERO_SKIP, QUANT)),
        (_consumer, (desc_o, q_smem, k_smem, v_smem, sk_smem, q_bar, kv_ready, kv_empty, turn, desc_q8, desc_k8, SQ,
                     b, h, m0, w, n, nu, nu1, u2, na1, na2, a1, a2, a3, fp8, H, L, T, qk_scale,
                     1, BM, BN, D, NSTAGE, FLAT, ZERO_SKIP, QUANT)),
        (_producer, (desc_q, desc_k, desc_v, desc_q8, desc_k8, desc_sk, q_smem, k_smem, v_smem, sk_smem, q_bar,
                     kv_ready, kv_empty, b, h, m0, n, nu, nu1, u2, na1, na2, a1, a2, a3, fp8,
                     BM // 2, BN, NSTAGE, FLAT, QUANT)),
    ], [4, 1], [232, 40])


# --------------------------------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------------------------------


def supported(q: torch.Tensor, head_dim: int, heads: int) -> bool:
    """This kernel runs the call: Hopper (sm90), head_dim 128, fp16/bf16, at most 128 heads. (TMA alignment of
    the tensors is checked by the caller, `arrow_triton._tma_ok`.)"""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim == HEAD_DIM and heads <= 128
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def _desc(x: torch.Tensor, layout: str, H: int, rows: int) -> TensorDescriptor:
    dt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    if layout == "bhld":
        B, Hh, L, D = x.shape
        block = [1, 1, rows, D]
        return TensorDescriptor(x, [B, Hh, L, D], list(x.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, dt))
    B, L, HD = x.shape
    D = HD // H
    sb, sl, _ = x.stride()
    block = [1, rows, 1, D]
    return TensorDescriptor(x, [B, L, H, D], [sb, sl, D, 1], block, gl.NVMMASharedLayout.get_default_for(block, dt))


class Plan:
    """Launch plan for one cache key: the grid, the scalar arguments and the TMA descriptors. Those of q, k, v and out
    get their `base` re-pointed at each call's tensors (and dropped after the launch, so the plan holds no tensor);
    an FP8 plan also holds descriptors of the pre-pass's e4m3 Q and K (the workspace it owns) and its scale buffers."""

    __slots__ = ("grid", "descs", "quant", "scalars", "consts", "runner")
    grid: tuple[int, int, int]
    descs: list[TensorDescriptor]
    quant: tuple            # (desc_q8, desc_k8, desc_sk, SQ), or () for a plan without FP8 heads
    scalars: tuple
    consts: dict
    runner: Any   # None: not built yet; False: the direct launcher failed once; else Triton's compiled launcher


def build(q, k, v, out, H: int, L: int, B: int, txt_len: int, layout: str, sm_scale, zero_skip: bool,
          quant=None) -> Plan:
    """`quant`: the FP8 pre-pass workspace (`arrow_triton._QuantBuffers`: e4m3 Q and K as [B, H, L, D], one Q scale per
    128-row query tile, per-token K scales in rows padded to 16 bytes) when the call has FP8 heads, else None."""
    plan = Plan()
    plan.grid = (max(math.ceil(L / BLOCK_M) * B * H, 1), 1, 1)
    plan.descs = [_desc(q, layout, H, BLOCK_M // 2), _desc(k, layout, H, BLOCK_N), _desc(v, layout, H, BLOCK_N),
                  _desc(out, layout, H, BLOCK_M // 2)]
    if quant is not None:
        f8 = gl.float8e4nv
        qb, kb = [1, 1, BLOCK_M // 2, HEAD_DIM], [1, 1, BLOCK_N, HEAD_DIM]
        d8 = [TensorDescriptor(x, list(x.shape), list(x.stride()), blk, gl.NVMMASharedLayout.get_default_for(blk, f8))
              for x, blk in ((quant.q8, qb), (quant.k8, kb))]
        sk, sb = quant.sk, [1, 1, BLOCK_N]   # [B, H, L] in rows padded to 16 bytes
        d_sk = TensorDescriptor(sk, [B, H, L], list(sk.stride()), sb,
                                gl.NVMMASharedLayout.get_default_for(sb, gl.float32))
        plan.quant = (*d8, d_sk, quant.sq)
    else:
        plan.quant = ()
    scale = (1.0 / math.sqrt(HEAD_DIM) if sm_scale is None else float(sm_scale)) * _LOG2E
    plan.scalars = (B, H, L, int(txt_len), scale)
    plan.consts = dict(H_PAD=max(1 << (H - 1).bit_length(), 2), FLAT=layout == "blhd_flat", ZERO_SKIP=bool(zero_skip),
                       BM=BLOCK_M, BN=BLOCK_N, D=HEAD_DIM, NSTAGE=STAGES, QUANT=quant is not None)
    plan.runner = None
    for d in plan.descs:
        d.base = None
    return plan


def _args(plan: Plan, head_window, head_quant) -> tuple:
    d = plan.descs
    # without FP8 heads the FP8 operands are never read: pass the bf16 descriptors and the head table as stand-ins
    quant = (*plan.quant, head_quant) if plan.quant else (d[0], d[1], d[0], head_window, head_window)
    return (*d, head_window, *quant, *plan.scalars)


def launch(plan: Plan, q, k, v, out, head_window, head_quant=None) -> None:
    """Run the plan on these tensors (same shapes, strides and dtypes as the plan's key). With FP8 heads the caller has
    run the pre-pass into the plan's workspace first (`arrow_triton._quantize`)."""
    d = plan.descs
    d[0].base, d[1].base, d[2].base, d[3].base = q, k, v, out
    try:
        runner = plan.runner
        args = _args(plan, head_window, head_quant)
        if runner:
            try:
                runner(*args, stream=torch._C._cuda_getCurrentRawStream(q.device.index))
                return
            except (TypeError, AttributeError):
                plan.runner = runner = False   # Triton-internal launcher changed: use the JIT path
        compiled = _arrow_fwd_gluon[plan.grid](*args, **plan.consts, num_warps=4)
        if runner is None and compiled is not None:
            plan.runner = getattr(compiled, "__getitem__", lambda grid: None)(plan.grid)
    finally:
        d[0].base = d[1].base = d[2].base = d[3].base = None


def compile_sm90(*, B: int, H: int, L: int, T: int, layout: str = "bhld", zero_skip: bool = False,
                 dtype: torch.dtype = torch.bfloat16, quant: bool = False):
    """Compile for sm90 on a machine without that GPU (CPU tensors stand in; Triton-internal API, a check tool)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    x = torch.empty((B, H, L, HEAD_DIM) if layout == "bhld" else (B, L, H * HEAD_DIM), dtype=dtype)
    qb = None
    if quant:
        from types import SimpleNamespace

        f8 = torch.empty((B, H, L, HEAD_DIM), dtype=torch.float8_e4m3fn)
        qb = SimpleNamespace(q8=f8, k8=f8, sq=torch.empty((B, H, math.ceil(L / BLOCK_M))),
                             sk=torch.empty((B, H, (L + 3) // 4 * 4)))
    plan = build(x, x, x, x, H, L, B, T, layout, None, zero_skip, qb)
    for dsc in plan.descs:
        dsc.base = x
    hw = torch.empty(H, dtype=torch.int32)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = _arrow_fwd_gluon
    opts = dict(plan.consts, num_warps=4)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*_args(plan, hw, hw), **opts)
    options, signature, constexprs, attrs = fn._pack_args(backend, {"num_warps": 4}, bound, specialization, options)
    return triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
