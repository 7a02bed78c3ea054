"""Functional ops: `nsa_attention` in SDPA layout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import NSAConfig
from .kernels.nsa import op as _op
from .kernels.nsa.naive import mean_pool
from .kernels.nsa.params import NSAParams, num_compressed

__all__ = ["nsa_attention"]


def _check_shape(name: str, x: Tensor, expected: tuple, fix: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"nsa_attention: {name} has shape {tuple(x.shape)}, expected "
                         f"{tuple(expected)}; {fix}")


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
    if not isinstance(config, NSAConfig):
        raise TypeError(f"nsa_attention: config must be an NSAConfig, got {type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"nsa_attention: {name} must be 4-D (B, heads, T, D) like SDPA's "
                             f"inputs, got shape {tuple(x.shape)}")
    B, HQ, T, Dk = q.shape
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
        _check_shape("gates", gates, (B, HQ, T, nb), "one gate per query head, position, branch")
        gates = gates.to(q.dtype)
    elif gates is not None:
        raise ValueError(f"nsa_attention: config.gate={config.gate} is fixed; pass gates=None "
                         "or use gate='learned'")
    params = NSAParams.from_config(config, Dk ** -0.5 if scale is None else scale)
    if params.needs_cmp:
        l, d = config.compress_block, config.compress_stride
        Tc = num_compressed(T, l, d)
        k_cmp = mean_pool(k, l, d) if k_cmp is None else k_cmp
        _check_shape("k_cmp", k_cmp, (B, H, Tc, Dk), f"Tc = floor((T - {l}) / {d}) + 1")
        k_cmp = k_cmp.to(q.dtype)
        if params.has_cmp:
            v_cmp = mean_pool(v, l, d) if v_cmp is None else v_cmp
            _check_shape("v_cmp", v_cmp, (B, H, Tc, Dv), f"Tc = floor((T - {l}) / {d}) + 1")
            v_cmp = v_cmp.to(q.dtype)
        else:
            v_cmp = None
    else:
        k_cmp = v_cmp = None
    # The forward keeps what the fast backward reads only when a gradient will be asked for.
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, gates, k_cmp, v_cmp))
    return _op.nsa_fwd(
        q, k, v, gates, k_cmp, v_cmp, params.compress_block, params.compress_stride,
        params.select_block, params.select_count, params.select_initial, params.select_local,
        params.window, [params.has_cmp, params.has_slc, params.has_win],
        list(params.fixed_gates), params.scale, save)[0]
