"""Functional ops in SDPA layout: `nsa_attention`, and `nsa_attention_decode` for the last
positions of a sequence (decoding with a KV cache)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import NSAConfig
from .kernels.nsa import naive, op as _op
from .kernels.nsa.params import NSAParams, num_compressed

__all__ = ["nsa_attention", "nsa_attention_decode"]


def _check_shape(name: str, x: Tensor, expected: tuple, fix: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"nsa_attention: {name} has shape {tuple(x.shape)}, expected "
                         f"{tuple(expected)}; {fix}")


def _validate(q: Tensor, k: Tensor, v: Tensor, config: NSAConfig, gates: Optional[Tensor],
              scale: Optional[float], T: int) -> NSAParams:
    """Checks the inputs of a call over T keys (q holds T queries, or the last of them when
    decoding) and returns its parameters; a ValueError names the input and the fix."""
    if not isinstance(config, NSAConfig):
        raise TypeError(f"nsa_attention: config must be an NSAConfig, got {type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"nsa_attention: {name} must be 4-D (B, heads, T, D) like SDPA's "
                             f"inputs, got shape {tuple(x.shape)}")
    B, HQ, Tq, Dk = q.shape
    H, Dv = k.shape[1], v.shape[-1]
    _check_shape("k", k, (B, H, T, Dk), "k must match q in batch, length and head dim")
    _check_shape("v", v, (B, H, T, Dv), "v must match k in batch, heads and length")
    if HQ % H:
        raise ValueError(f"nsa_attention: {HQ} query heads are not a multiple of {H} KV heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"nsa_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    nb = len(config.branches)
    if config.fixed_gates is None:
        if gates is None:
            raise ValueError("nsa_attention: config.gate='learned' needs gates of shape "
                             f"(B, HQ, T, {nb}); pass gates= or use fixed gate weights")
        _check_shape("gates", gates, (B, HQ, Tq, nb), "one gate per query head, position, branch")
    elif gates is not None:
        raise ValueError(f"nsa_attention: config.gate={config.gate} is fixed; pass gates=None "
                         "or use gate='learned'")
    return NSAParams.from_config(config, Dk ** -0.5 if scale is None else scale)


def _compressed(k: Tensor, v: Tensor, k_cmp: Optional[Tensor], v_cmp: Optional[Tensor],
                config: NSAConfig, params: NSAParams, dtype: torch.dtype):
    """(k_cmp, v_cmp) checked, mean-pooled where None, in `dtype`; None for absent branches."""
    if not params.needs_cmp:
        return None, None
    B, H, T, Dk = k.shape
    l, d = config.compress_block, config.compress_stride
    Tc = num_compressed(T, l, d)
    k_cmp = naive.mean_pool(k, l, d) if k_cmp is None else k_cmp
    _check_shape("k_cmp", k_cmp, (B, H, Tc, Dk), f"Tc = floor((T - {l}) / {d}) + 1")
    if not params.has_cmp:
        return k_cmp.to(dtype), None
    v_cmp = naive.mean_pool(v, l, d) if v_cmp is None else v_cmp
    _check_shape("v_cmp", v_cmp, (B, H, Tc, v.shape[-1]), f"Tc = floor((T - {l}) / {d}) + 1")
    return k_cmp.to(dtype), v_cmp.to(dtype)


def nsa_attention(q: Tensor, k: Tensor, v: Tensor, *, config: NSAConfig,
                  gates: Optional[Tensor] = None, k_cmp: Optional[Tensor] = None,
                  v_cmp: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Causal Native Sparse Attention.

    q: (B, HQ, T, Dk), k: (B, H, T, Dk), v: (B, H, T, Dv) with HQ % H == 0 (query head i reads
    KV head i // (HQ // H), as SDPA's enable_gqa). gates: (B, HQ, T, len(config.branches)) in
    [0, 1], required when config.gate == "learned" and refused otherwise. k_cmp: (B, H, Tc, Dk),
    v_cmp: (B, H, Tc, Dv) compressed keys/values with Tc = floor((T - l) / d) + 1 (0 if T < l),
    or None to mean-pool them. scale defaults to Dk ** -0.5. Returns (B, HQ, T, Dv).
    """
    params = _validate(q, k, v, config, gates, scale, q.shape[2] if q.dim() == 4 else 0)
    gates = None if gates is None else gates.to(q.dtype)
    k_cmp, v_cmp = _compressed(k, v, k_cmp, v_cmp, config, params, q.dtype)
    # The forward keeps what the fast backward reads only when a gradient will be asked for.
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, gates, k_cmp, v_cmp))
    return _op.nsa_fwd(q, k, v, gates, k_cmp, v_cmp, *_op_args(params), save)[0]


def nsa_attention_decode(q: Tensor, k: Tensor, v: Tensor, *, config: NSAConfig,
                         gates: Optional[Tensor] = None, k_cmp: Optional[Tensor] = None,
                         v_cmp: Optional[Tensor] = None,
                         scale: Optional[float] = None) -> Tensor:
    """`nsa_attention` for the last Tq positions only: decoding with a KV cache.

    q: (B, HQ, Tq, Dk) the queries at positions T - Tq … T - 1 of k: (B, H, T, Dk) and v:
    (B, H, T, Dv); gates: (B, HQ, Tq, len(config.branches)) or None; k_cmp/v_cmp as in
    `nsa_attention` (over all T keys). Returns (B, HQ, Tq, Dv), equal to
    `nsa_attention` over the whole sequence at those positions, at a cost that grows with Tq·T
    instead of T² (`nsa_compile::nsa_decode`: on CUDA the Triton decoding kernels, elsewhere a
    PyTorch kernel that gathers the chosen blocks). Not differentiable: it is for inference;
    `nsa_attention` on the padded queries gives gradients.
    """
    T = k.shape[2] if k.dim() == 4 else 0
    params = _validate(q, k, v, config, gates, scale, T)
    if q.shape[2] > T:
        raise ValueError(f"nsa_attention_decode: {q.shape[2]} queries but only {T} keys; the "
                         "queries are the last positions of the keys' sequence")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in (q, k, v, gates, k_cmp, v_cmp)):
        raise RuntimeError("nsa_attention_decode is not differentiable; call it under "
                           "torch.no_grad(), or nsa_attention for gradients")
    k_cmp, v_cmp = _compressed(k, v, k_cmp, v_cmp, config, params, q.dtype)
    return _op.nsa_decode(
        q, k, v, None if gates is None else gates.to(q.dtype), k_cmp, v_cmp, *_op_args(params))


def _op_args(params: NSAParams) -> tuple:
    """The NSA parameters as the ops' schemas take them (after the tensors)."""
    return (params.compress_block, params.compress_stride, params.select_block,
            params.select_count, params.select_initial, params.select_local, params.window,
            [params.has_cmp, params.has_slc, params.has_win], list(params.fixed_gates),
            params.scale)
