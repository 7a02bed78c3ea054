"""Tracing a model into an FX graph that still shows SDPA and the module that called each op.

Non-strict `torch.export`, before `run_decompositions()`, keeps `aten.scaled_dot_product_attention`
and each node's `nn_module_stack`; whole-model `symbolic_trace` fails on Hugging Face models.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import nn


def normalize_inputs(model: nn.Module, example_inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """example_inputs: a tuple of positional args, a dict of kwargs, a single tensor, or None
    for a Hugging Face model (its `dummy_inputs`). Returns (args, kwargs)."""
    if example_inputs is None:
        dummy = getattr(model, "dummy_inputs", None)
        if not isinstance(dummy, dict) or not dummy:
            raise ValueError(f"{type(model).__name__} has no dummy inputs; pass example_inputs= "
                             "(a tuple of positional args or a dict of kwargs)")
        return (), dict(dummy)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tuple of positional args or a dict of kwargs, got "
                    f"{type(example_inputs).__name__}")


@contextlib.contextmanager
def _no_hf_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models return a DynamicCache that export cannot flatten: trace without it."""
    config = getattr(model, "config", None)
    had = config is not None and hasattr(config, "use_cache")
    old = config.use_cache if had else None
    if had:
        config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = old


def trace_model(model: nn.Module, example_inputs: Any = None) -> torch.export.ExportedProgram:
    """Non-strict export of `model` on the example inputs, in eval mode, without decompositions.

    The model's training flag and Hugging Face `use_cache` are restored afterwards.
    """
    args, kwargs = normalize_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with _no_hf_cache(model), torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export raises many types; the user needs the model and the cause
        raise RuntimeError(f"nsa_compile could not trace {type(model).__name__} with "
                           f"torch.export (non-strict): {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)


def owner_path(node: torch.fx.Node) -> str:
    """Qualified name of the innermost module that executed `node` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export prefixes some paths with "L['self']." style names; keep the attribute path only
    return path.split("L['self'].")[-1] if "L['self']" in path else path
