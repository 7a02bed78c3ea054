"""Engram detection and insertion: the token-embedding lookup and the model's ordered blocks.

Detection reads the traced graph (`trace.trace_model`): the token embedding is an
`aten.embedding` whose indices come, through views and casts only, from an integer model input;
the blocks are the children of the outermost ModuleList/Sequential of same-class modules that
run after that embedding and hold attention. `layers=(1, 8)` then means the hidden state
entering blocks 1 and 8 of that list, in execution order.

Insertion (module surgery, in place): each chosen block gets an `engram` child and a forward
pre-hook that adds Engram's output to the hidden state it receives; the embedding module gets a
pre-hook that hands the token ids to the Engram modules, and the root a pre-hook that forgets
the previous call's ids. No global state; `torch.compile(fullgraph=True)` traces the hooks.

Under incremental decoding the embedding receives only the new tokens: a root forward hook
leaves each Engram's context (its last ids and conv inputs) on the KV cache, and the root
pre-hook hands it back when the next call continues that cache (`modules.engram`). Left padding
in a batch enters the n-grams as ordinary tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..config import EngramConfig
from ..modules.engram import (AddEngram, CaptureTokenIds, Engram, ForgetTokenIds,
                              KeepDecodeContext, canonical_ids, find_hidden, find_token_ids)
from .report import Site
from .trace import _no_hf_cache, normalize_inputs, trace_model

# Ops that change an index tensor's shape or dtype but not its values.
_PASSTHROUGH = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "clone", "contiguous",
                "to", "_to_copy", "alias", "flatten", "detach", "lift_fresh_copy", "expand"}
_ATTENTION_MARKS = ("scaled_dot_product", "softmax", "attention", "nsa_fwd")
_TOKEN_INPUT_NAMES = ("input_ids", "input", "ids", "idx", "tokens", "token_ids")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class _Embedding:
    path: str
    node: torch.fx.Node
    input_name: str
    num_embeddings: int


@dataclass
class _Plan:
    embedding: _Embedding
    others: List[_Embedding]
    list_path: str
    blocks: List[str]


def _op_name(node: torch.fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def _stack_paths(node: torch.fx.Node) -> List[str]:
    out = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        out.append(path.split("L['self'].")[-1] if "L['self']" in path else path)
    return out


def _owner(node: torch.fx.Node) -> str:
    paths = _stack_paths(node)
    return paths[-1] if paths else ""


def _index_source(node: Any) -> Optional[torch.fx.Node]:
    """The placeholder an index tensor is a view/cast of, else None."""
    while isinstance(node, torch.fx.Node):
        if node.op == "placeholder":
            return node
        if node.op != "call_function" or _op_name(node) not in _PASSTHROUGH:
            return None
        node = node.args[0] if node.args else None
    return None


def _token_embeddings(ep: torch.export.ExportedProgram) -> List[_Embedding]:
    """Embedding lookups whose indices are an integer user input, best candidate first: an
    input named like input_ids, then the larger vocabulary, then graph order."""
    user_inputs = set(ep.graph_signature.user_inputs)
    found = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        src = _index_source(node.args[1])
        if src is None or src.name not in user_inputs:
            continue
        val = src.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype not in _INT_DTYPES:
            continue
        weight = node.args[0].meta.get("val")
        found.append(_Embedding(_owner(node), node, src.name, int(weight.shape[0])))

    def rank(e: _Embedding):
        named = e.input_name in _TOKEN_INPUT_NAMES
        return (not named, -e.num_embeddings)
    return sorted(found, key=rank)


def _blocks(model: nn.Module, ep: torch.export.ExportedProgram,
            embedding: _Embedding) -> tuple[str, List[str]]:
    """(list path, block paths in execution order) of the model's repeated blocks."""
    order = {n: i for i, n in enumerate(ep.graph.nodes)}
    first: Dict[str, int] = {}
    attention = set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        paths = _stack_paths(node)
        for p in paths:
            first.setdefault(p, order[node])
        if any(m in _op_name(node).lower() or m in str(node.target) for m in _ATTENTION_MARKS):
            attention.update(paths)
    after = order[embedding.node]
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        kinds = {type(child) for child in mod}
        if len(kinds) != 1:
            continue
        children = [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
        ran = [c for c in children if first.get(c, -1) > after]
        if not ran:
            continue
        key = (any(c in attention for c in ran), len(ran) > 1, -name.count("."), len(ran))
        if best_key is None or key > best_key:
            best, best_key = (name, sorted(ran, key=first.__getitem__)), key
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no repeated blocks (a ModuleList or "
                         "Sequential of same-class modules run after the token embedding) to "
                         "insert Engram into")
    return best


def _plan(model: nn.Module, config: Optional[EngramConfig], example_inputs: Any,
          exported_program: Optional[torch.export.ExportedProgram]) -> Optional[_Plan]:
    ep = exported_program if exported_program is not None else trace_model(model, example_inputs)
    found = _token_embeddings(ep)
    if not found:
        if config is None:
            return None
        raise ValueError(
            f"{type(model).__name__} has no token embedding: Engram needs an embedding lookup "
            "(nn.Embedding or F.embedding) whose indices are an integer model input such as "
            "input_ids; pass token ids in example_inputs, or leave engram=None")
    emb = found[0]
    if config is None:
        return _Plan(emb, found[1:], "", [])
    list_path, blocks = _blocks(model, ep, emb)
    bad = [i for i in config.layers if i >= len(blocks)]
    if bad:
        raise ValueError(
            f"EngramConfig.layers={config.layers}: block index {bad[0]} is out of range; "
            f"{list_path or type(model).__name__} has {len(blocks)} blocks (0..{len(blocks) - 1})")
    return _Plan(emb, found[1:], list_path, blocks)


def _sites(plan: Optional[_Plan], config: Optional[EngramConfig]) -> List[Site]:
    if plan is None:
        return []
    emb = plan.embedding
    others = [Site(o.path, "embedding", "skip",
                   f"fed by input `{o.input_name}` ({o.num_embeddings} rows); Engram reads the "
                   f"token embedding {emb.path or '<root>'} instead") for o in plan.others]
    if config is None:
        return [Site(emb.path, "embedding", "skip",
                     f"token embedding fed by input `{emb.input_name}`: no EngramConfig given")] + others
    chosen = [plan.blocks[i] for i in config.layers]
    sites = [Site(emb.path, "embedding", "rewrite",
                  f"token embedding fed by input `{emb.input_name}` ({emb.num_embeddings} rows); "
                  f"its ids feed Engram at blocks {list(config.layers)} of "
                  f"{plan.list_path or '<root>'}")]
    for i, path in zip(config.layers, chosen):
        sites.append(Site(path, "embedding", "rewrite",
                          f"Engram added to the hidden state entering block {i} (orders "
                          f"{list(config.orders)}, {config.heads} hash heads each)"))
    return sites + others


def plan_engram(model: nn.Module, config: Optional[EngramConfig], example_inputs: Any = None,
                exported_program: Optional[torch.export.ExportedProgram] = None) -> List[Site]:
    """Sites Engram would touch: the token embedding and one insertion point per configured
    layer; with config None, the embedding as a skipped site. Changes nothing.

    Raises ValueError when config is given and the model has no token embedding, or a layer
    index is out of range.
    """
    return _sites(_plan(model, config, example_inputs, exported_program), config)


def _probe(model: nn.Module, plan: _Plan, blocks: Sequence[str], example_inputs: Any) -> dict:
    """Runs the example inputs once with recording hooks: the ids the embedding receives and
    the hidden state entering each chosen block."""
    seen: dict = {}

    def on_embedding(module, args, kwargs):
        seen.setdefault("ids", find_token_ids(args, kwargs)[1])

    def on_block(path):
        def hook(module, args, kwargs):
            seen.setdefault(path, find_hidden(args, kwargs)[1])
        return hook

    handles = [model.get_submodule(plan.embedding.path).register_forward_pre_hook(
        on_embedding, with_kwargs=True)]
    handles += [model.get_submodule(p).register_forward_pre_hook(on_block(p), with_kwargs=True)
                for p in blocks]
    args, kwargs = normalize_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with _no_hf_cache(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def apply_engram(model: nn.Module, config: EngramConfig, example_inputs: Any = None,
                 exported_program: Optional[torch.export.ExportedProgram] = None) -> List[Site]:
    """Inserts one Engram per `config.layers` index, in place, and returns the sites.

    Block i gets a child `engram` (new state_dict keys `<block>.engram.*`; existing keys are
    unchanged) and a forward pre-hook adding its output to the block's input hidden state.
    Runs the example inputs once to learn each insertion point's hidden size, dtype and device.
    """
    if config is None:
        return plan_engram(model, None, example_inputs, exported_program)
    if not isinstance(config, EngramConfig):
        raise TypeError(f"engram must be an EngramConfig, got {type(config).__name__}")
    if any(isinstance(m, Engram) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has Engram modules; apply Engram to "
                         "the original model once")
    plan = _plan(model, config, example_inputs, exported_program)
    chosen = [plan.blocks[i] for i in config.layers]
    for path in chosen:
        if hasattr(model.get_submodule(path), "engram"):
            raise ValueError(f"{path} already has an attribute `engram`; Engram cannot be "
                             "attached to it")
    seen = _probe(model, plan, chosen, example_inputs)
    ids = seen.get("ids")
    canon = canonical_ids(config.tokenizer, plan.embedding.num_embeddings)
    engrams = []
    for i, path in zip(config.layers, chosen):
        hidden = seen.get(path)
        if hidden is None or ids is None or hidden.dim() != 3 or hidden.shape[:2] != ids.shape:
            raise ValueError(
                f"Engram needs block {i} ({path}) to receive a (B, T, d_model) hidden state "
                f"matching the token ids (B, T); it received "
                f"{None if hidden is None else tuple(hidden.shape)} for ids "
                f"{None if ids is None else tuple(ids.shape)}")
        engram = Engram(config, hidden.shape[-1], plan.embedding.num_embeddings, layer=i,
                        canon=canon).to(device=hidden.device, dtype=hidden.dtype)
        block = model.get_submodule(path)
        block.add_module("engram", engram)
        block.register_forward_pre_hook(AddEngram("engram"), with_kwargs=True)
        engrams.append(engram)
    model.get_submodule(plan.embedding.path).register_forward_pre_hook(
        CaptureTokenIds(engrams), with_kwargs=True)
    # prepend: when the root is also the embedding's owner, forget before capturing
    model.register_forward_pre_hook(ForgetTokenIds(engrams), with_kwargs=True, prepend=True)
    model.register_forward_hook(KeepDecodeContext(engrams), with_kwargs=True)
    return _sites(plan, config)
