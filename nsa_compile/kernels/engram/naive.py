"""Pure-PyTorch reference of the Engram lookup: the test truth and the CPU kernel.

Hash (arXiv 2601.07372, reference variant): with canonical ids y_j = canon[x_{t-j}] (pad_id
before the sequence start), order n hashes to h = (y_0*m_0) ^ (y_1*m_1) ^ ... ^ (y_{n-1}*m_{n-1})
in int64; head k of order n reads the global table row h % primes[n, k] + offsets[n, k].
The multipliers are bounded so that y_j * m_j never overflows: the hash is exact on every
device. Ids are clamped into the canonical map before reading it; callers validate them.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def suffix_hashes(ids: Tensor, canon: Tensor, multipliers: Tensor, pad_id: Tensor,
                  orders: Sequence[int]) -> List[Tensor]:
    """ids: (B, T) integer; canon: (V,) int64; multipliers: (max(orders),) int64; pad_id: ()
    int64. Returns one (B, T) int64 hash per order, in the order of `orders`."""
    B, T = ids.shape
    n_max = max(orders)
    y = canon[ids.long().clamp(0, canon.shape[0] - 1)]
    # y_j for position t is yp[:, t + n_max - 1 - j]: left-pad once, slice per j.
    yp = torch.cat([pad_id.to(y.dtype).expand(B, n_max - 1), y], dim=1)
    by_order = {}
    h = None
    for j in range(n_max):
        term = yp[:, n_max - 1 - j: n_max - 1 - j + T] * multipliers[j]
        h = term if h is None else h ^ term
        if j + 1 in orders:
            by_order[j + 1] = h
    return [by_order[n] for n in orders]


def hash_rows(ids: Tensor, canon: Tensor, multipliers: Tensor, primes: Tensor, offsets: Tensor,
              pad_id: Tensor, orders: Sequence[int], heads: int) -> Tensor:
    """Global table rows (B, T, len(orders) * heads) int64; primes, offsets: (len(orders) *
    heads,) int64, order-major."""
    hs = suffix_hashes(ids, canon, multipliers, pad_id, orders)
    rows = [h[..., None] % primes[i * heads:(i + 1) * heads] + offsets[i * heads:(i + 1) * heads]
            for i, h in enumerate(hs)]
    return torch.cat(rows, dim=-1)


def engram_lookup_ref(ids: Tensor, canon: Tensor, multipliers: Tensor, primes: Tensor,
                      offsets: Tensor, pad_id: Tensor, table: Tensor, orders: Sequence[int],
                      heads: int) -> Tuple[Tensor, Tensor]:
    """table: (R, Dh). Returns emb (B, T, K * Dh) in table's dtype, the K = len(orders) * heads
    rows concatenated, and rows (B, T, K) int64."""
    rows = hash_rows(ids, canon, multipliers, primes, offsets, pad_id, orders, heads)
    B, T, K = rows.shape
    emb = table[rows.reshape(-1)].reshape(B, T, K * table.shape[1])
    return emb, rows


def engram_table_grad_ref(grad_emb: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """grad_emb: (B, T, K * Dh); rows: (B, T, K). Returns d table (num_rows, Dh) in grad_emb's
    dtype, accumulated in fp32 (fp64 for fp64); index_add_ on CPU adds in index order, so the
    result is deterministic there."""
    K = rows.shape[-1]
    dh = grad_emb.shape[-1] // K
    acc = torch.float64 if grad_emb.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_rows, dh, dtype=acc, device=grad_emb.device)
    out.index_add_(0, rows.reshape(-1), grad_emb.reshape(-1, dh).to(acc))
    return out.to(grad_emb.dtype)
