"""Triton Engram lookup: hashing fused with the row gather, and a deterministic table gradient.

Forward: one program per `block_t` tokens computes every order's suffix hash incrementally
(order n's hash is order n-1's XOR one more term), reduces it modulo each head's prime and
copies the K rows into the concatenated embedding; the canonical ids are read from the map
once per (token, j) and the table rows once per (token, head). Backward: the flat row indices
are sorted (stable), and each segment of equal rows is summed in that order by one lane, so
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
    """block_t: tokens per forward program; block_n: sorted entries per backward program."""

    block_t: int = 64
    block_n: int = 64
    num_warps: int = 4


DEFAULT = EngramKernelConfig()


@triton.jit
def _engram_fwd_kernel(ids_ptr, canon_ptr, mult_ptr, primes_ptr, offsets_ptr, pad_ptr, slot_ptr,
                       table_ptr, emb_ptr, rows_ptr, N, T, V, DH,
                       MAX_ORDER: tl.constexpr, ORDER_MASK: tl.constexpr, HEADS: tl.constexpr,
                       K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    t = tok % T
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    pad = tl.load(pad_ptr).to(tl.int64)
    h = tl.zeros([BLOCK_T], dtype=tl.int64)
    for j in tl.static_range(MAX_ORDER):
        valid = tmask & (t >= j)
        x = tl.load(ids_ptr + tok - j, mask=valid, other=0).to(tl.int64)
        x = tl.minimum(tl.maximum(x, 0), V - 1)
        y = tl.load(canon_ptr + x, mask=valid, other=0)
        y = tl.where(valid, y, pad)
        h = h ^ (y * tl.load(mult_ptr + j))
        if (ORDER_MASK >> (j + 1)) & 1:
            slot = tl.load(slot_ptr + j + 1)
            for k in tl.static_range(HEADS):
                col = slot * HEADS + k
                row = h % tl.load(primes_ptr + col) + tl.load(offsets_ptr + col)
                tl.store(rows_ptr + tok * K + col, row, mask=tmask)
                m2 = tmask[:, None] & dmask[None, :]
                vals = tl.load(table_ptr + row[:, None] * DH + d[None, :], mask=m2)
                tl.store(emb_ptr + (tok * K + col)[:, None] * DH + d[None, :], vals, mask=m2)


@triton.jit
def _engram_bwd_kernel(sorted_ptr, perm_ptr, grad_ptr, out_ptr, N, DH,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    imask = i < N
    r = tl.load(sorted_ptr + i, mask=imask, other=-1)
    prev = tl.load(sorted_ptr + i - 1, mask=imask & (i > 0), other=-1)
    head = imask & (r != prev)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    active = head
    j = i
    # Each segment head walks its run of equal rows in sorted (= original) order.
    while tl.max(active.to(tl.int32), axis=0) > 0:
        src = tl.load(perm_ptr + j, mask=active, other=0)
        g = tl.load(grad_ptr + src[:, None] * DH + d[None, :],
                    mask=active[:, None] & dmask[None, :], other=0.0)
        acc += g.to(tl.float32)
        j = j + 1
        nxt = tl.load(sorted_ptr + j, mask=active & (j < N), other=-1)
        active = active & (nxt == r)
    tl.store(out_ptr + r[:, None] * DH + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=head[:, None] & dmask[None, :])


def _slots(orders: Sequence[int], device) -> Tuple[Tensor, int]:
    slot = [-1] * (max(orders) + 1)
    mask = 0
    for i, n in enumerate(orders):
        slot[n] = i
        mask |= 1 << n
    return torch.tensor(slot, dtype=torch.int64, device=device), mask


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
    slot, mask = _slots(orders, ids.device)
    grid = (triton.cdiv(N, cfg.block_t),)
    _engram_fwd_kernel[grid](
        ids, canon.contiguous(), multipliers.contiguous(), primes.contiguous(),
        offsets.contiguous(), pad_id, slot, table, emb, rows, N, T, canon.shape[0], dh,
        MAX_ORDER=max(orders), ORDER_MASK=mask, HEADS=heads, K=K, BLOCK_T=cfg.block_t,
        BLOCK_D=triton.next_power_of_2(dh), num_warps=cfg.num_warps)
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
    sorted_rows, perm = torch.sort(flat, stable=True)
    grid = (triton.cdiv(N, cfg.block_n),)
    _engram_bwd_kernel[grid](sorted_rows, perm, grad_emb.contiguous(), out, N, dh,
                             BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(dh),
                             num_warps=cfg.num_warps)
    return out
