"""Rewrite: in-place surgery on each planned attention module.

The module keeps its class, its parameters and its Python `forward`; it gains an `nsa` submodule
(`NSAAttention`) and its `forward` is wrapped so that it runs under a `TorchFunctionMode` that
routes the attention call *made by that module* to `nsa`: the SDPA call at the planned index, or,
for hand-written attention, the PV matmul after the planned QKᵀ matmul (whose q and k it keeps).
Dynamo traces the mode, so `torch.compile(fullgraph=True)` sees one graph; the dense score
computation of a hand-written chain becomes dead code there and is dropped.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import NSAConfig
from ..modules.nsa_attention import NSAAttention
from .find import NEG_LARGE, SitePlan, einsum_pv_perms, einsum_qk_perms, keys_seen, to4d
from .graph import runtime_family

PLAN_ATTR = "_nsa_plan"
NSA_CHILD = "nsa"

_ARG_NAMES = {"masked_fill": "mask", "where": "condition", "add": "other"}


def _runtime_arg(func: Any, fam: str, args: tuple, kwargs: dict, pos: int) -> Any:
    if fam == "where" and func is torch.Tensor.where:  # x.where(cond, y) == torch.where(cond, x, y)
        args = (args[1], args[0], *args[2:])
    if pos < len(args):
        return args[pos]
    return kwargs.get(_ARG_NAMES.get(fam, ""), None) if pos > 0 else kwargs.get("input")


def key_padding(masks: List[Tuple[Tensor, str]], batch: int, keys: int) -> Optional[Tensor]:
    """(B, Tk) bool, True for keys some query may see, from masks in any of the forms the
    detector accepted (keep / drop / additive); None when there is no mask."""
    kp = None
    for mask, how in masks:
        if not isinstance(mask, Tensor):
            continue
        if how == "drop":
            keep = ~mask.bool()
        elif how == "keep" or mask.dtype == torch.bool:
            keep = mask.bool()
        else:
            keep = mask > NEG_LARGE
        keep = keys_seen(to4d(keep))  # (B|1, Tk)
        kp = keep if kp is None else kp & keep
    return None if kp is None else kp.expand(batch, keys)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, T, D) reordered along T by index (B, T)."""
    return x.gather(2, index[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[3]))


def _unrepeat(x: Tensor, plan: SitePlan, name: str) -> Tensor:
    H, HQ = plan.num_kv_heads, plan.num_heads
    if x.shape[1] in (H, 1) or H == HQ:
        return x
    if x.shape[1] != HQ:
        raise RuntimeError(f"nsa_compile: {plan.path or '<root>'} passed {name} with "
                           f"{x.shape[1]} heads; sparsify planned {HQ} query / {H} KV heads")
    if plan.kv_layout == "interleave":
        return x.unflatten(1, (H, HQ // H)).select(2, 0)
    return x[:, :H]


def nsa_causal(nsa: NSAAttention, q: Tensor, k: Tensor, v: Tensor, kp: Optional[Tensor]) -> Tensor:
    """NSA for q (B, HQ, Tq, D) against k, v (B, H, Tk, D), Tq <= Tk: the queries are the last
    Tq positions (decoding with a cache). kp (B, Tk): real keys; padded keys are moved behind the
    real ones, so each real token sees exactly the real tokens before it, in order."""
    B, HQ, Tq, D = q.shape
    Tk = k.shape[2]
    if Tq < Tk and not torch.is_grad_enabled():
        out = _decode(nsa, q, k, v, kp)
        if out is not None:
            return out
    if Tq < Tk:
        q = torch.cat([q.new_zeros(B, HQ, Tk - Tq, D), q], dim=2)
    if kp is None:
        out = nsa(q, k, v)
    else:
        order = torch.sort((~kp).to(torch.uint8), dim=-1, stable=True).indices  # real first
        inverse = torch.argsort(order, dim=-1)
        out = nsa(_gather_time(q, order), _gather_time(k, order), _gather_time(v, order))
        out = _gather_time(out, inverse)
    return out[:, :, Tk - Tq:] if Tq < Tk else out


def _decode(nsa: NSAAttention, q: Tensor, k: Tensor, v: Tensor,
            kp: Optional[Tensor]) -> Optional[Tensor]:
    """The last Tq queries alone (`NSAAttention.decode`: cost Tq·Tk, not Tk²), with no key
    padding or with each row's padding a prefix (the left padding of batched generation).
    None, for the caller's padded path, where the padding lies elsewhere or under
    torch.compile with any padding (the check reads the mask on the host)."""
    if kp is None:
        return nsa.decode(q, k, v, keep=True)
    if torch.compiler.is_compiling():
        return None
    Tq = q.shape[2]
    if not bool((kp[:, 1:] >= kp[:, :-1]).all() & kp[:, -Tq:].all()):
        return None
    # each row's real keys are a suffix: decode a row over them alone (all rows at once
    # where they have the same padding)
    starts = (~kp).sum(dim=1).tolist()
    if len(set(starts)) == 1:
        return nsa.decode(q, k[:, :, starts[0]:], v[:, :, starts[0]:], keep=True)
    return torch.cat([nsa.decode(q[b:b + 1], k[b:b + 1, :, s:], v[b:b + 1, :, s:])
                      for b, s in enumerate(starts)])


def route(module: nn.Module, plan: SitePlan, q: Tensor, k: Tensor, v: Tensor,
          masks: List[Tuple[Tensor, str]]) -> Tensor:
    """The planned attention call of `module`, computed by its NSA: q (B, HQ, Tq, D), k/v with
    H or HQ (repeated) heads. Returns (B, HQ, Tq, Dv) in q's head layout."""
    nsa: NSAAttention = getattr(module, NSA_CHILD)
    B, hq, Tq, D = q.shape
    packed = hq != plan.num_heads
    if packed:
        # transformers' pack_gqa: one decoding query of each head of a group laid out along T.
        if hq * Tq != plan.num_heads:
            raise RuntimeError(f"nsa_compile: {plan.path or '<root>'} passed q with {hq} heads; "
                               f"sparsify planned {plan.num_heads}")
        q = q.reshape(B, plan.num_heads, 1, D)
    k, v = _unrepeat(k, plan, "k"), _unrepeat(v, plan, "v")
    H, G = plan.num_kv_heads, plan.num_heads // plan.num_kv_heads
    tile = plan.kv_layout == "tile" and G > 1 and k.shape[1] == H
    if tile:  # query head g*H + h reads KV head h: regroup to h*G + g as the op expects
        q = q.unflatten(1, (G, H)).transpose(1, 2).flatten(1, 2)
    if k.shape[1] == 1 and H > 1:
        k, v = k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)
    out = nsa_causal(nsa, q, k, v, key_padding(masks, B, k.shape[2]))
    if tile:
        out = out.unflatten(1, (H, G)).transpose(1, 2).flatten(1, 2)
    if packed:
        out = out.reshape(B, hq, Tq, out.shape[-1])
    return out


def _dropout_guard(plan: SitePlan, p: float, training: bool) -> None:
    if training and p > 0:
        raise RuntimeError(f"nsa_compile: {plan.path or '<root>'} applies attention dropout "
                           f"p={p:g} in training, which NSA does not have; set the model's "
                           "attention dropout to 0")


class SiteMode(TorchFunctionMode):
    """Routes the planned attention call of one module's forward to its NSA module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.plan: SitePlan = module.__dict__[PLAN_ATTR]
        self.seen = 0
        self.done = False
        self.in_chain = False
        self.after: dict = {}
        self.q: Optional[Tensor] = None
        self.k: Optional[Tensor] = None
        self.masks: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fam = runtime_family(func)
        if fam is None or self.done:
            return func(*args, **kwargs)
        if self.plan.kind == "sdpa":
            if fam != "sdpa":
                return func(*args, **kwargs)
            index, self.seen = self.seen, self.seen + 1
            if index != self.plan.ordinal:
                return func(*args, **kwargs)
            self.done = True
            return self._sdpa(*args, **kwargs)
        if not self.in_chain:
            if fam == "matmul":
                index, self.seen = self.seen, self.seen + 1
                if index == self.plan.ordinal:
                    self._start_chain(func, args)
            return func(*args, **kwargs)
        index = self.after.get(fam, 0)
        self.after[fam] = index + 1
        if fam == "matmul" and index == self.plan.pv_after:
            self.done = True
            return self._finish_chain(func, args)
        if fam == "dropout":
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training",
                                                                 kwargs.get("train", True))
            _dropout_guard(self.plan, float(p), bool(training))
        if self.plan.external_mask:
            for m_fam, m_after, pos, how in self.plan.mask_ops:
                if m_fam == fam and m_after == index:
                    self.masks.append((_runtime_arg(func, fam, args, kwargs, pos), how))
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False):
        _dropout_guard(self.plan, float(dropout_p), True)
        masks = []
        if attn_mask is not None and self.plan.external_mask:
            masks.append((attn_mask, "keep" if attn_mask.dtype == torch.bool else "additive"))
        return route(self.module, self.plan, query, key, value, masks)

    def _operands(self, func, args) -> tuple:
        if getattr(func, "__name__", "") == "einsum":
            return tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) \
                else tuple(args[1:])
        return tuple(args[:2])

    def _start_chain(self, func, args) -> None:
        a, b = self._operands(func, args)
        if self.plan.qk_equation is not None:
            pq, pk = einsum_qk_perms(self.plan.qk_equation)
            self.q, self.k = a.permute(pq), b.permute(pk)
        else:
            self.q, self.k = a, b.transpose(-1, -2)
        self._check("QKᵀ", self.q, self.plan.head_dim)
        self._check("QKᵀ", self.k, self.plan.head_dim)
        self.in_chain = True

    def _check(self, where: str, x: Any, dim: int) -> None:
        """The call found by position must look like the one planned; if the module's code path
        changed since sparsify, fail loudly rather than attend with the wrong tensors."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise RuntimeError(
                f"nsa_compile: in {self.plan.path or '<root>'} the {where} matmul sparsify planned "
                f"now sees an operand of shape {shape} (expected 4-D with head dim {dim}); the "
                "module's forward took another path than when it was traced")

    def _finish_chain(self, func, args) -> Tensor:
        _p, v = self._operands(func, args)
        pout = None
        if self.plan.pv_equation is not None:
            pv, pout = einsum_pv_perms(self.plan.pv_equation)
            v = v.permute(pv)
        self._check("PV", v, self.plan.v_head_dim)
        out = route(self.module, self.plan, self.q, self.k, v, self.masks)
        return out if pout is None else out.permute(pout)


class SparseForward:
    """The forward of a rewritten module: its own forward, run under `SiteMode`.

    A plain picklable object (not a bound method), so the model still deep-copies and pickles.
    `dense` is the forward the module had as an instance attribute, if any (e.g. a hook
    wrapper); otherwise the class's forward runs.
    """

    def __init__(self, module: nn.Module, dense: Optional[Any] = None):
        self.module = module
        self.dense = dense

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        mode = SiteMode(module)
        with mode:
            if self.dense is not None:
                out = self.dense(*args, **kwargs)
            else:
                out = type(module).forward(module, *args, **kwargs)
        if not mode.done:
            raise RuntimeError(
                f"nsa_compile: {type(module).__name__} ({mode.plan.path or '<root>'}) did not make "
                f"the {mode.plan.kind} attention call it was sparsified for (was its attention "
                "implementation changed after sparsify?)")
        return out


def check_installable(module: nn.Module, path: str) -> None:
    """Raises before any change if `module` cannot take the NSA submodule."""
    if NSA_CHILD in module._modules or hasattr(module, NSA_CHILD):
        raise ValueError(f"nsa_compile: {type(module).__name__} at {path or '<root>'!r} already "
                         f"has an attribute {NSA_CHILD!r}; cannot add the NSA submodule (exclude "
                         "it with filter_fn)")


def install(module: nn.Module, plan: SitePlan, config: NSAConfig) -> NSAAttention:
    """Adds `module.nsa` and routes the module's attention call through it."""
    check_installable(module, plan.path)
    ref = next((p for p in module.parameters() if p.is_floating_point()), None)
    nsa = NSAAttention(config, plan.num_heads, plan.num_kv_heads, plan.head_dim,
                       plan.v_head_dim, scale=plan.scale)
    if ref is not None:
        nsa = nsa.to(device=ref.device, dtype=ref.dtype)
    module.add_module(NSA_CHILD, nsa)
    module.__dict__[PLAN_ATTR] = plan
    module.forward = SparseForward(module, module.__dict__.get("forward"))
    return nsa


def is_rewritten(module: nn.Module) -> bool:
    return PLAN_ATTR in module.__dict__
