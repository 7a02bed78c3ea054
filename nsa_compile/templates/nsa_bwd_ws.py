"""Gluon templates of the backward's dK/dV for Hopper (sm_90), warp-specialised.

Two kernels with the contracts of their Triton counterparts in `nsa_bwd`: the selected branch's
dK/dV (`nsa_slc_bwd_dkdv_kernel` without the fused dQ: a program walks one selection block's
inverted selection) and the compressed or window branch's (`nsa_dense_bwd_dkdv_kernel`: a
program walks the query tiles that see one tile of 64 keys). Where the Triton kernels have one
warpgroup load each tile and then run the MMAs and the softmax algebra in sequence (255
registers, spills every step), these split the work as FA3 does:
- a loader warpgroup copies each 32-row tile's q and dO rows and row statistics with cp.async
  into a ring of STAGES shared-memory stages, each completed on an mbarrier (gathered rows for
  the selected branch, consecutive positions for the others);
- two consumer warpgroups take alternate tiles, each with its own fp32 dK/dV (S^T = K·Q^T and
  dP^T = V·dO^T as wgmma from shared memory, P^T and dS^T as register operands of dV += P^T·dO
  and dK += dS^T·Q), so one's softmax overlaps the other's MMAs;
- setmaxnreg splits the register file: few for the loader, CONSUMER_REGS for the second
  consumer (the first takes what is left). With 32-row tiles the consumers' loop compiles
  without spills (64-row tiles would need more than 240 registers).
At the end the second consumer's sums pass through the (then idle) stage buffers to the
first, which stores the block's sums as the Triton kernels do.

Rows of a tile are (position, query head) pairs, position-major: BLOCK_T positions times the
group G (a power of two, BLOCK_T·G = ROWS_PER_TILE), so a tile's row statistics are one run of
ROWS (3, B, H, T, G). Dk == Dv == D, 16-bit inputs, row strides multiples of 16 elements (the
launcher checks: `triton_bwd.warp_specialised_limits`). Gluon has no CPU interpreter:
tests/gpu checks these kernels against the reference and tests/kernel_tests compiles them for
sm_90.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

LOG2E = gl.constexpr(1.4426950408889634)
ROWS_PER_TILE = 32
KEYS_PER_TILE = 64  # one wgmma tile of keys (M = 64 rows per consumer warpgroup)
# setmaxnreg works on whole warpgroups: a loader of fewer warps would still take four. With the
# two consumer warpgroups a launch runs 12 warps (`triton_bwd.WS_WARPS`).
LOADER_WARPS = gl.constexpr(4)


@gluon.jit
def _load_tiles(Q, DO, ROWS, QUERIES, q_bufs, do_bufs, st_bufs, ready, empty, b, h, base,
                n_tiles, last, T, n_rows, sq_b, sq_h, sq_t, so_b, so_h, so_t,
                H: gl.constexpr, G: gl.constexpr, BLOCK_T: gl.constexpr, D: gl.constexpr,
                STAGES: gl.constexpr, LISTED: gl.constexpr):
    """Loader: tile i's q and dO rows into stage i % STAGES and its rows' (lse2, D_c, gate) —
    and with LISTED their positions — into st_bufs[4·stage …]. Tile i holds positions
    base + i·BLOCK_T … (LISTED: the list entries QUERIES[base + i·BLOCK_T …]); indices past
    `last` repeat it, so every row read is a real, finite one (the consumers mask them)."""
    M: gl.constexpr = BLOCK_T * G
    cp: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [LOADER_WARPS, 1],
                                        [1, 0])
    st: gl.constexpr = gl.BlockedLayout([1], [32], [LOADER_WARPS], [0])
    d = gl.arange(0, D, layout=gl.SliceLayout(0, cp))
    r = gl.arange(0, M, layout=gl.SliceLayout(1, cp))
    r_st = gl.arange(0, M, layout=st)
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        first = base + i * BLOCK_T
        tok = gl.minimum(first + r // G, last)
        tok_st = gl.minimum(first + r_st // G, last)
        if LISTED:
            async_copy.async_copy_global_to_shared(st_bufs.index(s * 4 + 3)._reinterpret(
                gl.int32, [M], gl.SwizzledSharedLayout(1, 1, 1, [0])), QUERIES + tok_st)
            tok = gl.load(QUERIES + tok)
            tok_st = gl.load(QUERIES + tok_st)
        tok = tok.to(gl.int64)
        hq = (h * G + r % G).to(gl.int64)
        async_copy.async_copy_global_to_shared(
            q_bufs.index(s), Q + (b.to(gl.int64) * sq_b + hq * sq_h + tok * sq_t)[:, None]
            + d[None, :])
        async_copy.async_copy_global_to_shared(
            do_bufs.index(s), DO + (b.to(gl.int64) * so_b + hq * so_h + tok * so_t)[:, None]
            + d[None, :])
        row = ((b * H + h).to(gl.int64) * T + tok_st) * G + r_st % G
        for c in gl.static_range(3):
            async_copy.async_copy_global_to_shared(st_bufs.index(s * 4 + c),
                                                   ROWS + row + c * n_rows)
        async_copy.mbarrier_arrive(ready.index(s), increment_count=False)


@gluon.jit
def _consume_tiles(k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty, k0, base,
                   n_tiles, bound, qk_scale, scale, PAIRS, DQ_PART, G: gl.constexpr,
                   BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr, D: gl.constexpr,
                   STAGES: gl.constexpr, KEY_STRIDE: gl.constexpr, KEY_LAST: gl.constexpr,
                   WINDOW: gl.constexpr, LISTED: gl.constexpr, FUSE_DQ: gl.constexpr,
                   WHO: gl.constexpr):
    """Consumer WHO (0 or 1): the key tile's fp32 (dK / scale, dV) over tiles i ≡ WHO
    (mod 2), in the (BLOCK_K, D) wgmma accumulator layout. Key c (from k0) sits at position
    c·KEY_STRIDE + KEY_LAST and is seen by the positions t >= it (and t < it + WINDOW when
    WINDOW > 0). A row is live while its list entry (LISTED) or position is below `bound`.
    With FUSE_DQ (listed rows) each row's share of dQ, scale · dS·K, goes to row PAIRS[entry]
    of DQ_PART (pairs, G, D) as `nsa_bwd.nsa_slc_bwd_dkdv_kernel` writes it: formed as
    dQ^T = K^T·dS^T (wgmma needs 64 rows, the tile has 32), dS^T through ds_smem[WHO]."""
    M: gl.constexpr = BLOCK_T * G
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, D, 16])
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col: gl.constexpr = gl.SliceLayout(0, s_layout)
    pos = (k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, s_layout))) * KEY_STRIDE + KEY_LAST
    place = gl.arange(0, M, layout=col) // G
    # dQ^T (D, M) accumulates in s_layout too; stored 8 consecutive d per thread (16-byte stores)
    dq_out: gl.constexpr = gl.BlockedLayout([8, 1], [D // 8, 32 // (D // 8)], [1, 4], [0, 1])
    dq_d = gl.arange(0, D, layout=gl.SliceLayout(1, dq_out))
    dq_r = gl.arange(0, M, layout=gl.SliceLayout(0, dq_out))
    dk = gl.zeros([BLOCK_K, D], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_K, D], gl.float32, acc_layout)
    zero = gl.zeros([BLOCK_K, M], gl.float32, s_layout)
    zero_dq = gl.zeros([D, M], gl.float32, s_layout)
    for i in range(WHO, n_tiles, 2):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        fence_async_shared()  # the cp.async writes, seen by the wgmma's async proxy
        q_s = q_bufs.index(s)
        do_s = do_bufs.index(s)
        s_t = warpgroup_mma(k_smem, q_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(v_smem, do_s.permute((1, 0)), zero, use_acc=False, is_async=True)
        lse2 = st_bufs.index(s * 4).load(col)
        g = st_bufs.index(s * 4 + 2).load(col)
        ok = base + i * BLOCK_T + place < bound
        if LISTED:
            tok = st_bufs.index(s * 4 + 3)._reinterpret(
                gl.int32, [M], gl.SwizzledSharedLayout(1, 1, 1, [0])).load(col)
        else:
            tok = base + i * BLOCK_T + place
        visible = (pos[:, None] <= tok[None, :]) & ok[None, :]
        if WINDOW > 0:
            visible = visible & (pos[:, None] > tok[None, :] - WINDOW)
        s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))
        p = gl.where(visible, gl.exp2(s_t * qk_scale - lse2[None, :]), 0.0) * g[None, :]
        delta = st_bufs.index(s * 4 + 1).load(col)
        dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(dp_t,))
        ds = p * (dp_t - delta[None, :])
        ds_in = ds.to(q_s.dtype)
        if FUSE_DQ:
            ds_smem.index(WHO).store(ds_in)
            fence_async_shared()
        dv = warpgroup_mma(gl.convert_layout(p.to(q_s.dtype), operand), do_s, dv,
                           is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds_in, operand), q_s, dk, is_async=True)
        if FUSE_DQ:
            dq_t = warpgroup_mma(k_smem.permute((1, 0)), ds_smem.index(WHO), zero_dq,
                                 use_acc=False, is_async=True)
            entry = base + i * BLOCK_T + dq_r // G
            pair = gl.load(PAIRS + gl.minimum(entry, bound - 1))
            dk, dv, dq_t = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dq_t))
            mbarrier.arrive(empty.index(s), count=1)
            off = (pair * G + dq_r % G) * D
            gl.store(DQ_PART + off[None, :] + dq_d[:, None],
                     gl.convert_layout((dq_t * scale).to(DQ_PART.dtype.element_ty), dq_out),
                     mask=(entry < bound)[None, :] & (dq_d < D)[:, None])
        else:
            dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
            mbarrier.arrive(empty.index(s), count=1)
    return dk, dv


@gluon.jit
def _first_consumer(k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty, done,
                    sums, k0, base, n_tiles, bound, qk_scale, scale, PAIRS, DQ_PART,
                    G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr,
                    D: gl.constexpr, STAGES: gl.constexpr, KEY_STRIDE: gl.constexpr,
                    KEY_LAST: gl.constexpr, WINDOW: gl.constexpr, LISTED: gl.constexpr,
                    FUSE_DQ: gl.constexpr):
    """The default partition: the key tile's whole sums, its own plus the second consumer's,
    which that one leaves in the stage buffers once this one is done reading them."""
    dk, dv = _consume_tiles(k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty, k0,
                            base, n_tiles, bound, qk_scale, scale, PAIRS, DQ_PART, G, BLOCK_T,
                            BLOCK_K, D, STAGES, KEY_STRIDE, KEY_LAST, WINDOW, LISTED, FUSE_DQ,
                            0)
    mbarrier.arrive(done, count=1)
    mbarrier.wait(sums, 0)
    dk += _sums_view(q_bufs, BLOCK_K, D).load(dk.type.layout)
    dv += _sums_view(do_bufs, BLOCK_K, D).load(dv.type.layout)
    return dk, dv


@gluon.jit
def _second_consumer(k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty, done,
                     sums, k0, base, n_tiles, bound, qk_scale, scale, PAIRS, DQ_PART,
                     G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr,
                     D: gl.constexpr, STAGES: gl.constexpr, KEY_STRIDE: gl.constexpr,
                     KEY_LAST: gl.constexpr, WINDOW: gl.constexpr, LISTED: gl.constexpr,
                     FUSE_DQ: gl.constexpr):
    """A worker partition (it cannot return values): its sums into the stage buffers."""
    dk, dv = _consume_tiles(k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty, k0,
                            base, n_tiles, bound, qk_scale, scale, PAIRS, DQ_PART, G, BLOCK_T,
                            BLOCK_K, D, STAGES, KEY_STRIDE, KEY_LAST, WINDOW, LISTED, FUSE_DQ,
                            1)
    mbarrier.wait(done, 0)
    _sums_view(q_bufs, BLOCK_K, D).store(dk)
    _sums_view(do_bufs, BLOCK_K, D).store(dv)
    mbarrier.arrive(sums, count=1)


@gluon.jit
def _sums_view(bufs, BLOCK_K: gl.constexpr, D: gl.constexpr):
    """The stage buffers of q or dO as one (BLOCK_K, D) fp32 tile."""
    return bufs._reinterpret(gl.float32, [BLOCK_K, D], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))


@gluon.jit
def _walk(Q, K, V, DO, ROWS, QUERIES, PAIRS, DQ_PART, b, h, k0, n_keys, base, n_tiles, bound,
          last, T, n_rows, scale, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b,
          so_h, so_t, H: gl.constexpr, G: gl.constexpr, BLOCK_T: gl.constexpr,
          BLOCK_K: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
          KEY_STRIDE: gl.constexpr, KEY_LAST: gl.constexpr, WINDOW: gl.constexpr,
          LISTED: gl.constexpr, FUSE_DQ: gl.constexpr, CONSUMER_REGS: gl.constexpr,
          LOADER_REGS: gl.constexpr):
    """The warp-specialised walk over n_tiles query tiles for keys k0 … k0 + BLOCK_K - 1 of
    (b, KV head h) (zero past n_keys): -> the fp32 (dK / scale, dV) sums in the wgmma
    accumulator layout (and with FUSE_DQ the rows' dQ shares in DQ_PART, `_consume_tiles`)."""
    M: gl.constexpr = BLOCK_T * G
    gl.static_assert(STAGES * M >= 2 * BLOCK_K, "the stage buffers hold the second consumer's sums")
    tiles: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                               rank=2)
    kv: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
    c = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, kv))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, kv))
    key = c.to(gl.int64)[:, None]
    k = gl.load(K + b.to(gl.int64) * sk_b + h.to(gl.int64) * sk_h + key * sk_t + d[None, :],
                mask=(c < n_keys)[:, None], other=0.0)
    v = gl.load(V + b.to(gl.int64) * sv_b + h.to(gl.int64) * sv_h + key * sv_t + d[None, :],
                mask=(c < n_keys)[:, None], other=0.0)
    k_smem = gl.allocate_shared_memory(k.dtype, [BLOCK_K, D], tiles, k)
    v_smem = gl.allocate_shared_memory(v.dtype, [BLOCK_K, D], tiles, v)
    q_bufs = gl.allocate_shared_memory(k.dtype, [STAGES, M, D], tiles)
    do_bufs = gl.allocate_shared_memory(k.dtype, [STAGES, M, D], tiles)
    # per stage: lse2, D_c, gate (fp32) and, for listed rows, the positions (int32)
    st_bufs = gl.allocate_shared_memory(gl.float32, [STAGES * 4, M],
                                        gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # each consumer's dS^T, the right operand of its dQ^T = K^T·dS^T (FUSE_DQ)
    ds_smem = gl.allocate_shared_memory(k.dtype, [2, BLOCK_K, M], gl.NVMMASharedLayout(
        swizzle_byte_width=min(M * 2, 128), element_bitwidth=16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # the first consumer is done with the stages; the second's sums are in them
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    sums = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=LOADER_WARPS * 32)  # each loader thread's copies
        mbarrier.init(empty.index(i), count=1)
    mbarrier.init(done, count=1)
    mbarrier.init(sums, count=1)
    fence_async_shared()
    qk_scale = scale * LOG2E
    return gl.warp_specialize(
        [(_first_consumer, (k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty,
                            done, sums, k0, base, n_tiles, bound, qk_scale, scale, PAIRS,
                            DQ_PART, G, BLOCK_T, BLOCK_K, D, STAGES, KEY_STRIDE, KEY_LAST,
                            WINDOW, LISTED, FUSE_DQ)),
         (_second_consumer, (k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_smem, ready, empty,
                             done, sums, k0, base, n_tiles, bound, qk_scale, scale, PAIRS,
                             DQ_PART, G, BLOCK_T, BLOCK_K, D, STAGES, KEY_STRIDE, KEY_LAST,
                             WINDOW, LISTED, FUSE_DQ)),
         (_load_tiles, (Q, DO, ROWS, QUERIES, q_bufs, do_bufs, st_bufs, ready, empty, b, h, base,
                        n_tiles, last, T, n_rows, sq_b, sq_h, sq_t, so_b, so_h, so_t, H, G,
                        BLOCK_T, D, STAGES, LISTED))],
        [4, LOADER_WARPS], [CONSUMER_REGS, LOADER_REGS])


@gluon.jit
def _store_block(OUT, SUM, x, row0, rows, ok, s_row, D: gl.constexpr, ACCUMULATE: gl.constexpr):
    """OUT[row0 + rows[r] · s_row + d] = x[r, d] (+ SUM's element there with ACCUMULATE), in
    OUT's dtype, for the rows with ok."""
    d = gl.arange(0, D, layout=gl.SliceLayout(0, x.type.layout))
    off = row0 + rows.to(gl.int64)[:, None] * s_row + d[None, :]
    mask = ok[:, None] & (d < D)[None, :]
    if ACCUMULATE:
        x += gl.load(SUM + off, mask=mask, other=0.0)
    gl.store(OUT + off, x.to(OUT.dtype.element_ty), mask=mask)


@gluon.jit
def nsa_slc_bwd_dkdv_ws_kernel(
        Q, K, V, DO, ROWS, QUERIES, STARTS, PAIRS, SLOTS, DK_OUT, DV_OUT, DK_PART, DV_PART,
        DQ_PART,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
        sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
        T, n_blocks, n_rows, q_chunk, scale,
        H: gl.constexpr, G: gl.constexpr, BLOCK_T: gl.constexpr, LP: gl.constexpr,
        D: gl.constexpr, ACCUMULATE: gl.constexpr, FUSE_DQ: gl.constexpr,
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """dK, dV of the selected branch for one (chunk s, batch, KV head, selection block j), and
    with FUSE_DQ each (query, slot) pair's share of dQ, as `nsa_bwd.nsa_slc_bwd_dkdv_kernel`
    (whole-width shares) computes and stores them: chunk 0 into DK_OUT/DV_OUT (fp32 sums,
    added to with ACCUMULATE), chunk s >= 1 into partial slot SLOTS[g] + s - 1 of
    DK_PART/DV_PART ((slots, LP, D) fp32); the shares at row PAIRS[e] of DQ_PART (pairs, G, D;
    the inputs' dtype). Strides are of the first three dimensions (the last is 1)."""
    s_id = gl.program_id(0)
    pid_bh = gl.program_id(1)
    j = gl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    grp = pid_bh.to(gl.int64) * n_blocks + j
    start = gl.load(STARTS + grp) + s_id * q_chunk
    end = gl.minimum(gl.load(STARTS + grp + 1), start + q_chunk)
    needed = start < end
    if not ACCUMULATE:
        needed = needed | (s_id == 0)  # chunk 0 writes every block, zeros where none chose it
    if needed:
        n_tiles = gl.cdiv(end - start, BLOCK_T).to(gl.int32)
        dk, dv = _walk(Q, K, V, DO, ROWS, QUERIES, PAIRS, DQ_PART, b, h, j * LP, T, start,
                       n_tiles, end, end - 1, T, n_rows, scale, sq_b, sq_h, sq_t, sk_b, sk_h,
                       sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, H, G, BLOCK_T, LP, D, STAGES,
                       1, 0, 0, True, FUSE_DQ, CONSUMER_REGS, LOADER_REGS)
        rows = gl.arange(0, LP, layout=gl.SliceLayout(1, dk.type.layout))
        ok = (j * LP + rows) < T
        if s_id == 0:
            _store_block(DK_OUT, DK_OUT, dk * scale,
                         b.to(gl.int64) * sdk_b + h.to(gl.int64) * sdk_h, j * LP + rows, ok,
                         sdk_t, D, ACCUMULATE)
            _store_block(DV_OUT, DV_OUT, dv, b.to(gl.int64) * sdv_b + h.to(gl.int64) * sdv_h,
                         j * LP + rows, ok, sdv_t, D, ACCUMULATE)
        else:
            slot = (gl.load(SLOTS + grp) + s_id - 1).to(gl.int64)
            _store_block(DK_PART, DK_PART, dk * scale, slot * (LP * D), rows, ok, D, D, False)
            _store_block(DV_PART, DV_PART, dv, slot * (LP * D), rows, ok, D, D, False)


@gluon.jit
def nsa_dense_bwd_dkdv_ws_kernel(
        Q, K, V, DO, ROWS, DK_SUM, DV_SUM, DK_OUT, DV_OUT,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
        sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
        T, n_keys, n_rows, q_chunk, split_stride, scale,
        H: gl.constexpr, G: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr,
        KEY_STRIDE: gl.constexpr, KEY_LAST: gl.constexpr, WINDOW: gl.constexpr,
        D: gl.constexpr, ACCUMULATE: gl.constexpr, STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """dK, dV of the compressed or window branch for one (key tile, batch, KV head, query
    chunk), as `nsa_bwd.nsa_dense_bwd_dkdv_kernel` computes and stores them: the chunk's
    query tiles that see the tile's keys, its sums at split_stride · chunk elements into
    DK_OUT/DV_OUT (plus DK_SUM/DV_SUM with ACCUMULATE; the output may be the input dtype).
    DK_OUT/DV_OUT strides are one chunk's, of the first three dimensions."""
    k0 = gl.program_id(0) * BLOCK_K
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_lo = gl.program_id(2) * q_chunk
    split = gl.program_id(2).to(gl.int64) * split_stride
    first = k0 * KEY_STRIDE + KEY_LAST
    lo = gl.maximum(first, q_lo) // BLOCK_T * BLOCK_T
    hi = gl.minimum(T, q_lo + q_chunk)
    if WINDOW > 0:
        hi = gl.minimum(hi, first + (BLOCK_K - 1) * KEY_STRIDE + WINDOW)
    n_tiles = gl.maximum(gl.cdiv(hi - lo, BLOCK_T), 0)
    dk, dv = _walk(Q, K, V, DO, ROWS, Q, Q, Q, b, h, k0, n_keys, lo, n_tiles, T, T - 1, T,
                   n_rows, scale, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b,
                   so_h, so_t, H, G, BLOCK_T, BLOCK_K, D, STAGES, KEY_STRIDE, KEY_LAST, WINDOW,
                   False, False, CONSUMER_REGS, LOADER_REGS)
    rows = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, dk.type.layout))
    ok = rows < n_keys
    row0 = b.to(gl.int64) * sdk_b + h.to(gl.int64) * sdk_h
    _store_block(DK_OUT + split, DK_SUM, dk * scale, row0, rows, ok, sdk_t, D, ACCUMULATE)
    row0 = b.to(gl.int64) * sdv_b + h.to(gl.int64) * sdv_h
    _store_block(DV_OUT + split, DV_SUM, dv, row0, rows, ok, sdv_t, D, ACCUMULATE)
