"""Plan: turn classified findings into the user's `Report`, applying `nsa=` and `filter_fn`."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from ..config import EngramConfig, NSAConfig
from .detect import Finding
from .report import Site

FilterFn = Callable[[nn.Module, str], bool]


def attention_sites(model: nn.Module, findings: List[Finding], nsa: Optional[NSAConfig],
                    filter_fn: Optional[FilterFn] = None) -> List[Tuple[Site, Finding]]:
    """One Site per attention module; status "rewrite" only where the finding allows it, nsa is
    given and filter_fn (module, path) agrees."""
    modules = dict(model.named_modules())
    out = []
    for f in findings:
        status, reason = f.status, f.reason
        if status == "rewrite" and nsa is None:
            status, reason = "skip", f"nsa=None: attention left dense ({reason})"
        elif status == "rewrite" and filter_fn is not None and \
                not filter_fn(modules[f.call.path], f.call.path):
            status, reason = "skip", "excluded by filter_fn"
        out.append((Site(f.call.path, f.call.kind, status, reason), f))
    return out


def engram_sites(model: nn.Module, config: Optional[EngramConfig], example_inputs: Any,
                 ep: torch.export.ExportedProgram, apply: bool = False) -> List[Site]:
    """Embedding sites from the Engram pass (`plan_engram`, or `apply_engram` when apply=True).

    Without the Engram pass installed, inspect() lists no embedding sites and sparsify(engram=...)
    raises."""
    try:
        from . import engram as engram_pass
    except ImportError as exc:
        if apply:
            raise NotImplementedError("nsa_compile: the Engram pass is not available in this "
                                      f"build ({exc})") from exc
        return []
    if apply:
        return list(engram_pass.apply_engram(model, config, example_inputs, exported_program=ep))
    return list(engram_pass.plan_engram(model, config, example_inputs, exported_program=ep))
