"""Key/value compressors φ for NSA's compressed branch (SPEC §3)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.nsa.naive import compressed_blocks, mean_pool


class Compressor(nn.Module):
    """Maps each overlapping block of `block` keys (stride `stride`) to one key.

    kind="mean": the plain mean, no parameters. kind="mlp": the mean plus a learned MLP over the
    flattened block with a learned intra-block position embedding; the MLP's last layer starts
    at zero, so a freshly inserted compressor equals the mean and the model's output is unchanged
    by insertion in every branch except through the gates.
    x: (B, H, T, D) -> (B, H, Tc, D).
    """

    def __init__(self, head_dim: int, block: int, stride: int, kind: str = "mlp",
                 hidden: int | None = None):
        super().__init__()
        self.block, self.stride, self.kind = block, stride, kind
        if kind == "mlp":
            hidden = hidden or head_dim
            self.pos = nn.Parameter(torch.zeros(block, head_dim))
            self.fc1 = nn.Linear(block * head_dim, hidden)
            self.fc2 = nn.Linear(hidden, head_dim)
            nn.init.normal_(self.pos, std=0.02)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        elif kind != "mean":
            raise ValueError(f"Compressor kind={kind!r}: use 'mlp' or 'mean'")

    def forward(self, x: Tensor) -> Tensor:
        mean = mean_pool(x, self.block, self.stride)
        if self.kind == "mean":
            return mean
        blocks = compressed_blocks(x, self.block, self.stride)  # (B, H, Tc, l, D)
        flat = (blocks + self.pos.to(blocks.dtype)).flatten(-2)
        return mean + self.fc2(nn.functional.gelu(self.fc1(flat)))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, block={self.block}, stride={self.stride}"
