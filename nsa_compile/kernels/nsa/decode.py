"""The PyTorch kernel of `nsa_compile::nsa_decode` (CPU, and CUDA where the Triton decoding
kernels do not apply): the last few queries read only what NSA reads — the compressed keys,
their n chosen blocks and their window — in the compute dtype, instead of scoring every key
of the cache as the reference (`naive.nsa_attention_ref`) does. Tested against it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import naive
from .params import NSAParams, num_selection_blocks

# Beyond this many queries the gathered blocks (Tq · n · l' keys per head) cost more than the
# reference's chunked pass over the whole cache.
MAX_GATHER_QUERIES = 16


def block_importance(p_cmp: Tensor, num_sel: int, params: NSAParams) -> Tensor:
    """Σ_i w_ij p_i without the (Tc, Ns) overlap matrix: p_cmp (..., Tc) -> (..., num_sel).
    Compressed block i holds the stride-d chunks i … i+R-1 (R = l/d); a chunk's mass is the
    sum of the blocks holding it, and selection block j sums its Q = l'/d chunks."""
    r = params.compress_block // params.compress_stride
    qc = params.select_block // params.compress_stride
    if p_cmp.shape[-1] == 0:  # no compressed block yet: no mass anywhere
        return p_cmp.new_zeros(*p_cmp.shape[:-1], num_sel)
    chunks = F.pad(p_cmp, (r - 1, r - 1)).unfold(-1, r, 1).sum(-1)  # (..., Tc + r - 1)
    need = num_sel * qc
    chunks = F.pad(chunks, (0, max(0, need - chunks.shape[-1])))[..., :need]
    return chunks.unflatten(-1, (num_sel, qc)).sum(-1)


def _gathered(x: Tensor, pos: Tensor) -> Tensor:
    """x (B, H, T, D) at positions pos (B, H, C, K) -> (B, H, C, K, D)."""
    B, H, C, K = pos.shape
    flat = pos.reshape(B, H, C * K, 1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, flat).view(B, H, C, K, -1)


def nsa_decode_gather(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
                      k_cmp: Optional[Tensor], v_cmp: Optional[Tensor],
                      params: NSAParams) -> Tensor:
    """As `naive.nsa_attention_ref` for q (B, HQ, Tq, Dk) at the last Tq positions of k
    (B, H, T, Dk) / v (B, H, T, Dv); gates (B, HQ, Tq, nb) or None; k_cmp/v_cmp (B, H, Tc, D)
    or None for absent branches. Returns (B, HQ, Tq, Dv) in q's dtype."""
    B, HQ, Tq, _ = q.shape
    H, T = k.shape[1], k.shape[2]
    if Tq > MAX_GATHER_QUERIES or Tq == 0:
        return naive.nsa_attention_ref(q, k, v, gates, k_cmp, v_cmp, params)
    acc = naive.compute_dtype(q.dtype)
    dev = q.device
    t = torch.arange(T - Tq, T, device=dev)
    qg = naive._gqa(q.to(acc), H) * params.scale  # (B, H, G, Tq, Dk)
    parts: Dict[str, Tensor] = {}
    if params.needs_cmp:
        p_cmp = naive.compressed_probs(qg, k_cmp.to(acc), t, params)
        if params.has_cmp:
            parts["compressed"] = naive._attend(p_cmp, v_cmp.to(acc)).flatten(1, 2)
    if params.has_slc:
        lp = params.select_block
        Ns = num_selection_blocks(T, lp)
        idx = naive.select_blocks(block_importance(p_cmp.sum(dim=2), Ns, params), t, params)
        pos = (idx.clamp_min(0)[..., None] * lp + torch.arange(lp, device=dev)).flatten(-2)
        ok = (idx[..., None] >= 0).expand(*idx.shape, lp).flatten(-2) & (pos <= t[:, None])
        pos = pos.clamp_max(T - 1)  # (B, H, Tq, n·l')
        s = torch.einsum("bhgqd,bhqkd->bhgqk", qg, _gathered(k, pos).to(acc))
        p = naive.masked_softmax(s, ok[:, :, None])
        parts["selected"] = torch.einsum("bhgqk,bhqkd->bhgqd", p,
                                         _gathered(v, pos).to(acc)).flatten(1, 2)
    if params.has_win:
        win = naive.window_probs(qg, k, T - Tq, params)
        values = naive._values(win, v, None).to(acc)
        parts["window"] = naive._attend(win.probs, values).flatten(1, 2)
    return naive.combine(parts, None if gates is None else gates.to(acc), params).to(q.dtype)
