"""Triton helpers shared by the NSA forward templates: GQA row packing, online softmax, top-n keys.

A program owns one KV head and a tile of BLOCK_T query positions; its M = BLOCK_T * G_PAD rows
are (position, query head) pairs, position-major, so every MMA is fed by the whole GQA group
(G_PAD is the group size rounded up to a power of two; padded rows are masked).
"""
import inspect

import triton
import triton.language as tl

LENGTHS = ("T", "Tc", "n_keys", "n_blocks", "n_rows", "n_branch_stride", "q_chunk",
           "split_stride")

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def jit_kernel(fn):
    """triton.jit that does not specialise the length arguments (LENGTHS): one compile per
    block-size config instead of one per T == 1 / T % 16 == 0 / other."""
    params = inspect.signature(fn).parameters
    return triton.jit(do_not_specialize=[n for n in LENGTHS if n in params])(fn)


@triton.jit
def gqa_rows(t0, h, T, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row r of the tile -> (position, query head, valid)."""
    r = tl.arange(0, BLOCK_T * G_PAD)
    tok = t0 + r // G_PAD
    g = r % G_PAD
    return tok, h * G + g, (tok < T) & (g < G)


@triton.jit
def gqa_rows_by_head(t0, h, T, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """gqa_rows in head-major order (row r: query head r // BLOCK_T, position r % BLOCK_T), the
    order of a (G_PAD, BLOCK_T) block of q[b, h·G …, t0 …] as `load_tile` copies it."""
    r = tl.arange(0, BLOCK_T * G_PAD)
    tok = t0 + r % BLOCK_T
    g = r // BLOCK_T
    return tok, h * G + g, (tok < T) & (g < G)


@triton.jit
def load_rows(ptr, b, hq, tok, ok, s_b, s_h, s_t, s_d, D: tl.constexpr, D_PAD: tl.constexpr):
    """x[b, hq, tok, :] for each row -> (rows, D_PAD); 64-bit offsets."""
    d = tl.arange(0, D_PAD)
    off = b.to(tl.int64) * s_b + hq.to(tl.int64)[:, None] * s_h + tok.to(tl.int64)[:, None] * s_t
    return tl.load(ptr + off + d[None, :] * s_d, mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def load_keys(ptr, b, h, pos, ok, s_b, s_h, s_t, s_d, D: tl.constexpr, D_PAD: tl.constexpr):
    """x[b, h, pos, :] for a vector of key positions -> (len(pos), D_PAD); 64-bit offsets."""
    d = tl.arange(0, D_PAD)
    off = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + pos.to(tl.int64)[:, None] * s_t
    return tl.load(ptr + off + d[None, :] * s_d, mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def load_tile(ptr, desc, b, h, t0, n, s_b, s_h, s_t, s_d, HEADS: tl.constexpr,
              BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TMA: tl.constexpr):
    """x[b, h : h + HEADS, t0 : t0 + BLOCK, :] -> (HEADS * BLOCK, D_PAD) rows, head-major, zero
    past x's length n and past column D. TMA: one bulk copy through `desc`, a tensor
    descriptor of x with block [1, HEADS, BLOCK, D_PAD] (`triton_fwd.tiles`; heads past x's
    end are zero too); else pointer loads (which need HEADS == 1). t0 >= 0."""
    if TMA:
        x = desc.load([b, h, t0, 0]).reshape(HEADS * BLOCK, D_PAD)
    else:
        pos = t0 + tl.arange(0, BLOCK)
        x = load_keys(ptr, b, h, pos, pos < n, s_b, s_h, s_t, s_d, D, D_PAD)
    return x


@triton.jit
def key_value_tiles(K, V, K_TILES, V_TILES, b, h, k0, n, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t,
                    sv_d, BLOCK: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
                    DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_V: tl.constexpr,
                    TMA: tl.constexpr):
    """Keys and values k0 … k0 + BLOCK - 1 of (b, KV head h) via `load_tile` (without HAS_V the
    keys stand in for the values)."""
    k = load_tile(K, K_TILES, b, h, k0, n, sk_b, sk_h, sk_t, sk_d, 1, BLOCK, DK, DK_PAD, TMA)
    v = k
    if HAS_V:
        v = load_tile(V, V_TILES, b, h, k0, n, sv_b, sv_h, sv_t, sv_d, 1, BLOCK, DV, DV_PAD, TMA)
    return k, v


@triton.jit
def online_softmax_step(s, m_i, l_i, acc, v):
    """One key tile of flash attention. s: (M, K) masked scores in log2 units (scale·log2(e)
    folded in; -inf = hidden), v: (K, Dv). Rows that have seen only hidden keys keep
    m = -inf, l = 0, acc = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def finish_softmax(m_i, l_i, acc):
    """-> (normalised output, natural log-sum-exp); a row with nothing visible gives 0 and
    lse = +inf."""
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    m = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    return o, lse


@triton.jit
def load_gate(GATES, b, hq, tok, ok, sg_b, sg_h, sg_t, sg_c, gate_fixed,
              HAS_GATES: tl.constexpr, SLOT: tl.constexpr):
    """Each row's weight of branch SLOT: the learned gate, or the fixed weight."""
    if HAS_GATES:
        goff = b.to(tl.int64) * sg_b + hq.to(tl.int64) * sg_h + tok.to(tl.int64) * sg_t + SLOT * sg_c
        return tl.load(GATES + goff, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, gate_fixed, 0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, x, b, hq, tok, ok, s_b, s_h, s_t, s_d, D: tl.constexpr, D_PAD: tl.constexpr,
               ACCUMULATE: tl.constexpr):
    """ptr[b, hq, tok, :] (+)= x for each row, in ptr's dtype (the sum in fp32); hq may be one
    head for all rows (then tok lists key positions)."""
    d = tl.arange(0, D_PAD)
    row = b.to(tl.int64) * s_b + hq.to(tl.int64) * s_h + tok.to(tl.int64) * s_t
    ptrs = ptr + row[:, None] + d[None, :] * s_d
    mask = ok[:, None] & (d[None, :] < D)
    if ACCUMULATE:
        x += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_store(O, OB, o, b, hq, tok, ok, s_b, s_h, s_t, s_d, GATES, sg_b, sg_h, sg_t, sg_c,
                gate_fixed, DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_GATES: tl.constexpr,
                SLOT: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE: tl.constexpr):
    """O[b, hq, tok] (+)= g * o, with g the learned gate of branch SLOT or the fixed weight;
    with SAVE also OB[b, hq, tok] = o (the ungated branch output the backward reads; OB has
    O's strides)."""
    if SAVE:
        store_rows(OB, o, b, hq, tok, ok, s_b, s_h, s_t, s_d, DV, DV_PAD, False)
    g = load_gate(GATES, b, hq, tok, ok, sg_b, sg_h, sg_t, sg_c, gate_fixed, HAS_GATES, SLOT)
    store_rows(O, o * g[:, None], b, hq, tok, ok, s_b, s_h, s_t, s_d, DV, DV_PAD, ACCUMULATE)


@triton.jit
def monotone_bits(x):
    """fp32 -> int32 whose signed order is the float order."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def pack_key(score, idx):
    """(score, block index) -> int64 whose descending order is score desc, then index asc."""
    return (monotone_bits(score).to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def unpack_index(key):
    return 0x7FFFFFFF - (key & 0xFFFFFFFF).to(tl.int32)
