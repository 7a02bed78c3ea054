"""Triton Engram lookup: hashing fused with the row gather, and a deterministic table gradient.

Forward: one program per tile of tokens computes every order's suffix hash incrementally
(order n's hash is order n-1's XOR one more term), reduces it modulo each head's prime and
copies a (tokens, K, head_dim) tile of table rows into the concatenated embedding, so each
token's K rows are written contiguously; the canonical ids are read once per (token, j) and
the table rows once per (token, head). Backward: the flat row indices
are sorted (stable), and each segment of equal rows is summed in that order by one lane (every
lane owns a segment: the starts are compacted on the device first), so
the table gradient is bitwise reproducible (no float atomics) and equals the reference's
in-order fp32 sum.

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


@dataclass(frozen=True)
class EngramKernelConfig:
    """tile: elements (tokens x rows x head_dim, padded) one forward program copies;
    block_n: sorted entries per backward program."""

    tile: int = 8192
    block_n: int = 64
    num_warps: int = 4


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
def _engram_bwd_kernel(sorted_ptr, perm_ptr, starts_ptr, nseg_ptr, grad_ptr, out_ptr, N, DH,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    own = seg < tl.load(nseg_ptr)
    i = tl.load(starts_ptr + seg, mask=own, other=0)
    r = tl.load(sorted_ptr + i, mask=own, other=-1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    active = own
    j = i
    # Each lane owns one segment of equal rows and sums it in sorted (= original) order.
    while tl.max(active.to(tl.int32), axis=0) > 0:
        src = tl.load(perm_ptr + j, mask=active, other=0)
        g = tl.load(grad_ptr + src[:, None] * DH + d[None, :],
                    mask=active[:, None] & dmask[None, :], other=0.0)
        acc += g.to(tl.float32)
        j = j + 1
        nxt = tl.load(sorted_ptr + j, mask=active & (j < N), other=-1)
        active = active & (nxt == r)
    tl.store(out_ptr + r[:, None] * DH + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=own[:, None] & dmask[None, :])


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
    k_pad, block_d = triton.next_power_of_2(K), triton.next_power_of_2(dh)
    block_t = max(1, triton.next_power_of_2(cfg.tile // (k_pad * block_d) + 1) // 2)
    grid = (triton.cdiv(N, block_t),)
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
    # Segment starts without a host sync: segment s (0-based) starts where the running count
    # of heads reaches s + 1; non-heads write to a spare slot N that is never read.
    head = torch.ones(N, dtype=torch.bool, device=flat.device)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=head[1:])
    count = torch.cumsum(head, 0)
    starts = torch.empty(N + 1, dtype=torch.int64, device=flat.device)
    starts.index_put_((torch.where(head, count - 1, N),),
                      torch.arange(N, device=flat.device))
    grid = (triton.cdiv(N, cfg.block_n),)
    _engram_bwd_kernel[grid](sorted_rows, perm, starts, count[-1:], grad_emb.contiguous(),
                             out, N, dh,
                             BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(dh),
                             num_warps=cfg.num_warps)
    return out
