"""Optimizer parameter groups: Engram's tables apart from the rest of the model."""
from __future__ import annotations

from typing import List

from torch import nn

from .modules.engram import Engram

__all__ = ["param_groups"]


def param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                 engram_lr_mult: float = 5.0, engram_weight_decay: float = 0.0) -> List[dict]:
    """Parameter groups for any torch optimizer, the Engram tables in their own group.

    The Engram paper trains the embedding tables with Adam at 5x the backbone's learning rate
    and no weight decay; everything else (Engram's projections, norms and conv included) keeps
    `lr` and `weight_decay`. Only parameters with requires_grad are listed; an empty group is
    left out. Each group carries a "name" ("default" or "engram_tables").

        opt = torch.optim.Adam(nsa_compile.param_groups(model, lr=3e-4), betas=(0.9, 0.95))
    """
    tables = {id(m.table): m.table for m in model.modules()
              if isinstance(m, Engram) and m.table.requires_grad}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in tables]
    groups = []
    if rest:
        groups.append({"name": "default", "params": rest, "lr": lr,
                       "weight_decay": weight_decay})
    if tables:
        groups.append({"name": "engram_tables", "params": list(tables.values()),
                       "lr": lr * engram_lr_mult, "weight_decay": engram_weight_decay})
    return groups
