"""Helpers over an exported FX graph: op families, call grouping, dependencies, evaluation.

The detector reads the graph of `torch.export` (non-strict, before decompositions); the rewrite
recognises the same calls at run time by their torch-function names. `OP_FAMILIES` ties the two.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import torch
from torch import fx
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

aten = torch.ops.aten


def _packets(*packets) -> Set[Any]:
    return {p for p in packets if p is not None}


# Graph targets per family; the run-time names of the same calls are in `RUNTIME_NAMES`.
OP_FAMILIES: Dict[str, Set[Any]] = {
    "sdpa": _packets(aten.scaled_dot_product_attention.default),
    "matmul": _packets(aten.matmul.default, aten.bmm.default, aten.einsum.default),
    "softmax": _packets(aten.softmax.int, aten._softmax.default),
    "add": _packets(aten.add.Tensor, aten.add_.Tensor),
    "masked_fill": _packets(aten.masked_fill.Scalar, aten.masked_fill.Tensor,
                            aten.masked_fill_.Scalar, aten.masked_fill_.Tensor),
    "where": _packets(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
                      aten.where.Scalar),
    "dropout": _packets(aten.dropout.default, aten.dropout_.default),
}
RUNTIME_NAMES: Dict[str, FrozenSet[str]] = {
    "sdpa": frozenset({"scaled_dot_product_attention"}),
    "matmul": frozenset({"matmul", "bmm", "einsum", "__matmul__", "__rmatmul__"}),
    "add": frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"}),
    "masked_fill": frozenset({"masked_fill", "masked_fill_"}),
    "where": frozenset({"where"}),
    "dropout": frozenset({"dropout"}),
}
# Ops that only move, cast or copy their first tensor argument.
PASS_THROUGH: Set[Any] = _packets(
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.type_as.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.detach.default)
# Ops that repeat KV heads (repeat_kv's expand, repeat_interleave, tiling).
REPEAT_OPS: Set[Any] = _packets(
    aten.expand.default, aten.repeat.default, aten.repeat_interleave.self_int,
    aten.repeat_interleave.self_Tensor, aten.cat.default, aten.index_select.default)
# Ops whose output depends only on the shape/dtype of their tensor arguments.
META_ONLY: Set[Any] = _packets(
    aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
    aten.full_like.default, aten._assert_tensor_metadata.default)


def family(node: fx.Node) -> Optional[str]:
    if node.op != "call_function":
        return None
    for name, targets in OP_FAMILIES.items():
        if node.target in targets:
            return name
    return None


def runtime_family(func: Callable) -> Optional[str]:
    """The family of a call seen by a TorchFunctionMode, from the function's name."""
    name = getattr(func, "__name__", None)
    for fam, names in RUNTIME_NAMES.items():
        if name in names:
            return fam
    return None


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor recorded for `node` at export, or None for non-tensor values."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index`/`name` of a call node, whether passed positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def owner_calls(node: fx.Node) -> List[Tuple[str, str]]:
    """(stack key, module path) of every module active at `node`, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, _cls) in stack.items():
        path = path.split("L['self'].")[-1] if "L['self']" in path else path
        out.append((key, "" if path == "L['self']" else path))
    return out


def common_owner(nodes: Iterable[fx.Node]) -> Tuple[str, str]:
    """(stack key, path) of the innermost module call that executed all `nodes`."""
    stacks = [owner_calls(n) for n in nodes]
    common: List[Tuple[str, str]] = []
    for entries in zip(*stacks):
        if all(e == entries[0] for e in entries):
            common.append(entries[0])
        else:
            break
    return common[-1] if common else ("", "")


def in_call(node: fx.Node, key: str) -> bool:
    """Whether `node` ran inside the module call whose stack key is `key` ("" = root)."""
    return key == "" or any(k == key for k, _ in owner_calls(node))


def user_input_deps(graph: fx.Graph, user_inputs: Set[str]) -> Dict[fx.Node, FrozenSet[str]]:
    """For each node, the user inputs whose *values* reach it (shape-only edges excluded)."""
    deps: Dict[fx.Node, FrozenSet[str]] = {}
    empty: FrozenSet[str] = frozenset()
    for node in graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset({node.name}) if node.name in user_inputs else empty
            continue
        if node.op == "call_function" and node.target in META_ONLY:
            deps[node] = empty
            continue
        acc = empty
        for inp in node.all_input_nodes:
            # tensors and multi-output tuples carry values; SymInts only carry shapes
            if isinstance(inp.meta.get("val"), (torch.Tensor, tuple, list)):
                acc = acc | deps.get(inp, empty)
        deps[node] = acc
    return deps


def ancestors(nodes: Iterable[fx.Node], stop: Optional[Callable[[fx.Node], bool]] = None
              ) -> Set[fx.Node]:
    """All nodes `nodes` depend on (inclusive); `stop(n)` prunes the walk at n (n kept)."""
    seen: Set[fx.Node] = set()
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop is not None and stop(n):
            continue
        todo.extend(n.all_input_nodes)
    return seen


class GraphValues:
    """Evaluates chosen nodes of an exported program on concrete inputs.

    Only the ancestors of the requested nodes run, so asking for a mask costs a few small ops
    and asking for the keys of the last layer costs about one forward pass.
    """

    def __init__(self, ep: torch.export.ExportedProgram, args: tuple, kwargs: dict):
        self.ep = ep
        self.graph = ep.graph_module.graph
        self.inputs: Dict[str, Any] = {}
        self.user_inputs: Dict[str, Any] = {}
        flat = pytree.tree_leaves((args, kwargs))
        user_specs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        user_tensor_specs = [s for s in user_specs if hasattr(s.arg, "name")
                             and type(s.arg).__name__ == "TensorArgument"]
        if len(user_tensor_specs) != len(tensors):
            raise RuntimeError("nsa_compile: could not match the example inputs to the traced "
                               f"graph ({len(tensors)} tensors, {len(user_tensor_specs)} inputs)")
        for spec, value in zip(user_tensor_specs, tensors):
            self.inputs[spec.arg.name] = value
            self.user_inputs[spec.arg.name] = value
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT or not hasattr(spec.arg, "name"):
                continue
            target = spec.target
            if target in ep.state_dict:
                self.inputs[spec.arg.name] = ep.state_dict[target]
            elif target in ep.constants:
                self.inputs[spec.arg.name] = ep.constants[target]

    def evaluate(self, wanted: Iterable[fx.Node], overrides: Optional[Dict[str, Any]] = None
                 ) -> Dict[fx.Node, Any]:
        wanted = [n for n in wanted if isinstance(n, fx.Node)]
        need = ancestors(wanted)
        inputs = dict(self.inputs, **(overrides or {}))
        env: Dict[fx.Node, Any] = {}
        load = lambda a: fx.node.map_arg(a, env.__getitem__)  # noqa: E731
        with torch.no_grad():
            for node in self.graph.nodes:
                if node not in need:
                    continue
                if node.op == "placeholder":
                    env[node] = inputs[node.name]
                elif node.op == "get_attr":
                    env[node] = _fetch_attr(self.ep.graph_module, node.target)
                elif node.op == "call_function":
                    env[node] = node.target(*load(node.args), **load(node.kwargs))
        return {n: env[n] for n in wanted}


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
