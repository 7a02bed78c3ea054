"""Triton Engram lookup: hashing fused with the row gather, and a deterministic table gradient.

Forward: one program per tile of tokens computes every order's suffix hash incrementally
(order n's hash is order n-1's XOR one more term), reduces it modulo each head's prime and
copies a (tokens, K, head_dim) tile of table rows into the concatenated embedding, so each
token's K rows are written contiguously; the canonical ids are read once per (token, j) and
the table rows once per (token, head). Backward: the flat row indices
are sorted (stable); each block of sorted entries sums its runs of equal rows with a segmented
scan (every lane loads one gradient row), and a second small kernel adds, in block order, the
partial sums of runs that cross block edges. The order of every addition is fixed by the
sorted order and the block size, so the table gradient is bitwise reproducible (no float
atomics); it matches the reference's in-order fp32 sum to rounding.

The gate and projections stay in PyTorch: they are GEMMs over d_model, where cuBLAS wins and
fusing them into a gather gains no memory traffic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..host import cdiv, next_pow2


@dataclass(frozen=True)
class EngramKernelConfig:
    """tile: elements (tokens x rows x head_dim, padded) one forward program copies;
    block_n: sorted entries per backward program. The backward's segmented scan runs along
    the entries, so it is fastest within one warp (H100, 8.4 M entries: 32/1 warp beats
    64/4 warps by 2.4x)."""

    tile: int = 8192
    num_warps: int = 4
    block_n: int = 32
    bwd_num_warps: int = 1


DEFAULT = EngramKernelConfig()
# Order n's slot in `orders` sits in 4 bits of a constexpr code (15 = n is not an order).
_NO_SLOT = 15
MAX_ORDER = 14


@triton.jit
def _engram_fwd_kernel(ids_ptr, canon_ptr, mult_ptr, primes_ptr, offsets_ptr, pad_ptr,
                       table_ptr, emb_ptr, rows_ptr, N, T, V, DH,
                       MAX_N: tl.constexpr, SLOT_CODE: tl.constexpr, HEADS: tl.constexpr,
                       K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    t = tok % T
    c = tl.arange(0, K_PAD)
    cmask = c < K
    col_slot = c // HEADS
    pad = tl.load(pad_ptr).to(tl.int64)
    h = tl.zeros([BLOCK_T], dtype=tl.int64)
    hashes = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
    for j in tl.static_range(MAX_N):
        valid = tmask & (t >= j)
        x = tl.load(ids_ptr + tok - j, mask=valid, other=0).to(tl.int64)
        x = tl.minimum(tl.maximum(x, 0), V - 1)
        y = tl.where(valid, tl.load(canon_ptr + x, mask=valid, other=0), pad)
        h = h ^ (y * tl.load(mult_ptr + j))
        # j + 1's slot; 15 (not an order) matches no column, so no branch is needed
        hashes = tl.where(col_slot[None, :] == ((SLOT_CODE >> (4 * (j + 1))) & 15),
                          h[:, None], hashes)
    p = tl.load(primes_ptr + c, mask=cmask, other=1)
    off = tl.load(offsets_ptr + c, mask=cmask, other=0)
    rows = hashes % p[None, :] + off[None, :]
    m2 = tmask[:, None] & cmask[None, :]
    flat = tok[:, None] * K + c[None, :]
    tl.store(rows_ptr + flat, rows, mask=m2)
    d = tl.arange(0, BLOCK_D)
    m3 = m2[:, :, None] & (d < DH)[None, None, :]
    # one (BLOCK_T, K, Dh) tile: each token's K rows land contiguously in emb
    vals = tl.load(table_ptr + rows[:, :, None] * DH + d[None, None, :], mask=m3)
    tl.store(emb_ptr + flat[:, :, None] * DH + d[None, None, :], vals, mask=m3)


@triton.jit
def _segmented_add(v1, f1, v2, f2):
    return tl.where(f2, v2, v1 + v2), f1 | f2


@triton.jit
def _engram_bwd_kernel(sorted_ptr, perm_ptr, grad_ptr, out_ptr, first_ptr, last_ptr, N, DH,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of sorted entries: a segmented scan sums each run of equal rows (a fixed
    tree order). Runs wholly inside the block are written to out; the block's first run, when
    it continues an earlier block's, goes to first[b]; its last run, when it starts here and
    continues past the block, to last[b] (both finished by `_engram_bwd_carry_kernel`)."""
    b = tl.program_id(0)
    k = tl.arange(0, BLOCK_N)
    i = b.to(tl.int64) * BLOCK_N + k
    imask = i < N
    r = tl.load(sorted_ptr + i, mask=imask, other=-1).to(tl.int64)
    prev = tl.load(sorted_ptr + i - 1, mask=imask & (i > 0), other=-2).to(tl.int64)
    nxt = tl.load(sorted_ptr + i + 1, mask=(i + 1) < N, other=-2).to(tl.int64)
    head = r != prev  # a run starts here, globally
    tail = r != nxt  # a run ends here, globally
    piece_start = head | (k == 0)
    piece_end = imask & (tail | (k == BLOCK_N - 1))
    d = tl.arange(0, BLOCK_D)
    dm = (d < DH)[None, :]
    src = tl.load(perm_ptr + i, mask=imask, other=0)
    g = tl.load(grad_ptr + src[:, None] * DH + d[None, :], mask=imask[:, None] & dm,
                other=0.0).to(tl.float32)
    flags = tl.broadcast_to(piece_start[:, None], (BLOCK_N, BLOCK_D))
    acc, _ = tl.associative_scan((g, flags), 0, _segmented_add)
    # the block's first piece continues an earlier run unless entry 0 is a head
    in_first = tl.cumsum((piece_start & (k > 0)).to(tl.int32), 0) == 0
    continued = in_first & (tl.sum((head & (k == 0)).to(tl.int32), 0) == 0)
    tl.store(out_ptr + r[:, None] * DH + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(piece_end & tail & ~continued)[:, None] & dm)
    part = b.to(tl.int64) * DH + k[:, None] * 0 + d[None, :]
    tl.store(first_ptr + part, acc, mask=(piece_end & continued)[:, None] & dm)
    tl.store(last_ptr + part, acc, mask=(piece_end & ~tail & ~continued)[:, None] & dm)


@triton.jit
def _engram_bwd_carry_kernel(sorted_ptr, out_ptr, first_ptr, last_ptr, N, DH,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Finishes a run that starts in block b and continues past it: last[b] plus the
    following blocks' first[] in block order, as long as the run goes on."""
    b = tl.program_id(0).to(tl.int64)
    lo = b * BLOCK_N
    hi = tl.minimum(lo + BLOCK_N, N) - 1
    r = tl.load(sorted_ptr + hi).to(tl.int64)
    nxt = tl.load(sorted_ptr + hi + 1, mask=hi + 1 < N, other=-2).to(tl.int64)
    # the block's last run starts inside it unless the whole block continues an earlier run
    first_row = tl.load(sorted_ptr + lo).to(tl.int64)
    before = tl.load(sorted_ptr + lo - 1, mask=lo > 0, other=-2).to(tl.int64)
    own = (nxt == r) & ((first_row != r) | (before != r))
    d = tl.arange(0, BLOCK_D)
    dm = (d < DH) & own
    acc = tl.load(last_ptr + b * DH + d, mask=dm, other=0.0)
    c = b + 1
    more = own
    while more:
        acc += tl.load(first_ptr + c * DH + d, mask=dm, other=0.0)
        end = tl.minimum(c * BLOCK_N + BLOCK_N, N) - 1
        after = tl.load(sorted_ptr + end + 1, mask=end + 1 < N, other=-2).to(tl.int64)
        more = after == r
        c += 1
    tl.store(out_ptr + r * DH + d, acc.to(out_ptr.dtype.element_ty), mask=dm)


def _slot_code(orders: Sequence[int]) -> int:
    code = sum(_NO_SLOT << (4 * n) for n in range(max(orders) + 1))
    for i, n in enumerate(orders):
        code ^= (_NO_SLOT ^ i) << (4 * n)
    return code


def supported(orders: Sequence[int]) -> bool:
    return max(orders) <= MAX_ORDER and len(orders) < _NO_SLOT


def engram_lookup(ids: Tensor, canon: Tensor, multipliers: Tensor, primes: Tensor,
                  offsets: Tensor, pad_id: Tensor, table: Tensor, orders: Sequence[int],
                  heads: int, config: Optional[EngramKernelConfig] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Same contract as `naive.engram_lookup_ref`: emb (B, T, K * Dh), rows (B, T, K) int64."""
    cfg = config or DEFAULT
    B, T = ids.shape
    K = len(orders) * heads
    R, dh = table.shape
    ids, table = ids.contiguous(), table.contiguous()
    emb = torch.empty(B, T, K * dh, dtype=table.dtype, device=table.device)
    rows = torch.empty(B, T, K, dtype=torch.int64, device=table.device)
    N = B * T
    if N == 0:
        return emb, rows
    k_pad, block_d = next_pow2(K), next_pow2(dh)
    block_t = max(1, next_pow2(cfg.tile // (k_pad * block_d) + 1) // 2)
    grid = (cdiv(N, block_t),)
    _engram_fwd_kernel[grid](
        ids, canon.contiguous(), multipliers.contiguous(), primes.contiguous(),
        offsets.contiguous(), pad_id, table, emb, rows, N, T, canon.shape[0], dh,
        MAX_N=max(orders), SLOT_CODE=_slot_code(orders), HEADS=heads, K=K, K_PAD=k_pad,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=cfg.num_warps)
    return emb, rows


def engram_table_grad(grad_emb: Tensor, rows: Tensor, num_rows: int,
                      config: Optional[EngramKernelConfig] = None) -> Tensor:
    """Same contract as `naive.engram_table_grad_ref`: (num_rows, Dh) in grad_emb's dtype."""
    cfg = config or DEFAULT
    K = rows.shape[-1]
    dh = grad_emb.shape[-1] // K
    out = torch.zeros(num_rows, dh, dtype=grad_emb.dtype, device=grad_emb.device)
    flat = rows.reshape(-1)
    N = flat.numel()
    if N == 0:
        return out
    # 32-bit keys halve the radix sort's passes; the table never has 2**31 rows in practice
    keys = flat.to(torch.int32) if num_rows < 2 ** 31 else flat
    sorted_rows, perm = torch.sort(keys, stable=True)
    num_blocks = cdiv(N, cfg.block_n)
    # per-block partial sums of the runs crossing block edges (fp32, read only where written)
    first = torch.empty(num_blocks, dh, dtype=torch.float32, device=out.device)
    last = torch.empty(num_blocks, dh, dtype=torch.float32, device=out.device)
    block_d = next_pow2(dh)
    grad = grad_emb.contiguous()
    _engram_bwd_kernel[(num_blocks,)](sorted_rows, perm, grad, out, first, last, N, dh,
                                      BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                                      num_warps=cfg.bwd_num_warps)
    _engram_bwd_carry_kernel[(num_blocks,)](sorted_rows, out, first, last, N, dh,
                                            BLOCK_N=cfg.block_n, BLOCK_D=block_d, num_warps=1)
    return out
