"""Triton templates of the NSA forward: compressed branch, top-n block selection, selected
branch (per position, or block by block with a merge pass), sliding window. Launch order:
compressed (writes O and the lse), selection (reads the lse), selected (adds to O), window
(adds to O), so the gated sum is formed in place without a separate combine pass. With a
window branch, the window kernel also attends to the selected branch's forced blocks and
finishes that branch (`nsa_win_fwd_kernel` FOLD)."""
import triton
import triton.language as tl

from .nsa_common import (LOG2E, finish_softmax, gated_store, gqa_rows, jit_kernel,
                         key_value_tiles, load_keys, load_rows, load_tile, monotone_bits,
                         online_softmax_step, pack_key, store_rows, unpack_index)


@triton.jit
def cmp_step(q, kc, vc, c, tok, m_i, l_i, acc, qk_scale, L: tl.constexpr, STRIDE: tl.constexpr,
             HAS_CMP: tl.constexpr, MASKED: tl.constexpr):
    """One tile of compressed keys c: the online softmax (only its normaliser without
    HAS_CMP); MASKED hides the keys a row cannot see yet (tiles every row sees skip it)."""
    s = tl.dot(q, tl.trans(kc)) * qk_scale
    if MASKED:
        s = tl.where((c * STRIDE + L - 1)[None, :] <= tok[:, None], s, float("-inf"))
    if HAS_CMP:
        return online_softmax_step(s, m_i, l_i, acc, vc)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
    return m_new, l_i, acc


@jit_kernel
def nsa_cmp_fwd_kernel(
        Q, KC, VC, KC_TILES, VC_TILES, GATES, O, OB, LSE,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        sg_b, sg_h, sg_t, sg_c, so_b, so_h, so_t, so_d,
        T, Tc, scale, gate_fixed,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr, HAS_CMP: tl.constexpr,
        HAS_GATES: tl.constexpr, SAVE: tl.constexpr, TMA: tl.constexpr):
    """Flash attention over the compressed keys for one (batch, KV head, query tile): writes
    the gated o_cmp (when the branch is present) and the lse that selection needs.
    LSE: (B, HQ, T) fp32, +inf where no compressed block is visible yet. KC_TILES/VC_TILES:
    the key tiles' sources for `load_tile`.
    """
    t0 = tl.program_id(0) * BLOCK_T
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tok, hq, ok = gqa_rows(t0, h, T, G, G_PAD, BLOCK_T)
    q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
    qk_scale = scale * LOG2E
    last = t0 + BLOCK_T - 1
    # Compressed blocks visible to the tile's last query: i*d + l - 1 <= last (<= 0: none);
    # the first n_full (whole tiles) are visible to its first query too: no mask there.
    n_vis = (last - L + 1 + STRIDE) // STRIDE
    n_full = tl.maximum(t0 - L + 1 + STRIDE, 0) // STRIDE // BLOCK_C * BLOCK_C

    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, DV_PAD], tl.float32)
    for c0 in range(0, n_full, BLOCK_C):
        kc, vc = key_value_tiles(KC, VC, KC_TILES, VC_TILES, b, h, c0, Tc, sk_b, sk_h, sk_t, sk_d,
                                 sv_b, sv_h, sv_t, sv_d, BLOCK_C, DK, DK_PAD, DV, DV_PAD, HAS_CMP,
                                 TMA)
        m_i, l_i, acc = cmp_step(q, kc, vc, c0 + tl.arange(0, BLOCK_C), tok, m_i, l_i, acc,
                                 qk_scale, L, STRIDE, HAS_CMP, False)
    for c0 in range(n_full, n_vis, BLOCK_C):
        kc, vc = key_value_tiles(KC, VC, KC_TILES, VC_TILES, b, h, c0, Tc, sk_b, sk_h, sk_t, sk_d,
                                 sv_b, sv_h, sv_t, sv_d, BLOCK_C, DK, DK_PAD, DV, DV_PAD, HAS_CMP,
                                 TMA)
        m_i, l_i, acc = cmp_step(q, kc, vc, c0 + tl.arange(0, BLOCK_C), tok, m_i, l_i, acc,
                                 qk_scale, L, STRIDE, HAS_CMP, True)
    o, lse = finish_softmax(m_i, l_i, acc)
    tl.store(LSE + (b * H * G + hq).to(tl.int64) * T + tok, lse, mask=ok)
    if HAS_CMP:
        gated_store(O, OB, o, b, hq, tok, ok, so_b, so_h, so_t, so_d, GATES, sg_b, sg_h, sg_t,
                    sg_c, gate_fixed, DV, DV_PAD, HAS_GATES, 0, False, SAVE)


@jit_kernel
def nsa_select_kernel(
        Q, KC, KC_TILES, LSE, IDX, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, T, Tc, scale,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        DK: tl.constexpr, DK_PAD: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr,
        LP: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, NJ: tl.constexpr,
        S_INIT: tl.constexpr, S_LOCAL: tl.constexpr, TMA: tl.constexpr):
    """Top-n block selection for one (batch, KV head, query tile).

    Recomputes the compressed-branch probabilities (with the lse of nsa_cmp_fwd_kernel) chunk
    by chunk of NJ selection blocks, maps them to block importance, sums over the GQA group
    and merges each chunk into a running top-n held as packed int64 keys — no (T x Tc) matrix
    leaves the chip. IDX: (B, H, T, N_PAD) int32, -1 where fewer blocks exist.
    """
    t0 = tl.program_id(0) * BLOCK_T
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tok, hq, ok = gqa_rows(t0, h, T, G, G_PAD, BLOCK_T)
    q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
    qk_scale = scale * LOG2E
    last = t0 + BLOCK_T - 1
    lse = tl.load(LSE + (b * H * G + hq).to(tl.int64) * T + tok, mask=ok, other=float("inf"))
    R: tl.constexpr = LP // STRIDE          # stride-d chunks per selection block
    CHUNKS: tl.constexpr = L // STRIDE      # chunks per compressed block
    BLOCK_C2: tl.constexpr = NJ * R
    lse2 = lse * LOG2E
    t_tile = t0 + tl.arange(0, BLOCK_T)
    jj = tl.arange(0, NJ)
    ii = tl.arange(0, BLOCK_C2)
    # w[i, j]: chunks of compressed block i (chunks i … i+CHUNKS-1) inside selection block
    # j (chunks jR … jR+R-1), relative to the current chunk; w_next: the same for block NJ,
    # which belongs to the next chunk and is carried over.
    lo = tl.maximum(ii[:, None], (jj * R)[None, :])
    hi = tl.minimum(ii[:, None] + CHUNKS, (jj * R + R)[None, :])
    w = tl.maximum(hi - lo, 0).to(tl.float32)
    w_next = tl.maximum(tl.minimum(ii + CHUNKS, NJ * R + R) - tl.maximum(ii, NJ * R), 0)
    w_next = w_next.to(tl.float32)
    top = pack_key(tl.full([BLOCK_T, N_PAD], float("-inf"), tl.float32),
                   tl.full([BLOCK_T, N_PAD], 0x7FFFFFFF, tl.int32))
    carry = tl.zeros([BLOCK_T], tl.float32)
    n_sel = last // LP + 1
    for j0 in range(0, n_sel, NJ):
        c = j0 * R + ii
        kc = load_tile(KC, KC_TILES, b, h, j0 * R, Tc, sk_b, sk_h, sk_t, sk_d, 1, BLOCK_C2, DK,
                       DK_PAD, TMA)
        s = tl.dot(q, tl.trans(kc)) * qk_scale
        vis = ((c * STRIDE + L - 1)[None, :] <= tok[:, None]) & ok[:, None]
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        # Block importance with one small MMA in the input dtype (for bf16 ~2e-3 relative,
        # below the inputs' own rounding; p then stays in registers as in P·V) and the sum
        # over the GQA group: with many positions per tile the group sum first (an MMA of
        # BLOCK_T rows), else the MMA over all rows first (H100: each order wins where chosen).
        if BLOCK_T >= 32:
            p_pos = tl.sum(tl.reshape(p, [BLOCK_T, G_PAD, BLOCK_C2]), axis=1)
            imp = tl.dot(p_pos.to(kc.dtype), w.to(kc.dtype))
            spill = tl.sum(p_pos * w_next[None, :], axis=1)
        else:
            imp_rows = tl.dot(p.to(kc.dtype), w.to(kc.dtype))
            imp = tl.sum(tl.reshape(imp_rows, [BLOCK_T, G_PAD, NJ]), axis=1)
            spill = tl.sum(tl.reshape(tl.sum(p * w_next[None, :], axis=1), [BLOCK_T, G_PAD]),
                           axis=1)
        imp += tl.where(jj == 0, carry[:, None], 0.0)
        carry = spill
        j = j0 + jj
        started = (j * LP)[None, :] <= t_tile[:, None]
        own = (t_tile // LP)[:, None]
        forced = started & ((j[None, :] < S_INIT) | (j[None, :] > own - S_LOCAL))
        imp = tl.where(forced, float("inf"), tl.where(started, imp, float("-inf")))
        # Bitonic top-n: the chunk's best n descending (sorted as int32 keys) against the
        # running top-n ascending; their element-wise max holds the best n of both as a
        # bitonic sequence, which one merge network sorts (ascending again).
        keys = chunk_keys(imp, NJ)
        if NJ > N_PAD:
            keys = tl.topk(keys, N_PAD)
        else:
            keys = tl.sort(keys, dim=1, descending=True)
        top = tl.bitonic_merge(tl.maximum(top, widen_key(keys, j0, NJ)), dim=1,
                               descending=False)
    col = N_PAD - 1 - tl.arange(0, N_PAD)  # top is ascending: store the best first
    dead = monotone_bits(tl.full([BLOCK_T, N_PAD], float("-inf"), tl.float32)).to(tl.int64)
    alive = (top >> 32) > dead
    idx = tl.where(alive & (col[None, :] < N), unpack_index(top), -1)
    off = ((b * H + h).to(tl.int64) * T + t_tile.to(tl.int64))[:, None] * N_PAD + col[None, :]
    tl.store(IDX + off, idx, mask=(t_tile < T)[:, None])


@triton.jit
def chunk_keys(imp, NJ: tl.constexpr):
    """(rows, NJ) importance of a chunk's blocks -> int32 keys whose descending order is
    importance desc, then place in the chunk asc: the score's order bits with the lowest
    log2(NJ) replaced by the place (scores within 2^-(23 - log2 NJ) relative count as tied —
    far below the importance's own bf16 rounding)."""
    place = tl.arange(0, NJ)
    return (monotone_bits(imp) & -NJ) | (NJ - 1 - place)[None, :]


@triton.jit
def widen_key(key, j0, NJ: tl.constexpr):
    """A chunk key of blocks j0 … j0+NJ-1 -> the int64 key of pack_key (truncated score,
    block index)."""
    idx = j0 + NJ - 1 - (key & (NJ - 1))
    return ((key & -NJ).to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@jit_kernel
def nsa_slc_fwd_kernel(
        Q, K, V, K_TILES, V_TILES, IDX, GATES, O, OB, LSE,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        sg_b, sg_h, sg_t, sg_c, so_b, so_h, so_t, so_d,
        T, scale, gate_fixed,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        LP: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, HAS_GATES: tl.constexpr,
        SLOT: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE: tl.constexpr, TMA: tl.constexpr,
        FOLD: tl.constexpr, S_INIT: tl.constexpr, S_LOCAL: tl.constexpr):
    """Selected-block attention for one (batch, KV head, query position): the G query heads of
    the group share the position's n blocks; G_PAD >= 16 rows feed the MMA.

    FOLD: the forced blocks are the window kernel's (`nsa_win_fwd_kernel` FOLD): the loop
    starts after them (selection ranks them first), and the other blocks' ungated output and
    log2-sum-exp go to OB and LSE for the window kernel to finish."""
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tok, hq, ok = gqa_rows(t, h, T, G, G_PAD, 1)
    q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
    qk_scale = scale * LOG2E
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    # All n indices in one load; a slot with no block (-1) is a fully masked tile, so the loop
    # has no branch and Triton can pipeline the K/V loads.
    slots = tl.arange(0, N_PAD)
    blocks = tl.load(IDX + ((b * H + h).to(tl.int64) * T + t) * N_PAD + slots)
    first = 0
    if FOLD:
        first = num_forced(t, LP, S_INIT, S_LOCAL)
    for s_i in range(first, N):
        j = tl.sum(tl.where(slots == s_i, blocks, 0))
        pos = j * LP + tl.arange(0, LP)
        live = (pos <= t) & (j >= 0)
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, tl.maximum(j, 0) * LP, T, sk_b,
                               sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, LP, DK, DK_PAD, DV,
                               DV_PAD, True, TMA)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(live[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc, v)
    store_selected(m_i, l_i, acc, O, OB, LSE, b, hq, tok, ok, T, so_b, so_h, so_t, so_d, GATES,
                   sg_b, sg_h, sg_t, sg_c, gate_fixed, H, G, DV, DV_PAD, HAS_GATES, SLOT,
                   ACCUMULATE, SAVE, FOLD)


@triton.jit
def num_forced(t, LP: tl.constexpr, S_INIT: tl.constexpr, S_LOCAL: tl.constexpr):
    """How many forced blocks position t has started (the first S_INIT and the S_LOCAL ending
    at its own block, counted once where they overlap): the selection's first slots."""
    own = t // LP
    init = tl.minimum(S_INIT, own + 1)
    return init + own + 1 - tl.maximum(own - S_LOCAL + 1, init)


@triton.jit
def store_selected(m_i, l_i, acc, O, OB, LSE, b, hq, tok, ok, T, so_b, so_h, so_t, so_d, GATES,
                   sg_b, sg_h, sg_t, sg_c, gate_fixed, H: tl.constexpr, G: tl.constexpr,
                   DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_GATES: tl.constexpr,
                   SLOT: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE: tl.constexpr,
                   FOLD: tl.constexpr):
    """The selected branch's softmax state of the rows, stored: its lse to LSE and the gated
    output into O (with SAVE the ungated one to OB) — or, FOLD, the non-forced blocks' part
    for `nsa_win_fwd_kernel` to finish: the ungated output to OB and the log2-sum-exp (-inf:
    none) to LSE."""
    lse_at = LSE + (b * H * G + hq).to(tl.int64) * T + tok
    if FOLD:
        seen = l_i > 0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        m = tl.where(m_i == float("-inf"), 0.0, m_i)
        tl.store(lse_at, tl.where(seen, m + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                 mask=ok)
        store_rows(OB, o, b, hq, tok, ok, so_b, so_h, so_t, so_d, DV, DV_PAD, False)
    else:
        o, lse = finish_softmax(m_i, l_i, acc)
        tl.store(lse_at, lse, mask=ok)
        gated_store(O, OB, o, b, hq, tok, ok, so_b, so_h, so_t, so_d, GATES, sg_b, sg_h, sg_t,
                    sg_c, gate_fixed, DV, DV_PAD, HAS_GATES, SLOT, ACCUMULATE, SAVE)


@triton.jit
def window_mask(s, pos, tok, WINDOW: tl.constexpr):
    """Scores s (rows, keys pos) with the keys outside each row's (tok - WINDOW, tok] hidden."""
    vis = pos[None, :] <= tok[:, None]
    if WINDOW > 0:
        vis = vis & (pos[None, :] > tok[:, None] - WINDOW)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def win_step(q, k, v, pos, tok, m_i, l_i, acc, qk_scale, WINDOW: tl.constexpr,
             MASKED: tl.constexpr):
    """One key tile of the window branch; MASKED hides keys outside (tok - WINDOW, tok]."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = window_mask(s, pos, tok, WINDOW)
    return online_softmax_step(s, m_i, l_i, acc, v)


@jit_kernel
def nsa_win_fwd_kernel(
        Q, K, V, K_TILES, V_TILES, GATES, O, OB, LSE, SLC_OB, SLC_LSE,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        sg_b, sg_h, sg_t, sg_c, so_b, so_h, so_t, so_d,
        T, scale, gate_fixed, slc_gate_fixed,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr, WINDOW: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_GATES: tl.constexpr, SLOT: tl.constexpr,
        ACCUMULATE: tl.constexpr, SAVE: tl.constexpr, TMA: tl.constexpr, FOLD: tl.constexpr,
        LP: tl.constexpr, S_INIT: tl.constexpr, S_LOCAL: tl.constexpr, SLC_SLOT: tl.constexpr):
    """Sliding-window (WINDOW == 0: full causal) attention for one (batch, KV head, query
    tile): keys in (t - window, t]. Key tiles [lo, hi) in three runs: masked, seen by every
    row of the tile (no mask), masked (the diagonal).

    FOLD: also the selected branch's forced blocks (the first S_INIT, the S_LOCAL ending at
    each row's own block — tiles every query tile has at hand, which the selected kernels then
    leave out): the initial blocks' tiles in a run of their own, the local ones' (the last
    tiles of the window, or past its start) in a run where one QK feeds both softmaxes; their
    softmax is merged with the other blocks' (SLC_OB ungated output and SLC_LSE log2-sum-exp,
    from `store_selected`), and the selected branch's lse, gated output (added to O) and with
    SAVE its ungated output (over SLC_OB) are stored here."""
    t0 = tl.program_id(0) * BLOCK_T
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tok, hq, ok = gqa_rows(t0, h, T, G, G_PAD, BLOCK_T)
    q = load_rows(Q, b, hq, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, DV_PAD], tl.float32)
    qk_scale = scale * LOG2E
    hi = t0 + BLOCK_T
    lo = 0
    full_lo = 0   # first key every row sees, rounded up to a tile
    if WINDOW > 0:
        lo = t0 - WINDOW + 1
        lo = lo * (lo > 0) // BLOCK_K * BLOCK_K
        full_lo = tl.maximum(lo, (t0 + BLOCK_T - WINDOW + BLOCK_K - 1) // BLOCK_K * BLOCK_K)
    full_hi = tl.maximum(lo, (t0 + 1) // BLOCK_K * BLOCK_K)  # tiles ending at or before t0
    full_lo = tl.minimum(full_lo, full_hi)
    # FOLD: the tiles from `split` on hold the rows' local forced blocks; there one QK feeds
    # both softmaxes (the window's and the forced blocks', state *_f)
    split = hi
    if FOLD:
        m_f = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
        l_f = tl.zeros([BLOCK_T * G_PAD], tl.float32)
        acc_f = tl.zeros([BLOCK_T * G_PAD, DV_PAD], tl.float32)
        # the initial blocks' tiles first (the local ones' start after them)
        init_hi = tl.minimum(S_INIT * LP, hi)
        for k0 in range(0, init_hi, BLOCK_K):
            m_f, l_f, acc_f = forced_step(q, K, V, K_TILES, V_TILES, b, h, k0, tok, T, m_f, l_f,
                                          acc_f, qk_scale, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h,
                                          sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, TMA, LP,
                                          S_INIT, S_LOCAL)
        split = tl.maximum((t0 // LP - S_LOCAL + 1) * LP, 0) // BLOCK_K * BLOCK_K
        split = tl.minimum(tl.maximum(split, (init_hi + BLOCK_K - 1) // BLOCK_K * BLOCK_K), hi)
    for k0 in range(lo, tl.minimum(full_lo, split), BLOCK_K):
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, T, sk_b, sk_h, sk_t, sk_d,
                               sv_b, sv_h, sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, True, TMA)
        m_i, l_i, acc = win_step(q, k, v, k0 + tl.arange(0, BLOCK_K), tok, m_i, l_i, acc,
                                 qk_scale, WINDOW, True)
    for k0 in range(full_lo, tl.minimum(full_hi, split), BLOCK_K):
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, T, sk_b, sk_h, sk_t, sk_d,
                               sv_b, sv_h, sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, True, TMA)
        m_i, l_i, acc = win_step(q, k, v, k0 + tl.arange(0, BLOCK_K), tok, m_i, l_i, acc,
                                 qk_scale, WINDOW, False)
    for k0 in range(full_hi, split, BLOCK_K):
        k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, T, sk_b, sk_h, sk_t, sk_d,
                               sv_b, sv_h, sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, True, TMA)
        m_i, l_i, acc = win_step(q, k, v, k0 + tl.arange(0, BLOCK_K), tok, m_i, l_i, acc,
                                 qk_scale, WINDOW, True)
    if FOLD:
        # (below `lo` only the forced softmax sees keys: the window's rows stay empty there)
        for k0 in range(split, hi, BLOCK_K):
            k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, T, sk_b, sk_h, sk_t, sk_d,
                                   sv_b, sv_h, sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, True,
                                   TMA)
            pos = k0 + tl.arange(0, BLOCK_K)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            m_i, l_i, acc = online_softmax_step(window_mask(s, pos, tok, WINDOW), m_i, l_i,
                                                acc, v)
            s = tl.where(forced_keys(pos, tok, LP, S_INIT, S_LOCAL), s, float("-inf"))
            m_f, l_f, acc_f = online_softmax_step(s, m_f, l_f, acc_f, v)
    o, lse = finish_softmax(m_i, l_i, acc)
    row = (b * H * G + hq).to(tl.int64) * T + tok
    tl.store(LSE + row, lse, mask=ok)
    gated_store(O, OB, o, b, hq, tok, ok, so_b, so_h, so_t, so_d, GATES, sg_b, sg_h, sg_t, sg_c,
                gate_fixed, DV, DV_PAD, HAS_GATES, SLOT, ACCUMULATE, SAVE)
    if FOLD:
        lse_free = tl.load(SLC_LSE + row, mask=ok, other=float("-inf"))
        o_free = load_rows(SLC_OB, b, hq, tok, ok, so_b, so_h, so_t, so_d, DV, DV_PAD)
        m_f, l_f, acc_f = merge_partial(m_f, l_f, acc_f, lse_free, o_free.to(tl.float32))
        o, lse = finish_softmax(m_f, l_f, acc_f)
        tl.store(SLC_LSE + row, lse, mask=ok)
        gated_store(O, SLC_OB, o, b, hq, tok, ok, so_b, so_h, so_t, so_d, GATES, sg_b, sg_h,
                    sg_t, sg_c, slc_gate_fixed, DV, DV_PAD, HAS_GATES, SLC_SLOT, True, SAVE)


@triton.jit
def forced_step(q, K, V, K_TILES, V_TILES, b, h, k0, tok, T, m_i, l_i, acc, qk_scale, sk_b,
                sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, BLOCK_K: tl.constexpr,
                DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                TMA: tl.constexpr, LP: tl.constexpr, S_INIT: tl.constexpr,
                S_LOCAL: tl.constexpr):
    """One key tile [k0, k0 + BLOCK_K) of the selected branch's forced blocks."""
    k, v = key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, T, sk_b, sk_h, sk_t, sk_d, sv_b,
                           sv_h, sv_t, sv_d, BLOCK_K, DK, DK_PAD, DV, DV_PAD, True, TMA)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(forced_keys(k0 + tl.arange(0, BLOCK_K), tok, LP, S_INIT, S_LOCAL), s,
                 float("-inf"))
    return online_softmax_step(s, m_i, l_i, acc, v)


@jit_kernel
def nsa_slc_fwd_blocks_kernel(
        Q, K, V, QUERIES, STARTS, PAIRS, PART_O, PART_LSE,
        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
        T, n_blocks, q_chunk, scale,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        LP: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr):
    """Selected-block attention block by block, for one (list chunk s, batch, KV head,
    selection block j): the block's K/V are loaded once and the queries that chose it
    (QUERIES[STARTS[g] + s·q_chunk …], `inverted.Inverted`) taken BLOCK_T at a time with their
    GQA group as MMA rows — full MMAs at any group size, and each block read once instead of
    once per choosing position. Each (query, slot) pair's softmax over this block alone goes to
    row PAIRS[e] of PART_O (pairs, G, DV) (normalised, in PART_O's dtype) and PART_LSE
    (pairs, G) fp32 (log2 units); `nsa_slc_fwd_combine_kernel` merges a position's pairs."""
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    j = tl.program_id(2)
    grp = pid_bh.to(tl.int64) * n_blocks + j
    start = tl.load(STARTS + grp) + s * q_chunk
    end = tl.minimum(tl.load(STARTS + grp + 1), start + q_chunk)
    if start < end:
        b = pid_bh // H
        h = pid_bh % H
        pos = j * LP + tl.arange(0, LP)
        k = load_keys(K, b, h, pos, pos < T, sk_b, sk_h, sk_t, sk_d, DK, DK_PAD)
        v = load_keys(V, b, h, pos, pos < T, sv_b, sv_h, sv_t, sv_d, DV, DV_PAD)
        qk_scale = scale * LOG2E
        r = tl.arange(0, BLOCK_T * G_PAD)
        gh = r % G_PAD
        for e0 in range(start, end, BLOCK_T):
            e = e0 + r // G_PAD
            listed = e < end
            tok = tl.load(QUERIES + e, mask=listed, other=0)
            pair = tl.load(PAIRS + e, mask=listed, other=0)
            ok = listed & (gh < G)
            q = load_rows(Q, b, h * G + gh, tok, ok, sq_b, sq_h, sq_t, sq_d, DK, DK_PAD)
            sc = tl.dot(q, tl.trans(k)) * qk_scale
            # a chosen block starts at or before its query: every listed row sees a key
            sc = tl.where(pos[None, :] <= tok[:, None], sc, float("-inf"))
            m = tl.max(sc, 1)
            m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(sc - m[:, None])
            l_i = tl.sum(p, 1)
            l_i = tl.where(l_i > 0, l_i, 1.0)  # rows past the list's end
            o = tl.dot(p.to(v.dtype), v) / l_i[:, None]
            # row pair·G + g of PART_O (the batch index enters with stride 0)
            store_rows(PART_O, o, b, gh, pair, ok, 0, DV, G * DV, 1, DV, DV_PAD, False)
            tl.store(PART_LSE + pair * G + gh, m + tl.log2(l_i), mask=ok)


@triton.jit
def merge_tile(IDX, T, t_lo, n_pos, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
               BLOCK_T: tl.constexpr, N_PAD: tl.constexpr):
    """The rows of a program of a kernel merging per-(query, slot) results: tile
    program_id(0) of positions [t_lo, t_lo + n_pos), (batch, KV head) program_id(1) ->
    (b, position, query head, index in the group, valid, every slot's block (rows, N_PAD)).
    The blocks come in one load, so the slot loop's loads wait on registers only."""
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    rel, hq, ok = gqa_rows(tl.program_id(0) * BLOCK_T, h, n_pos, G, G_PAD, BLOCK_T)
    tok = t_lo + rel
    slots = tl.arange(0, N_PAD)
    blocks = tl.load(IDX + ((pid_bh.to(tl.int64) * T + tok) * N_PAD)[:, None] + slots[None, :],
                     mask=ok[:, None], other=-1)
    return pid_bh // H, tok, hq, hq - h * G, ok, blocks


@triton.jit
def merge_slot(blocks, ok, rel, n_pos, s_i, N_PAD: tl.constexpr):
    """(rows whose slot s_i holds a block, their flat (query, slot) pair index) for the rows
    of `merge_tile` at positions t_lo + rel."""
    slots = tl.arange(0, N_PAD)
    live = ok & (tl.sum(tl.where(slots[None, :] == s_i, blocks, 0), 1) >= 0)
    return live, (tl.program_id(1).to(tl.int64) * n_pos + rel) * N_PAD + s_i


@triton.jit
def merge_partial(m_i, l_i, acc, lse2, o):
    """Online softmax over partial results: the running (max, sum, output) state absorbs a
    softmax over other keys given as its normalised output o and log2-sum-exp lse2 (-inf:
    no keys)."""
    m_new = tl.maximum(m_i, lse2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    w = tl.exp2(lse2 - m_safe)
    return m_new, l_i * alpha + w, acc * alpha[:, None] + o * w[:, None]


@triton.jit
def forced_keys(pos, tok, LP: tl.constexpr, S_INIT: tl.constexpr, S_LOCAL: tl.constexpr):
    """Keys pos (a row vector) of each row's forced selection blocks, that the row sees: the
    first S_INIT blocks and the S_LOCAL ending at the row's own (tok // LP)."""
    local_lo = (tok // LP - S_LOCAL + 1) * LP
    return (pos[None, :] <= tok[:, None]) & (
        (pos[None, :] < S_INIT * LP) | (pos[None, :] >= local_lo[:, None]))


@jit_kernel
def nsa_slc_fwd_combine_kernel(
        IDX, PART_O, PART_LSE, GATES, O, OB, LSE,
        sg_b, sg_h, sg_t, sg_c, so_b, so_h, so_t, so_d,
        T, t_lo, n_pos, gate_fixed,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        N: tl.constexpr, N_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        HAS_GATES: tl.constexpr, SLOT: tl.constexpr, ACCUMULATE: tl.constexpr,
        SAVE: tl.constexpr, FOLD: tl.constexpr, LP: tl.constexpr, S_INIT: tl.constexpr,
        S_LOCAL: tl.constexpr):
    """Selected-branch output of positions [t_lo, t_lo + n_pos) for one (batch, KV head, tile):
    merges the n per-block softmaxes of `nsa_slc_fwd_blocks_kernel` (slots in order, each
    weighted by exp(its lse − the total lse)), then stores the lse and the gated output.
    FOLD: the forced blocks are the window kernel's (they have no partial results): merges
    the other slots and leaves their ungated output in OB and their log2-sum-exp in LSE for
    `nsa_win_fwd_kernel` to finish."""
    b, tok, hq, gh, ok, blocks = merge_tile(IDX, T, t_lo, n_pos, H, G, G_PAD, BLOCK_T, N_PAD)
    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, DV_PAD], tl.float32)
    for s_i in range(N):
        live, pair = merge_slot(blocks, ok, tok - t_lo, n_pos, s_i, N_PAD)
        if FOLD:
            live = live & (s_i >= num_forced(tok, LP, S_INIT, S_LOCAL))
        lse_j = tl.load(PART_LSE + pair * G + gh, mask=live, other=float("-inf"))
        o_j = load_rows(PART_O, b, gh, pair, live, 0, DV, G * DV, 1, DV, DV_PAD).to(tl.float32)
        m_i, l_i, acc = merge_partial(m_i, l_i, acc, lse_j, o_j)
    store_selected(m_i, l_i, acc, O, OB, LSE, b, hq, tok, ok, T, so_b, so_h, so_t, so_d, GATES,
                   sg_b, sg_h, sg_t, sg_c, gate_fixed, H, G, DV, DV_PAD, HAS_GATES, SLOT,
                   ACCUMULATE, SAVE, FOLD)
