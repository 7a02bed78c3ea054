"""The two verbs: `inspect` (what would change, and why not) and `sparsify` (change it, in place)."""
from __future__ import annotations

import logging
import warnings
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..config import EngramConfig, NSAConfig
from ..modules.nsa_attention import HandCompressedKeys, KeepCompressedKeys, NSAAttention
from .detect import Finding, detect
from .plan import FilterFn, attention_sites, engram_sites
from .report import Report, Site
from .rewrite import check_installable, install, is_rewritten
from .trace import normalize_inputs, trace_model

log = logging.getLogger("nsa_compile")

REPORT_ATTR = "_nsa_compile_report"


def _refuse(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"nsa_compile: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("nsa_compile: this model is already compiled (torch.compile returned an "
                         "OptimizedModule); call nsa_compile.sparsify(model) on the original "
                         "module first, then torch.compile(model)")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError("nsa_compile: this model is already compiled (model.compile() was "
                         "called); sparsify a model before compiling it")
    engram_cls = _engram_class()
    for path, module in model.named_modules():
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError(f"nsa_compile: submodule {path!r} is compiled; sparsify before "
                             "torch.compile")
        if is_rewritten(module) or isinstance(module, NSAAttention) or (
                engram_cls is not None and isinstance(module, engram_cls)):
            raise ValueError(f"nsa_compile: this model is already sparsified (found "
                             f"{type(module).__name__} at {path or '<root>'!r}); build a fresh "
                             "model, sparsify it once, and load saved weights into it")
    if REPORT_ATTR in model.__dict__:
        raise ValueError("nsa_compile: this model is already sparsified; build a fresh model, "
                         "sparsify it once, and load saved weights into it")


def _engram_class() -> Optional[type]:
    try:
        from ..modules.engram import Engram
    except ImportError:
        return None
    return Engram


def _prepare(model: nn.Module, example_inputs: Any) -> Tuple[Any, tuple, dict,
                                                            torch.export.ExportedProgram]:
    args, kwargs = normalize_inputs(model, example_inputs)
    example = args if args else kwargs
    return example, args, kwargs, trace_model(model, example)


def _check_configs(nsa: Any, engram: Any) -> None:
    if nsa is not None and not isinstance(nsa, NSAConfig):
        raise TypeError(f"nsa_compile: nsa must be an NSAConfig or None, got {type(nsa).__name__}")
    if engram is not None and not isinstance(engram, EngramConfig):
        raise TypeError("nsa_compile: engram must be an EngramConfig or None, got "
                        f"{type(engram).__name__}")


def inspect(model: nn.Module, example_inputs: Any = None, nsa: Optional[NSAConfig] = NSAConfig()
            ) -> Report:
    """What `sparsify(model, nsa, example_inputs=...)` would change, and why not; changes nothing.

    example_inputs: a tuple of positional args or a dict of kwargs (default: a Hugging Face
    model's dummy inputs). Lists every attention site and every token-embedding lookup.
    """
    _check_configs(nsa, None)
    example, args, kwargs, ep = _prepare(model, example_inputs)
    findings = detect(model, ep, args, kwargs)
    sites = [s for s, _ in attention_sites(model, findings, nsa)]
    sites += engram_sites(model, None, example, ep)
    return Report(sites)


def sparsify(model: nn.Module, nsa: Optional[NSAConfig] = NSAConfig(), *,
             engram: Optional[EngramConfig] = None, example_inputs: Any = None,
             filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Rewrite `model` in place: causal attention → NSA (nsa=None keeps it dense), and, with
    `engram=`, Engram memories at the chosen blocks. Returns the same object.

    example_inputs: a tuple of positional args or a dict of kwargs (default: a Hugging Face
    model's dummy inputs). filter_fn(module, path) -> bool limits the attention sites touched.
    Refuses a model that is already sparsified or compiled. The report of what changed is logged
    and kept as `model._nsa_compile_report`.
    """
    _refuse(model)
    _check_configs(nsa, engram)
    if nsa is None and engram is None:
        raise ValueError("nsa_compile.sparsify: nothing to do with nsa=None and engram=None; pass "
                         "nsa=NSAConfig() and/or engram=EngramConfig(...)")
    example, args, kwargs, ep = _prepare(model, example_inputs)
    findings: List[Finding] = detect(model, ep, args, kwargs)
    planned = attention_sites(model, findings, nsa, filter_fn)
    modules = dict(model.named_modules())
    for site, _ in planned:
        if site.status == "rewrite":
            check_installable(modules[site.path], site.path)
    sites: List[Site] = []
    installed = []
    for site, finding in planned:
        if site.status == "rewrite":
            installed.append(install(modules[site.path], finding.plan, nsa))
        sites.append(site)
    if installed:  # decoding steps continue the compressed keys kept on the KV cache
        model.register_forward_pre_hook(HandCompressedKeys(installed), with_kwargs=True)
        model.register_forward_hook(KeepCompressedKeys(installed), with_kwargs=True)
    if engram is not None:
        sites += engram_sites(model, engram, example, ep, apply=True)
    report = Report(sites)
    model.__dict__[REPORT_ATTR] = report
    log.info("nsa_compile.sparsify:\n%s", report)
    if nsa is not None and not any(s.status == "rewrite" and s.kind != "embedding" for s in sites):
        warnings.warn("nsa_compile.sparsify: no attention site was rewritten; "
                      "print(nsa_compile.inspect(model, example_inputs)) says why", stacklevel=2)
    return model
