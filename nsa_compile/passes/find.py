"""Finding attention calls in the traced graph, and the value helpers the detection rules use.

Two finders (`find_sdpa_calls`, `find_manual_calls`) turn graph nodes into `Call`s: the owning
module, q/k/v, the masks on the way to the softmax, the scale factors. `detect.py` classifies them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .graph import (PASS_THROUGH, aten, arg, common_owner, family, owner_calls, tensor_val)

NEG_LARGE = -1e4  # a fill at or below this counts as "masked out" (HF uses finfo.min)


@dataclass
class MaskOp:
    """A masking step between QKᵀ and the softmax (or SDPA's attn_mask).

    how: "keep" (True = attend), "drop" (True = masked, as masked_fill) or "additive" (0 = attend,
    very negative = masked). family/argpos/after locate it at run time: the `after`-th call of
    `family` after the QKᵀ matmul, mask at argument `argpos`. fill: what masked_fill/where write
    at masked positions (a number, or a graph node evaluated later).
    """

    node: Any
    how: str
    family: str = "sdpa"
    argpos: int = 3
    after: int = 0
    fill: Any = None


@dataclass
class Call:
    """One attention call found in the graph, before classification.

    kind "sdpa": q/k/v are SDPA's inputs. kind "manual": q/k are the QKᵀ matmul's operands (k is
    kᵀ for matmul), v the PV matmul's second operand; einsum calls carry their equations.
    """

    kind: str
    path: str
    key: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    qk: Optional[fx.Node] = None
    masks: List[MaskOp] = field(default_factory=list)
    scale_factors: List[Tuple[str, Any]] = field(default_factory=list)
    is_causal: bool = False
    enable_gqa: bool = False
    sdpa_scale: Optional[float] = None
    dropout_p: float = 0.0
    problem: Optional[str] = None
    ordinal: int = 0
    pv_after: int = 0


@dataclass(frozen=True)
class SitePlan:
    """What the rewrite needs to route one module's attention call to NSA at run time.

    num_heads: query heads HQ; num_kv_heads: true KV heads H (after undoing repeat_kv and the
    like); kv_layout: "interleave" (query head i reads KV head i // G, repeat_kv's layout) or
    "tile" (i % H, `k.repeat(1, G, 1, 1)`'s); scale: softmax scale. For "sdpa" sites `ordinal` is
    the index of the SDPA call inside the module's forward; for "manual" sites it is the QKᵀ
    matmul's index among matmul calls, `pv_after` the PV matmul's among those after it, and
    `mask_ops` the masks to read padding from. external_mask: the mask comes from outside the
    module, so at run time it may carry padding.
    """

    path: str
    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    kv_layout: str
    scale: float
    ordinal: int
    pv_after: int = 0
    qk_equation: Optional[str] = None
    pv_equation: Optional[str] = None
    mask_ops: Tuple[Tuple[str, int, int, str], ...] = ()
    external_mask: bool = False
    dropout_p: float = 0.0


@dataclass
class Finding:
    """A classified call: status "rewrite" (with a plan) or "skip"; reason in a user's words."""

    call: Call
    status: str
    reason: str
    plan: Optional[SitePlan] = None


# --------------------------------------------------------------------------- finders

def _shape(node: Any) -> Optional[Tuple[int, ...]]:
    val = tensor_val(node)
    return tuple(val.shape) if val is not None else None


def find_sdpa_calls(graph: fx.Graph) -> List[Call]:
    """Every `aten.scaled_dot_product_attention` node, with its arguments unpacked."""
    calls = []
    for node in graph.nodes:
        if family(node) != "sdpa":
            continue
        key, path = common_owner([node])
        q, k, v = node.args[:3]
        mask = arg(node, 3, "attn_mask")
        call = Call("sdpa", path, key, q, k, v, node,
                    is_causal=bool(arg(node, 5, "is_causal", False)),
                    enable_gqa=bool(node.kwargs.get("enable_gqa", False)),
                    sdpa_scale=node.kwargs.get("scale"),
                    dropout_p=float(arg(node, 4, "dropout_p", 0.0) or 0.0))
        if mask is not None:
            val = tensor_val(mask)
            how = "keep" if val is not None and val.dtype == torch.bool else "additive"
            call.masks.append(MaskOp(mask, how))
        calls.append(call)
    return calls


def _scores_operand(node: fx.Node, candidates: Sequence[Any]) -> Optional[int]:
    """Index of the operand of `node` that carries the attention scores (same shape as out)."""
    out = _shape(node)
    full = [i for i, c in enumerate(candidates) if _shape(c) == out]
    if len(full) == 1:
        return full[0]
    for i in full or range(len(candidates)):
        if _reaches_matmul(candidates[i]):
            return i
    return None


def _reaches_matmul(node: Any, depth: int = 12) -> bool:
    while isinstance(node, fx.Node) and depth > 0:
        if family(node) == "matmul":
            return True
        if node.op != "call_function" or not node.args:
            return False
        node, depth = node.args[0], depth - 1
    return False


def _walk_back_scores(softmax: fx.Node) -> Tuple[Optional[fx.Node], List[MaskOp], list, List[str]]:
    """From the softmax input back to the QKᵀ matmul: (qk, masks, scale factors, unknown ops)."""
    masks: List[MaskOp] = []
    factors: list = []
    unknown: List[str] = []
    x = softmax.args[0]
    for _ in range(64):
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return None, masks, factors, unknown
        fam, t = family(x), x.target
        if fam == "matmul":
            return x, masks, factors, unknown
        if t in PASS_THROUGH:
            x = x.args[0]
        elif t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            i = _scores_operand(x, x.args[:2])
            if i is None or (t in (aten.div.Tensor, aten.div.Scalar) and i != 0):
                return None, masks, factors, unknown
            factors.append(("div" if t in (aten.div.Tensor, aten.div.Scalar) else "mul",
                            x.args[1 - i]))
            x = x.args[i]
        elif fam == "add":
            i = _scores_operand(x, x.args[:2])
            if i is None:
                return None, masks, factors, unknown
            masks.append(MaskOp(x.args[1 - i], "additive", "add", 1 - i))
            x = x.args[i]
        elif fam == "masked_fill":
            masks.append(MaskOp(x.args[1], "drop", "masked_fill", 1, fill=x.args[2]))
            x = x.args[0]
        elif fam == "where":
            i = _scores_operand(x, x.args[1:3])
            if i is None:
                return None, masks, factors, unknown
            masks.append(MaskOp(x.args[0], "keep" if i == 0 else "drop", "where", 0,
                                fill=x.args[2 - i]))  # a number, or a node evaluated later
            x = x.args[1 + i]
        else:
            unknown.append(str(getattr(t, "__name__", t)).split(".")[0])
            x = x.args[0] if x.args else None
    return None, masks, factors, unknown


def _walk_forward_probs(softmax: fx.Node) -> Tuple[Optional[fx.Node], float]:
    """From the softmax to the PV matmul through casts and dropout: (pv, dropout p)."""
    p = 0.0
    frontier = [softmax]
    for _ in range(16):
        nxt = []
        for x in frontier:
            for user in x.users:
                fam = family(user)
                if fam == "matmul":
                    first = user.args[1][0] if user.target is aten.einsum.default else user.args[0]
                    if first is x:
                        return user, p
                elif fam == "dropout":
                    p = max(p, float(user.args[1]))
                    nxt.append(user)
                elif user.op == "call_function" and user.target in PASS_THROUGH:
                    nxt.append(user)
        frontier = nxt
    return None, p


def find_manual_calls(graph: fx.Graph) -> List[Call]:
    """Every softmax fed by a matmul and feeding a matmul: hand-written attention."""
    calls = []
    for node in graph.nodes:
        if family(node) != "softmax":
            continue
        dim = node.args[1]
        rank = len(_shape(node) or ())
        if dim not in (-1, rank - 1):
            continue
        qk, masks, factors, unknown = _walk_back_scores(node)
        if qk is None:
            continue
        pv, p = _walk_forward_probs(node)
        if pv is None:
            continue
        q, k = qk.args[1][:2] if qk.target is aten.einsum.default else qk.args[:2]
        v = pv.args[1][1] if pv.target is aten.einsum.default else pv.args[1]
        if any(len(_shape(x) or ()) < 3 for x in (q, k, v)):
            continue  # a softmax over x @ W (a router, a classifier) is not attention
        key, path = common_owner([qk, node, pv])
        call = Call("manual", path, key, q, k, v, pv, qk=qk, masks=masks, scale_factors=factors,
                    dropout_p=p)
        if unknown:
            call.problem = ("hand-written attention with unsupported ops between QKᵀ and the "
                            f"softmax ({', '.join(sorted(set(unknown)))}; e.g. logit soft-capping)")
        calls.append(call)
    return calls


def number_calls(graph: fx.Graph, calls: List[Call]) -> None:
    """Fill in each call's run-time coordinates: its index among same-family calls inside the
    owning module's forward, and the masks' and PV matmul's positions after the QKᵀ matmul."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    keys = {call.key for call in calls}
    by_key: Dict[str, List[fx.Node]] = {key: [] for key in keys}
    for n in graph.nodes:
        for key in {k for k, _ in owner_calls(n)} & keys | ({""} & keys):
            by_key[key].append(n)
    for call in calls:
        nodes = by_key[call.key]
        fam = "sdpa" if call.kind == "sdpa" else "matmul"
        first = call.out if call.kind == "sdpa" else call.qk
        call.ordinal = sum(1 for n in nodes if family(n) == fam and order[n] < order[first])
        if call.kind != "manual":
            continue
        start = order[call.qk]
        between = lambda f, end: sum(1 for n in nodes  # noqa: E731
                                     if family(n) == f and start < order[n] < order[end])
        call.pv_after = between("matmul", call.out)
        for m in call.masks:
            user = next((u for u in (m.node.users if isinstance(m.node, fx.Node) else ())
                         if family(u) == m.family and start < order[u] <= order[call.out]), None)
            m.after = between(m.family, user) if user is not None else -1


# --------------------------------------------------------------------------- evaluation helpers

def canonical_qkv(call: Call, values: Dict[fx.Node, Any]) -> Tuple[torch.Tensor, ...]:
    """q (B, HQ, Tq, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv) as NSA sees them."""
    q, k, v = values[call.q], values[call.k], values[call.v]
    if call.kind == "manual":
        if call.qk.target is aten.einsum.default:
            pq, pk = einsum_qk_perms(call.qk.args[0])
            q, k = q.permute(pq), k.permute(pk)
        else:
            k = k.transpose(-1, -2)
        if call.out.target is aten.einsum.default:
            v = v.permute(einsum_pv_perms(call.out.args[0])[0])
    return q, k, v


def _letters(eq: str) -> Tuple[str, str, str]:
    if "..." in eq or "->" not in eq:
        raise ValueError(f"einsum {eq!r}: only explicit 4-letter equations are supported")
    ins, out = eq.replace(" ", "").split("->")
    a, b = ins.split(",")
    if not (len(a) == len(b) == len(out) == 4):
        raise ValueError(f"einsum {eq!r}: only 4-D operands are supported")
    return a, b, out


def einsum_qk_perms(eq: str) -> Tuple[List[int], List[int]]:
    """Permutations taking an einsum QKᵀ's operands to (B, H, Tq, D) and (B, H, Tk, D); the
    output must be (b1, b2, q, k) so the softmax runs over keys."""
    a, b, out = _letters(eq)
    b1, b2, tq, tk = out
    (d,) = set(a) & set(b) - set(out)
    return [a.index(c) for c in (b1, b2, tq, d)], [b.index(c) for c in (b1, b2, tk, d)]


def einsum_pv_perms(eq: str) -> Tuple[List[int], List[int]]:
    """(perm of v to (B, H, Tk, Dv), perm of (B, H, Tq, Dv) to the einsum's output layout)."""
    a, b, out = _letters(eq)
    b1, b2, tq, tk = a
    (dv,) = set(b) - set(a)
    canon = (b1, b2, tq, dv)
    return [b.index(c) for c in (b1, b2, tk, dv)], [canon.index(c) for c in out]


def mask_keep(m: MaskOp, value: Any, values: Dict[fx.Node, Any]
              ) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """The boolean keep-mask of one mask step, or a reason it is not a mask."""
    if not isinstance(value, torch.Tensor):
        return None, "a mask that is not a tensor"
    if m.how == "keep":
        keep = value.bool()
    elif m.how == "drop":
        keep = ~value.bool()
    else:
        keep = value > NEG_LARGE
        if value.dtype == torch.bool:
            return value, None
        kept = value.masked_select(keep)
        if kept.numel() and kept.abs().max() > 0:
            return None, ("an additive attention bias (e.g. ALiBi or relative positions): NSA "
                          "has no bias input")
    fill = m.fill
    if isinstance(fill, fx.Node):
        fill = values.get(fill)
        fill = float(fill.max()) if isinstance(fill, torch.Tensor) and fill.numel() else None
    if m.how in ("keep", "drop") and m.family != "sdpa" and (fill is None or fill > NEG_LARGE):
        return None, f"a {m.family} with fill value {fill} that is not a mask"
    return keep, None


def expected_keep(T: int, kp: Optional[torch.Tensor], window: Optional[int]) -> torch.Tensor:
    """(B|1, 1, T, T) causal (optionally banded) ∧ key-padding pattern."""
    i = torch.arange(T)
    keep = i[None, :] <= i[:, None]
    if window is not None:
        keep &= i[:, None] - i[None, :] < window
    keep = keep[None, None]
    if kp is not None:
        keep = keep & kp[:, None, None, :]
    return keep


def matches(keep: torch.Tensor, T: int, kp: Optional[torch.Tensor], window: Optional[int]) -> bool:
    """keep equals the causal(-window) ∧ padding pattern on every real query row."""
    exp = expected_keep(T, kp, window).to(keep.device)
    B = max(keep.shape[0], exp.shape[0])
    keep = keep.expand(B, keep.shape[1], T, T)
    exp = exp.expand(B, keep.shape[1], T, T)
    rows = torch.ones(B, T, dtype=torch.bool, device=keep.device) if kp is None else kp.expand(B, T)
    return bool(((keep == exp) | ~rows[:, None, :, None]).all())


def pattern(keep: torch.Tensor, T: int, kp: Optional[torch.Tensor]) -> Tuple[str, Optional[int]]:
    """("causal", None), ("window", W), ("bidirectional", None) or ("arbitrary", None)."""
    if matches(keep, T, kp, None):
        return "causal", None
    lower = keep & expected_keep(T, None, None).to(keep.device)
    if bool((lower == keep).all()):
        i = torch.arange(T, device=keep.device)
        dist = (i[:, None] - i[None, :]).expand_as(keep)
        W = int(dist.masked_select(keep).max()) + 1 if keep.any() else 1
        if matches(keep, T, kp, W):
            return "window", W
    full = torch.ones_like(keep) if kp is None else kp[:, None, None, :].expand_as(keep)
    if bool((keep == full).all()):
        return "bidirectional", None
    return "arbitrary", None


def to4d(x: torch.Tensor) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0 if x.dim() < 3 else 1)
    return x


def keys_seen(keep: torch.Tensor) -> torch.Tensor:
    """keep (B|1, H|1, Tq, Tk) bool -> (B|1, Tk): the keys some query row sees, i.e. the real
    (non-padding) keys of a causal ∧ key-padding mask. Queries are the last Tq positions; a row
    that sees a future key (a fully masked row that a mask function re-opened, as transformers'
    unmask-unattended fix does) says nothing about padding and is ignored."""
    Tq, Tk = keep.shape[-2:]
    q_pos = torch.arange(Tq, device=keep.device) + (Tk - Tq)
    future = torch.arange(Tk, device=keep.device)[None, :] > q_pos[:, None]
    sane = ~(keep & future).any(dim=-1, keepdim=True)
    return (keep & sane).any(dim=-2)[:, 0]


def repeated(x: torch.Tensor, H: int, G: int, layout: str) -> bool:
    """x (B, H*G, T, D) holds G copies of H heads in the given layout."""
    y = x.unflatten(1, (H, G) if layout == "interleave" else (G, H))
    dim = 2 if layout == "interleave" else 1
    return bool((y == y.narrow(dim, 0, 1)).all())


def is_scalar_like(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor)
                                               and value.numel() == 1)


def module_dropout(module: nn.Module) -> float:
    """Attention-dropout probability a module keeps for training (0.0 if none is visible)."""
    p = 0.0
    for name, value in vars(module).items():
        if isinstance(value, float) and "drop" in name.lower() and not isinstance(value, bool):
            if "resid" not in name.lower() and "hidden" not in name.lower():
                p = max(p, value)
    for name, child in module.named_children():
        low = name.lower()
        if isinstance(child, nn.Dropout) and ("attn" in low or "attention" in low):
            p = max(p, float(child.p))
    return p
