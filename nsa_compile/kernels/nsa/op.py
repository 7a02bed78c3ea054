"""`torch.library` registration of the NSA op: forward, backward, fake functions, autograd.

The default (CPU and any device without a faster kernel) implementation is the reference in
`naive.py`; the CUDA kernels register themselves on top with `register_kernel("cuda")`.

The forward returns, besides the output, what the Triton backward reads — the ungated branch
outputs, each branch's lse and the selected blocks — when asked to save them and the Triton
path runs; otherwise those are empty and the backward recomputes through the reference.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import naive
from .decode import nsa_decode_gather
from .params import NSAParams, supported


def _params(compress_block: int, compress_stride: int, select_block: int, select_count: int,
            select_initial: int, select_local: int, window: int, branches: List[bool],
            fixed_gates: List[float], scale: float) -> NSAParams:
    return NSAParams(compress_block, compress_stride, select_block, select_count, select_initial,
                     select_local, window, *branches, tuple(fixed_gates), scale)


_warned: set = set()


def _triton_path(q: Tensor, v: Tensor, params: NSAParams) -> bool:
    """Whether the Triton kernels run (CUDA and supported parameters); warns once per reason
    when a CUDA call falls back to the reference."""
    if q.device.type != "cuda":
        return False
    reason = supported(params, q.shape[-1], v.shape[-1])
    if reason is not None:
        _warn_once(reason)
    return reason is None


def _warn_once(reason: str, fallback: str = "the PyTorch reference") -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"nsa_compile: no Triton kernel for {reason}; using {fallback} (slow)",
                      RuntimeWarning, stacklevel=5)


def _residual_shapes(q: Tensor, k: Tensor, v: Tensor, params: NSAParams, save: bool):
    """Shapes of (branch_out, lse, block_idx): full when saved for the Triton backward, else
    (0,) — shared by the kernels and the fake so they always agree."""
    if not (save and q.device.type == "cuda"
            and supported(params, q.shape[-1], v.shape[-1]) is None):
        return (0,), (0,), (0,)
    nb = params.num_branches
    B, HQ, T, _ = q.shape
    n_pad = 1 << max(0, (params.select_count - 1).bit_length())
    idx = (B, k.shape[1], T, n_pad) if params.has_slc else (0,)
    return (nb, B, HQ, T, v.shape[-1]), (nb, B, HQ, T), idx


def _empty_residuals(q: Tensor):
    return q.new_empty(0), q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.int32)


@torch.library.custom_op("nsa_compile::nsa_fwd", mutates_args=())
def nsa_fwd(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor], k_cmp: Optional[Tensor],
            v_cmp: Optional[Tensor], compress_block: int, compress_stride: int,
            select_block: int, select_count: int, select_initial: int, select_local: int,
            window: int, branches: List[bool], fixed_gates: List[float], scale: float,
            save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (o, branch_out, lse, block_idx); the last three are empty on this path."""
    p = _params(compress_block, compress_stride, select_block, select_count, select_initial,
                select_local, window, branches, fixed_gates, scale)
    return (naive.nsa_attention_ref(q, k, v, gates, k_cmp, v_cmp, p), *_empty_residuals(q))


@nsa_fwd.register_kernel("cuda")
def _nsa_fwd_cuda(q, k, v, gates, k_cmp, v_cmp, *args):
    params, save = _params(*args[:-1]), args[-1]
    if not _triton_path(q, v, params):
        return (naive.nsa_attention_ref(q, k, v, gates, k_cmp, v_cmp, params),
                *_empty_residuals(q))
    # Imported on first CUDA call: CPU users never import Triton code.
    from .triton_fwd import nsa_fwd_cuda
    res = nsa_fwd_cuda(q, k, v, gates, k_cmp, v_cmp, params, save)
    if not save:
        return (res.o, *_empty_residuals(q))
    idx = res.block_idx if res.block_idx is not None else _empty_residuals(q)[2]
    return res.o, res.branch_out, res.branch_lse(), idx


@nsa_fwd.register_fake
def _nsa_fwd_fake(q, k, v, gates, k_cmp, v_cmp, *args):
    shapes = _residual_shapes(q, k, v, _params(*args[:-1]), args[-1])
    return (q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(shapes[0]),
            q.new_empty(shapes[1], dtype=torch.float32),
            q.new_empty(shapes[2], dtype=torch.int32))


@torch.library.custom_op("nsa_compile::nsa_bwd", mutates_args=())
def nsa_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
            k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], branch_out: Tensor, lse: Tensor,
            block_idx: Tensor, compress_block: int, compress_stride: int, select_block: int,
            select_count: int, select_initial: int, select_local: int, window: int,
            branches: List[bool], fixed_gates: List[float],
            scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dgates, dk_cmp, dv_cmp); an absent input's gradient is empty.
    branch_out/lse/block_idx: the forward's residuals (ignored here: the reference recomputes)."""
    p = _params(compress_block, compress_stride, select_block, select_count, select_initial,
                select_local, window, branches, fixed_gates, scale)
    grads = naive.nsa_attention_backward_ref(grad_out, q, k, v, gates, k_cmp, v_cmp, p)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@nsa_bwd.register_kernel("cuda")
def _nsa_bwd_cuda(grad_out, q, k, v, gates, k_cmp, v_cmp, branch_out, lse, block_idx, *args):
    p = _params(*args)
    if branch_out.numel() == 0:  # the forward ran the reference or saved nothing
        grads = naive.nsa_attention_backward_ref(grad_out, q, k, v, gates, k_cmp, v_cmp, p)
    else:
        from .triton_bwd import nsa_bwd_cuda
        grads = nsa_bwd_cuda(grad_out, q, k, v, gates, k_cmp, v_cmp, p, branch_out, lse,
                             block_idx if p.has_slc else None)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@nsa_bwd.register_fake
def _nsa_bwd_fake(grad_out, q, k, v, gates, k_cmp, v_cmp, *args):
    like = lambda x: q.new_empty(0) if x is None else torch.empty_like(x)
    return tuple(like(x) for x in (q, k, v, gates, k_cmp, v_cmp))


def _setup_context(ctx, inputs, output):
    q, k, v, gates, k_cmp, v_cmp, *ctx.args = inputs
    ctx.args = ctx.args[:-1]  # the save flag is the forward's only
    _, branch_out, lse, block_idx = output
    ctx.mark_non_differentiable(branch_out, lse, block_idx)
    # The residual outputs get no gradient: without this autograd would fill a zero tensor
    # of each (branch_out alone is 3x the output) before every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, gates, k_cmp, v_cmp, branch_out, lse, block_idx)


def _backward(ctx, grad_out, *_residual_grads):
    q, k, v, gates, k_cmp, v_cmp, *residuals = ctx.saved_tensors
    if grad_out is None:  # only the residuals reached the loss: they carry no gradient
        return (None,) * (6 + len(ctx.args) + 1)
    grads = nsa_bwd(grad_out.contiguous(), q, k, v, gates, k_cmp, v_cmp, *residuals, *ctx.args)
    present = (q, k, v, gates, k_cmp, v_cmp)
    return (*(None if x is None else g for g, x in zip(grads, present)),
            *([None] * (len(ctx.args) + 1)))


nsa_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("nsa_compile::nsa_decode", mutates_args=())
def nsa_decode(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor], k_cmp: Optional[Tensor],
               v_cmp: Optional[Tensor], compress_block: int, compress_stride: int,
               select_block: int, select_count: int, select_initial: int, select_local: int,
               window: int, branches: List[bool], fixed_gates: List[float],
               scale: float) -> Tensor:
    """The forward at the last q.shape[2] positions of k's sequence (decoding with a KV cache);
    no autograd. This kernel (CPU and any device) reads only the chosen blocks
    (`decode.nsa_decode_gather`)."""
    p = _params(compress_block, compress_stride, select_block, select_count, select_initial,
                select_local, window, branches, fixed_gates, scale)
    return nsa_decode_gather(q, k, v, gates, k_cmp, v_cmp, p)


@nsa_decode.register_kernel("cuda")
def _nsa_decode_cuda(q, k, v, gates, k_cmp, v_cmp, *args):
    params = _params(*args)
    from .triton_decode import decode_supported, nsa_decode_cuda
    reason = decode_supported(params, k.shape[2], q.shape[-1], v.shape[-1])
    if reason is not None:
        _warn_once(reason, "the PyTorch decoding kernel")
        return nsa_decode_gather(q, k, v, gates, k_cmp, v_cmp, params)
    return nsa_decode_cuda(q, k, v, gates, k_cmp, v_cmp, params)


@nsa_decode.register_fake
def _nsa_decode_fake(q, k, v, *args):
    return q.new_empty(*q.shape[:3], v.shape[-1])
