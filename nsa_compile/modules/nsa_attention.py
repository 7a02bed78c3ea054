"""The module the rewrite inserts in place of a dense causal attention call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import NSAConfig
from ..ops import nsa_attention, nsa_attention_decode
from .compressor import Compressor
from .gate import BranchGate
from .kv_cache import keep_on_cache, kv_cache

# The attribute of a KV cache object that carries the NSA modules' CompressedKeys.
_MEMO_ATTR = "_nsa_compile_nsa"


@dataclass
class CompressedKeys:
    """One NSA module's compressed keys and values over the first `keys` keys of a decoded
    sequence (k_cmp (B, H, Tc, Dk), v_cmp (B, H, Tc, Dv) or None), kept with the KV cache so
    the next step compresses only the blocks its new keys finish. A step continues it only if
    its keys are exactly these plus its new ones: a cropped cache starts over."""

    k_cmp: Tensor
    v_cmp: Optional[Tensor]
    keys: int

    def select(self, rows: Tensor) -> "CompressedKeys":
        """The batch rows `rows` (beam search's reordering)."""
        pick = lambda x: None if x is None else x.index_select(0, rows.to(x.device))
        return CompressedKeys(pick(self.k_cmp), pick(self.v_cmp), self.keys)


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

    def decode(self, q: Tensor, k: Tensor, v: Tensor, hidden: Optional[Tensor] = None,
               keep: bool = False) -> Tensor:
        """The output at the last Tq positions only (decoding with a KV cache, no gradient):
        q (B, HQ, Tq, Dk) against k (B, H, T, Dk), v (B, H, T, Dv); hidden (B, Tq, hidden_size).
        Equals forward() over the whole sequence at those positions. keep: this call continues
        (and extends) the compressed keys that the root model's hooks handed over from the
        previous step (`HandCompressedKeys`), when they fit k; only the rewrite's unpadded and
        uniformly left-padded steps pass it."""
        return nsa_attention_decode(q, k, v, config=self.config, scale=self.scale,
                                    **self._op_inputs(q, k, v, hidden, keep))

    def _compress(self, k: Tensor, v: Tensor, keep: bool = False, new: int = 0):
        """(k_cmp, v_cmp) over all of k/v. With `keep` (eager only): continues the memo handed
        over for this step when it covers all but the `new` last keys of k (its blocks plus
        those of the keys beyond them: a compressor sees only each block's own keys), and
        leaves the result as the memo for the next step."""
        has_k, has_v = hasattr(self, "k_compress"), hasattr(self, "v_compress")
        keep = keep and has_k and not torch.compiler.is_compiling()
        # handed over once: a module called again in the same step (shared weights) starts over
        prev = self.__dict__.pop("_memo_prev", None) if keep else None
        T = k.shape[2]
        if (prev is not None and prev.keys + new == T and prev.k_cmp.shape[:2] == k.shape[:2]
                and prev.k_cmp.device == k.device and prev.k_cmp.dtype == k.dtype):
            start = prev.k_cmp.shape[2] * self.config.compress_stride
            k_cmp = torch.cat([prev.k_cmp, self.k_compress(k[:, :, start:])], dim=2)
            v_cmp = (torch.cat([prev.v_cmp, self.v_compress(v[:, :, start:])], dim=2)
                     if has_v else None)
        else:
            k_cmp = self.k_compress(k) if has_k else None
            v_cmp = self.v_compress(v) if has_v else None
        if keep:  # two calls in one step leave no memo: which would the next step continue?
            calls = self.__dict__.get("_memo_calls", 0)
            self.__dict__["_memo_next"] = None if calls else CompressedKeys(k_cmp, v_cmp, T)
            self.__dict__["_memo_calls"] = calls + 1
        return k_cmp, v_cmp

    def _op_inputs(self, q: Tensor, k: Tensor, v: Tensor, hidden: Optional[Tensor],
                   keep: bool = False) -> dict:
        """The op's learned inputs: compressed keys/values over all of k/v (`_compress`), and
        the gates of the queries (or of `hidden`)."""
        k_cmp, v_cmp = self._compress(k, v, keep, q.shape[2])
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


class HandCompressedKeys:
    """Forward pre-hook of the root model: hands each NSA module the compressed keys its
    call's KV cache carries (`CompressedKeys`; the module checks that they fit)."""

    def __init__(self, modules: Sequence[NSAAttention]):
        self.modules = list(modules)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # compiled steps compress every key
            return
        cache = kv_cache(kwargs)
        held = getattr(cache, _MEMO_ATTR, None) if cache is not None else None
        for i, nsa in enumerate(self.modules):
            nsa.__dict__["_memo_prev"] = held[i] if held is not None else None
            nsa.__dict__["_memo_next"] = None
            nsa.__dict__["_memo_calls"] = 0


class KeepCompressedKeys:
    """Forward hook of the root model: stores the NSA modules' compressed keys of this call on
    its KV cache for the call that continues it — or none if a module made none this call
    (a stale memo must not outlive a step that did not extend it)."""

    def __init__(self, modules: Sequence[NSAAttention]):
        self.modules = list(modules)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kv_cache(kwargs, output)
        memos = None  # a compiled step extends no memo: the old one goes
        if not torch.compiler.is_compiling():
            memos = [nsa.__dict__.pop("_memo_next", None) for nsa in self.modules]
            for nsa in self.modules:
                nsa.__dict__.pop("_memo_prev", None)
                nsa.__dict__.pop("_memo_calls", None)
            if any(m is None for m in memos):
                memos = None
        if cache is not None and (memos is not None
                                  or getattr(cache, _MEMO_ATTR, None) is not None):
            keep_on_cache(cache, _MEMO_ATTR, memos)
