"""fp64 references for the GPU tests that accept the kernel's block choice.

With random inputs many blocks have near-equal importance, so bf16 rounding can swap the
last chosen block; the tests therefore check that the kernel's blocks carry the reference's
top-n importance, then compare outputs given the kernel's blocks.
"""
import torch

from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams, num_selection_blocks


def importance(q, k_cmp, params: NSAParams, chunk: int = 512):
    """(B, H, T, Ns) fp64 block importance as the spec defines it (with forced/invalid blocks
    mapped to +inf/-inf)."""
    B, HQ, T, _ = q.shape
    H = k_cmp.shape[1]
    Ns = num_selection_blocks(T, params.select_block)
    Tc = k_cmp.shape[2]
    w = naive.overlap_weights(Tc, Ns, params, q.device, torch.float64)
    j = torch.arange(Ns, device=q.device)
    out = []
    for t0 in range(0, T, chunk):
        t = torch.arange(t0, min(T, t0 + chunk), device=q.device)
        qg = q[:, :, t0:t0 + chunk].double().view(B, H, HQ // H, len(t), -1)
        s = torch.einsum("bhgcd,bhnd->bhgcn", qg, k_cmp.double()) * params.scale
        vis = (torch.arange(Tc, device=q.device) * params.compress_stride
               + params.compress_block - 1)[None, :] <= t[:, None]
        imp = naive.masked_softmax(s, vis).sum(2) @ w
        started = j[None, :] * params.select_block <= t[:, None]
        own = (t // params.select_block)[:, None]
        forced = started & ((j[None, :] < params.select_initial)
                            | (j[None, :] > own - params.select_local))
        imp = torch.where(forced, torch.inf, torch.where(started, imp, -torch.inf))
        out.append(imp)
    return torch.cat(out, dim=2)


def selected_output(q, k, v, block_idx, params: NSAParams, chunk: int = 256):
    """Selected-branch output (B, HQ, T, Dv) fp64 given block_idx (B, H, T, n), -1 = none."""
    B, HQ, T, _ = q.shape
    H, lp = k.shape[1], params.select_block
    out = []
    for t0 in range(0, T, chunk):
        t = torch.arange(t0, min(T, t0 + chunk), device=q.device)
        idx = block_idx[:, :, t0:t0 + chunk].long()
        pos = (idx.clamp_min(0)[..., None] * lp + torch.arange(lp, device=q.device)).flatten(-2)
        mask = (idx >= 0).repeat_interleave(lp, -1) & (pos <= t[:, None])
        pos = torch.minimum(pos, t[:, None])
        kk = torch.gather(k.double(), 2, pos.flatten(2)[..., None].expand(-1, -1, -1, k.shape[-1]))
        vv = torch.gather(v.double(), 2, pos.flatten(2)[..., None].expand(-1, -1, -1, v.shape[-1]))
        kk = kk.view(B, H, len(t), -1, k.shape[-1])
        vv = vv.view(B, H, len(t), -1, v.shape[-1])
        qg = q[:, :, t0:t0 + chunk].double().view(B, H, HQ // H, len(t), -1)
        s = torch.einsum("bhgcd,bhckd->bhgck", qg, kk) * params.scale
        p = naive.masked_softmax(s, mask[:, :, None])
        out.append(torch.einsum("bhgck,bhckd->bhgcd", p, vv).flatten(1, 2))
    return torch.cat(out, dim=2)
