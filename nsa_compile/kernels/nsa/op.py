"""`torch.library` registration of the NSA op: forward, backward, fake functions, autograd.

The default (CPU and any device without a faster kernel) implementation is the reference in
`naive.py`; the CUDA launchers register themselves on top with `register_kernel("cuda")`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import naive
from .params import NSAParams


def _params(compress_block: int, compress_stride: int, select_block: int, select_count: int,
            select_initial: int, select_local: int, window: int, branches: List[bool],
            fixed_gates: List[float], scale: float) -> NSAParams:
    return NSAParams(compress_block, compress_stride, select_block, select_count, select_initial,
                     select_local, window, *branches, tuple(fixed_gates), scale)


@torch.library.custom_op("nsa_compile::nsa_fwd", mutates_args=())
def nsa_fwd(q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor], k_cmp: Optional[Tensor],
            v_cmp: Optional[Tensor], compress_block: int, compress_stride: int,
            select_block: int, select_count: int, select_initial: int, select_local: int,
            window: int, branches: List[bool], fixed_gates: List[float], scale: float) -> Tensor:
    p = _params(compress_block, compress_stride, select_block, select_count, select_initial,
                select_local, window, branches, fixed_gates, scale)
    return naive.nsa_attention_ref(q, k, v, gates, k_cmp, v_cmp, p)


@nsa_fwd.register_kernel("cuda")
def _nsa_fwd_cuda(q, k, v, gates, k_cmp, v_cmp, *args):
    # Imported on first CUDA call: CPU users never import Triton code.
    from .triton_fwd import nsa_fwd_cuda
    return nsa_fwd_cuda(q, k, v, gates, k_cmp, v_cmp, _params(*args))


@nsa_fwd.register_fake
def _nsa_fwd_fake(q, k, v, gates, k_cmp, v_cmp, *args):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("nsa_compile::nsa_bwd", mutates_args=())
def nsa_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
            k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], compress_block: int,
            compress_stride: int, select_block: int, select_count: int, select_initial: int,
            select_local: int, window: int, branches: List[bool], fixed_gates: List[float],
            scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dgates, dk_cmp, dv_cmp); an absent input's gradient is empty."""
    p = _params(compress_block, compress_stride, select_block, select_count, select_initial,
                select_local, window, branches, fixed_gates, scale)
    grads = naive.nsa_attention_backward_ref(grad_out, q, k, v, gates, k_cmp, v_cmp, p)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@nsa_bwd.register_fake
def _nsa_bwd_fake(grad_out, q, k, v, gates, k_cmp, v_cmp, *args):
    like = lambda x: q.new_empty(0) if x is None else torch.empty_like(x)
    return tuple(like(x) for x in (q, k, v, gates, k_cmp, v_cmp))


def _setup_context(ctx, inputs, output):
    q, k, v, gates, k_cmp, v_cmp, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, gates, k_cmp, v_cmp)


def _backward(ctx, grad_out):
    q, k, v, gates, k_cmp, v_cmp = ctx.saved_tensors
    grads = nsa_bwd(grad_out.contiguous(), q, k, v, gates, k_cmp, v_cmp, *ctx.args)
    present = (q, k, v, gates, k_cmp, v_cmp)
    return (*(None if x is None else g for g, x in zip(grads, present)), *([None] * len(ctx.args)))


nsa_fwd.register_autograd(_backward, setup_context=_setup_context)
