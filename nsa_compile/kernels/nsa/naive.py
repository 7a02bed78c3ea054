"""Pure-PyTorch reference of Native Sparse Attention (SPEC §3).

The test truth, the CPU kernel of `nsa_compile::nsa_fwd`/`nsa_bwd`, and the benchmark
baseline. Computes in fp32 (fp64 when given fp64) and is memory-linear in T: queries are
processed in chunks, and the backward recomputes each chunk instead of storing T×T
probabilities. Layout follows SDPA: q (B, HQ, T, Dk), k (B, H, T, Dk), v (B, H, T, Dv),
query head i reads KV head i // (HQ // H).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .params import NSAParams, num_compressed, num_selection_blocks

DEFAULT_CHUNK = 128


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def compressed_blocks(x: Tensor, block: int, stride: int) -> Tensor:
    """x: (B, H, T, D) -> (B, H, Tc, block, D), a view of the overlapping key blocks."""
    B, H, T, D = x.shape
    if T < block:
        return x.new_empty(B, H, 0, block, D)
    return x.unfold(2, block, stride).transpose(-1, -2)


def mean_pool(x: Tensor, block: int, stride: int) -> Tensor:
    """The "mean" compressor: x (B, H, T, D) -> (B, H, Tc, D).

    Sums each stride-long chunk once (a contiguous reduction), then adds block/stride
    neighbouring chunk sums, instead of reducing the overlapping windows one by one.
    """
    B, H, T, D = x.shape
    Tc = 0 if T < block else (T - block) // stride + 1
    if Tc == 0:
        return x.new_empty(B, H, 0, D)
    per = block // stride
    n_chunks = Tc + per - 1
    acc = compute_dtype(x.dtype)
    chunks = x[:, :, :n_chunks * stride].reshape(B, H, n_chunks, stride, D).sum(3, dtype=acc)
    total = chunks[:, :, :Tc]
    for c in range(1, per):
        total = total + chunks[:, :, c:c + Tc]
    return (total / block).to(x.dtype)


def overlap_weights(num_cmp: int, num_sel: int, params: NSAParams,
                    device=None, dtype=torch.float32) -> Tensor:
    """w (Tc, Ns): how many stride-d chunks of compressed block i lie inside selection block j.

    For l/d/l' = 32/16/64, selection block j gets weights 1,2,2,2,1 from blocks 4j-1 … 4j+3.
    """
    d, lp = params.compress_stride, params.select_block
    chunks = torch.arange(params.compress_block // d, device=device)
    owner = ((torch.arange(num_cmp, device=device)[:, None] + chunks) * d) // lp  # (Tc, l/d)
    w = torch.zeros(num_cmp, num_sel + 1, device=device, dtype=dtype)
    w.scatter_add_(1, owner.clamp(max=num_sel), torch.ones_like(owner, dtype=dtype))
    return w[:, :num_sel]


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to mask; rows with nothing visible give zeros.

    Works in place on `scores` (a fresh temporary in every caller): the score tensors are the
    reference's largest, and each extra copy costs a pass over C × keys elements.
    """
    if scores.shape[-1] == 0:  # no compressed block yet (T < l): amax would refuse an empty dim
        return scores.zero_()
    scores.masked_fill_(mask.logical_not(), float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(scores.dtype).min)
    p = scores.sub_(peak).exp_()
    return p.div_(p.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(scores.dtype).tiny))


def select_blocks(importance: Tensor, t: Tensor, params: NSAParams) -> Tensor:
    """Top-n block choice per query.

    importance: (..., C, Ns) summed over the GQA group; t: (C,) query positions.
    Returns (..., C, min(n, Ns)) block indices in ascending order, -1 where fewer blocks exist.
    Forced blocks: the first select_initial and the select_local ending at t's own block; then
    the highest importance; ties go to the lower index.
    """
    Ns = importance.shape[-1]
    n = min(params.select_count, Ns)
    j = torch.arange(Ns, device=importance.device)
    own = (t // params.select_block)[:, None]
    started = j[None, :] * params.select_block <= t[:, None]
    forced = started & ((j[None, :] < params.select_initial)
                        | (j[None, :] > own - params.select_local))
    score = torch.where(forced, torch.inf, importance)
    score = torch.where(started, score, -torch.inf)
    # Stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]
    valid = torch.gather(started.expand_as(score), -1, order)
    idx = torch.where(valid, order, Ns)
    idx = torch.sort(idx, dim=-1).values
    return torch.where(idx == Ns, -1, idx)


def _gqa(x: Tensor, H: int) -> Tensor:
    """(B, HQ, C, D) -> (B, H, G, C, D)."""
    B, HQ, C, D = x.shape
    return x.view(B, H, HQ // H, C, D)


# The three products of attention as batched matmuls over (B, H) with the group's G query heads
# stacked into the rows, so the shared key/value block is read once and nothing large is
# transposed into a copy (einsum would permute the (G, C, K) probabilities for the last one).
def _scores(qg: Tensor, keys: Tensor) -> Tensor:
    """qg (B, H, G, C, D) · keys (B, H, K, D)ᵀ -> (B, H, G, C, K)."""
    B, H, G, C, D = qg.shape
    return (qg.reshape(B, H, G * C, D) @ keys.transpose(-1, -2)).view(B, H, G, C, -1)


def _attend(probs: Tensor, values: Tensor) -> Tensor:
    """probs (B, H, G, C, K) · values (B, H, K, D) -> (B, H, G, C, D)."""
    B, H, G, C, K = probs.shape
    return (probs.reshape(B, H, G * C, K) @ values).view(B, H, G, C, -1)


def _group_sum(probs: Tensor, x: Tensor) -> Tensor:
    """Σ over the group's heads and queries of probs (B, H, G, C, K) ⊗ x (B, H, G, C, D) ->
    (B, H, K, D): the key/value gradient shape."""
    B, H, G, C, K = probs.shape
    return probs.reshape(B, H, G * C, K).transpose(-1, -2) @ x.reshape(B, H, G * C, -1)


class BranchProbs(NamedTuple):
    """One branch's attention of a query chunk: probs (B, H, G, C, K) over keys [lo, hi) of k/v,
    or over the compressed blocks when lo is None."""

    probs: Tensor
    lo: Optional[int]
    hi: int


def chunk_probs(q: Tensor, t0: int, k: Tensor, k_cmp: Optional[Tensor], params: NSAParams,
                k0: int = 0) -> Tuple[Dict[str, BranchProbs], Optional[Tensor]]:
    """Attention probabilities of each present branch for the queries t0 … t0+C-1.

    q: (B, HQ, C, Dk); k holds keys [k0, k0 + k.shape[2]) covering [k0, t0 + C), with k0 > 0
    only for a window-only chunk (see `chunk_key_start`); k_cmp: (B, H, Tc, Dk). Returns the
    branches by name and the selected block indices (B, H, C, n) (None without that branch).
    Key ranges lo/hi are positions relative to k0.
    """
    B, HQ, C, _ = q.shape
    H = k.shape[1]
    end = t0 + C
    dev = q.device
    t = torch.arange(t0, end, device=dev)
    qg = _gqa(q, H) * params.scale
    out: Dict[str, BranchProbs] = {}
    idx = None
    if params.needs_cmp:
        Tc = k_cmp.shape[2]
        p_cmp = compressed_probs(qg, k_cmp, t, params)
        if params.has_cmp:
            out["compressed"] = BranchProbs(p_cmp, None, Tc)
    if params.has_slc:
        assert k0 == 0, "the selected branch reads keys from position 0"
        lp = params.select_block
        Ns = num_selection_blocks(end, lp)
        w = overlap_weights(Tc, Ns, params, dev, p_cmp.dtype)
        idx = select_blocks(p_cmp.sum(dim=2) @ w, t, params)
        chosen = torch.zeros(B, H, C, Ns + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(idx < 0, Ns, idx), True)
        keys = torch.arange(end, device=dev)
        mask = chosen[..., keys // lp] & (keys[None, :] <= t[:, None])  # (B, H, C, end)
        s = _scores(qg, k[:, :, :end])
        out["selected"] = BranchProbs(masked_softmax(s, mask[:, :, None]), 0, end)
    if params.has_win:
        out["window"] = window_probs(qg, k, t0, params, k0)
    return out, idx


def compressed_probs(qg: Tensor, k_cmp: Tensor, t: Tensor, params: NSAParams) -> Tensor:
    """The compressed branch's probabilities (B, H, G, C, Tc) of the scaled queries qg
    (B, H, G, C, Dk) at positions t (C,): block i is visible once it ends, i·d + l - 1 <= t."""
    l, d = params.compress_block, params.compress_stride
    ends = torch.arange(k_cmp.shape[2], device=qg.device) * d + l - 1
    return masked_softmax(_scores(qg, k_cmp), ends[None, :] <= t[:, None])


def window_probs(qg: Tensor, k: Tensor, t0: int, params: NSAParams, k0: int = 0) -> BranchProbs:
    """The window branch's probabilities of the scaled queries qg (B, H, G, C, Dk) at positions
    t0 … t0+C-1 over k, which holds the keys from position k0 on (through t0 + C - 1); the
    window's keys are read in qg's dtype."""
    end = t0 + qg.shape[3]
    w_len = params.window
    lo = max(0, t0 - w_len + 1) if w_len else 0
    t = torch.arange(t0, end, device=qg.device)
    keys = torch.arange(lo, end, device=qg.device)
    mask = keys[None, :] <= t[:, None]
    if w_len:
        mask = mask & (keys[None, :] > t[:, None] - w_len)
    s = _scores(qg, k[:, :, lo - k0:end - k0].to(qg.dtype))
    return BranchProbs(masked_softmax(s, mask), lo - k0, end - k0)


def _values(branch: BranchProbs, v: Tensor, v_cmp: Optional[Tensor]) -> Tensor:
    return v_cmp if branch.lo is None else v[:, :, branch.lo:branch.hi]


def _keys(branch: BranchProbs, k: Tensor, k_cmp: Optional[Tensor]) -> Tensor:
    return k_cmp if branch.lo is None else k[:, :, branch.lo:branch.hi]


def chunk_parts(q: Tensor, t0: int, k: Tensor, v: Tensor, k_cmp: Optional[Tensor],
                v_cmp: Optional[Tensor], params: NSAParams, k0: int = 0) -> Dict[str, Tensor]:
    """Branch outputs (B, HQ, C, Dv) by name for the queries t0 … t0+C-1, plus "block_idx"
    (B, H, C, n) when the selected branch runs. Arguments as `chunk_probs`."""
    branches, idx = chunk_probs(q, t0, k, k_cmp, params, k0)
    out = {name: _attend(b.probs, _values(b, v, v_cmp)).flatten(1, 2)
           for name, b in branches.items()}
    if idx is not None:
        out["block_idx"] = idx
    return out


def chunk_key_start(t0: int, params: NSAParams) -> int:
    """First key a chunk starting at query t0 reads: 0 unless only a bounded window runs."""
    if params.has_slc or not params.window:
        return 0
    return max(0, t0 - params.window + 1)


def combine(parts: Dict[str, Tensor], gates: Optional[Tensor], params: NSAParams) -> Tensor:
    """o = Σ_c g_c · o_c; gates (B, HQ, C, n_branches) or the fixed weights."""
    o = None
    for slot, name in enumerate(b for b in ("compressed", "selected", "window") if b in parts):
        g = gates[..., slot:slot + 1] if gates is not None else params.fixed_gates[slot]
        term = parts[name] * g
        o = term if o is None else o + term
    return o


def _upcast(*xs: Optional[Tensor]):
    return [None if x is None else x.to(compute_dtype(x.dtype)) for x in xs]


def nsa_attention_ref(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
                      k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], params: NSAParams,
                      chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Forward. q (B, HQ, Tq, Dk), k (B, H, T, Dk), v (B, H, T, Dv), gates (B, HQ, Tq, nb) or
    None, k_cmp (B, H, Tc, Dk), v_cmp (B, H, Tc, Dv). Tq <= T: the queries are the last Tq
    positions (Tq < T: decoding with a KV cache; the op itself has Tq == T). Returns
    (B, HQ, Tq, Dv) in q's dtype."""
    Tq, offset = q.shape[2], k.shape[2] - q.shape[2]
    q32, k32, v32, g32, kc32, vc32 = _upcast(q, k, v, gates, k_cmp, v_cmp)
    outs = []
    with torch.no_grad():
        for t0 in range(0, Tq, chunk):
            t1 = min(Tq, t0 + chunk)
            parts = chunk_parts(q32[:, :, t0:t1], offset + t0, k32, v32, kc32, vc32, params)
            parts.pop("block_idx", None)
            outs.append(combine(parts, None if g32 is None else g32[:, :, t0:t1], params))
    if not outs:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    return torch.cat(outs, dim=2).to(q.dtype)


def nsa_attention_backward_ref(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
        k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], params: NSAParams,
        chunk: int = DEFAULT_CHUNK) -> Tuple[Optional[Tensor], ...]:
    """Gradients (dq, dk, dv, dgates, dk_cmp, dv_cmp), each shaped like its input (None for an
    absent input). Recomputes each query chunk's probabilities; the block choice carries no
    gradient (it is discrete), so importance scores are not differentiated."""
    T, H = q.shape[2], k.shape[1]
    q32, k32, v32, g32, kc32, vc32 = _upcast(q, k, v, gates, k_cmp, v_cmp)
    go32 = grad_out.to(q32.dtype)
    dq, dk, dv = torch.zeros_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
    dg = None if g32 is None else torch.zeros_like(g32)
    dkc = None if kc32 is None else torch.zeros_like(kc32)
    dvc = None if vc32 is None else torch.zeros_like(vc32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        lo = chunk_key_start(t0, params)
        qc = q32[:, :, t0:t1]
        kc, vc = k32[:, :, lo:t1], v32[:, :, lo:t1]
        branches, _ = chunk_probs(qc, t0, kc, kc32, params, k0=lo)
        for slot, (name, b) in enumerate(branches.items()):
            vals = _values(b, vc, vc32)
            o = _attend(b.probs, vals)
            do = go32[:, :, t0:t1]
            if dg is not None:
                dg[:, :, t0:t1, slot] = (do * o.flatten(1, 2)).sum(-1)
                do = do * g32[:, :, t0:t1, slot:slot + 1]
            else:
                do = do * params.fixed_gates[slot]
            do = _gqa(do, H)
            # Softmax backward: dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O)).
            ds = _scores(do, vals).sub_((do * o).sum(-1, keepdim=True)).mul_(b.probs)
            dq[:, :, t0:t1] += _attend(ds, _keys(b, kc, kc32)).flatten(1, 2) * params.scale
            dkey = _group_sum(ds, _gqa(qc, H)) * params.scale
            dval = _group_sum(b.probs, do)
            if b.lo is None:
                dkc += dkey
                dvc += dval
            else:
                dk[:, :, lo + b.lo:lo + b.hi] += dkey
                dv[:, :, lo + b.lo:lo + b.hi] += dval
    grads = (dq, dk, dv, dg, dkc, dvc)
    ins = (q, k, v, gates, k_cmp, v_cmp)
    return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, ins))
