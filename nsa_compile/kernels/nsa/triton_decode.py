"""Launcher of the Triton NSA decoding kernels (templates/nsa_decode.py): the last Tq queries
of a sequence against its KV cache, the CUDA path of `ops.nsa_attention_decode`.

Decoding is memory-bound (a handful of queries per KV head), so the block sizes are fixed, not
tuned: 64 keys per tile, and as many compressed-key splits as it takes to give every SM a few
programs (flash-decoding). The partial softmaxes' statistics are fp32, their normalised outputs
in the input's dtype (half the scratch traffic in bf16, H200 64k: 68.7 vs 75.4 µs a step in
fp32; the forward's block-by-block partials do the same).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..host import cdiv
from ...templates.nsa_decode import (nsa_decode_attend_kernel, nsa_decode_cmp_kernel,
                                     nsa_decode_combine_kernel, nsa_decode_select_kernel)
from .inverted import sms
from .params import NSAParams, num_selection_blocks, supported
from .triton_fwd import _pow2, launch_geometry, tile_pair

BLOCK_N, WARPS = 64, 4
# Selection blocks per program of the selection kernel (`select_tile`): each program keeps its
# n best as candidates, and every selected-branch program ranks all tiles' candidates, a cost
# quadratic in their count, so tiles are large (about SELECT_TILES of them per position); but a
# program loads G·tile scores, so G·tile stays within SELECT_SCORES, and the tile within 64 …
# 256. H200 (64k): tiles of 128 at G=16 (select 10.4 µs vs 29.5 with 256; 64 at 8k: step 24.2
# vs 26.2 µs), 256 at G=4 (step 72.9 vs 76.3 µs with 128; 128k: 124.2 vs 142.0 with 128 and
# 130.2 with 512). Past MAX_SELECTION_BLOCKS the ranking's registers run out.
SELECT_TILES, SELECT_SCORES, MIN_SELECT_TILE, MAX_SELECT_TILE = 4, 2048, 64, 256
MAX_SELECTION_BLOCKS = 4096
# Compressed-key splits: at least this many programs per SM, each at least one tile.
PROGRAMS_PER_SM = 4
# Parts merged per load (combine) and output columns per combine program. Merges of at most
# MAX_UNROLLED_CHUNKS chunks are unrolled, so their loads are in flight together; longer ones
# loop. H200, 64/4 64k: combine 8.2 µs looped with 32 columns, 7.1 unrolled, 6.9 unrolled with
# 16; 8 parts per load beat 4 and 16.
PART_CHUNK, COMBINE_COLUMNS = 8, 16
MAX_UNROLLED_CHUNKS = 4


def decode_supported(params: NSAParams, T: int, dk: int, dv: int) -> Optional[str]:
    """None when the Triton decoding kernels handle this call, else the reason they do not."""
    reason = supported(params, dk, dv)
    if reason is None and params.has_slc and (
            num_selection_blocks(T, params.select_block) > MAX_SELECTION_BLOCKS):
        reason = (f"decoding over more than {MAX_SELECTION_BLOCKS} selection blocks "
                  f"(T = {T} > {MAX_SELECTION_BLOCKS * params.select_block})")
    return reason


def select_tile(n_blocks: int, G: int) -> int:
    """Selection blocks per program of the selection kernel: a power of two near
    n_blocks / SELECT_TILES, at least MIN_SELECT_TILE, at most SELECT_SCORES / G and
    MAX_SELECT_TILE."""
    budget = 1 << (max(SELECT_SCORES // G, 1).bit_length() - 1)  # a power of two <= it
    most = min(budget, MAX_SELECT_TILE)
    return max(min(_pow2(cdiv(n_blocks, SELECT_TILES)), most), MIN_SELECT_TILE)


def compressed_split(Tc: int, programs: int, device: torch.device) -> int:
    """Compressed keys per split: a multiple of BLOCK_N giving `programs` (B·H·Tq) times the
    splits at least PROGRAMS_PER_SM programs per SM where Tc allows."""
    splits = max(1, cdiv(PROGRAMS_PER_SM * sms(device), max(programs, 1)))
    return cdiv(max(cdiv(Tc, splits), 1), BLOCK_N) * BLOCK_N


def _unrolled(n_parts: int, chunk: int) -> int:
    """Chunks of an unrolled merge of n_parts parts, rounded up to a power of two (fewer
    compiles as T grows), or 0: too many to unroll, the merge loops."""
    chunks = _pow2(cdiv(n_parts, chunk))
    return chunks if chunks <= MAX_UNROLLED_CHUNKS else 0


def _lse_merge(n_splits: int) -> dict:
    """The selection kernel's merge of the compressed splits' (m, l) alone: in one chunk of up
    to 64 parts (one load at the default split counts)."""
    chunk = min(_pow2(max(n_splits, 1)), 64)
    return dict(S_CHUNK=chunk, S_CHUNKS=_unrolled(n_splits, chunk))


def nsa_decode_cuda(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
                    k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], params: NSAParams,
                    split: Optional[int] = None) -> Tensor:
    """q: (B, HQ, Tq, Dk) at positions T - Tq … T - 1 of k: (B, H, T, Dk), v: (B, H, T, Dv);
    gates (B, HQ, Tq, n_branches) or None; k_cmp/v_cmp (B, H, Tc, D) or None for absent
    branches. Returns (B, HQ, Tq, Dv) in q's dtype. split: compressed keys per split (a
    multiple of 64; default `compressed_split`)."""
    return decode_with_blocks(q, k, v, gates, k_cmp, v_cmp, params, split)[0]


def decode_with_blocks(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
                       k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], params: NSAParams,
                       split: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """`nsa_decode_cuda` and the chosen blocks (B, H, Tq, n) int32, -1 past the last (None
    without the selected branch)."""
    B, H, Tq, G, fixed, common, gstr = launch_geometry(q, k, v, gates, params)
    T, DV, dev = k.shape[2], v.shape[-1], q.device
    o = torch.empty(B, q.shape[1], Tq, DV, device=dev, dtype=q.dtype)
    if o.numel() == 0:
        return o, None
    G_PAD, DV_PAD = _pow2(G, 16), common["DV_PAD"]
    Tc = k_cmp.shape[2] if params.needs_cmp else 0
    split = split or compressed_split(Tc, B * H * Tq, dev)
    n_splits = cdiv(Tc, split) if params.needs_cmp else 0
    lp, n_sel = params.select_block, params.select_count
    n_slc = n_sel if params.has_slc else 0
    seg = lp if params.has_slc else BLOCK_N
    span = min(params.window or T, T)
    n_win = cdiv(span, seg) if params.has_win else 0
    n_parts = n_splits + n_slc + n_win
    pm = torch.empty(B * H, Tq, n_parts, G, device=dev, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B * H, Tq, n_parts, G, DV_PAD, device=dev, dtype=q.dtype)
    n_blocks = num_selection_blocks(T, lp) if params.has_slc else 0
    tile = select_tile(n_blocks, G)
    n_jtiles = cdiv(n_blocks, tile)
    n_cand = n_jtiles * n_sel
    cand = torch.empty(B * H, Tq, n_cand, device=dev, dtype=torch.int64)
    idx = torch.empty(B * H, Tq, n_slc, device=dev, dtype=torch.int32)
    scores = torch.empty(B * H, Tq, G, Tc if params.has_slc else 0, device=dev,
                         dtype=torch.float32)
    geometry = dict(H=H, G=G, G_PAD=G_PAD, DK=common["DK"], DK_PAD=common["DK_PAD"], DV=DV,
                    DV_PAD=DV_PAD)
    kc = k_cmp if k_cmp is not None else k
    vc = v_cmp if v_cmp is not None else kc
    block_n = min(BLOCK_N, _pow2(seg, 16))
    keys = dict(SEG=seg, SEG_BLOCK_N=block_n, SEG_TILES=cdiv(seg, block_n), N_SLC=n_slc)
    kc_tiles, vc_tiles, tma_cmp = tile_pair(kc, vc, BLOCK_N)
    k_tiles, v_tiles, tma = tile_pair(k, v, block_n)
    if n_splits + n_win:
        nsa_decode_cmp_kernel[(B * H, Tq, n_splits + n_win)](
            q, kc, vc, kc_tiles, vc_tiles, k, v, k_tiles, v_tiles, scores, pm, pl, pacc, T, Tq,
            Tc, n_parts, n_splits, split, *q.stride(), *kc.stride(), *vc.stride(), *k.stride(),
            *v.stride(), params.scale, L=params.compress_block, D_STRIDE=params.compress_stride,
            BLOCK_N=BLOCK_N, N_TILES=split // BLOCK_N, HAS_CMP=params.has_cmp,
            HAS_SLC=params.has_slc, WINDOW=params.window if params.has_win else 0,
            TMA_CMP=tma_cmp, TMA=tma, num_warps=WARPS, **keys, **geometry)
    if params.has_slc:
        r, qc = params.compress_block // params.compress_stride, lp // params.compress_stride
        nsa_decode_select_kernel[(B * H, Tq, n_jtiles)](
            scores, pm, pl, cand, T, Tq, Tc, n_parts, n_splits, G=G, G_PAD=G_PAD,
            L=params.compress_block, D_STRIDE=params.compress_stride, L_SEL=lp, N_SEL=n_sel,
            INITIAL=params.select_initial, LOCAL=params.select_local, BLOCK_J=tile,
            U_PAD=_pow2(qc + r - 1), **_lse_merge(n_splits), num_warps=WARPS)
        nsa_decode_attend_kernel[(B * H, Tq, n_slc)](
            q, k, v, k_tiles, v_tiles, cand, idx, pm, pl, pacc, T, Tq, n_parts, n_splits,
            n_cand, *q.stride(), *k.stride(), *v.stride(), params.scale, C_PAD=_pow2(n_cand),
            TMA=tma, num_warps=WARPS, **keys, **geometry)
    present = [b for b, on in zip(("compressed", "selected", "window"),
                                  (params.has_cmp, params.has_slc, params.has_win)) if on]
    weights = dict(zip(present, fixed))
    block_dv = min(COMBINE_COLUMNS, DV_PAD)
    nsa_decode_combine_kernel[(B * H, Tq, DV_PAD // block_dv)](
        pm, pl, pacc, gates if gates is not None else o, o, Tq, n_parts, n_splits, n_win,
        *o.stride(), *gstr, weights.get("compressed", 0.0), weights.get("selected", 0.0),
        weights.get("window", 0.0), H=H, G=G, G_PAD=G_PAD, DV=DV, DV_PAD=DV_PAD,
        BLOCK_DV=block_dv, N_SLC=n_slc, HAS_CMP=params.has_cmp, HAS_WIN=params.has_win,
        HAS_GATES=gates is not None, SLOT_SLC=present.index("selected") if params.has_slc else 0,
        SLOT_WIN=present.index("window") if params.has_win else 0, P_CHUNK=PART_CHUNK,
        CMP_CHUNKS=_unrolled(n_splits, PART_CHUNK), SLC_CHUNKS=_unrolled(n_slc, PART_CHUNK),
        WIN_CHUNKS=_unrolled(n_win, PART_CHUNK), num_warps=WARPS)
    blocks = idx.view(B, H, Tq, n_sel) if params.has_slc else None
    return o, blocks
