"""Attention patterns NSA must not take over (or must take over carefully), each shaped after a
real model: the pass should skip them with a reason, or rewrite them exactly."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

D_MODEL, HEADS = 32, 4
HEAD_DIM = D_MODEL // HEADS


def _heads(x: Tensor) -> Tensor:
    B, T, _ = x.shape
    return x.view(B, T, HEADS, HEAD_DIM).transpose(1, 2)


def _merge(y: Tensor) -> Tensor:
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)

    def split(self, x: Tensor):
        return [_heads(t) for t in self.qkv(x).chunk(3, dim=-1)]


class Encoder(QKV):
    """ViT / BERT: SDPA with no mask — bidirectional."""

    def forward(self, x):
        q, k, v = self.split(x)
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """T5 / Whisper decoder cross-attention: queries from x, keys/values from `memory`."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.kv = nn.Linear(D_MODEL, 2 * D_MODEL)

    def forward(self, x, memory):
        k, v = [_heads(t) for t in self.kv(memory).chunk(2, dim=-1)]
        return _merge(F.scaled_dot_product_attention(_heads(self.q(x)), k, v, is_causal=True))


class ALiBi(QKV):
    """BLOOM / MPT: a causal additive mask carrying per-head linear position biases."""

    def forward(self, x):
        q, k, v = self.split(x)
        T = x.shape[1]
        i = torch.arange(T, device=x.device)
        slopes = 2.0 ** (-8.0 * torch.arange(1, HEADS + 1, device=x.device) / HEADS)
        bias = slopes[:, None, None] * (i[None, :] - i[:, None])[None].float()
        bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)))


class PrefixLM(QKV):
    """T5-style prefix LM / PaliGemma: the first 3 tokens see each other, the rest is causal."""

    def forward(self, x):
        q, k, v = self.split(x)
        T = x.shape[1]
        i = torch.arange(T, device=x.device)
        keep = (i[None, :] <= i[:, None]) | (i[None, :] < 3)
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=keep)))


class UserMask(QKV):
    """A model that takes a full (B, T, T) boolean mask from its caller (e.g. document masks)."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])))


class Softcap(QKV):
    """Gemma-2's eager attention: tanh soft-capping of the logits before the causal mask."""

    def forward(self, x):
        q, k, v = self.split(x)
        T = x.shape[1]
        att = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        att = torch.tanh(att / 50.0) * 50.0
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out(_merge(att @ v))


class LearnedTemperature(QKV):
    """Swin-V2 style attention whose scale is a learned parameter."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        q, k, v = self.split(x)
        T = x.shape[1]
        att = (q @ k.transpose(-1, -2)) * self.logit_scale.exp()
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out(_merge(att @ v))


class TwoCalls(QKV):
    """One module making two attention calls (e.g. a differential-attention layer)."""

    def forward(self, x):
        q, k, v = self.split(x)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = F.scaled_dot_product_attention(q * 0.5, k, v, is_causal=True)
        return self.out(_merge(a - 0.5 * b))


class Batched3D(QKV):
    """BLOOM's eager path: heads folded into the batch, (B·H, T, D) bmm."""

    def forward(self, x):
        q, k, v = self.split(x)
        B, H, T, D = q.shape
        q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))
        att = torch.bmm(q, k.transpose(1, 2)) * D ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out(_merge(torch.bmm(att, v).view(B, H, T, D)))


class Causal(QKV):
    """A plain causal SDPA layer (nanoGPT's flash path)."""

    def forward(self, x):
        q, k, v = self.split(x)
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class Shared(nn.Module):
    """ALBERT-style weight sharing: one causal attention module applied at every layer."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.attn = Causal()
        self.depth = depth

    def forward(self, x):
        for _ in range(self.depth):
            x = x + self.attn(x)
        return x


class Wrap(nn.Module):
    """Runs `inner` on a residual stream; extra inputs are passed through."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, *extra):
        return x + self.inner(x, *extra)
