"""Detection: classify every attention call of a traced model (rules) and plan its rewrite.

Each rule is a small function with a docstring naming a real model that produces its pattern.
Masks are judged by their *values* on the example inputs, and by how those values change when an
input the mask reads changes (a padding mask must act as causal ∧ key-padding), not by the names
of the ops that built them, so Hugging Face's mask functions, `tril` buffers and additive `-inf`
masks need no rule of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind

from .find import (Call, Finding, SitePlan, canonical_qkv, find_manual_calls, find_sdpa_calls,
                   is_scalar_like, keys_seen, mask_keep, matches, module_dropout, number_calls,
                   pattern, repeated, to4d)
from .graph import REPEAT_OPS, GraphValues, ancestors, in_call, tensor_val, user_input_deps


@dataclass
class Context:
    """What the rules read: the model, the graph's input dependencies and evaluated values."""

    model: nn.Module
    modules: Dict[str, nn.Module]
    gv: GraphValues
    deps: Dict[fx.Node, FrozenSet[str]]
    params: FrozenSet[str]
    values: Dict[fx.Node, Any]


@dataclass
class MaskVerdict:
    kind: str                      # "causal" | "window" | skip
    reason: str
    window: Optional[int] = None
    padding: Tuple[str, ...] = ()  # inputs read as key padding


# --------------------------------------------------------------------------- gating rules

def meta_qkv(call: Call) -> Tuple[torch.Tensor, ...]:
    """canonical q/k/v of a call as the fake tensors recorded at export (shapes only)."""
    return canonical_qkv(call, {n: tensor_val(n) for n in (call.q, call.k, call.v)})


def rule_layout(call: Call, ctx: Context) -> Optional[str]:
    """q/k/v must be 4-D (B, heads, T, D) with as many keys as queries. BLOOM's eager attention
    (baddbmm on (B·heads, T, D)) is the common 3-D layout this turns away."""
    if any(tensor_val(n) is None or tensor_val(n).dim() != 4 for n in (call.q, call.k, call.v)):
        return "attention on 3-D (batch·heads, T, D) tensors: only (B, heads, T, D) is supported"
    try:
        q, k, _ = meta_qkv(call)
    except ValueError as exc:
        return f"hand-written attention with an unsupported einsum: {exc}"
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq != Tk:
        return (f"cross-attention ({Tq} queries, {Tk} keys): NSA rewrites causal self-attention "
                "only")
    if Tq < 2:
        return ("the example inputs have sequence length 1, so causal and bidirectional "
                "attention look alike; pass example_inputs with at least 2 tokens")
    return None


def rule_cross_attention(call: Call, ctx: Context) -> Optional[str]:
    """Keys computed from other inputs than the queries: T5's and Whisper's decoder
    cross-attention (queries from the decoder, keys from the encoder)."""
    if ctx.deps.get(call.q, frozenset()) != ctx.deps.get(call.k, frozenset()):
        return "cross-attention (keys come from other inputs than queries): NSA is self-attention"
    return None


def rule_unsupported_chain(call: Call, ctx: Context) -> Optional[str]:
    """Hand-written attention with extra ops on the scores, e.g. Gemma-2's eager logit
    soft-capping (tanh between QKᵀ and the softmax)."""
    return call.problem


def rule_learned_scale(call: Call, ctx: Context) -> Optional[str]:
    """A scale that reads a parameter, e.g. Swin-V2's cosine attention with a learned
    logit_scale, or a tensor scale that is not a scalar."""
    for _op, operand in call.scale_factors:
        if isinstance(operand, fx.Node):
            if any(n.op == "placeholder" and n.name in ctx.params for n in ancestors([operand])):
                return "a learned attention temperature (the scale reads a parameter)"
            if not is_scalar_like(ctx.values.get(operand)):
                return "scores multiplied by a non-scalar tensor (a per-head or positional scale)"
    return None


GATING_RULES: List[Callable[[Call, Context], Optional[str]]] = [
    rule_layout, rule_cross_attention, rule_unsupported_chain, rule_learned_scale]


# --------------------------------------------------------------------------- mask rules

def rule_is_causal_flag(call: Call, ctx: Context) -> Optional[MaskVerdict]:
    """SDPA with is_causal=True and no mask: nanoGPT's flash path, and transformers' SDPA
    attention when it can drop the mask."""
    if call.kind == "sdpa" and call.is_causal and not call.masks:
        return MaskVerdict("causal", "causal self-attention (is_causal=True)")
    return None


def rule_no_mask(call: Call, ctx: Context) -> Optional[MaskVerdict]:
    """No mask and no causal flag: bidirectional attention, as in ViT's and BERT's encoders."""
    if not call.masks and not call.is_causal:
        return MaskVerdict("skip", "bidirectional attention (no causal mask): NSA is causal")
    return None


def _keep(call: Call, ctx: Context, values: Dict[fx.Node, Any]
          ) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    keep = None
    for m in call.masks:
        value = values.get(m.node, m.node) if isinstance(m.node, fx.Node) else m.node
        k, why = mask_keep(m, value, values)
        if why:
            return None, why
        k = to4d(k)
        keep = k if keep is None else keep & k
    return keep, None


def _padding_inputs(call: Call, ctx: Context) -> Tuple[List[str], List[str]]:
    """The inputs the masks read: (0/1 (B, T) ones, read as key padding; all others)."""
    names = set()
    for m in call.masks:
        for part in (m.node, m.fill):
            if isinstance(part, fx.Node):
                names |= ctx.deps.get(part, frozenset())
    padding, other = [], []
    T = meta_qkv(call)[0].shape[2]
    for name in sorted(names):
        x = ctx.gv.user_inputs[name]
        binary = x.dim() == 2 and x.shape[-1] == T and bool(((x == 0) | (x == 1)).all())
        (padding if binary else other).append(name)
    return padding, other


def _padded(x: torch.Tensor) -> torch.Tensor:
    """A left-padded first row and, when there is a second, a right-padded second row."""
    x = x.clone()
    n = max(1, min(2, x.shape[1] - 1))
    x[0, :n] = 0
    if x.shape[0] > 1:
        x[1, -n:] = 0
    return x


def _mask_values(call: Call, ctx: Context, overrides: Dict[str, Any]) -> Dict[fx.Node, Any]:
    nodes = [p for m in call.masks for p in (m.node, m.fill) if isinstance(p, fx.Node)]
    return ctx.gv.evaluate(nodes, overrides) if overrides else ctx.values


def _padding_readable(keep: torch.Tensor, kp: Optional[torch.Tensor]) -> bool:
    """The rewrite reads the real keys back from the mask at run time (`keys_seen`): that must
    give the padding the mask encodes (all keys when there is none)."""
    seen = keys_seen(keep)
    want = torch.ones_like(seen) if kp is None else kp.to(seen.device)
    return seen.shape[-1] == want.shape[-1] and bool((seen.expand_as(want) == want).all())


def rule_mask_values(call: Call, ctx: Context) -> Optional[MaskVerdict]:
    """A mask tensor built by the model: Hugging Face's boolean (SDPA) and additive finfo.min
    (eager) masks from masking_utils, nanoGPT's `tril` buffer with masked_fill(-inf), Mistral's
    sliding-window mask. Judged by its values; a mask read from a 0/1 (B, T) input (Llama's
    attention_mask) must act as key padding when that input gets zeros; a mask read from any
    other input must not change when the input does."""
    T = meta_qkv(call)[0].shape[2]
    keep, why = _keep(call, ctx, ctx.values)
    if why:
        return MaskVerdict("skip", why)
    padding, other = _padding_inputs(call, ctx)
    kp = None
    for name in padding:
        x = ctx.gv.user_inputs[name].bool()
        kp = x if kp is None else kp & x
    kind, window = pattern(keep, T, kp)
    if kind in ("causal", "window") and not _padding_readable(keep, kp):
        kind = "arbitrary"
    if kind == "bidirectional":
        return MaskVerdict("skip", "bidirectional attention (the mask lets every token see every "
                                   "other): NSA is causal")
    if kind == "arbitrary":
        return MaskVerdict("skip", "an attention mask that is neither causal nor causal with "
                                   "padding (e.g. block or prefix-LM masks): NSA is causal")
    for name in padding:
        x = ctx.gv.user_inputs[name]
        pert = _padded(x)
        kp2 = pert.bool()
        for other_name in padding:
            if other_name != name:
                kp2 = kp2 & ctx.gv.user_inputs[other_name].bool()
        keep2, why = _keep(call, ctx, _mask_values(call, ctx, {name: pert}))
        if why or not matches(keep2, T, kp2, window) or not _padding_readable(keep2, kp2):
            return MaskVerdict("skip", f"the mask reads input {name!r} in a way that is not "
                                       "causal key padding: NSA cannot reproduce it")
    for name in other:
        x = ctx.gv.user_inputs[name]
        pert = ~x if x.dtype == torch.bool else x * 1.5 + 1 if x.is_floating_point() else x + 1
        keep2, why = _keep(call, ctx, _mask_values(call, ctx, {name: pert}))
        if why or keep2.shape != keep.shape or not bool((keep2 == keep).all()):
            return MaskVerdict("skip", f"the mask depends on the values of input {name!r} (an "
                                       "arbitrary user mask): NSA supports causal and padding "
                                       "masks only")
    what = "causal mask built by the model" if kind == "causal" else (
        f"causal sliding-window mask (window {window}; NSA's branches replace it)")
    if padding:
        what += f", padding from {', '.join(repr(p) for p in padding)} handled"
    return MaskVerdict(kind, what, window, tuple(padding))


MASK_RULES: List[Callable[[Call, Context], Optional[MaskVerdict]]] = [
    rule_is_causal_flag, rule_no_mask, rule_mask_values]


def rule_attention_dropout(call: Call, ctx: Context, owner: nn.Module
                           ) -> Tuple[Optional[str], float]:
    """Attention dropout that is active in training: GPT-2's attn_pdrop=0.1 (nn.Dropout on the
    probabilities), nanoGPT's dropout_p, Llama's attention_dropout."""
    p = max(call.dropout_p, module_dropout(owner))
    if p > 0 and ctx.model.training:
        return (f"attention dropout p={p:g} in training: NSA has no attention dropout; set it to 0 "
                "or sparsify in eval mode"), p
    return None, p


# --------------------------------------------------------------------------- GQA and scale

def kv_heads(call: Call, ctx: Context, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> Tuple[int, str]:
    """True KV head count and layout. Recognises KV heads repeated for the query heads by
    Llama/Mistral/Qwen2's repeat_kv (unsqueeze, expand, reshape), gemma_pytorch's
    repeat_interleave, and tiling by k.repeat(1, G, 1, 1); SDPA's enable_gqa passes them as is.
    A head count is only lowered when a repeat op is on the path and the heads are equal."""
    Hk = k.shape[1]
    if call.enable_gqa or Hk == 1:
        return Hk, "interleave"
    inside = ancestors([call.k, call.v], stop=lambda n: not in_call(n, call.key))
    if not any(n.op == "call_function" and n.target in REPEAT_OPS for n in inside):
        return Hk, "interleave"
    for G in range(Hk, 1, -1):
        if Hk % G:
            continue
        for layout in ("interleave", "tile"):
            if repeated(k, Hk // G, G, layout) and repeated(v, Hk // G, G, layout):
                return Hk // G, layout
    return Hk, "interleave"


def attention_scale(call: Call, ctx: Context, q: torch.Tensor) -> float:
    """SDPA: its scale argument or D ** -0.5. Manual: the product of the factors between QKᵀ and
    the softmax (1.0 when the model scales q or k before the matmul)."""
    if call.kind == "sdpa":
        return float(call.sdpa_scale) if call.sdpa_scale is not None else q.shape[-1] ** -0.5
    s = 1.0
    for op, operand in call.scale_factors:
        val = ctx.values.get(operand, operand) if isinstance(operand, fx.Node) else operand
        val = float(val.reshape(()) if isinstance(val, torch.Tensor) else val)
        s = s * val if op == "mul" else s / val
    return s


def _external_mask(call: Call, ctx: Context) -> bool:
    """The mask comes from outside the module (or from an input), so it may carry padding."""
    nodes = [m.node for m in call.masks if isinstance(m.node, fx.Node)]
    if call.kind == "sdpa" and not nodes:
        return True  # a mask passed at run time (e.g. with padding) must not be dropped
    for n in ancestors(nodes, stop=lambda n: not in_call(n, call.key)):
        if n.op == "placeholder" and n.name in ctx.gv.user_inputs:
            return True
        if n.op == "call_function" and not in_call(n, call.key):
            return True
    return False


# --------------------------------------------------------------------------- driver

def _values_needed(calls: List[Call]) -> List[fx.Node]:
    """Masks, scale factors, and q/k/v where KV heads may be repeated: evaluated in one pass."""
    out = []
    for call in calls:
        if _needs_kv(call):
            out += [call.q, call.k, call.v]
        for m in call.masks:
            out += [p for p in (m.node, m.fill) if isinstance(p, fx.Node)]
        out += [op for _, op in call.scale_factors if isinstance(op, fx.Node)]
    return out


def _needs_kv(call: Call) -> bool:
    inside = ancestors([call.k, call.v], stop=lambda n: not in_call(n, call.key))
    return any(n.op == "call_function" and n.target in REPEAT_OPS for n in inside)


def classify(call: Call, ctx: Context) -> Finding:
    for rule in GATING_RULES:
        why = rule(call, ctx)
        if why:
            return Finding(call, "skip", why)
    verdict = None
    for rule in MASK_RULES:
        verdict = rule(call, ctx)
        if verdict is not None:
            break
    if verdict is None or verdict.kind == "skip":
        return Finding(call, "skip", verdict.reason if verdict else "unrecognised attention mask")
    owner = ctx.modules[call.path]
    why, p = rule_attention_dropout(call, ctx, owner)
    if why:
        return Finding(call, "skip", why)
    q, k, v = canonical_qkv(call, ctx.values) if call.k in ctx.values else meta_qkv(call)
    HQ = q.shape[1]
    H, layout = kv_heads(call, ctx, q, k, v)
    if HQ % H:
        return Finding(call, "skip", f"{HQ} query heads are not a multiple of {H} KV heads")
    scale = attention_scale(call, ctx, q)
    reason = verdict.reason
    if call.kind == "sdpa" and verdict.kind == "causal" and call.is_causal:
        reason = "causal self-attention (is_causal=True)"
    heads = f"{HQ} heads" if H == HQ else f"{HQ} query / {H} KV heads"
    reason = f"{reason}; {heads}, head dim {q.shape[-1]}"
    if p > 0:
        reason += f" (attention dropout p={p:g} unsupported in training: the site raises then)"
    plan = SitePlan(
        path=call.path, kind=call.kind, num_heads=HQ, num_kv_heads=H, head_dim=q.shape[-1],
        v_head_dim=v.shape[-1], kv_layout=layout, scale=scale, ordinal=call.ordinal,
        pv_after=call.pv_after,
        qk_equation=call.qk.args[0] if call.qk is not None and call.qk.target is
        torch.ops.aten.einsum.default else None,
        pv_equation=call.out.args[0] if call.kind == "manual" and call.out.target is
        torch.ops.aten.einsum.default else None,
        mask_ops=tuple((m.family, m.after, m.argpos, m.how) for m in call.masks
                       if call.kind == "manual"),
        external_mask=_external_mask(call, ctx), dropout_p=p)
    return Finding(call, "rewrite", reason, plan)


def _merge_module_calls(findings: List[Finding]) -> List[Finding]:
    """One NSA module per attention module: a module with several attention calls per forward
    is skipped; a module called several times (shared weights) must plan alike each time."""
    by_path: Dict[str, List[Finding]] = {}
    for f in findings:
        by_path.setdefault(f.call.path, []).append(f)
    out = []
    for path, group in by_path.items():
        keys = {f.call.key for f in group}
        per_call = len(group) // max(len(keys), 1)
        if per_call > 1 or len(group) % max(len(keys), 1):
            for f in group:
                out.append(Finding(f.call, "skip", f"module {path or '<root>'} makes "
                                   f"{per_call} attention calls per forward; NSA rewrites "
                                   "modules with one"))
            continue
        plans = {f.plan for f in group}
        if len(keys) > 1 and (len(plans) > 1 or any(f.status != group[0].status for f in group)):
            for f in group:
                out.append(Finding(f.call, "skip", f"module {path or '<root>'} is called "
                                   f"{len(keys)} times with different attention patterns"))
            continue
        out.append(group[0])
    return out


def detect(model: nn.Module, ep: torch.export.ExportedProgram, args: tuple, kwargs: dict
           ) -> List[Finding]:
    """All attention calls of `model` (traced as `ep` on args/kwargs), classified and planned;
    one Finding per attention module, in graph order."""
    graph = ep.graph_module.graph
    calls = find_sdpa_calls(graph) + find_manual_calls(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    calls.sort(key=lambda c: order[c.out])
    number_calls(graph, calls)
    gv = GraphValues(ep, args, kwargs)
    params = frozenset(s.arg.name for s in ep.graph_signature.input_specs
                       if s.kind == InputKind.PARAMETER)
    ctx = Context(model, dict(model.named_modules()), gv,
                  user_input_deps(graph, set(gv.user_inputs)), params, {})
    ctx.values = gv.evaluate(_values_needed(calls))
    findings = []
    for call in calls:
        if call.path not in ctx.modules:
            findings.append(Finding(call, "skip", f"owning module {call.path!r} not found"))
            continue
        findings.append(classify(call, ctx))
    return _merge_module_calls(findings)
