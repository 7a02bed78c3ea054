"""`torch.library` registration of the Engram lookup: forward, table gradient, fakes, autograd.

The default kernel (CPU and any device without a faster one) is the reference in `naive.py`;
on CUDA the Triton launcher in `triton_lookup.py` runs instead, imported on first use so the
package imports without Triton.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from . import naive


@torch.library.custom_op("nsa_compile::engram_fwd", mutates_args=())
def engram_fwd(ids: Tensor, canon: Tensor, multipliers: Tensor, primes: Tensor, offsets: Tensor,
               pad_id: Tensor, table: Tensor, orders: List[int], heads: int
               ) -> Tuple[Tensor, Tensor]:
    """ids: (B, T) int64; table: (R, Dh). Returns emb (B, T, K * Dh) and rows (B, T, K) int64,
    K = len(orders) * heads. Hash constants as in `naive.hash_rows`."""
    return naive.engram_lookup_ref(ids, canon, multipliers, primes, offsets, pad_id, table,
                                   orders, heads)


@engram_fwd.register_fake
def _engram_fwd_fake(ids, canon, multipliers, primes, offsets, pad_id, table, orders, heads):
    B, T = ids.shape
    K = len(orders) * heads
    return (table.new_empty(B, T, K * table.shape[1]),
            ids.new_empty(B, T, K, dtype=torch.int64))


@engram_fwd.register_kernel("cuda")
def _engram_fwd_cuda(ids, canon, multipliers, primes, offsets, pad_id, table, orders, heads):
    from .triton_lookup import engram_lookup, supported
    if not supported(orders):
        return naive.engram_lookup_ref(ids, canon, multipliers, primes, offsets, pad_id, table,
                                       orders, heads)
    return engram_lookup(ids, canon, multipliers, primes, offsets, pad_id, table, orders, heads)


@torch.library.custom_op("nsa_compile::engram_bwd", mutates_args=())
def engram_bwd(grad_emb: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """grad_emb: (B, T, K * Dh); rows: (B, T, K). Returns the table gradient (num_rows, Dh),
    summed in a fixed order (deterministic)."""
    return naive.engram_table_grad_ref(grad_emb, rows, num_rows)


@engram_bwd.register_fake
def _engram_bwd_fake(grad_emb, rows, num_rows):
    return grad_emb.new_empty(num_rows, grad_emb.shape[-1] // rows.shape[-1])


@engram_bwd.register_kernel("cuda")
def _engram_bwd_cuda(grad_emb, rows, num_rows):
    from .triton_lookup import engram_table_grad
    return engram_table_grad(grad_emb, rows, num_rows)


def _setup_context(ctx, inputs, output):
    ctx.num_rows = inputs[6].shape[0]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_emb, _grad_rows):
    (rows,) = ctx.saved_tensors
    dtable = engram_bwd(grad_emb.contiguous(), rows, ctx.num_rows)
    return None, None, None, None, None, None, dtable, None, None


engram_fwd.register_autograd(_backward, setup_context=_setup_context)
