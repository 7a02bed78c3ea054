"""Triton templates of the NSA backward.

Each branch c's output is o_c = softmax(q kᵀ) v and the op's output is Σ g_c o_c, so with
P the recomputed probabilities (from the forward's lse), dO the output gradient and
D_c = rowsum(dO ∘ o_c) (= the gate's gradient):
    dV = (g P)ᵀ dO,   dS = g P ∘ (dO Vᵀ − D_c),   dQ = scale · dS K,   dK = scale · dSᵀ Q.
The gate is one factor per row, so no gated copy of dO is made.

Every gradient element is written by exactly one program of each kernel, and the kernels run
one after another (adding into fp32 buffers), so results are the same run to run: no atomics.
The compressed and window branches share two kernels — key c sits at position
c * KEY_STRIDE + KEY_LAST (compressed: c·d + l − 1; window: c) and is seen by queries
t >= that position (and t < position + WINDOW when WINDOW > 0). The selected branch's dK/dV
kernel walks, per key block, the list of queries that chose it (the inverted selection), long
lists in chunks whose partial sums a small kernel adds in a fixed order; at small groups it
also writes each (query, slot) pair's share of dQ, which a merge kernel sums per query.
"""
import triton
import triton.language as tl

from .nsa_common import (LOG2E, gqa_rows, gqa_rows_by_head, jit_kernel, key_value_tiles,
                          load_gate, load_keys, load_rows, load_tile, store_rows)
from .nsa_fwd import merge_slot, merge_tile


@jit_kernel
def nsa_bwd_rows_kernel(DO, OB, LSE, GATES, DGATES, ROWS, n_rows, T,
                        sg_b, sg_h, sg_t, sg_c, sdg_b, sdg_h, sdg_t, sdg_c, fixed0, fixed1, fixed2,
                        NB: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DV: tl.constexpr,
                        DV_PAD: tl.constexpr, HAS_GATES: tl.constexpr, BLOCK: tl.constexpr):
    """Per row and branch c, from the contiguous (B·HQ·T, Dv) output gradient DO, the
    branches' outputs OB (NB, B·HQ·T, Dv) and LSE (NB, B·HQ·T): D_c = Σ_d DO[r, d] ·
    OB[c, r, d] in fp32, the gate's gradient (into DGATES, shaped like GATES, when the gates
    are learned), and the row's (lse in log2 units, D_c, gate weight) into ROWS[c]
    (3, B, H, T, G) fp32 for `_row_stats` (fixed_c: branch c's weight without GATES).

    A program takes BLOCK consecutive entries of ROWS[c]'s layout — a KV head's rows
    position-major, so a tile of positions reads them as one run — and so stores them as one
    run; its loads are whole rows of Dv values, cheap in any order."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # ((b·H + h)·T + t)·G + gh
    live = i < n_rows
    gh = i % G
    tok = (i // G) % T
    bh = i // (G * T)
    b = bh // H
    hq = bh % H * G + gh
    r = (bh * G + gh) * T + tok  # the row of DO: (b·HQ + hq)·T + t
    d = tl.arange(0, DV_PAD)
    mask = live[:, None] & (d < DV)[None, :]
    do = tl.load(DO + r[:, None] * DV + d[None, :], mask=mask, other=0.0).to(tl.float32)
    for c in tl.static_range(NB):
        o = tl.load(OB + (r + c * n_rows)[:, None] * DV + d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        delta = tl.sum(do * o, 1)
        fixed = fixed0
        if c == 1:
            fixed = fixed1
        if c == 2:
            fixed = fixed2
        g = load_gate(GATES, b, hq, tok, live, sg_b, sg_h, sg_t, sg_c, fixed, HAS_GATES, c)
        if HAS_GATES:
            dg = b * sdg_b + hq * sdg_h + tok * sdg_t + c * sdg_c
            tl.store(DGATES + dg, delta.to(DGATES.dtype.element_ty), mask=live)
        lse2 = tl.load(LSE + c * n_rows + r, mask=live, other=0.0) * LOG2E
        out = ROWS + c * 3 * n_rows + i
        tl.store(out, lse2, mask=live)
        tl.store(out + n_rows, delta, mask=live)
        tl.store(out + 2 * n_rows, g, mask=live)


@triton.jit
def _row_stats(ROWS, n_rows, b, h, hq, tok, ok, T, H: tl.constexpr, G: tl.constexpr):
    """Per row of KV head h: the branch's lse in log2 units (+inf on dead rows, so P = 0), D_c
    and the gate, from ROWS (3, B, H, T, G) (`nsa_bwd_rows_kernel`)."""
    row = ((b * H + h).to(tl.int64) * T + tok) * G + (hq - h * G)
    lse2 = tl.load(ROWS + row, mask=ok, other=float("inf"))
    delta = tl.load(ROWS + (row + n_rows), mask=ok, other=0.0)
    g = tl.load(ROWS + (row + n_rows + n_rows), mask=ok, other=0.0)
    return lse2, delta, g


@triton.jit
def _probs_and_dscores(q, do, k, v, visible, lse2, delta, g, qk_scale):
    """(g·P, dS) of one (rows × keys) tile; q (M, Dk), do (M, Dv), k (K, Dk), v (K, Dv)."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0) * g[:, None]
    dp = tl.dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@triton.jit
def _probs_and_dscores_by_key(k, v, q, do, visible, lse2, delta, g, qk_scale):
    """(g·P, dS) of one tile transposed, (keys × rows), for the dK/dV kernels: visible is
    (keys × rows) too. With the keys as the MMAs' rows, Pᵀ and dSᵀ come out of the MMAs as
    the left operands of dV += Pᵀ·dO and dK += dSᵀ·Q, instead of being transposed through
    shared memory every step."""
    s = tl.dot(k, tl.trans(q)) * qk_scale
    p = tl.where(visible, tl.exp2(s - lse2[None, :]), 0.0) * g[None, :]
    dp = tl.dot(v, tl.trans(do))
    return p, p * (dp - delta[None, :])


@jit_kernel
def nsa_dense_bwd_dq_kernel(
        Q, K, V, K_TILES, V_TILES, DO, ROWS, DQ_SUM, DQ_OUT,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        so_b, so_h, so_t, so_d, sdq_b, sdq_h, sdq_t, sdq_d,
        T, n_keys, n_rows, scale,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr, KEY_STRIDE: tl.constexpr, KEY_LAST: tl.constexpr,
        WINDOW: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr):
    """dQ of the compressed or window branch for one (batch, KV head, query tile), added (with
    ACCUMULATE) to the fp32 sum DQ_SUM of the kernels before and stored in DQ_OUT: DQ_SUM
    itself, or the gradient in the input dtype when no kernel adds to dQ after this one
    (`accumulate_into`). K_TILES/V_TILES: the key tiles' sources for `load_tile`."""
    t0 = tl.program_id(0) * BLOCK_T
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tok, hq, ok = gqa_rows(t0, h, T, G, G_PAD, BLOCK_T)
    q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
    do = load_rows(DO, b, hq, tok, ok, so_b, so_h, so_t, so_d, DV, DV_PAD)
    lse2, delta, g = _row_stats(ROWS, n_rows, b, h, hq, tok, ok, T, H, G)
    qk_scale = scale * LOG2E
    last = tl.minimum(t0 + BLOCK_T, T) - 1
    hi = tl.minimum((last - KEY_LAST + KEY_STRIDE) // KEY_STRIDE, n_keys)  # keys c < hi
    lo = 0
    if WINDOW > 0:
        lo = (t0 - WINDOW + 1 - KEY_LAST) // KEY_STRIDE
        lo = lo * (lo > 0) // BLOCK_K * BLOCK_K
    dq = tl.zeros([BLOCK_T * G_PAD, DK_PAD], tl.float32)
    for c0 in range(lo, hi, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        live = c < n_keys
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, c0, n_keys, sk_b, sk_h, sk_t, sk_d,
                               sv_b, sv_h, sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, True, TMA)
        pos = c * KEY_STRIDE + KEY_LAST
        visible = (pos[None, :] <= tok[:, None]) & live[None, :]
        if WINDOW > 0:
            visible = visible & (pos[None, :] > tok[:, None] - WINDOW)
        p, ds = _probs_and_dscores(q, do, k, v, visible, lse2, delta, g, qk_scale)
        dq += tl.dot(ds.to(k.dtype), k)
    dq = accumulate_into(DQ_SUM, dq * scale, b, hq, tok, ok, sdq_b, sdq_h, sdq_t, sdq_d, DK,
                         DK_PAD, ACCUMULATE)
    store_rows(DQ_OUT, dq, b, hq, tok, ok, sdq_b, sdq_h, sdq_t, sdq_d, DK, DK_PAD, False)


@triton.jit
def accumulate_into(SUM, x, b, hq, tok, ok, s_b, s_h, s_t, s_d, D: tl.constexpr,
                    D_PAD: tl.constexpr, ACCUMULATE: tl.constexpr):
    """x plus, with ACCUMULATE, the fp32 rows SUM[b, hq, tok, :] the kernels before wrote (hq
    may be one head for all rows, as in `store_rows`): the last kernel adding to a gradient
    can store the sum straight in the input dtype, with no cast pass over the fp32 buffer."""
    if ACCUMULATE:
        d = tl.arange(0, D_PAD)
        row = b.to(tl.int64) * s_b + hq.to(tl.int64) * s_h + tok.to(tl.int64) * s_t
        x += tl.load(SUM + row[:, None] + d[None, :] * s_d, mask=ok[:, None] & (d < D)[None, :],
                     other=0.0)
    return x


@jit_kernel
def nsa_dense_bwd_dkdv_kernel(
        Q, K, V, DO, Q_TILES, DO_TILES, ROWS, DK_SUM, DV_SUM, DK_OUT, DV_OUT,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        so_b, so_h, so_t, so_d,
        sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
        T, n_keys, n_rows, q_chunk, split_stride, scale,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr, KEY_STRIDE: tl.constexpr, KEY_LAST: tl.constexpr,
        WINDOW: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr):
    """dK, dV of the compressed or window branch for one (batch, KV head, key tile, query
    chunk): walks the query tiles of chunk program_id(2) (queries [s·q_chunk, (s+1)·q_chunk),
    q_chunk a multiple of BLOCK_T) that see the tile's keys; the whole GQA group is summed in
    each MMA (rows head-major: with TMA a tile's q and dO are one (G_PAD, BLOCK_T) block copy
    each, Q_TILES/DO_TILES). Chunk s writes its partial sums split_stride elements after
    chunk s - 1's, so the long compressed-key walk is spread over more programs and summed in
    a fixed order. With ACCUMULATE the fp32 sums DK_SUM/DV_SUM of the kernels before are
    added and DK_OUT/DV_OUT may be the gradients in the input dtype (`accumulate_into`)."""
    c = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    q_lo = tl.program_id(2) * q_chunk
    split = tl.program_id(2).to(tl.int64) * split_stride
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    live = c < n_keys
    k = load_keys(K, b, h, c, live, sk_b, sk_h, sk_t, sk_d, DK, DK_PAD)
    v = load_keys(V, b, h, c, live, sv_b, sv_h, sv_t, sv_d, DV, DV_PAD)
    pos = c * KEY_STRIDE + KEY_LAST
    qk_scale = scale * LOG2E
    first = tl.program_id(0) * BLOCK_K * KEY_STRIDE + KEY_LAST
    lo = tl.maximum(first, q_lo) // BLOCK_T * BLOCK_T
    hi = tl.minimum(T, q_lo + q_chunk)
    if WINDOW > 0:
        hi = tl.minimum(hi, first + (BLOCK_K - 1) * KEY_STRIDE + WINDOW)
    dk = tl.zeros([BLOCK_K, DK_PAD], tl.float32)
    dv = tl.zeros([BLOCK_K, DV_PAD], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        tok, hq, ok = gqa_rows_by_head(t0, h, T, G, G_PAD, BLOCK_T)
        if TMA:  # rows of heads past the group (G < G_PAD) are dead: lse = +inf, P = 0
            q = load_tile(Q, Q_TILES, b, h * G, t0, T, 0, 0, 0, 0, G_PAD, BLOCK_T, DK, DK_PAD,
                          True)
            do = load_tile(DO, DO_TILES, b, h * G, t0, T, 0, 0, 0, 0, G_PAD, BLOCK_T, DV,
                           DV_PAD, True)
        else:
            q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
            do = load_rows(DO, b, hq, tok, ok, so_b, so_h, so_t, so_d, DV, DV_PAD)
        lse2, delta, g = _row_stats(ROWS, n_rows, b, h, hq, tok, ok, T, H, G)
        visible = (pos[:, None] <= tok[None, :]) & live[:, None]
        if WINDOW > 0:
            visible = visible & (pos[:, None] > tok[None, :] - WINDOW)
        p_t, ds_t = _probs_and_dscores_by_key(k, v, q, do, visible, lse2, delta, g, qk_scale)
        dv += tl.dot(p_t.to(do.dtype), do)
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = accumulate_into(DK_SUM, dk * scale, b, h, c, live, sdk_b, sdk_h, sdk_t, sdk_d, DK,
                         DK_PAD, ACCUMULATE)
    dv = accumulate_into(DV_SUM, dv, b, h, c, live, sdv_b, sdv_h, sdv_t, sdv_d, DV, DV_PAD,
                         ACCUMULATE)
    store_rows(DK_OUT + split, dk, b, h, c, live, sdk_b, sdk_h, sdk_t, sdk_d, DK, DK_PAD, False)
    store_rows(DV_OUT + split, dv, b, h, c, live, sdv_b, sdv_h, sdv_t, sdv_d, DV, DV_PAD, False)


@jit_kernel
def nsa_slc_bwd_dq_kernel(
        Q, K, V, K_TILES, V_TILES, DO, IDX, ROWS, DQ,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        so_b, so_h, so_t, so_d, sdq_b, sdq_h, sdq_t, sdq_d,
        T, n_rows, scale,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, LP: tl.constexpr,
        N: tl.constexpr, N_PAD: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr,
        ACCUMULATE: tl.constexpr, TMA: tl.constexpr):
    """dQ of the selected branch for one (batch, KV head, query position): the forward's loop
    over the position's n blocks (IDX (B, H, T, N_PAD), -1 = none)."""
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tok, hq, ok = gqa_rows(t, h, T, G, G_PAD, 1)
    q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
    do = load_rows(DO, b, hq, tok, ok, so_b, so_h, so_t, so_d, DV, DV_PAD)
    lse2, delta, g = _row_stats(ROWS, n_rows, b, h, hq, tok, ok, T, H, G)
    qk_scale = scale * LOG2E
    slots = tl.arange(0, N_PAD)
    blocks = tl.load(IDX + ((b * H + h).to(tl.int64) * T + t) * N_PAD + slots)
    dq = tl.zeros([G_PAD, DK_PAD], tl.float32)
    for s_i in range(N):
        j = tl.sum(tl.where(slots == s_i, blocks, 0))
        pos = j * LP + tl.arange(0, LP)
        live = (pos <= t) & (j >= 0)
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, tl.maximum(j, 0) * LP, T, sk_b,
                               sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, LP, DK, DK_PAD, DV,
                               DV_PAD, True, TMA)
        p, ds = _probs_and_dscores(q, do, k, v, live[None, :], lse2, delta, g, qk_scale)
        dq += tl.dot(ds.to(k.dtype), k)
    store_rows(DQ, dq * scale, b, hq, tok, ok, sdq_b, sdq_h, sdq_t, sdq_d, DK, DK_PAD,
               ACCUMULATE)


@jit_kernel
def nsa_slc_bwd_dkdv_kernel(
        Q, K, V, DO, ROWS, QUERIES, STARTS, PAIRS, SLOTS, DK_OUT, DV_OUT, DK_PART,
        DV_PART, DQ_PART,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        so_b, so_h, so_t, so_d,
        sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
        T, n_blocks, n_rows, q_chunk, scale,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        LP: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr,
        ACCUMULATE: tl.constexpr, FUSE_DQ: tl.constexpr, DQ_HALVES: tl.constexpr):
    """dK, dV of the selected branch for one (chunk s, batch, KV head, selection block j), and
    with FUSE_DQ each (query, slot) pair's share of dQ, dS·K of this block, at row PAIRS[e] of
    DQ_PART (pairs, G, DK; the inputs' dtype) for `nsa_slc_bwd_dq_merge_kernel` to sum in fp32.
    DQ_HALVES forms each share as two (rows × DK_PAD/2) products, one per half of K's columns:
    half the fp32 tile live at once (ptxas then spills less at small groups; at G = 16 it can
    stop serialising the MMAs and spill more instead — a tuning choice, `nsa_configs`).

    QUERIES[STARTS[g] : STARTS[g + 1]], g = (b·H + h)·n_blocks + j, are the positions that chose
    block j in ascending order; they are taken BLOCK_T at a time with their whole GQA group as
    the rows of each MMA, so small groups still fill the tensor cores. A list is cut into chunks
    of q_chunk entries (block 0 is chosen by every query: one program per list would leave it
    running alone): chunk 0 writes DK_OUT/DV_OUT, chunk s >= 1 writes partial slot
    SLOTS[g] + s - 1 of DK_PART/DV_PART ((slots, LP, D) fp32), which
    `nsa_slc_bwd_reduce_kernel` adds in slot order. Axis 0 of the grid is the chunk, so a long
    list's chunks start first.
    """
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    j = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    grp = pid_bh.to(tl.int64) * n_blocks + j
    start = tl.load(STARTS + grp) + s * q_chunk
    end = tl.minimum(tl.load(STARTS + grp + 1), start + q_chunk)
    needed = start < end
    if not ACCUMULATE:
        needed = needed | (s == 0)  # chunk 0 writes every block, zeros where none chose it
    if needed:
        r_k = tl.arange(0, LP)
        pos = j * LP + r_k
        live = pos < T
        k = load_keys(K, b, h, pos, live, sk_b, sk_h, sk_t, sk_d, DK, DK_PAD)
        v = load_keys(V, b, h, pos, live, sv_b, sv_h, sv_t, sv_d, DV, DV_PAD)
        HALF: tl.constexpr = DK_PAD // 2
        if FUSE_DQ and DQ_HALVES:  # K's column halves, the right operands of the two products
            k_lo, k_hi = tl.split(tl.permute(tl.reshape(k, [LP, 2, HALF]), (0, 2, 1)))
        qk_scale = scale * LOG2E
        r = tl.arange(0, BLOCK_T * G_PAD)
        gh = r % G_PAD
        dk = tl.zeros([LP, DK_PAD], tl.float32)
        dv = tl.zeros([LP, DV_PAD], tl.float32)
        for e0 in range(start, end, BLOCK_T):
            e = e0 + r // G_PAD
            tok = tl.load(QUERIES + e, mask=e < end, other=0)
            ok = (e < end) & (gh < G)
            hq = h * G + gh
            q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
            do = load_rows(DO, b, hq, tok, ok, so_b, so_h, so_t, so_d, DV, DV_PAD)
            lse2, delta, g = _row_stats(ROWS, n_rows, b, h, hq, tok, ok, T, H, G)
            visible = (pos[None, :] <= tok[:, None]) & ok[:, None]
            p, ds = _probs_and_dscores(q, do, k, v, visible, lse2, delta, g, qk_scale)
            ds_in = ds.to(q.dtype)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds_in), q)
            if FUSE_DQ:
                pair = tl.load(PAIRS + e, mask=e < end, other=0)
                if DQ_HALVES:
                    store_rows(DQ_PART, tl.dot(ds_in, k_lo) * scale, b, gh, pair, ok, 0, DK,
                               G * DK, 1, HALF, HALF, False)
                    store_rows(DQ_PART + HALF, tl.dot(ds_in, k_hi) * scale, b, gh, pair, ok, 0,
                               DK, G * DK, 1, DK - HALF, HALF, False)
                else:
                    store_rows(DQ_PART, tl.dot(ds_in, k) * scale, b, gh, pair, ok, 0, DK,
                               G * DK, 1, DK, DK_PAD, False)
        if s == 0:
            store_rows(DK_OUT, dk * scale, b, h, pos, live, sdk_b, sdk_h, sdk_t, sdk_d, DK,
                       DK_PAD, ACCUMULATE)
            store_rows(DV_OUT, dv, b, h, pos, live, sdv_b, sdv_h, sdv_t, sdv_d, DV, DV_PAD,
                       ACCUMULATE)
        else:
            slot = tl.load(SLOTS + grp) + s - 1
            store_rows(DK_PART, dk * scale, slot, h, r_k, live, LP * DK, 0, DK, 1, DK, DK_PAD,
                       False)
            store_rows(DV_PART, dv, slot, h, r_k, live, LP * DV, 0, DV, 1, DV, DV_PAD, False)


@jit_kernel
def nsa_slc_bwd_reduce_kernel(
        DK_PART, DV_PART, SLOTS, DK_OUT, DV_OUT,
        sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d, T, n_blocks,
        H: tl.constexpr, LP: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr):
    """DK_OUT/DV_OUT rows of selection block j += its partial slots SLOTS[g] .. SLOTS[g+1] - 1
    (the chunks s >= 1 of `nsa_slc_bwd_dkdv_kernel`), summed in slot order."""
    pid_bh = tl.program_id(0)
    j = tl.program_id(1)
    grp = pid_bh.to(tl.int64) * n_blocks + j
    lo = tl.load(SLOTS + grp)
    hi = tl.load(SLOTS + grp + 1)
    if lo < hi:
        b = pid_bh // H
        h = pid_bh % H
        r = tl.arange(0, LP)
        pos = j * LP + r
        live = pos < T
        dk = tl.zeros([LP, DK_PAD], tl.float32)
        dv = tl.zeros([LP, DV_PAD], tl.float32)
        for i in range(0, hi - lo):  # slot lo + i's rows, as the dK/dV kernel stored them
            slot = lo + i
            dk += load_keys(DK_PART, slot, h, r, live, LP * DK, 0, DK, 1, DK, DK_PAD)
            dv += load_keys(DV_PART, slot, h, r, live, LP * DV, 0, DV, 1, DV, DV_PAD)
        store_rows(DK_OUT, dk, b, h, pos, live, sdk_b, sdk_h, sdk_t, sdk_d, DK, DK_PAD, True)
        store_rows(DV_OUT, dv, b, h, pos, live, sdv_b, sdv_h, sdv_t, sdv_d, DV, DV_PAD, True)


@jit_kernel
def nsa_slc_bwd_dq_merge_kernel(
        IDX, DQ_PART, DQ, sdq_b, sdq_h, sdq_t, sdq_d, T, t_lo, n_pos,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        N: tl.constexpr, N_PAD: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
        ACCUMULATE: tl.constexpr):
    """Selected-branch dQ of positions [t_lo, t_lo + n_pos) for one (batch, KV head, tile):
    the sum, in slot order, of the pairs' shares the fused dK/dV kernel wrote."""
    b, tok, hq, gh, ok, blocks = merge_tile(IDX, T, t_lo, n_pos, H, G, G_PAD, BLOCK_T, N_PAD)
    dq = tl.zeros([BLOCK_T * G_PAD, DK_PAD], tl.float32)
    for s_i in tl.static_range(N):  # unrolled: the n loads in flight at once
        live, pair = merge_slot(blocks, ok, tok - t_lo, n_pos, s_i, N_PAD)
        dq += load_rows(DQ_PART, b, gh, pair, live, 0, DK, G * DK, 1, DK, DK_PAD).to(tl.float32)
    store_rows(DQ, dq, b, hq, tok, ok, sdq_b, sdq_h, sdq_t, sdq_d, DK, DK_PAD, ACCUMULATE)
