"""Fused head-wise arrow attention (DiTFastAttnV2, arXiv 2503.22796) as one Triton launch per layer.

Per head: full attention, token-exact arrow attention (text rows/columns dense, image band |q - k| <= w),
or skip (cached head: nothing written). Online-softmax tiling after FlashAttention-2 (Dao, 2023);
written from scratch for this pack. See kernels/NOTES.md for floors, versions and measurements.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["arrow_attention_triton"]

# head_window codes (int32 per head): the window vocabulary of kernels/methods.py (WINDOW_FULL, WINDOW_SKIP,
# band half-width >= 0), restated here because this file is also loaded standalone (tests, bench);
# tests/test_arrow_triton.py checks that both agree.
_FULL = -1
_SKIP = -2
_LOG2E = 1.4426950408889634
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# FP8 heads (head_quant = 1): Q.K^T in e4m3 (largest finite 448) with one scale per query tile of Q and per-token
# scales of mean-smoothed K; P.V in the input dtype (an e4m3 P.V measured slower on an H200 in this kernel and in
# kernel v3, kernels/NOTES.md). The scheme of kernels/quant.py's reference; kernel v3 runs the same scheme.
_FP8_MAX = tl.constexpr(448.0)
#: Smallest scale of a quantized block/row: an all-zero block quantizes to zeros instead of 0/0.
_FP8_MIN_SCALE = tl.constexpr(1e-12)


# --------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rank_heads(HW, H, H_PAD: tl.constexpr):
    """Heavy-first rank of every head (full > wider arrow > narrower > skip; ties by head index)."""
    offs = tl.arange(0, H_PAD)
    win = tl.load(HW + offs, mask=offs < H, other=-2)
    key = tl.where(win == -1, 1 << 30, tl.where(win < -1, -2, win))
    before = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (offs[None, :] < offs[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    n_full = tl.sum(((win == -1) & (offs < H)).to(tl.int32), axis=0)
    n_arrow = tl.sum(((win >= 0) & (offs < H)).to(tl.int32), axis=0)
    return offs, rank, n_full, n_arrow


@triton.jit
def _head_for_slot(HW, slot, H, H_PAD: tl.constexpr):
    """Head index at position `slot` of the heavy-first order (full > wider arrow > narrower > skip).

    Computed in every program from the device table (H <= H_PAD entries): no host sync, no host schedule.
    Ties keep the head index order, so the order is a permutation.
    """
    offs, rank, n_full, n_arrow = _rank_heads(HW, H, H_PAD)
    return tl.sum(tl.where(rank == slot, offs, 0), axis=0)


@triton.jit
def _to_fp8(x, INTERP: tl.constexpr):
    """x (fp32, |x| <= 448) rounded to e4m3. On the GPU a real cast (cvt.rn.satfinite). Under the interpreter the
    same round-to-nearest-even in fp32 arithmetic, kept as fp32: Triton 3.6's interpreter rounds values that carry
    into the next binade wrong (31.85 -> 16), and its fp8 tl.dot is wrong too."""
    if INTERP:
        ax = tl.abs(x)
        e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(ax, 1e-30))), -6.0)  # binade; subnormals below 2^-6
        ulp = tl.math.exp2(e - 3.0)                                            # 3 mantissa bits
        r = ((ax / ulp + 12582912.0) - 12582912.0) * ulp                       # 1.5 * 2^23: fp32 round-half-even
        return tl.where(x < 0, -r, r)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def _quant_fwd(Q, K, HQ, KM, Q8, K8, SQ, SK,
               sqb, sqh, sql, sqd, skb, skh, skl, skd,
               H, L, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """Quantization pre-pass of the FP8 heads: one program per (query tile, batch x head); bf16 heads load and store
    nothing. Q8, K8: [B, H, L, D] e4m3. SQ [B, H, tiles]: one scale per tile of BLOCK query rows (the kernel's
    BLOCK_M), times the softmax scale in log2 units. SK [B, H, L4 >= L]: per-token scales of K after subtracting its
    per-channel mean KM (softmax-invariant; it takes the shared offset out of K's range); its rows are padded to 4
    floats (16 bytes: kernel v3 brings a tile's key scales by TMA)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    live = tl.load(HQ + h) != 0
    rows = t * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (rows < L) & live
    ok = row_ok[:, None]
    bh64 = bh.to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None] * sql + offs_d[None, :] * sqd,
                mask=ok, other=0.0).to(tl.float32)
    sq = tl.maximum(tl.max(tl.max(tl.abs(q), 1), 0) / _FP8_MAX, _FP8_MIN_SCALE)
    tl.store(Q8 + bh64 * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], _to_fp8(q / sq, INTERP), mask=ok)
    tl.store(SQ + bh64 * tl.cdiv(L, BLOCK) + t, sq * qk_scale, mask=live)
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + rows[:, None] * skl + offs_d[None, :] * skd,
                mask=ok, other=0.0).to(tl.float32)
    k = k - tl.load(KM + bh64 * HEAD_DIM + offs_d)[None, :]
    sk = tl.maximum(tl.max(tl.abs(k), 1) / _FP8_MAX, _FP8_MIN_SCALE)
    tl.store(K8 + bh64 * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], _to_fp8(k / sk[:, None], INTERP),
             mask=ok)
    tl.store(SK + bh64 * ((L + 3) // 4 * 4) + rows, sk, mask=row_ok)


@triton.jit
def _load_rows(X, base, start, offs_n, offs_d, sl, sd, L, desc, b, h,
               BOUNDS: tl.constexpr, USE_TMA: tl.constexpr, FLAT: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Rows [start, start + BLOCK_N) of one head of K or V: by TMA (rows past L are zero-filled by the copy engine)
    or by pointers (BOUNDS: masked to rows < L)."""
    if USE_TMA:
        if FLAT:
            x = desc.load([b, start, h, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            x = desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        rows = start + offs_n
        ptrs = X + base + rows[:, None] * sl + offs_d[None, :] * sd
        if BOUNDS:
            x = tl.load(ptrs, mask=(rows < L)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_kv(K, V, k_base, v_base, start, offs_n, offs_d, skl, skd, svl, svd, L,
             kdesc, vdesc, b, h,
             BOUNDS: tl.constexpr, USE_TMA: tl.constexpr, FLAT: tl.constexpr,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    k = _load_rows(K, k_base, start, offs_n, offs_d, skl, skd, L, kdesc, b, h, BOUNDS, USE_TMA, FLAT, BLOCK_N, HEAD_DIM)
    v = _load_rows(V, v_base, start, offs_n, offs_d, svl, svd, L, vdesc, b, h, BOUNDS, USE_TMA, FLAT, BLOCK_N, HEAD_DIM)
    return k, v


@triton.jit
def _tile(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d, skl, skd, svl, svd,
          L, T, lo, hi, qk_scale, kdesc, vdesc, b, h,
          MASKED: tl.constexpr, USE_TMA: tl.constexpr, FLAT: tl.constexpr, IEEE: tl.constexpr,
          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, INTERP: tl.constexpr):
    """One key tile of the online softmax. MASKED: token-exact keep(q, k) and bounds; else neither."""
    k, v = _load_kv(K, V, k_base, v_base, start, offs_n, offs_d, skl, skd, svl, svd, L,
                    kdesc, vdesc, b, h, MASKED, USE_TMA, FLAT, BLOCK_N, HEAD_DIM)
    p_dtype = v.dtype
    if INTERP:
        # the interpreter's bf16 tl.dot is wrong (triton 3.6 + numpy 2.4); the values are bf16-exact,
        # so an fp32 product of the same operands tests the same arithmetic
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        # keep(q, k) = k < T or lo_q <= k <= hi_q, with [lo_q, hi_q] = [0, L-1] for text rows / full heads
        # and [q - w, min(q + w, L - 1)] for image rows of arrow heads (row vectors built once per program)
        kk = start + offs_n
        keep = (kk < T)[None, :] | ((kk[None, :] >= lo[:, None]) & (kk[None, :] <= hi[:, None]))
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = p.to(p_dtype)
    if INTERP:
        p = p.to(tl.float32)
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc)
    return acc, l_i, m_new


@triton.jit
def _tile8(acc, l_i, m_i, q8, sq, K8, SK, kv8_base, sk_base, V, v_base, start, offs_n, offs_d, svl, svd, L, T, lo, hi,
           k8desc, vdesc, b, h,
           MASKED: tl.constexpr, USE_TMA: tl.constexpr, FLAT: tl.constexpr, BLOCK_N: tl.constexpr,
           HEAD_DIM: tl.constexpr, INTERP: tl.constexpr):
    """`_tile` of an FP8 head: e4m3 Q.K^T (the query tile's scale `sq` times the keys' per-token scales: one multiply
    per score, as the bf16 tile's softmax scale), then the online softmax and P.V in V's dtype."""
    kk = start + offs_n
    if USE_TMA:
        k8 = k8desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        k_ptrs = K8 + kv8_base + kk[:, None] * HEAD_DIM + offs_d[None, :]
        if MASKED:
            k8 = tl.load(k_ptrs, mask=(kk < L)[:, None], other=0.0)
        else:
            k8 = tl.load(k_ptrs)
    v = _load_rows(V, v_base, start, offs_n, offs_d, svl, svd, L, vdesc, b, h, MASKED, USE_TMA, FLAT, BLOCK_N,
                   HEAD_DIM)
    if MASKED:
        scale = tl.load(SK + sk_base + kk, mask=kk < L, other=0.0) * sq
    else:
        scale = tl.load(SK + sk_base + kk) * sq
    if INTERP:
        s = tl.dot(q8, tl.trans(k8), input_precision="ieee")
    else:
        s = tl.dot(q8, tl.trans(k8))
    s = s * scale[None, :]
    if MASKED:
        keep = (kk < T)[None, :] | ((kk[None, :] >= lo[:, None]) & (kk[None, :] <= hi[:, None]))
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if INTERP:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _tile_any(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d, skl, skd, svl, svd,
              L, T, lo, hi, qk_scale, kdesc, vdesc, b, h, sq, K8, SK, kv8_base, sk_base, k8desc,
              MASKED: tl.constexpr, USE_TMA: tl.constexpr, FLAT: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, INTERP: tl.constexpr, FP8: tl.constexpr):
    if FP8:
        return _tile8(acc, l_i, m_i, q, sq, K8, SK, kv8_base, sk_base, V, v_base, start, offs_n, offs_d, svl, svd,
                      L, T, lo, hi, k8desc, vdesc, b, h, MASKED, USE_TMA, FLAT, BLOCK_N, HEAD_DIM, INTERP)
    else:
        return _tile(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d, skl, skd, svl, svd,
                     L, T, lo, hi, qk_scale, kdesc, vdesc, b, h,
                     MASKED, USE_TMA, FLAT, IEEE, BLOCK_N, HEAD_DIM, INTERP)


@triton.jit
def _arrow_fwd(
    Q, K, V, O, HW, HQ,
    qdesc, kdesc, vdesc,
    Q8, K8, SQ, SK, q8desc, k8desc,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    B, H, L, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr,
    USE_TMA: tl.constexpr, FLAT: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr, WS: tl.constexpr,
    ZERO_SKIP: tl.constexpr, QUANT: tl.constexpr,
):
    """One program per work item (head, batch, query tile), long items first (see `_work`). QUANT: the launch has
    FP8 heads (HQ[h] = 1; their operands come quantized from `_quant_fwd`); bf16 heads run beside them."""
    offs_h, rank, n_full, n_arrow = _rank_heads(HW, H, H_PAD)
    _work(tl.program_id(0), offs_h, rank, n_full, n_arrow, Q, K, V, O, HW, HQ, qdesc, kdesc, vdesc,
          Q8, K8, SQ, SK, q8desc, k8desc,
          sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
          B, H, L, T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, H_PAD, USE_TMA, FLAT, IEEE, INTERP, WS, ZERO_SKIP,
          QUANT)


@triton.jit
def _attend(Q, K, V, qdesc, kdesc, vdesc, Q8, K8, SQ, SK, q8desc, k8desc,
            sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
            b, h, m0, skip, nu, nu1, u2, na, na1, na2, a1, a2, a3, offs_m, offs_n, offs_d, lo, hi,
            H, L, T, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            USE_TMA: tl.constexpr, FLAT: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr, WS: tl.constexpr,
            FP8: tl.constexpr):
    """The key loops of one work item: (acc, l) with out = acc / l. FP8: the quantized operands."""
    bh_q = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = b.to(tl.int64) * svb + h.to(tl.int64) * svh
    bh8 = b.to(tl.int64) * H + h
    kv8_base = bh8 * L * HEAD_DIM
    sk_base = bh8 * ((L + 3) // 4 * 4)   # SK's rows are padded to 4 floats (`_QuantBuffers`)
    if FP8:
        if USE_TMA:
            q = q8desc.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            q = tl.load(Q8 + kv8_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=(offs_m < L)[:, None] & (skip == 0), other=0.0)
    else:
        if USE_TMA:
            if FLAT:
                q = qdesc.load([b, m0, h, 0]).reshape(BLOCK_M, HEAD_DIM)
            else:
                q = qdesc.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            q_ok = (offs_m < L)[:, None] & (skip == 0)
            q = tl.load(Q + bh_q + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=q_ok, other=0.0)

    # m starts finite, masked scores are -inf: a fully masked tile then adds exactly 0 (no NaN)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if FP8:  # this query tile's scale (softmax scale included)
        sq = tl.load(SQ + bh8 * tl.cdiv(L, BLOCK_M) + m0 // BLOCK_M)
    else:
        sq = 0.0

    # ---- interior tiles: no element mask, no bounds; then edge tiles, masked token-exactly ----
    if INTERP:
        # the interpreter holds scalars as 1-element arrays, which range() rejects: count with while
        j = 0
        while j < nu:
            start = j * BLOCK_N + (j >= nu1).to(tl.int32) * (u2 - nu1 * BLOCK_N)
            acc, l_i, m_i = _tile_any(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d,
                                      skl, skd, svl, svd, L, T, lo, hi, qk_scale, kdesc, vdesc, b, h,
                                      sq, K8, SK, kv8_base, sk_base, k8desc,
                                      False, USE_TMA, FLAT, IEEE, BLOCK_N, HEAD_DIM, INTERP, FP8)
            j += 1
        j = 0
        while j < na:
            start = (j * BLOCK_N + a1 + (j >= na1).to(tl.int32) * (a2 - na1 * BLOCK_N - a1)
                     + (j >= na1 + na2).to(tl.int32) * (a3 - na2 * BLOCK_N - a2))
            acc, l_i, m_i = _tile_any(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d,
                                      skl, skd, svl, svd, L, T, lo, hi, qk_scale, kdesc, vdesc, b, h,
                                      sq, K8, SK, kv8_base, sk_base, k8desc,
                                      True, USE_TMA, FLAT, IEEE, BLOCK_N, HEAD_DIM, INTERP, FP8)
            j += 1
    else:
        for j in tl.range(0, nu, warp_specialize=WS):
            start = j * BLOCK_N + (j >= nu1).to(tl.int32) * (u2 - nu1 * BLOCK_N)
            acc, l_i, m_i = _tile_any(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d,
                                      skl, skd, svl, svd, L, T, lo, hi, qk_scale, kdesc, vdesc, b, h,
                                      sq, K8, SK, kv8_base, sk_base, k8desc,
                                      False, USE_TMA, FLAT, IEEE, BLOCK_N, HEAD_DIM, INTERP, FP8)
        for j in tl.range(0, na, warp_specialize=WS):
            start = (j * BLOCK_N + a1 + (j >= na1).to(tl.int32) * (a2 - na1 * BLOCK_N - a1)
                     + (j >= na1 + na2).to(tl.int32) * (a3 - na2 * BLOCK_N - a2))
            acc, l_i, m_i = _tile_any(acc, l_i, m_i, q, K, V, k_base, v_base, start, offs_m, offs_n, offs_d,
                                      skl, skd, svl, svd, L, T, lo, hi, qk_scale, kdesc, vdesc, b, h,
                                      sq, K8, SK, kv8_base, sk_base, k8desc,
                                      True, USE_TMA, FLAT, IEEE, BLOCK_N, HEAD_DIM, INTERP, FP8)
    return acc, l_i


@triton.jit
def _work(
    pid, offs_h, rank, n_full, n_arrow,
    Q, K, V, O, HW, HQ,
    qdesc, kdesc, vdesc,
    Q8, K8, SQ, SK, q8desc, k8desc,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    B, H, L, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr,
    USE_TMA: tl.constexpr, FLAT: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr, WS: tl.constexpr,
    ZERO_SKIP: tl.constexpr, QUANT: tl.constexpr,
):
    """One work item (head, batch, query tile) -> its output rows."""
    # ---- item -> (head, batch, query tile) ----
    n_qt = tl.cdiv(L, BLOCK_M)
    # long programs first: [full heads, every query tile] [arrow heads, query tiles with text rows]
    # [arrow heads, image query tiles (wider bands first)] [skipped heads]. A text-row tile of an arrow
    # head visits every key tile (as long as a full-head tile); started last it would run alone for
    # a whole dense program's time after the short band tiles are done.
    n_tq = tl.minimum(tl.cdiv(T, BLOCK_M), n_qt)
    n_iq = n_qt - n_tq
    seg_a = n_full * B * n_qt
    seg_b = n_arrow * B * n_tq
    seg_c = n_arrow * B * n_iq
    in_a = (pid < seg_a).to(tl.int32)
    in_b = ((pid >= seg_a) & (pid < seg_a + seg_b)).to(tl.int32)
    in_c = ((pid >= seg_a + seg_b) & (pid < seg_a + seg_b + seg_c)).to(tl.int32)
    in_d = 1 - in_a - in_b - in_c
    # integer arithmetic instead of scalar tl.where (keeps scalars 0-d in the interpreter)
    base = in_b * seg_a + in_c * (seg_a + seg_b) + in_d * (seg_a + seg_b + seg_c)
    per = in_a * n_qt + in_b * n_tq + in_c * n_iq + in_d * n_qt
    per = tl.maximum(per, 1)
    p_loc = pid - base
    qt = p_loc % per + in_c * n_tq
    r = p_loc // per
    b = r % B
    slot = r // B + (in_b + in_c) * n_full + in_d * (n_full + n_arrow)
    h = tl.sum(tl.where(rank == slot, offs_h, 0), axis=0)
    w = tl.load(HW + h)
    skip = w < -1
    m0 = qt * BLOCK_M

    # ---- key-tile segments (tile starts may be unaligned; the softmax is order-free) ----
    # unmasked tiles: [u1, u1 + nu1 tiles) then [u2, u2 + nu2 tiles)
    # masked tiles:   [a1, +na1) then [a2, +na2) then [a3, +na3)
    Lfl = (L // BLOCK_N) * BLOCK_N
    Tfl = (T // BLOCK_N) * BLOCK_N
    Tc = tl.cdiv(T, BLOCK_N) * BLOCK_N
    dense_tile = (w == -1) | (m0 + BLOCK_M <= T)   # full head, or a query tile of text rows only
    straddle = (w >= 0) & (m0 < T) & (m0 + BLOCK_M > T)
    # band of this (image) query tile, image arrow heads only
    wp = tl.maximum(w, 0)
    s0 = tl.maximum(m0 - wp, Tc)
    e0 = tl.minimum(m0 + BLOCK_M + wp, L)
    nb = tl.maximum(tl.cdiv(tl.maximum(e0 - s0, 0), BLOCK_N), 0)
    fk_lo = tl.maximum(m0 + BLOCK_M - 1 - wp, s0)   # first key kept by every row of the tile
    fk_hi = tl.minimum(m0 + wp, L - 1)               # last key kept by every row of the tile
    j_lo = tl.minimum(tl.cdiv(fk_lo - s0, BLOCK_N), nb)
    j_hi = tl.minimum(tl.maximum(fk_hi - s0 + 1, 0) // BLOCK_N, nb)
    j_hi = tl.maximum(j_hi, j_lo)

    di = dense_tile.to(tl.int32)
    si = straddle.to(tl.int32)
    ii = (1 - di) * (1 - si)
    live = (skip == 0).to(tl.int32)
    # 0/1 flags by integer arithmetic, not `(x % n != 0).to(...)`: Triton compiles an int argument equal to 1
    # (T = 1, L = 1) as a constant, and a comparison of constants is a Python bool without `.to`
    t_part = tl.cdiv(T, BLOCK_N) - T // BLOCK_N
    l_part = tl.cdiv(L, BLOCK_N) - L // BLOCK_N
    nu1 = (di * (L // BLOCK_N) + ii * (T // BLOCK_N)) * live
    nu2 = ii * (j_hi - j_lo) * live
    a1 = di * Lfl + ii * Tfl
    na1 = (di * l_part + si * tl.cdiv(L, BLOCK_N) + ii * t_part) * live
    na2 = ii * j_lo * live
    na3 = ii * (nb - j_hi) * live
    u2 = s0 + j_lo * BLOCK_N
    a2 = s0
    a3 = s0 + j_hi * BLOCK_N
    nu = nu1 + nu2
    na = na1 + na2 + na3

    # ---- per-row key range for the element mask: keep(q, k) = k < T or lo_q <= k <= hi_q ----
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    img_row = (offs_m >= T) & (w >= 0)
    lo = tl.where(img_row, offs_m - wp, 0)
    hi = tl.minimum(tl.where(img_row, offs_m + wp, L - 1), L - 1)
    # ---- the key loops: bf16 heads, or (a runtime branch, one launch) FP8 heads ----
    if QUANT:
        if tl.load(HQ + h) != 0:
            acc, l_i = _attend(Q, K, V, qdesc, kdesc, vdesc, Q8, K8, SQ, SK, q8desc, k8desc,
                               sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                               b, h, m0, skip, nu, nu1, u2, na, na1, na2, a1, a2, a3, offs_m, offs_n, offs_d, lo, hi,
                               H, L, T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, USE_TMA, FLAT, IEEE, INTERP, WS,
                               True)
        else:
            acc, l_i = _attend(Q, K, V, qdesc, kdesc, vdesc, Q8, K8, SQ, SK, q8desc, k8desc,
                               sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                               b, h, m0, skip, nu, nu1, u2, na, na1, na2, a1, a2, a3, offs_m, offs_n, offs_d, lo, hi,
                               H, L, T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, USE_TMA, FLAT, IEEE, INTERP, WS,
                               False)
    else:
        acc, l_i = _attend(Q, K, V, qdesc, kdesc, vdesc, Q8, K8, SQ, SK, q8desc, k8desc,
                           sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                           b, h, m0, skip, nu, nu1, u2, na, na1, na2, a1, a2, a3, offs_m, offs_n, offs_d, lo, hi,
                           H, L, T, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, USE_TMA, FLAT, IEEE, INTERP, WS, False)

    # ---- epilogue (padding rows may hold 0/0; they are never stored) ----
    o = acc / l_i[:, None]
    o_ptrs = O + (b.to(tl.int64) * sob + h.to(tl.int64) * soh) + offs_m[:, None] * sol + offs_d[None, :] * sod
    if ZERO_SKIP:
        # functional API: a skipped head's rows come back as zeros (its programs run no key tile: acc = 0, l = 0)
        o = tl.where(skip, 0.0, o)
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m < L)[:, None])
    else:
        # in-place API: a skipped head keeps what `out` held (the caller's cached output)
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m < L)[:, None] & (skip == 0))


@triton.jit
def _order_kernel(HW, ORDER, H, H_PAD: tl.constexpr):
    slot = tl.program_id(0)
    tl.store(ORDER + slot, _head_for_slot(HW, slot, H, H_PAD))


def _head_order(head_window: torch.Tensor) -> torch.Tensor:
    """Heavy-first head order the kernel uses (for tests and the benchmark)."""
    H = head_window.shape[0]
    order = torch.empty(H, dtype=torch.int32, device=head_window.device)
    _order_kernel[(H,)](head_window, order, H, H_PAD=max(triton.next_power_of_2(H), 2))
    return order


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Largest head count of one launch: every program ranks all heads in an H_PAD x H_PAD register tile.
MAX_HEADS = 128
#: Opt-in shared memory per block (bytes) of the architectures `_arch_config` knows; a config must fit.
SMEM_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
              (10, 0): 232448, (12, 0): 101376}


def _arch_config(capability: tuple[int, int], head_dim: int, dtype: torch.dtype) -> dict:
    """Launch parameters for a GPU of compute `capability` (pure: no device needed; bench/compile_archs.py
    compiles every entry for its architecture without the GPU). Only sm90 is tuned by measurement
    (bench/bench_arrow.py --sweep on an H200). The others were chosen on 2026-11-28 from compiles alone (never run):
    fit the architecture's shared memory, few or no register spills in ptxas -v (kernels/NOTES.md)."""
    major, minor = capability
    if dtype == torch.float32:  # tests only (IEEE products)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if major == 9:  # Hopper: TMA loads; warp specialisation of the key loops at D = 128
        if head_dim <= 64:  # 64x64 tiles: 2x the CTAs at SD3 sizes, finer band tiles
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=True, WS=True)
    if major == 10:  # datacenter Blackwell (sm100/sm103, 228 KB shared memory; Triton emits tcgen05)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    # sm80 / sm86 / sm89 / sm120 (mma.sync, pointer loads; 100-164 KB shared memory): 64 x 64 tiles of 4 warps. The
    # former 128-row tiles of 4 warps spilled at D = 128 (sm80: 44 KB of spills; sm86: 0.7-4 KB); 64 x 64 spills at
    # most 64 B and leaves room for 2 stages at D = 128 (56 KB) and 3 at D <= 64 (40 KB) within sm86's 99 KB.
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3 if head_dim <= 64 else 2)


def _default_config(device: torch.device, head_dim: int, dtype: torch.dtype, seq_len: int = 0) -> dict:
    """Launch parameters for `device`. The interpreter (tests): small tiles, so that short sequences cross many
    tile edges; larger ones for long sequences (the interpreter's cost is per tile, not per element)."""
    if device.type != "cuda" or _interpreting():
        if seq_len >= 256:  # 64 / 128 / 256-token tiles from 256 / 512 / 768 tokens
            t = 256 if seq_len >= 768 else 128 if seq_len >= 512 else 64
            return dict(BLOCK_M=t, BLOCK_N=t, num_warps=4, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    return _arch_config(torch.cuda.get_device_capability(device), head_dim, dtype)


def _strides_4d(x: torch.Tensor, layout: str, H: int, D: int) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) element strides of q/k/v/out for either layout."""
    if layout == "bhld":
        return tuple(x.stride())  # type: ignore[return-value]
    sb, sl, sc = x.stride()
    return (sb, D * sc, sl, sc)


def _geometry(q: torch.Tensor, H: int, layout: str) -> tuple[int, int, int]:
    """(B, L, D) of q in `layout` (shapes only)."""
    if layout == "bhld":
        return q.shape[0], q.shape[2], q.shape[3]
    return q.shape[0], q.shape[1], q.shape[2] // max(H, 1)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: str = "bhld",
                       device_check: bool = True) -> str | None:
    """Why this kernel cannot run attention on these inputs (None: it can), from shapes, strides, dtypes and
    devices only (no device sync). Callers route such calls elsewhere; `arrow_attention_triton` raises."""
    if layout not in ("bhld", "blhd_flat"):
        return f"layout {layout!r} (the kernel takes 'bhld' or 'blhd_flat')"
    want_dim = 4 if layout == "bhld" else 3
    if any(x.dim() != want_dim for x in (q, k, v)):
        return f"q, k, v are not {want_dim}-D for layout {layout!r}"
    if not (q.shape == k.shape == v.shape):
        return f"q, k, v differ in shape ({tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; Lq != Lk?)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (the kernel takes one of float16, bfloat16, float32)"
    if device_check:
        if not (q.device == k.device == v.device):
            return "q, k, v are on different devices"
        if q.device.type != "cuda" and not _interpreting():
            return f"tensors on {q.device.type} (the kernel needs CUDA, or TRITON_INTERPRET=1)"
        if q.device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(q.device) < (8, 0):
            return "a GPU below sm80 (the kernel needs bf16/fp16 mma.sync of sm80 or later)"
    if not 1 <= heads <= MAX_HEADS:
        return f"{heads} heads (the kernel takes 1..{MAX_HEADS})"
    if layout == "blhd_flat" and q.shape[-1] % heads:
        return f"last dim {q.shape[-1]} is not a multiple of {heads} heads"
    if layout == "bhld" and q.shape[1] != heads:
        return f"q has {q.shape[1]} heads, the head table {heads}"
    B, L, D = _geometry(q, heads, layout)
    if D not in _SUPPORTED_HEAD_DIMS:
        return f"head_dim {D} (the kernel takes {', '.join(map(str, _SUPPORTED_HEAD_DIMS))})"
    for x in (q, k, v):
        if layout == "blhd_flat" and x.stride(-1) != 1:
            return "blhd_flat tensors need a contiguous last dim"
        # rows inside one (batch, head) are addressed with 32-bit offsets (batch and head bases are 64-bit)
        st = _strides_4d(x, layout, heads, D)
        if (L - 1) * abs(st[2]) + (D - 1) * abs(st[3]) >= 2**31:
            return "a (batch, head) slice spans more than 2^31 elements"
    return None


def _validate(q, k, v, head_window, txt_len, layout, out):
    """Shapes, dtypes, devices and txt_len of a launch; returns (B, H, L, D). Raises ValueError."""
    if layout not in ("bhld", "blhd_flat"):
        raise ValueError(f"layout must be 'bhld' or 'blhd_flat', got {layout!r}")
    if head_window.dtype != torch.int32 or head_window.dim() != 1:
        raise ValueError(f"head_window must be a 1-D int32 tensor [H], got {head_window.dtype} "
                         f"{tuple(head_window.shape)}")
    H = head_window.shape[0]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != (4 if layout == "bhld" else 3):
            raise ValueError(f"{name} must be {4 if layout == 'bhld' else 3}-D for layout {layout!r}, got shape "
                             f"{tuple(x.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (Lq == Lk), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.device == k.device == v.device == head_window.device):
        raise ValueError(f"q, k, v and head_window must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {head_window.device}")
    if layout == "bhld" and q.shape[1] != H:
        raise ValueError(f"head_window has {H} entries but q has {q.shape[1]} heads")
    if layout == "blhd_flat" and (H == 0 or q.shape[-1] % H):
        raise ValueError(f"blhd_flat: last dim {q.shape[-1]} is not a multiple of the {H} heads in head_window")
    B, L, D = _geometry(q, H, layout)
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} not supported; expected one of {_SUPPORTED_HEAD_DIMS}")
    why = unsupported_reason(q, k, v, H, layout, device_check=False)
    if why is not None:
        raise ValueError(f"the arrow kernel cannot run this call: {why}")
    if not 0 <= int(txt_len) <= L:
        raise ValueError(f"txt_len must be in [0, L={L}], got {txt_len}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
                         f"{tuple(out.shape)}, {out.dtype}, {out.device}")
    if out is not None and layout == "blhd_flat" and out.stride(-1) != 1:
        raise ValueError(f"blhd_flat: out must have a contiguous last dim, got strides {out.stride()}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"tensors are on {q.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
    return B, H, L, D


def _tma_ok(xs) -> bool:
    """TMA descriptor rules: 16-byte aligned base and 16-byte multiples for every stride but the last (= 1)."""
    for x in xs:
        if x.stride(-1) != 1 or x.data_ptr() % 16:
            return False
        if any((s * x.element_size()) % 16 for s in x.stride()[:-1]):
            return False
    return True


def _descriptor(x, layout: str, H: int, D: int, block_rows: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    if layout == "bhld":
        B, Hh, L, _ = x.shape
        return TensorDescriptor(x, [B, Hh, L, D], list(x.stride()), [1, 1, block_rows, D])
    B, L, _ = x.shape
    sb, sl, _ = x.stride()
    return TensorDescriptor(x, [B, L, H, D], [sb, sl, D, 1], [1, block_rows, 1, D])


class _QuantBuffers:
    """Workspace of the FP8 pre-pass for one geometry (B, H, L, D), query tile and device: e4m3 Q and K, fp32 scales
    (one per query tile of Q; per token of K) and K's per-channel means. Under the interpreter the "e4m3" buffers
    are fp32 holding e4m3 values (see `_to_fp8`)."""

    __slots__ = ("q8", "k8", "sq", "sk", "km", "block_m")

    def __init__(self, B: int, H: int, L: int, D: int, block_m: int, device: torch.device, interp: bool) -> None:
        dt = torch.float32 if interp else torch.float8_e4m3fn
        self.block_m = block_m
        self.q8 = torch.empty((B, H, L, D), dtype=dt, device=device)
        self.k8 = torch.empty((B, H, L, D), dtype=dt, device=device)
        self.sq = torch.empty((B, H, triton.cdiv(L, block_m)), dtype=torch.float32, device=device)
        # one row of K scales per (batch, head), padded to a multiple of 4 floats: 16-byte rows for kernel v3's TMA
        self.sk = torch.empty((B, H, (L + 3) // 4 * 4), dtype=torch.float32, device=device)
        self.km = torch.empty((B, H, D), dtype=torch.float32, device=device)

    def descriptors(self, BN: int) -> list:
        from triton.tools.tensor_descriptor import TensorDescriptor

        B, H, L, D = self.q8.shape
        return [TensorDescriptor(self.q8, [B, H, L, D], list(self.q8.stride()), [1, 1, self.block_m, D]),
                TensorDescriptor(self.k8, [B, H, L, D], list(self.k8.stride()), [1, 1, BN, D])]


_WORKSPACES: dict = {}


def _workspace(B: int, H: int, L: int, D: int, block_m: int, device: torch.device, interp: bool) -> _QuantBuffers:
    """One FP8 workspace per geometry and device (every layer of a model shares it; launches on one stream are
    ordered, so reuse is safe)."""
    key = (B, H, L, D, block_m, device, interp)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if len(_WORKSPACES) >= 8:
            _WORKSPACES.clear()
        ws = _WORKSPACES[key] = _QuantBuffers(B, H, L, D, block_m, device, interp)
    return ws


def _fp8_capable(device: torch.device) -> bool:
    """The FP8 path can run: e4m3 tensor cores (compute capability 8.9+; `kernels.quant.fp8_supported` is the
    pack-wide rule, restated here because this file loads standalone) or the interpreter (tests)."""
    if _interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _kernel_args(q, k, v, out, head_window, txt_len: int, layout: str, sm_scale, cfg: dict, *, use_tma: bool,
                 interp: bool, zero_skip: bool, head_quant=None, quant: _QuantBuffers | None = None):
    """(grid, positional args, launch options) of `_arrow_fwd` for these tensors and config: the one place that
    turns a call into kernel arguments (`_launch` and the target compile check `_compile_for_target` share it).
    `quant` (with `head_quant`): the FP8 variant, reading the pre-pass's buffers."""
    H = head_window.shape[0]
    B, L, D = _geometry(q, H, layout)
    cfg = dict(cfg)
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    cfg.pop("TMA", None)
    ws = bool(cfg.pop("WS", False)) and not interp
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    descs = [_descriptor(x, layout, H, D, bm) for x, bm in ((q, BM), (k, BN), (v, BN))] if use_tma else [None] * 3
    if quant is not None:
        assert quant.block_m == BM, "the pre-pass scales Q per query tile of the kernel"
        qbufs = [quant.q8, quant.k8, quant.sq, quant.sk]
        qdescs = quant.descriptors(BN) if use_tma else [None] * 2
    else:  # unused pointers (QUANT is a constexpr: the bf16 variant has no FP8 code)
        qbufs, qdescs = [q] * 4, [None] * 2
    grid = (max(triton.cdiv(L, BM) * B * H, 1), 1, 1)
    args = (
        q, k, v, out, head_window, head_window if head_quant is None else head_quant, *descs, *qbufs, *qdescs,
        *_strides_4d(q, layout, H, D), *_strides_4d(k, layout, H, D),
        *_strides_4d(v, layout, H, D), *_strides_4d(out, layout, H, D),
        B, H, L, int(txt_len), float(sm_scale) * _LOG2E,
        D, BM, BN, max(triton.next_power_of_2(H), 2),
        use_tma, layout == "blhd_flat", q.dtype == torch.float32 or interp, interp, ws, zero_skip, quant is not None,
    )
    return grid, args, cfg  # cfg now holds num_warps, num_stages


class _Plan:
    """Everything a launch needs that depends only on the cache key (shapes, strides, dtypes, devices,
    alignment, txt_len, sm_scale, layout, config): validated once, reused with new base pointers."""

    __slots__ = ("grid", "tail", "opts", "descs", "runner", "empty", "device_index", "qstep")


_PLANS: dict = {}
_PLANS_MAX = 256
_TAIL = 6  # positional args of `_arrow_fwd` that change per call: q, k, v, out, head_window, head_quant


def _plan_key(q, k, v, head_window, txt_len, layout, sm_scale, out, config, use_tma, zero_skip, quant=False):
    cfg_key = None if config is None else tuple(sorted(config.items()))
    o_key = None if out is None else (out.shape, out.stride(), out.dtype, out.device, out.data_ptr() % 16)
    dev = q.device
    cur = torch.cuda.current_device() if dev.type == "cuda" else -1
    return (layout, txt_len, sm_scale, cfg_key, use_tma, zero_skip, quant, cur,
            q.shape, q.stride(), q.dtype, dev, q.data_ptr() % 16,
            k.shape, k.stride(), k.dtype, k.device, k.data_ptr() % 16,
            v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16,
            head_window.shape, head_window.dtype, head_window.device, head_window.data_ptr() % 16, o_key)


def _build_plan(q, k, v, head_window, txt_len, layout, sm_scale, out, config, use_tma, zero_skip, head_quant=None):
    B, H, L, D = _validate(q, k, v, head_window, txt_len, layout, out)
    if head_quant is not None and (head_quant.dtype != torch.int32 or head_quant.shape != head_window.shape
                                   or head_quant.device != head_window.device):
        raise ValueError(f"head_quant must be an int32 tensor like head_window ({tuple(head_window.shape)}, "
                         f"{head_window.device}), got {head_quant.dtype} {tuple(head_quant.shape)} {head_quant.device}")
    plan = _Plan()
    plan.runner = None
    plan.device_index = q.device.index
    plan.empty = B * H * L == 0
    if out is None:
        out = torch.empty_like(q)  # same strides as the tensor each later call allocates (key has q's)
    cfg = dict(config) if config is not None else _default_config(q.device, D, q.dtype, L)
    interp = _interpreting()
    use_tma = cfg.get("TMA", False) if use_tma is None else use_tma
    use_tma = (bool(use_tma) and not plan.empty and q.device.type == "cuda" and not interp
               and torch.cuda.get_device_capability(q.device) >= (9, 0) and _tma_ok((q, k, v)))
    plan.qstep = None
    if head_quant is not None and not plan.empty:
        plan.qstep = _QuantStep(q, k, layout, B, H, L, D, cfg["BLOCK_M"], sm_scale, interp)
    plan.grid, args, plan.opts = _kernel_args(q, k, v, out, head_window, txt_len, layout, sm_scale, cfg,
                                              use_tma=use_tma, interp=interp, zero_skip=zero_skip,
                                              head_quant=head_quant,
                                              quant=None if plan.qstep is None else plan.qstep.quant)
    plan.tail = args[_TAIL:]
    descs = list(args[_TAIL:_TAIL + 3])
    plan.descs = descs if use_tma else None
    for d in descs:  # the plan keeps no caller tensor alive (the FP8 descriptors point at the plan's workspace)
        if d is not None:
            d.base = None
    return plan


def _bhld_view(x: torch.Tensor, H: int, layout: str) -> torch.Tensor:
    if layout == "bhld":
        return x
    return x.unflatten(-1, (H, x.shape[-1] // H)).transpose(1, 2)


class _QuantStep:
    """The FP8 pre-pass of one plan (Triton kernel or kernel v3): its workspace (`quant`), launch grid, the arguments
    of `_quant_fwd` after (Q, K, HQ) with its three constexprs last (`qtail`), the cached launcher, the [B, H, L, D]
    view of the caller's layout."""

    __slots__ = ("quant", "qgrid", "qtail", "qrunner", "views", "device_index")

    def __init__(self, q, k, layout: str, B: int, H: int, L: int, D: int, block_m: int, sm_scale, interp: bool):
        self.quant = qb = _workspace(B, H, L, D, block_m, q.device, interp)
        sm = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
        self.qgrid = (triton.cdiv(L, block_m), B * H, 1)
        self.qtail = (qb.km, qb.q8, qb.k8, qb.sq, qb.sk, *_strides_4d(q, layout, H, D), *_strides_4d(k, layout, H, D),
                      H, L, sm * _LOG2E, D, block_m, interp)
        self.qrunner = None
        self.views = lambda x: _bhld_view(x, H, layout)
        self.device_index = q.device.index


def _quantize(step: _QuantStep, q, k, head_quant) -> None:
    """The FP8 pre-pass: K's per-channel mean (one reduction over the tokens), then one kernel that quantizes the
    FP8 heads' Q and K into the step's workspace."""
    torch.mean(step.views(k), dim=2, dtype=torch.float32, out=step.quant.km)
    runner = step.qrunner
    if runner:
        runner(q, k, head_quant, *step.qtail, stream=torch._C._cuda_getCurrentRawStream(step.device_index))
        return
    D, blk, interp = step.qtail[-3:]
    compiled = _quant_fwd[step.qgrid](q, k, head_quant, *step.qtail[:-3], HEAD_DIM=D, BLOCK=blk, INTERP=interp)
    if compiled is not None and not interp and q.device.type == "cuda":
        step.qrunner = getattr(compiled, "__getitem__", lambda grid: None)(step.qgrid)


_fp8_warned = False

#: Hopper, head_dim 128, fp16/bf16 calls run kernel v3 (kernels/arrow_gluon.py, Gluon: producer warp + two consumer
#: warpgroups in ping-pong; FP8 heads included) unless DFAV2_KERNEL=triton; everything else and explicit configs
#: (tests, bench variants) run `_arrow_fwd` here. False after a failure (warned once; the call then runs here).
GLUON = os.environ.get("DFAV2_KERNEL", "").lower() != "triton"
_gluon_mod = None


def _gluon():
    """kernels/arrow_gluon.py, loaded from this file's folder (both files also load standalone); None without Gluon."""
    global _gluon_mod
    if _gluon_mod is None:
        import importlib.util

        try:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arrow_gluon.py")
            spec = importlib.util.spec_from_file_location("_dfav2_arrow_gluon", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _gluon_mod = mod
        except Exception:  # noqa: BLE001 - no Gluon in this Triton: the Triton kernel serves every call
            _gluon_mod = False
    return _gluon_mod or None


def _gluon_plan(q, k, v, head_window, txt_len, layout, sm_scale, out, zero_skip, head_quant=None):
    """Kernel v3's launch plan for this call -- (plan, FP8 pre-pass or None) -- or None where it does not apply (the
    Triton kernel runs it)."""
    H = head_window.shape[0]
    B, L, D = _geometry(q, H, layout)
    g = _gluon()
    if g is None or not g.supported(q, D, H) or B * H * L == 0:
        return None
    _validate(q, k, v, head_window, txt_len, layout, out)
    o = torch.empty_like(q) if out is None else out
    if not _tma_ok((q, k, v, o)):
        return None
    step = None if head_quant is None else _QuantStep(q, k, layout, B, H, L, D, g.BLOCK_M, sm_scale, False)
    return g.build(q, k, v, o, H, L, B, txt_len, layout, sm_scale, zero_skip, None if step is None else step.quant), step


def _try_gluon(q, k, v, head_window, txt_len, layout, sm_scale, out, zero_skip, fast, v2_key, head_quant=None):
    """Run the call on kernel v3 if it applies: the output, else None. Its plan is cached beside v2's under
    ("gluon", v2's key) -- None where v3 does not apply, so such calls cost one lookup. A failure disables v3 for the
    process with one warning (the call and all later ones then run on the Triton kernel)."""
    global GLUON
    key = ("gluon", v2_key)
    entry = _PLANS.get(key, False) if fast else False
    try:
        if entry is False:
            entry = _gluon_plan(q, k, v, head_window, txt_len, layout, sm_scale, out, zero_skip, head_quant)
            if fast:
                if len(_PLANS) >= _PLANS_MAX:
                    _PLANS.clear()
                _PLANS[key] = entry
        if entry is None:
            return None
        plan, step = entry
        if out is None:
            out = torch.empty_like(q)
        if step is not None:
            _quantize(step, q, k, head_quant)
        _gluon().launch(plan, q, k, v, out, head_window, head_quant)
        return out
    except ValueError:
        raise  # bad input: the same error the Triton path gives
    except Exception as exc:  # noqa: BLE001 - never fail the attention call for the faster kernel's sake
        GLUON = False
        import warnings

        warnings.warn(f"DiTFastAttnV2: kernel v3 (Gluon) failed ({type(exc).__name__}: {str(exc)[:200]}); using the "
                      "Triton kernel from now on", RuntimeWarning, stacklevel=3)
        return None


def _launch(q, k, v, head_window, txt_len, layout, sm_scale, out, config=None, use_tma=None, fast=True,
            zero_skip=False, head_quant=None):
    """Private launcher (tests and the benchmark pass explicit configs here).

    The first call for a key (shapes, strides, dtypes, devices, 16-byte alignment, txt_len, sm_scale,
    layout, config) validates the inputs, builds the TMA descriptors and launches through Triton's JIT
    (compiling if needed); later calls with the same key re-point the cached descriptors at the new
    tensors and call the compiled kernel's launcher directly. fast=False: rebuild the plan every call.
    zero_skip: skipped heads are written as zeros instead of being left alone. head_quant: per-head FP8 flags.
    """
    global _fp8_warned
    txt_len = int(txt_len)
    if head_quant is not None and not _fp8_capable(q.device):
        if not _fp8_warned:
            _fp8_warned = True
            import warnings
            warnings.warn("DiTFastAttnV2: this GPU has no FP8 tensor cores (needs compute capability 8.9+); FP8 heads "
                          "run in bf16", RuntimeWarning, stacklevel=3)
        head_quant = None
    key = _plan_key(q, k, v, head_window, txt_len, layout, sm_scale, out, config, use_tma, zero_skip,
                    head_quant is not None)
    if GLUON and config is None and use_tma is None and q.device.type == "cuda" and not _interpreting():
        res = _try_gluon(q, k, v, head_window, txt_len, layout, sm_scale, out, zero_skip, fast, key, head_quant)
        if res is not None:
            return res
    plan = _PLANS.get(key) if fast else None
    if plan is None:
        plan = _build_plan(q, k, v, head_window, txt_len, layout, sm_scale, out, config, use_tma, zero_skip,
                           head_quant)
        if fast:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            _PLANS[key] = plan
    if out is None:
        out = torch.empty_like(q)
    if plan.empty:
        return out
    if plan.qstep is not None:
        _quantize(plan.qstep, q, k, head_quant)
    hq = head_window if head_quant is None else head_quant
    descs = plan.descs
    if descs is not None:
        descs[0].base = q
        descs[1].base = k
        descs[2].base = v
    try:
        runner = plan.runner  # None: not built yet; False: the direct launcher failed once, use the JIT path
        if runner:
            try:
                runner(q, k, v, out, head_window, hq, *plan.tail,
                       stream=torch._C._cuda_getCurrentRawStream(plan.device_index))
            except (TypeError, AttributeError):
                # The compiled launcher is Triton-internal API: if a Triton release changes it, fall back to
                # the JIT launch (slower host path, same kernel) instead of failing the attention call.
                plan.runner = runner = False
        if not runner:
            compiled = _arrow_fwd[plan.grid](q, k, v, out, head_window, hq, *plan.tail, **plan.opts)
            if runner is None and fast and compiled is not None and not _interpreting() and q.device.type == "cuda":
                plan.runner = getattr(compiled, "__getitem__", lambda grid: None)(plan.grid)
    finally:
        if descs is not None:
            descs[0].base = descs[1].base = descs[2].base = None
    return out


def _compile_for_target(capability: tuple[int, int], *, B: int, H: int, L: int, T: int, D: int,
                        dtype: torch.dtype = torch.bfloat16, layout: str = "bhld", config: dict | None = None,
                        zero_skip: bool = False, quant: bool = False):
    """Compile `_arrow_fwd` for an NVIDIA GPU of compute `capability` exactly as `_launch` would call it there
    (same config choice, argument list and Triton specialisation: ints equal to 1 become constants, multiples
    of 16 get divisibility hints), without a GPU and without launching: CPU tensors stand in for the inputs
    (only shapes, strides, dtypes and alignment matter). Returns Triton's CompiledKernel (asm: ttgir, ptx,
    cubin; metadata.shared: shared memory bytes). Uses Triton-internal API (3.6): a check tool, not a launch
    path. Triton and this module must have been imported with TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _arrow_fwd
    if not (hasattr(fn, "params") and hasattr(tl.standard.sum, "params")):
        # Triton decorates its own library (tl.sum, ...) when it is first imported: both must be real JIT functions
        raise RuntimeError("Triton or this module was loaded under TRITON_INTERPRET=1; compile in a process that "
                           "imports Triton with it unset")
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    backend = make_backend(target)
    x = torch.empty((B, H, L, D) if layout == "bhld" else (B, L, H * D), dtype=dtype)
    hw = torch.empty(H, dtype=torch.int32)
    cfg = dict(config) if config is not None else _arch_config(capability, D, dtype)
    use_tma = bool(cfg.get("TMA", False)) and capability >= (9, 0) and _tma_ok((x,))
    qb = _QuantBuffers(B, H, L, D, cfg["BLOCK_M"], torch.device("cpu"), False) if quant else None
    _, args, opts = _kernel_args(x, x, x, x, hw, T, layout, None, cfg, use_tma=use_tma, interp=False,
                                 zero_skip=zero_skip, head_quant=hw if quant else None, quant=qb)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **opts)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def arrow_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_window: torch.Tensor,
                           txt_len: int, *, layout: str = "bhld", sm_scale: float | None = None,
                           out: torch.Tensor | None = None, zero_skip: bool = False,
                           head_quant: torch.Tensor | None = None) -> torch.Tensor:
    """Head-wise arrow attention for a text-first sequence, all heads of a layer in one launch (the kernel
    entry point; the public, torch.compile-able API is `kernels.attention.arrow_attention`).

    Parameters
    ----------
    q, k, v : Tensor
        ``layout="bhld"``: ``[B, H, L, D]`` (any strides, e.g. ComfyUI Flux views);
        ``layout="blhd_flat"``: ``[B, L, H*D]`` (ComfyUI SD3; last dim contiguous), read through strides,
        never copied. float16 / bfloat16 (float32 for tests), one CUDA device (or CPU under
        ``TRITON_INTERPRET=1``). ``L = txt_len + N``: text tokens first. ``D`` in {16, 32, 64, 128};
        ``H <= MAX_HEADS``. `unsupported_reason` says why other inputs are refused.
    head_window : Tensor
        int32 ``[H]`` on the same device, per head: ``-1`` full attention; ``-2`` skip (cached head:
        nothing is written for it); ``w >= 0`` arrow with half-width ``w`` tokens, i.e.
        ``keep(q, k) = q < T or k < T or |q - k| <= w`` (token-exact). Never read on the host.
    txt_len : int
        Number of text tokens ``T`` (0 allowed).
    sm_scale : float, optional
        Softmax scale; ``None`` means ``1 / sqrt(D)``.
    out : Tensor, optional
        Same shape, dtype and layout as ``q``; written in place. Skipped heads keep what it held (the
        caller pre-fills the cache there). If ``None`` a new tensor is returned whose skipped heads are
        uninitialised (zeros with ``zero_skip``).
    zero_skip : bool
        Write zeros for skipped heads instead of leaving them alone.
    head_quant : Tensor, optional
        int32 ``[H]`` beside `head_window`: ``1`` runs that head's Q.K^T in FP8 (e4m3, one scale per query tile of
        Q, per-token scales of mean-smoothed K, fp32 accumulation; P.V stays in the input dtype; the scheme of
        `kernels.quant`), ``0`` all in the input dtype; both kinds in one launch, after one quantization pre-pass.
        On a GPU without FP8 tensor cores (below sm89) every head runs in the input dtype (warned once).

    Returns
    -------
    Tensor in the input layout and dtype (fp32 accumulation).
    """
    return _launch(q, k, v, head_window, txt_len, layout, sm_scale, out, zero_skip=zero_skip, head_quant=head_quant)
