"""fp64 references for the GPU tests that accept the kernel's block choice.

With random inputs many blocks have near-equal importance, so bf16 rounding can swap the
last chosen block; the tests therefore check that the kernel's blocks carry the reference's
top-n importance, then compare outputs given the kernel's blocks.
"""
import torch

from nsa_compile.kernels.nsa import naive
from nsa_compile.templates.nsa_configs import KernelConfig
from nsa_compile.kernels.nsa.params import NSAParams, num_selection_blocks


# Interpreter-sized tiles for every kernel kind (each kernel loop runs more than once at the
# tests' lengths) and NSA parameters small enough for T of a few dozen.
SMALL = {kind: KernelConfig(16, 16, 4, 1) for kind in ("cmp", "sel", "win", "cmp_dq", "cmp_dkdv",
                                                       "win_dq", "win_dkdv", "slc_dkdv")}
SMALL.update(slc=KernelConfig(16, 0, 4, 1), slc_dq=KernelConfig(16, 0, 4, 1))
# The selected branch's block-by-block variants: forward, and dQ fused into dK/dV.
SMALL_BLOCKS = dict(slc=KernelConfig(16, 1, 4, 1), slc_dq=KernelConfig(16, 1, 4, 1))
# GPU block sizes forcing each loop order of the selected branch (the rest: DEFAULTS).
GPU_ORDERS = dict(positions=dict(slc=KernelConfig(16, 0, 4, 2), slc_dq=KernelConfig(16, 0, 4, 2)),
                  blocks=dict(slc=KernelConfig(64, 1, 4, 2), slc_dq=KernelConfig(16, 1, 4, 1),
                              # the fused dQ needs room for K twice: fits D = 256
                              slc_dkdv=KernelConfig(32, 0, 4, 1)))
# the fused dQ shares formed in two halves of Dk
GPU_ORDERS["halves"] = {**GPU_ORDERS["blocks"], "slc_dkdv": KernelConfig(32, 1, 4, 1)}
# the warp-specialised Gluon dK/dV kernels (num_warps 12, Hopper only; `templates.nsa_bwd_ws`),
# the selected dQ per position, or fused into the selected dK/dV as shares
WS_DKDV = dict(slc_dkdv=KernelConfig(32, 0, 12, 4), cmp_dkdv=KernelConfig(32, 64, 12, 4),
               win_dkdv=KernelConfig(32, 64, 12, 4))
GPU_ORDERS["ws"] = {**GPU_ORDERS["positions"], **WS_DKDV}
GPU_ORDERS["ws-fused"] = {**GPU_ORDERS["blocks"], **WS_DKDV}
SMALL_NSA = dict(compress_block=16, compress_stride=8, select_block=16, select_count=4,
                 window=24)


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


def selected_output(q, k, v, block_idx, params: NSAParams, chunk: int = 256,
                    with_lse: bool = False):
    """Selected-branch output (B, HQ, T, Dv) fp64 given block_idx (B, H, T, n), -1 = none;
    with_lse: also its log-sum-exp (B, HQ, T)."""
    B, HQ, T, _ = q.shape
    H, lp = k.shape[1], params.select_block
    out, lse = [], []
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
        # out of place (differentiable): rows with no visible key give zeros
        s = torch.where(mask[:, :, None], s, -torch.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out.append(torch.einsum("bhgck,bhckd->bhgcd", p, vv).flatten(1, 2))
        lse.append(torch.logsumexp(s, -1).flatten(1, 2))
    if with_lse:
        return torch.cat(out, dim=2), torch.cat(lse, dim=2)
    return torch.cat(out, dim=2)


def gradients(grad_out, q, k, v, gates, k_cmp, v_cmp, params: NSAParams, block_idx=None):
    """fp64 (dq, dk, dv, dgates, dk_cmp, dv_cmp) of the op given the kernel's block choice
    (block_idx (B, H, T, n) when the selected branch runs): the other branches through the
    reference backward, the selected one by autograd through `selected_output`."""
    dd = lambda x: None if x is None else x.detach().double()
    q, k, v, gates, k_cmp, v_cmp, do = map(dd, (q, k, v, gates, k_cmp, v_cmp, grad_out))
    if not params.has_slc:
        return naive.nsa_attention_backward_ref(do, q, k, v, gates, k_cmp, v_cmp, params)
    slot = params.gate_slot("selected")
    others = [i for i in range(params.num_branches) if i != slot]
    rest = params._replace(has_slc=False, fixed_gates=tuple(
        params.fixed_gates[i] for i in others) if params.fixed_gates else ())
    grads = [torch.zeros_like(x) if x is not None else None
             for x in (q, k, v, gates, k_cmp, v_cmp)]
    if rest.num_branches:
        g_rest = None if gates is None else gates[..., others]
        part = naive.nsa_attention_backward_ref(do, q, k, v, g_rest, k_cmp,
                                                v_cmp if rest.has_cmp else None, rest)
        for i, g in enumerate(part):
            if g is None:
                continue
            if i == 3:
                grads[3][..., others] = g
            else:
                grads[i] += g
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_sel = selected_output(*leaves, block_idx, params)
    w = gates[..., slot:slot + 1] if gates is not None else params.fixed_gates[slot]
    for i, g in enumerate(torch.autograd.grad(o_sel, leaves, do * w)):
        grads[i] += g
    if gates is not None:
        grads[3][..., slot] = (do * o_sel.detach()).sum(-1)
    return tuple(grads)


def record_position_chunks(monkeypatch, launcher: str) -> list:
    """Sets a 1-byte partial budget (chunks of 16 positions) and returns the list that collects
    the first position of each chunk `launcher` ("triton_fwd" / "triton_bwd") inverts."""
    from nsa_compile.kernels.nsa import inverted
    monkeypatch.setattr(inverted, "PARTIAL_BUDGET", 1)
    monkeypatch.setattr(inverted, "MIN_POSITION_CHUNK", 16)
    chunks = []
    invert = inverted.invert_selection
    monkeypatch.setattr(f"nsa_compile.kernels.nsa.{launcher}.invert_selection",
                        lambda idx, n, t0, *skip: chunks.append(t0) or invert(idx, n, t0, *skip))
    return chunks
