"""The module the rewrite inserts in place of a dense causal attention call."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..config import NSAConfig
from ..ops import nsa_attention, nsa_attention_decode
from .compressor import Compressor
from .gate import BranchGate


class NSAAttention(nn.Module):
    """Native Sparse Attention over SDPA-layout q/k/v; owns the compressors and the gates.

    q: (B, HQ, T, Dk), k: (B, H, T, Dk), v: (B, H, T, Dv); hidden: (B, T, hidden_size), the
    attention module's input, used for the gates when `hidden_size` was given (else the gates
    read the query heads). Returns (B, HQ, T, Dv).
    """

    def __init__(self, config: NSAConfig, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: Optional[int] = None, hidden_size: Optional[int] = None,
                 scale: Optional[float] = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"NSAAttention: num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.config = config
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.scale = scale
        needs_cmp = "compressed" in config.branches or "selected" in config.branches
        if needs_cmp:
            l, d = config.compress_block, config.compress_stride
            self.k_compress = Compressor(head_dim, l, d, config.compressor)
        if "compressed" in config.branches:
            self.v_compress = Compressor(self.v_head_dim, l, d, config.compressor)
        if config.gate == "learned":
            self.gate = BranchGate(hidden_size or head_dim, num_heads, len(config.branches),
                                   from_hidden=hidden_size is not None)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, hidden: Optional[Tensor] = None) -> Tensor:
        return nsa_attention(q, k, v, config=self.config, scale=self.scale,
                             **self._op_inputs(q, k, v, hidden))

    def decode(self, q: Tensor, k: Tensor, v: Tensor,
               hidden: Optional[Tensor] = None) -> Tensor:
        """The output at the last Tq positions only (decoding with a KV cache, no gradient):
        q (B, HQ, Tq, Dk) against k (B, H, T, Dk), v (B, H, T, Dv); hidden (B, Tq, hidden_size).
        Equals forward() over the whole sequence at those positions."""
        return nsa_attention_decode(q, k, v, config=self.config, scale=self.scale,
                                    **self._op_inputs(q, k, v, hidden))

    def _op_inputs(self, q: Tensor, k: Tensor, v: Tensor, hidden: Optional[Tensor]) -> dict:
        """The op's learned inputs: compressed keys/values over all of k/v, and the gates of
        the queries (or of `hidden`)."""
        k_cmp = self.k_compress(k) if hasattr(self, "k_compress") else None
        v_cmp = self.v_compress(v) if hasattr(self, "v_compress") else None
        gates = None
        if hasattr(self, "gate"):
            if self.gate.from_hidden:
                if hidden is None:
                    raise ValueError("NSAAttention: this module's gates read the attention "
                                     "input; pass hidden=(B, T, hidden_size)")
                gates = self.gate(hidden)
            else:
                gates = self.gate(q)
        return dict(gates=gates, k_cmp=k_cmp, v_cmp=v_cmp)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, config={self.config}")
