"""A configurable tiny decoder covering the attention code found in the wild, for Hypothesis.

Every option mirrors a real pattern: separate q/k/v projections (Llama), a fused qkv split (GPT-2,
Phi-3), chunk (Falcon-style) or view+permute+unbind (timm ViT / x-transformers); SDPA, a manual
matmul chain (nanoGPT, HF eager) or einsum (lucidrains-style); causality by `is_causal`, a boolean
mask, an additive -inf mask, `torch.where`, or a `tril` buffer with masked_fill; KV heads repeated
by repeat_kv (Llama), repeat_interleave (gemma_pytorch), tiling, SDPA's enable_gqa, or before the
head transpose (Meta's reference Llama); scale on the scores (mul/div), explicit, or on q.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LAYOUTS = ("separate", "fused_split", "fused_chunk", "fused_unbind")
ATTNS = ("sdpa", "manual", "einsum", "einsum_bthd")
MASKS = ("flag", "bool", "additive", "where")
GQAS = ("repeat_kv", "repeat_interleave", "tile", "enable_gqa", "bthd")
SCALES = ("default", "explicit", "div", "q", "k")


@dataclass(frozen=True)
class ZooSpec:
    """depth layers; n_head query heads, n_kv_head KV heads of head_dim; causal=False layers in
    `bidirectional` use no mask; padding=True makes forward take a (B, T) 0/1 key-padding mask."""

    depth: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 8
    layout: str = "separate"
    attn: str = "sdpa"
    mask: str = "flag"
    gqa: str = "repeat_kv"
    scale: str = "default"
    upcast: bool = False
    bidirectional: Tuple[int, ...] = ()
    padding: bool = False
    vocab: int = 61
    max_len: int = 128

    @property
    def hidden(self) -> int:
        return self.n_head * self.head_dim


def _repeat(x: Tensor, G: int, how: str) -> Tensor:
    """x (B, H, T, D) -> (B, H*G, T, D)."""
    if G == 1:
        return x
    B, H, T, D = x.shape
    if how == "repeat_kv":
        return x[:, :, None].expand(B, H, G, T, D).reshape(B, H * G, T, D)
    if how == "repeat_interleave":
        return x.repeat_interleave(G, dim=1)
    if how == "tile":
        return x.repeat(1, G, 1, 1)
    raise ValueError(how)


class ZooAttention(nn.Module):
    def __init__(self, spec: ZooSpec, causal: bool):
        super().__init__()
        self.spec, self.causal = spec, causal
        HQ, H, D = spec.n_head, spec.n_kv_head, spec.head_dim
        if spec.layout == "separate":
            self.q_proj = nn.Linear(spec.hidden, HQ * D)
            self.k_proj = nn.Linear(spec.hidden, H * D)
            self.v_proj = nn.Linear(spec.hidden, H * D)
        else:
            self.qkv = nn.Linear(spec.hidden, (HQ + 2 * H) * D)
        self.o_proj = nn.Linear(HQ * D, spec.hidden)
        self.attn_drop = nn.Dropout(0.0)
        if causal and spec.mask in ("bool", "where", "flag"):
            self.register_buffer("tril", torch.tril(torch.ones(spec.max_len, spec.max_len,
                                                               dtype=torch.bool)), persistent=False)
        if causal and spec.mask == "additive":
            neg = torch.full((spec.max_len, spec.max_len), float("-inf")).triu(1)
            self.register_buffer("neg", neg, persistent=False)

    def _qkv(self, x: Tensor):
        s, (B, T, _) = self.spec, x.shape
        HQ, H, D = s.n_head, s.n_kv_head, s.head_dim
        if s.layout == "separate":
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        elif s.layout == "fused_split":
            q, k, v = self.qkv(x).split([HQ * D, H * D, H * D], dim=-1)
        elif s.layout == "fused_chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, HQ, D).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q, k, v = q.view(B, T, HQ, D), k.view(B, T, H, D), v.view(B, T, H, D)
        G = HQ // H
        if s.gqa == "bthd" and G > 1:
            k = k[:, :, :, None].expand(B, T, H, G, D).reshape(B, T, HQ, D)
            v = v[:, :, :, None].expand(B, T, H, G, D).reshape(B, T, HQ, D)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _mask(self, T: int, pad: Optional[Tensor]):
        """(keep bool (B|1, 1, T, T) or None, additive (…) or None)."""
        s = self.spec
        if not self.causal:
            return None
        if s.mask == "additive":
            add = self.neg[:T, :T][None, None]
            if pad is not None:
                add = add + torch.zeros_like(pad, dtype=add.dtype).masked_fill(
                    pad == 0, float("-inf"))[:, None, None, :]
            return add
        if s.mask == "flag" and s.attn == "sdpa" and pad is None:
            return None  # is_causal=True
        keep = self.tril[:T, :T][None, None]
        if pad is not None:
            keep = keep & pad.bool()[:, None, None, :]
        return keep

    def forward(self, x: Tensor, pad: Optional[Tensor] = None) -> Tensor:
        s = self.spec
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        G = q.shape[1] // k.shape[1]
        if s.gqa != "enable_gqa" or s.attn != "sdpa":
            how = s.gqa if s.gqa in ("repeat_kv", "repeat_interleave", "tile") else "repeat_kv"
            k, v = _repeat(k, G, how), _repeat(v, G, how)
        D = q.shape[-1]
        scale = {"default": D ** -0.5, "explicit": 0.3, "div": D ** -0.5, "q": 1.0,
                 "k": 1.0}[s.scale]
        if s.scale == "q":
            q = q * D ** -0.5
        elif s.scale == "k":
            k = k / math.sqrt(D)
        mask = self._mask(T, pad)
        if s.attn == "sdpa":
            kw = {}
            if s.gqa == "enable_gqa" and G > 1:
                kw["enable_gqa"] = True
            if s.scale in ("explicit", "q", "k"):
                kw["scale"] = scale
            if mask is not None and mask.dtype == torch.bool and s.mask == "where":
                mask = torch.where(mask, 0.0, float("-inf"))
            flag = self.causal and mask is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if flag else mask,
                                               is_causal=flag, **kw)
        else:
            if s.attn == "einsum":
                att = torch.einsum("bhqd,bhkd->bhqk", q, k)
            elif s.attn == "einsum_bthd":
                att = torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2))
            else:
                att = q @ k.transpose(-2, -1)
            if s.scale == "div":
                att = att / math.sqrt(D)
            elif s.scale not in ("q", "k"):
                att = att * scale
            if mask is not None:
                if mask.dtype != torch.bool:
                    att = att + mask
                elif s.mask == "where":
                    att = torch.where(mask, att, torch.finfo(att.dtype).min)
                else:
                    att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att.float() if s.upcast else att, dim=-1).to(q.dtype)
            att = self.attn_drop(att)
            if s.attn == "einsum_bthd":
                y = torch.einsum("bhqk,bkhd->bqhd", att, v.transpose(1, 2))
                return self.o_proj(y.reshape(B, T, -1))
            y = torch.einsum("bhqk,bhkd->bhqd", att, v) if s.attn == "einsum" else att @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class ZooBlock(nn.Module):
    def __init__(self, spec: ZooSpec, causal: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(spec.hidden), nn.LayerNorm(spec.hidden)
        self.attn = ZooAttention(spec, causal)
        self.mlp = nn.Sequential(nn.Linear(spec.hidden, 2 * spec.hidden), nn.GELU(),
                                 nn.Linear(2 * spec.hidden, spec.hidden))

    def forward(self, x: Tensor, pad: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.ln1(x), pad)
        return x + self.mlp(self.ln2(x))


class ZooModel(nn.Module):
    """ids (B, T) [, pad (B, T) 0/1] -> logits (B, T, vocab)."""

    def __init__(self, spec: ZooSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.blocks = nn.ModuleList([ZooBlock(spec, i not in spec.bidirectional)
                                     for i in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, spec.vocab)

    def forward(self, ids: Tensor, pad: Optional[Tensor] = None) -> Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, pad)
        return self.head(self.norm(x))

    def attention_paths(self, causal: bool) -> list:
        return [f"blocks.{i}.attn" for i in range(self.spec.depth)
                if (i not in self.spec.bidirectional) == causal]
