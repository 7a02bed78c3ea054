"""Sigmoid branch gates g_c ∈ [0, 1] of NSA (SPEC §3, Output)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BranchGate(nn.Module):
    """Per-head, per-position sigmoid gates for `num_branches` branches.

    from_hidden=False: a linear map from each query head's vector, shared by the heads:
    x (B, HQ, T, in_features) -> (B, HQ, T, num_branches).
    from_hidden=True: a linear map from the attention module's input:
    x (B, T, in_features) -> (B, num_heads, T, num_branches).
    The weight starts at zero and the bias at logit(1 / num_branches) (capped at sigmoid 0.95),
    so the branches start as an average and a dense-trained model keeps its output scale.
    """

    def __init__(self, in_features: int, num_heads: int, num_branches: int,
                 from_hidden: bool = False):
        super().__init__()
        self.num_heads, self.num_branches, self.from_hidden = num_heads, num_branches, from_hidden
        out = num_heads * num_branches if from_hidden else num_branches
        self.proj = nn.Linear(in_features, out)
        p = min(1.0 / num_branches, 0.95)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, math.log(p / (1 - p)))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.proj(x))
        if self.from_hidden:
            B, T, _ = x.shape
            g = g.view(B, T, self.num_heads, self.num_branches).transpose(1, 2)
        return g
