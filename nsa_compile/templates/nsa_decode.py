"""Triton kernels of NSA decoding: the last Tq queries of a sequence against a KV cache of T keys.

Flash-decoding in four launches. A program owns one KV head and one query position (a
`row` r of the Tq new queries, at position t = T - Tq + r); its G_PAD rows are the GQA group's
query heads, so each key is read once for the whole group. The work of one position is cut into
*parts*, each a partial softmax (max m, sum l, unnormalised output acc) over a slice of keys:
  1. `nsa_decode_cmp_kernel`: the compressed keys in splits (parts 0 … S-1) with the raw
     compressed scores the selection needs, and the window's segments (the last parts), which
     need no selection and so overlap the splits instead of following the selection;
  2. `nsa_decode_select_kernel`, per tile of selection blocks: the compressed lse from the
     splits' (m, l), each block's importance (overlap weights, summed over the group), the
     forced blocks, and the tile's top-n as packed (score, index) keys — ties go to the lower
     index;
  3. `nsa_decode_attend_kernel`: one part per chosen block (parts S … S+n-1: program u ranks
     all tiles' candidates and takes the u-th);
  4. `nsa_decode_combine_kernel`: each branch's parts merged, gated, summed into o.
Parts live in scratch (B·H, Tq, n_parts, G[, Dv_PAD]): m and l in fp32, the normalised
output in the input's dtype; scores in log2 units (times scale·log2(e)), as in `nsa_fwd`.
Selected blocks and window segments are SEG keys long. Loops of a few independent loads are
unrolled (`tl.static_range`) so the loads are in flight together: these kernels wait on
memory latency more than on bandwidth.
Reference: `naive.nsa_attention_ref` with Tq < T.
"""
import triton
import triton.language as tl

from .nsa_common import (LOG2E, jit_kernel, key_value_tiles, load_gate, load_rows,
                         online_softmax_step, pack_key, unpack_index)


@triton.jit
def _group_rows(G: tl.constexpr, G_PAD: tl.constexpr):
    g = tl.arange(0, G_PAD)
    return g, g < G


@triton.jit
def _store_part(PM, PL, PACC, bh, r, part, Tq, n_parts, m_i, l_i, acc, G: tl.constexpr,
                G_PAD: tl.constexpr, DV_PAD: tl.constexpr, HAS_ACC: tl.constexpr):
    """Part `part` of row r: the group's G rows of (m, l[, acc / l]) into the scratch (the
    output normalised, so PACC may be of the input's dtype)."""
    g, ok = _group_rows(G, G_PAD)
    off = ((bh.to(tl.int64) * Tq + r) * n_parts + part) * G + g
    tl.store(PM + off, m_i, mask=ok)
    tl.store(PL + off, l_i, mask=ok)
    if HAS_ACC:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(PACC + off[:, None] * DV_PAD + tl.arange(0, DV_PAD)[None, :],
                 o.to(PACC.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _query_rows(Q, b, h, r, sq_b, sq_h, sq_t, sq_d, G: tl.constexpr, G_PAD: tl.constexpr,
                DK: tl.constexpr, DK_PAD: tl.constexpr):
    """The group's queries at row r: (G_PAD, DK_PAD), zero past the group."""
    g, ok = _group_rows(G, G_PAD)
    return load_rows(Q, b, h * G + g, r + g * 0, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)


@triton.jit
def _visible_compressed(t, Tc, L: tl.constexpr, D_STRIDE: tl.constexpr):
    """How many compressed blocks position t sees: block i ends at key i·d + l - 1 <= t."""
    return tl.minimum(tl.where(t >= L - 1, (t - L + 1) // D_STRIDE + 1, 0), Tc)


@triton.jit
def _attend_keys(q, qk_scale, K, V, K_TILES, V_TILES, SCORES, score_row, score_ok, n_cols, b,
                 h, lo, hi, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                 G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, N_TILES: tl.constexpr,
                 DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                 HAS_V: tl.constexpr, STORE_SCORES: tl.constexpr, TMA: tl.constexpr):
    """Online softmax of the query rows over keys [lo, hi) (at most N_TILES·BLOCK_N of them):
    (m, l, acc) in log2 units; without HAS_V only (m, l). STORE_SCORES: also
    SCORES[score_row, key] = score for the rows in score_ok (n_cols per row). Tiles come
    through `key_value_tiles` (TMA: K_TILES/V_TILES are descriptors; the keys past hi they
    load are masked out of the scores)."""
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    for i in range(0, N_TILES):
        k0 = lo + i * BLOCK_N
        pos = k0 + tl.arange(0, BLOCK_N)
        ok = pos < hi
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, hi, sk_b, sk_h, sk_t, sk_d,
                               sv_b, sv_h, sv_t, sv_d, BLOCK_N, DK, DK_PAD, DV, DV_PAD, HAS_V,
                               TMA)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        if STORE_SCORES:
            tl.store(SCORES + score_row[:, None] * n_cols + pos[None, :], s,
                     mask=score_ok[:, None] & ok[None, :])
        if HAS_V:
            m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v)
        else:  # the softmax's (m, l) alone: online_softmax_step without its values
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _segment_part(Q, K, V, K_TILES, V_TILES, PM, PL, PACC, b, h, bh, r, lo, hi, Tq, n_parts,
                  part, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                  scale, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  N_TILES: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
                  DV: tl.constexpr, DV_PAD: tl.constexpr, TMA: tl.constexpr):
    """Row r's group over keys [lo, hi) of the cache (a chosen block or a window segment) as
    part `part`."""
    q = _query_rows(Q, b, h, r, sq_b, sq_h, sq_t, sq_d, G, G_PAD, DK, DK_PAD)
    # (K, r, r > 0, 0): placeholders of the score store, which STORE_SCORES=False leaves out
    m_i, l_i, acc = _attend_keys(q, scale * LOG2E, K, V, K_TILES, V_TILES, K, r, r > 0, 0, b, h,
                                 lo, hi, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, G_PAD,
                                 BLOCK_N, N_TILES, DK, DK_PAD, DV, DV_PAD, True, False, TMA)
    _store_part(PM, PL, PACC, bh, r, part, Tq, n_parts, m_i, l_i, acc, G, G_PAD, DV_PAD, True)


@jit_kernel
def nsa_decode_cmp_kernel(Q, KC, VC, KC_TILES, VC_TILES, K, V, K_TILES, V_TILES, SCORES, PM, PL,
                          PACC, T, Tq, Tc, n_parts, n_splits, split, sq_b, sq_h, sq_t, sq_d,
                          skc_b, skc_h, skc_t, skc_d, svc_b, svc_h, svc_t, svc_d,
                          sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, scale,
                          H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                          L: tl.constexpr, D_STRIDE: tl.constexpr, BLOCK_N: tl.constexpr,
                          N_TILES: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
                          DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_CMP: tl.constexpr,
                          HAS_SLC: tl.constexpr, N_SLC: tl.constexpr, SEG: tl.constexpr,
                          SEG_BLOCK_N: tl.constexpr, SEG_TILES: tl.constexpr,
                          WINDOW: tl.constexpr, TMA_CMP: tl.constexpr, TMA: tl.constexpr):
    """Grid (B·H, Tq, S + window segments). Program s < S: split s covers compressed blocks
    [s·split, (s+1)·split) of those the query sees (block i ends at key i·d + l - 1 <= t);
    writes part s and, for the selection, the scores SCORES[bh, r, g, i] (log2 units; blocks
    the query does not see are not written). split = N_TILES·BLOCK_N. Program S + u attends
    to window segment u (keys lo + u·SEG … up to t, lo = max(0, t - WINDOW + 1), or 0 when
    WINDOW is 0: unbounded) as part S + N_SLC + u: it needs no selection. TMA_CMP / TMA: the
    compressed / the cache's tiles come through descriptors."""
    bh, r, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    t = T - Tq + r
    if sp < n_splits:
        n_vis = _visible_compressed(t, Tc, L, D_STRIDE)
        lo = sp * split
        hi = tl.minimum(lo + split, n_vis)
        q = _query_rows(Q, b, h, r, sq_b, sq_h, sq_t, sq_d, G, G_PAD, DK, DK_PAD)
        g, g_ok = _group_rows(G, G_PAD)
        score_row = (bh.to(tl.int64) * Tq + r) * G + g
        m_i, l_i, acc = _attend_keys(q, scale * LOG2E, KC, VC, KC_TILES, VC_TILES, SCORES,
                                     score_row, g_ok, Tc, b, h, lo, hi, skc_b, skc_h, skc_t,
                                     skc_d, svc_b, svc_h, svc_t, svc_d, G_PAD, BLOCK_N, N_TILES,
                                     DK, DK_PAD, DV, DV_PAD, HAS_CMP, HAS_SLC, TMA_CMP)
        _store_part(PM, PL, PACC, bh, r, sp, Tq, n_parts, m_i, l_i, acc, G, G_PAD, DV_PAD,
                    HAS_CMP)
    else:
        u = sp - n_splits
        lo = tl.where(WINDOW > 0, tl.maximum(t - WINDOW + 1, 0), 0) + u * SEG
        _segment_part(Q, K, V, K_TILES, V_TILES, PM, PL, PACC, b, h, bh, r, lo,
                      tl.minimum(lo + SEG, t + 1), Tq, n_parts, n_splits + N_SLC + u, sq_b,
                      sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, scale,
                      G, G_PAD, SEG_BLOCK_N, SEG_TILES, DK, DK_PAD, DV, DV_PAD, TMA)


@triton.jit
def _merge_chunk(PM, PL, PACC, base, c0, p1, d, m_all, l_all, acc, G: tl.constexpr,
                 G_PAD: tl.constexpr, DV_PAD: tl.constexpr, HAS_ACC: tl.constexpr,
                 P_CHUNK: tl.constexpr):
    """(m, l, acc) merged with parts c0 … min(c0 + P_CHUNK, p1) - 1, loaded together."""
    chunk = tl.arange(0, P_CHUNK)
    g, g_ok = _group_rows(G, G_PAD)
    p_ok = (c0 + chunk < p1)[:, None] & g_ok[None, :]
    off = (base + c0 + chunk)[:, None] * G + g[None, :]  # (P_CHUNK, G_PAD)
    m_p = tl.load(PM + off, mask=p_ok, other=float("-inf"))
    l_p = tl.load(PL + off, mask=p_ok, other=0.0)
    m_new = tl.maximum(m_all, tl.max(m_p, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha, beta = tl.exp2(m_all - m_safe), tl.exp2(m_p - m_safe[None, :])
    l_all = l_all * alpha + tl.sum(l_p * beta, 0)
    if HAS_ACC:
        o_p = tl.load(PACC + off[:, :, None] * DV_PAD + d[None, None, :],
                      mask=p_ok[:, :, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(o_p * (l_p * beta)[:, :, None], 0)
    return m_new, l_all, acc


@triton.jit
def _merge_parts(PM, PL, PACC, bh, r, Tq, n_parts, p0, p1, d0, G: tl.constexpr,
                 G_PAD: tl.constexpr, BLOCK_DV: tl.constexpr, DV_PAD: tl.constexpr,
                 HAS_ACC: tl.constexpr, P_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Parts p0 … p1-1 merged -> (m, l, acc), acc (G_PAD, BLOCK_DV) the unnormalised output's
    columns d0 … d0+BLOCK_DV-1 (zeros without HAS_ACC: the lse alone). P_CHUNK parts per load,
    so the loads of a chunk are in flight together instead of one part's after another's.
    N_CHUNKS > 0: the chunks unrolled (p1 - p0 <= N_CHUNKS·P_CHUNK), else a loop."""
    m_all = tl.full([G_PAD], float("-inf"), tl.float32)
    l_all = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    d = d0 + tl.arange(0, BLOCK_DV)
    base = (bh.to(tl.int64) * Tq + r) * n_parts
    if N_CHUNKS > 0:
        for c in tl.static_range(N_CHUNKS):
            m_all, l_all, acc = _merge_chunk(PM, PL, PACC, base, p0 + c * P_CHUNK, p1, d, m_all,
                                             l_all, acc, G, G_PAD, DV_PAD, HAS_ACC, P_CHUNK)
    else:
        for c0 in range(p0, p1, P_CHUNK):
            m_all, l_all, acc = _merge_chunk(PM, PL, PACC, base, c0, p1, d, m_all, l_all, acc,
                                             G, G_PAD, DV_PAD, HAS_ACC, P_CHUNK)
    return m_all, l_all, acc


@triton.jit
def _branch_output(PM, PL, PACC, bh, r, Tq, n_parts, p0, p1, d0, G: tl.constexpr,
                   G_PAD: tl.constexpr, BLOCK_DV: tl.constexpr, DV_PAD: tl.constexpr,
                   P_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Columns d0 … d0+BLOCK_DV-1 of the normalised output (G_PAD, BLOCK_DV) of parts p0 …
    p1-1; rows that saw nothing give 0."""
    _, l_all, acc = _merge_parts(PM, PL, PACC, bh, r, Tq, n_parts, p0, p1, d0, G, G_PAD,
                                 BLOCK_DV, DV_PAD, True, P_CHUNK, N_CHUNKS)
    return acc / tl.where(l_all > 0, l_all, 1.0)[:, None]


@jit_kernel
def nsa_decode_select_kernel(SCORES, PM, PL, CAND, T, Tq, Tc, n_parts, n_splits,
                             G: tl.constexpr, G_PAD: tl.constexpr, L: tl.constexpr,
                             D_STRIDE: tl.constexpr, L_SEL: tl.constexpr, N_SEL: tl.constexpr,
                             INITIAL: tl.constexpr, LOCAL: tl.constexpr, BLOCK_J: tl.constexpr,
                             U_PAD: tl.constexpr, S_CHUNK: tl.constexpr,
                             S_CHUNKS: tl.constexpr):
    """Grid (B·H, Tq, selection-block tiles): the N_SEL best blocks of tile jt (BLOCK_J blocks)
    as packed (score, index) keys, best first, into CAND[bh, r, jt, :] (-1: none); the
    attend kernel ranks all tiles' candidates. Score as `naive.select_blocks`: +inf for the
    forced first/local blocks, else the importance Σ_g Σ_i w_ij p_gi, p the compressed
    softmax (its lse from parts 0 … n_splits-1); blocks not yet started are left out. (H200,
    64k: one query head's scores per load and N_SEL max-reductions beat loads of several heads
    and one tl.topk, 15 vs 22 µs.)"""
    bh, r, jt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = T - Tq + r
    n_vis = _visible_compressed(t, Tc, L, D_STRIDE)
    g, g_ok = _group_rows(G, G_PAD)
    # the compressed splits' (m, l) alone (no acc: PACC and the column sizes are placeholders)
    m_all, l_all, _ = _merge_parts(PM, PL, PM, bh, r, Tq, n_parts, 0, n_splits, 0, G, G_PAD,
                                   16, 16, False, S_CHUNK, S_CHUNKS)
    seen = l_all > 0
    lse = tl.where(seen, tl.where(seen, m_all, 0.0) + tl.log2(tl.where(seen, l_all, 1.0)),
                   float("inf"))
    # Chunks of d keys: compressed block i holds chunks i … i+R-1, selection block j holds
    # chunks jQ … jQ+Q-1, so w_ij = |[i, i+R) ∩ [jQ, jQ+Q)| for i in jQ-R+1 … jQ+Q-1.
    R: tl.constexpr = L // D_STRIDE
    QC: tl.constexpr = L_SEL // D_STRIDE
    j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    u = tl.arange(0, U_PAD)
    i = j[:, None] * QC - R + 1 + u[None, :]
    w = tl.minimum(i + R, (j[:, None] + 1) * QC) - tl.maximum(i, j[:, None] * QC)
    i_ok = (u[None, :] < QC + R - 1) & (i >= 0) & (i < n_vis)
    w = tl.where(i_ok, w, 0).to(tl.float32)
    imp = tl.zeros([BLOCK_J], tl.float32)
    row0 = (bh.to(tl.int64) * Tq + r) * G
    for gg in tl.static_range(G):  # unrolled: the G loads in flight together
        lse_g = tl.sum(tl.where(g == gg, lse, 0.0), 0)
        s = tl.load(SCORES + (row0 + gg) * Tc + i, mask=i_ok, other=float("-inf"))
        imp += tl.sum(w * tl.exp2(s - lse_g), 1)
    own = t // L_SEL
    started = j <= own
    forced = started & ((j < INITIAL) | (j > own - LOCAL))
    key = tl.where(started, pack_key(tl.where(forced, float("inf"), imp), j), -1)
    base = ((bh.to(tl.int64) * Tq + r) * tl.num_programs(2) + jt) * N_SEL
    for n in tl.static_range(N_SEL):
        best = tl.max(key, 0)
        tl.store(CAND + base + n, best)
        key = tl.where(key == best, -1, key)


@triton.jit
def _ranked_block(CAND, bh, r, u, Tq, n_cand, C_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """The block of the u-th best of the n_cand candidate keys of (bh, r), -1 if none: each
    key's rank is how many keys beat it (keys are distinct: they hold the block index)."""
    base = (bh.to(tl.int64) * Tq + r) * n_cand
    c = tl.arange(0, C_PAD)
    key = tl.load(CAND + base + c, mask=c < n_cand, other=-1)
    rank = tl.zeros([C_PAD], tl.int32)
    for c0 in tl.static_range(0, C_PAD, CHUNK):  # unrolled: the loads in flight together
        cc = c0 + tl.arange(0, CHUNK)
        other = tl.load(CAND + base + cc, mask=cc < n_cand, other=-1)
        rank += tl.sum((other[None, :] > key[:, None]).to(tl.int32), 1)
    best = tl.max(tl.where((rank == u) & (c < n_cand), key, -1), 0)
    return tl.where(best >= 0, unpack_index(best), -1)


@jit_kernel
def nsa_decode_attend_kernel(Q, K, V, K_TILES, V_TILES, CAND, IDX, PM, PL, PACC, T, Tq, n_parts,
                             part0, n_cand, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                             sv_b, sv_h, sv_t, sv_d, scale, H: tl.constexpr, G: tl.constexpr,
                             G_PAD: tl.constexpr, SEG: tl.constexpr, SEG_BLOCK_N: tl.constexpr,
                             SEG_TILES: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
                             DV: tl.constexpr, DV_PAD: tl.constexpr, N_SLC: tl.constexpr,
                             C_PAD: tl.constexpr, TMA: tl.constexpr):
    """Grid (B·H, Tq, N_SLC): program u attends to the u-th best selection block j of the
    candidates (keys [j·SEG, j·SEG + SEG) up to t; IDX[bh, r, u] = j, -1 if fewer blocks
    exist) and writes part part0 + u."""
    bh, r, u = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    t = T - Tq + r
    blk = _ranked_block(CAND, bh, r, u, Tq, n_cand, C_PAD, 32)
    tl.store(IDX + (bh.to(tl.int64) * Tq + r) * N_SLC + u, blk)
    lo = tl.where(blk >= 0, blk * SEG, T)
    _segment_part(Q, K, V, K_TILES, V_TILES, PM, PL, PACC, b, h, bh, r, lo,
                  tl.minimum(lo + SEG, t + 1), Tq, n_parts, part0 + u, sq_b, sq_h, sq_t, sq_d,
                  sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, scale, G, G_PAD, SEG_BLOCK_N,
                  SEG_TILES, DK, DK_PAD, DV, DV_PAD, TMA)


@jit_kernel
def nsa_decode_combine_kernel(PM, PL, PACC, GATES, O, Tq, n_parts, n_splits, n_win,
                              so_b, so_h, so_t, so_d, sg_b, sg_h, sg_t, sg_c,
                              gate_cmp, gate_slc, gate_win, H: tl.constexpr, G: tl.constexpr,
                              G_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                              BLOCK_DV: tl.constexpr, N_SLC: tl.constexpr,
                              HAS_CMP: tl.constexpr, HAS_WIN: tl.constexpr,
                              HAS_GATES: tl.constexpr, SLOT_SLC: tl.constexpr,
                              SLOT_WIN: tl.constexpr, P_CHUNK: tl.constexpr,
                              CMP_CHUNKS: tl.constexpr, SLC_CHUNKS: tl.constexpr,
                              WIN_CHUNKS: tl.constexpr):
    """Grid (B·H, Tq, DV_PAD / BLOCK_DV): columns dt·BLOCK_DV … of o[b, hq, r] = Σ_branch
    gate · (that branch's parts merged); parts are [0, n_splits) compressed, then N_SLC
    selected, then n_win window; gate slots 0 (compressed), SLOT_SLC, SLOT_WIN."""
    bh, r, d0 = tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_DV
    b, h = bh // H, bh % H
    g, ok = _group_rows(G, G_PAD)
    hq = h * G + g
    tok = r + g * 0
    o = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    if HAS_CMP:
        gate = load_gate(GATES, b, hq, tok, ok, sg_b, sg_h, sg_t, sg_c, gate_cmp, HAS_GATES, 0)
        o += gate[:, None] * _branch_output(PM, PL, PACC, bh, r, Tq, n_parts, 0, n_splits, d0,
                                            G, G_PAD, BLOCK_DV, DV_PAD, P_CHUNK, CMP_CHUNKS)
    if N_SLC > 0:
        gate = load_gate(GATES, b, hq, tok, ok, sg_b, sg_h, sg_t, sg_c, gate_slc, HAS_GATES,
                         SLOT_SLC)
        o += gate[:, None] * _branch_output(PM, PL, PACC, bh, r, Tq, n_parts, n_splits,
                                            n_splits + N_SLC, d0, G, G_PAD, BLOCK_DV,
                                            DV_PAD, P_CHUNK, SLC_CHUNKS)
    if HAS_WIN:
        gate = load_gate(GATES, b, hq, tok, ok, sg_b, sg_h, sg_t, sg_c, gate_win, HAS_GATES,
                         SLOT_WIN)
        o += gate[:, None] * _branch_output(PM, PL, PACC, bh, r, Tq, n_parts,
                                            n_splits + N_SLC, n_splits + N_SLC + n_win, d0,
                                            G, G_PAD, BLOCK_DV, DV_PAD, P_CHUNK, WIN_CHUNKS)
    d = d0 + tl.arange(0, BLOCK_DV)
    off = b.to(tl.int64) * so_b + hq.to(tl.int64)[:, None] * so_h + r.to(tl.int64) * so_t
    tl.store(O + off + d[None, :] * so_d, o.to(O.dtype.element_ty),
             mask=ok[:, None] & (d[None, :] < DV))
