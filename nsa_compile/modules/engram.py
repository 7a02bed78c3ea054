"""Engram: hashed n-gram memory read by the token ids and gated by the hidden state.

DeepSeek, arXiv 2601.07372 (reference variant). For position t the suffix n-grams of the
canonical ids, one per order, are hashed by `heads` hash heads each into one table per layer;
the K = len(orders) * heads rows are concatenated into e_t, and the block's input h_t receives

    alpha_t * W_V e_t  (+ SiLU(depthwise causal conv(RMSNorm(.))) of it, when conv=True),
    alpha_t = sigmoid(sign(s) * sqrt(|s|)),  s = <RMSNorm(h_t), RMSNorm(W_K e_t)> / sqrt(d_model).

W_V and the conv start at zero, so inserting the module leaves the model's output unchanged.

Incremental decoding: a call that continues a KV cache (`past_key_values` with cached
positions) sees only the new tokens, but its n-grams and its conv reach back max(orders) - 1
ids and 3 * max(orders) conv inputs. Each call that returns or fills a cache, other than a
training step, leaves that context (`DecodeContext`) on the cache object itself, and the next
call over the same cache reads it, so decoding step by step gives the full-sequence forward's
output; beam search's `reorder_cache` reorders it with the cache. A cache whose length does
not match its context (built without these hooks, by a training step, or cropped) is refused
with a clear error.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EngramConfig
from ..kernels.engram import naive
from ..kernels.engram.op import engram_fwd
from .kv_cache import keep_on_cache, kv_cache

__all__ = ["Engram", "canonical_ids", "normalize_token"]

_SPACES = re.compile(r"[ \t\r\n]+")
# Per-layer seed stride, as in the reference implementation (a prime, so layers never share
# a generator stream for small seeds).
_LAYER_SEED_STRIDE = 10007
_CONV_KERNEL = 4


def normalize_token(text: str) -> str:
    """NFKC, lowercase, accents stripped, runs of whitespace collapsed and the ends trimmed
    (a whitespace-only token becomes a single space)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in unicodedata.normalize("NFD", text)
                   if unicodedata.category(c) != "Mn")
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text))
    return text if text == " " else text.strip()


def _token_texts(tokenizer: Any) -> tuple[List[str], List[str]]:
    """(decoded text, raw token string) of every id of a Hugging Face tokenizer, a
    `tokenizers.Tokenizer`, or a list of token strings."""
    if isinstance(tokenizer, (list, tuple)):
        if not all(isinstance(t, str) for t in tokenizer):
            raise TypeError("EngramConfig.tokenizer: a list must hold one string per token id")
        return list(tokenizer), list(tokenizer)
    if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "decode"):
        n = len(tokenizer)
        ids = [[i] for i in range(n)]
        if hasattr(tokenizer, "batch_decode"):
            texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
        else:
            texts = [tokenizer.decode(i, skip_special_tokens=False) for i in ids]
        return list(texts), [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(n)))]
    if hasattr(tokenizer, "get_vocab_size") and hasattr(tokenizer, "decode_batch"):
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        return list(texts), [str(tokenizer.id_to_token(i)) for i in range(n)]
    raise TypeError(f"EngramConfig.tokenizer: expected a Hugging Face tokenizer, a "
                    f"tokenizers.Tokenizer or a list of token strings, got {type(tokenizer).__name__}")


def canonical_ids(tokenizer: Any, vocab_size: int) -> Tensor:
    """Canonical-id map P: (max(vocab_size, len(tokenizer)),) int64.

    Tokens whose decoded text normalises (`normalize_token`) to the same string share an id;
    a token that decodes to a partial character or to nothing keeps its raw string as its key.
    Ids past the tokenizer (padded embeddings) each get their own id. `None` is the identity.
    Canonical ids are numbered in order of first appearance, so the map never depends on
    Python's string hashing.
    """
    if tokenizer is None:
        return torch.arange(vocab_size, dtype=torch.int64)
    texts, raws = _token_texts(tokenizer)
    keys: dict = {}
    out = []
    for text, raw in zip(texts, raws):
        norm = normalize_token(text) if "\ufffd" not in text else ""
        key = ("text", norm) if norm else ("raw", raw)
        out.append(keys.setdefault(key, len(keys)))
    out.extend(range(len(keys), len(keys) + max(0, vocab_size - len(out))))
    return torch.tensor(out, dtype=torch.int64)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % f for f in range(3, math.isqrt(n) + 1, 2))


def _primes_from(start: int, count: int) -> List[int]:
    """The `count` smallest primes >= start."""
    out, n = [], start
    while len(out) < count:
        if _is_prime(n):
            out.append(n)
        n += 1
    return out


def _multipliers(seed: int, layer: int, order: int, num_values: int) -> Tensor:
    """Odd int64 multipliers m_0..m_{order-1}, small enough that y * m never overflows int64
    for any y < num_values (the canonical ids and the pad id)."""
    gen = torch.Generator().manual_seed((seed + _LAYER_SEED_STRIDE * layer) % (1 << 63))
    half = max(1, ((1 << 63) - 1) // num_values // 2)
    return torch.randint(0, half, (order,), generator=gen, dtype=torch.int64) * 2 + 1


@dataclass
class DecodeContext:
    """What one Engram needs from the positions before a call to continue a sequence.

    ids: (B, <= max(orders) - 1) the last token ids; conv: (B, 3 * max(orders), d_model) the
    last conv inputs (zeros before the sequence start), None without the conv; length: the
    positions seen so far, which must equal the KV cache's length (None once a compiled call
    has made the context: it is not checked then).
    """

    ids: Tensor
    conv: Optional[Tensor]
    length: Optional[int]

    def select(self, rows: Tensor) -> "DecodeContext":
        """The context of batch rows `rows` (beam search's reordering)."""
        rows = rows.to(self.ids.device)
        conv = None if self.conv is None else self.conv.index_select(0, rows)
        return DecodeContext(self.ids.index_select(0, rows), conv, self.length)


class Engram(nn.Module):
    """Hashed n-gram memory for one block.

    config: the EngramConfig (orders, heads, table_size, head_dim, conv, seed, tokenizer).
    hidden_size: d_model of the hidden state it is added to. vocab_size: rows of the model's
    token embedding. layer: the block index, which seeds this layer's hash multipliers.
    canon: a prebuilt canonical-id map (shared by the layers of one model), else it is built
    from config.tokenizer.

    forward(hidden (B, T, d_model), input_ids (B, T) or None) -> (B, T, d_model), the term to
    add to `hidden`. With input_ids None it reads the ids the token embedding's hook captured
    in this forward call (see `nsa_compile.passes.engram`).
    """

    def __init__(self, config: EngramConfig, hidden_size: int, vocab_size: int, layer: int = 0,
                 canon: Optional[Tensor] = None):
        super().__init__()
        if canon is None:
            canon = canonical_ids(config.tokenizer, vocab_size)
        self.orders = tuple(config.orders)
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.hidden_size = hidden_size
        self.layer = layer
        pad = int(canon.max()) + 1 if canon.numel() else 0
        primes = _primes_from(config.table_size, len(self.orders) * self.heads)
        offsets = [sum(primes[:i]) for i in range(len(primes))]
        self.register_buffer("canon", canon.clone())
        self.register_buffer("pad_id", torch.tensor(pad, dtype=torch.int64))
        self.register_buffer("multipliers", _multipliers(config.seed, layer, max(self.orders), pad + 1))
        self.register_buffer("primes", torch.tensor(primes, dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.table = nn.Parameter(torch.randn(sum(primes), self.head_dim))
        width = len(primes) * self.head_dim
        self.key_proj = nn.Linear(width, hidden_size, bias=False)
        self.value_proj = nn.Linear(width, hidden_size, bias=False)
        nn.init.zeros_(self.value_proj.weight)
        self.norm_hidden = nn.RMSNorm(hidden_size, eps=1e-6)
        self.norm_key = nn.RMSNorm(hidden_size, eps=1e-6)
        self.conv: Optional[nn.Conv1d] = None
        if config.conv:
            self.conv_norm = nn.RMSNorm(hidden_size, eps=1e-6)
            self.conv = nn.Conv1d(hidden_size, hidden_size, _CONV_KERNEL, groups=hidden_size,
                                  dilation=max(self.orders), bias=False)
            nn.init.zeros_(self.conv.weight)
        # Per forward call, set by the hooks of `nsa_compile.passes.engram`; plain attributes
        # (not buffers), so they are never saved. _ids: the token ids the embedding received;
        # _context: what came before them under a KV cache (None: a fresh sequence); _keep:
        # leave this call's context in _next for the cache to carry to the next call.
        self._ids: Optional[Tensor] = None
        self._context: Optional[DecodeContext] = None
        self._keep = False
        self._next: Optional[DecodeContext] = None

    @property
    def vocab_size(self) -> int:
        return self.canon.shape[0]

    def _check_ids(self, ids: Tensor) -> None:
        V = self.canon.shape[0]
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"Engram: token ids must be an integer tensor, got {ids.dtype}")
        if torch.compiler.is_compiling():
            # A Python check would need the values on the host (a sync, and a graph break or
            # a data-dependent-guard error under torch.compile/export); an async assert is
            # traced into the graph. The kernels clamp ids, so no read is ever out of range.
            torch._assert_async(((ids >= 0) & (ids < V)).all(),
                                f"Engram: a token id is outside [0, {V}); the canonical-id map "
                                "has one entry per embedding row")
            return
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):
            raise ValueError(f"Engram: token id {int(ids[bad][0])} is outside the vocabulary "
                             f"[0, {V}); Engram's canonical-id map was built for {V} ids (the "
                             "token embedding's rows); check the tokenizer and the embedding size")

    def hash(self, input_ids: Tensor) -> Tensor:
        """input_ids: (B, T) or (T,). Global table rows (B, T, len(orders) * heads) int64
        (or (T, K)); row = h mod p_{n,k} + offset_{n,k}."""
        self._check_ids(input_ids)
        ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        rows = naive.hash_rows(ids, self.canon, self.multipliers, self.primes, self.offsets,
                               self.pad_id, self.orders, self.heads)
        return rows[0] if input_ids.dim() == 1 else rows

    def lookup(self, input_ids: Tensor) -> Tensor:
        """e_t: the concatenated rows (B, T, len(orders) * heads * head_dim)."""
        emb, _ = engram_fwd(input_ids, self.canon, self.multipliers, self.primes, self.offsets,
                            self.pad_id, self.table, list(self.orders), self.heads)
        return emb

    def forward(self, hidden: Tensor, input_ids: Optional[Tensor] = None) -> Tensor:
        ids = self._ids if input_ids is None else input_ids
        if input_ids is not None:
            self._check_ids(input_ids)  # captured ids were checked by CaptureTokenIds
        if ids is None:
            raise RuntimeError(
                "Engram: no token ids for this call. nsa_compile captures them from the token "
                "embedding; call the model with input_ids (inputs_embeds carry no ids), or call "
                "Engram(hidden, input_ids) directly")
        if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or ids.shape[1] != hidden.shape[1]:
            raise ValueError(f"Engram: token ids of shape {tuple(ids.shape)} do not match the "
                             f"hidden state {tuple(hidden.shape)}; expected (B, T) = "
                             f"{tuple(hidden.shape[:2])}")
        ctx, T = self._context, ids.shape[1]
        if ctx is not None and ctx.ids.shape[0] != ids.shape[0]:
            raise ValueError(f"Engram: the KV cache holds {ctx.ids.shape[0]} sequences but this "
                             f"call has {ids.shape[0]}")
        # the earlier ids enter this call's n-grams; their own rows are dropped
        full_ids = ids if ctx is None else torch.cat([ctx.ids.to(ids), ids], dim=1)
        e = self.lookup(full_ids)[:, full_ids.shape[1] - T:]
        key = self.key_proj(e)
        value = self.value_proj(e)
        s = (self.norm_hidden(hidden) * self.norm_key(key)).sum(-1, keepdim=True)
        s = s / math.sqrt(self.hidden_size)
        # clamp keeps d sqrt(|s|)/ds finite at s = 0
        alpha = torch.sigmoid(torch.sign(s) * s.abs().clamp_min(1e-6).sqrt())
        out = alpha * value
        conv_in = None
        if self.conv is not None:
            x = self.conv_norm(out)
            reach = (_CONV_KERNEL - 1) * self.conv.dilation[0]
            # the causal conv's left context: the earlier inputs, or zeros at the start
            conv_in = (F.pad(x, (0, 0, reach, 0)) if ctx is None
                       else torch.cat([ctx.conv.to(x), x], dim=1))
            out = out + F.silu(self.conv(conv_in.transpose(1, 2))).transpose(1, 2)
        if self._keep:
            # under torch.compile an int carried from step to step is a guard that recompiles
            # at every step: compiled calls neither count nor check the positions
            past = 0 if ctx is None else ctx.length
            length = None if past is None or torch.compiler.is_compiling() else past + T
            # contiguous: one stride for every step, so a compiled model does not recompile
            self._next = DecodeContext(
                full_ids[:, max(0, full_ids.shape[1] - (max(self.orders) - 1)):].contiguous(),
                None if conv_in is None else conv_in[:, conv_in.shape[1] - reach:].contiguous(),
                length)
        return out

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, orders={self.orders}, heads={self.heads}, "
                f"rows={self.table.shape[0]}, head_dim={self.head_dim}, "
                f"hidden_size={self.hidden_size}, vocab={self.canon.shape[0]}")


def _first_tensor(args: tuple, kwargs: dict, names: Sequence[str], want_float: bool):
    """(key, tensor) of the first floating (or integer) tensor: a positional arg first, then the
    named kwargs in order, then any kwarg. key is an int (position) or a str (kwarg name)."""
    def ok(x: Any) -> bool:
        return (isinstance(x, Tensor) and x.dim() >= 1
                and x.dtype.is_floating_point == want_float and x.dtype != torch.bool)
    for i, a in enumerate(args):
        if ok(a):
            return i, a
    for n in names:
        if ok(kwargs.get(n)):
            return n, kwargs[n]
    for n, a in kwargs.items():
        if ok(a):
            return n, a
    return None, None


_ID_KWARGS = ("input_ids", "input", "ids", "idx", "tokens", "token_ids")
_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "hidden", "x", "h", "input", "inputs")


def find_token_ids(args: tuple, kwargs: dict):
    """(key, ids) of the token ids in a token embedding's call, or (None, None)."""
    return _first_tensor(args, kwargs, _ID_KWARGS, want_float=False)


def find_hidden(args: tuple, kwargs: dict):
    """(key, hidden) of the hidden state in a block's call, or (None, None)."""
    return _first_tensor(args, kwargs, _HIDDEN_KWARGS, want_float=True)


class CaptureTokenIds:
    """Forward pre-hook of the token embedding: hands its ids to the model's Engram modules.

    The ids live on the Engram modules for the rest of the forward call (module state, no
    global): torch.compile(fullgraph=True) traces the attribute store and the later read
    within one graph.
    """

    def __init__(self, engrams: Sequence[Engram]):
        self.engrams = list(engrams)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        _, ids = find_token_ids(args, kwargs)
        if ids is not None and self.engrams:
            # before the embedding's own lookup, so a bad id gets Engram's message; once per
            # call, for all layers (they share the vocabulary)
            self.engrams[0]._check_ids(ids)
        for engram in self.engrams:
            engram._ids = ids


# The attribute of a KV cache object that carries the Engram modules' DecodeContexts.
_CONTEXT_ATTR = "_nsa_compile_engram"


class ForgetTokenIds:
    """Forward pre-hook of the root model: drops the previous call's ids, so a call without
    token ids (inputs_embeds) fails clearly instead of reading stale ones, and hands each
    Engram the context its KV cache carries (`DecodeContext`) when the call continues one."""

    def __init__(self, engrams: Sequence[Engram]):
        self.engrams = list(engrams)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kv_cache(kwargs)
        past = 0 if cache is None else int(cache.get_seq_length())
        contexts = [None] * len(self.engrams)
        if past:
            contexts = getattr(cache, _CONTEXT_ATTR, None)
            counted = contexts is not None and not torch.compiler.is_compiling()
            if contexts is None or (counted and any(c.length not in (None, past)
                                                    for c in contexts)):
                held = "none" if contexts is None else f"{contexts[0].length} positions"
                raise RuntimeError(
                    f"Engram: this call continues a KV cache of {past} positions, but the "
                    f"cache carries Engram's context for {held}. Engram's n-grams need the "
                    "earlier token ids: fill the cache through this model in eval mode or "
                    "under torch.no_grad() (as generate() does), and do not crop it")
        # a training step leaves no context behind (its output's cache is never continued)
        keep = not (module.training and torch.is_grad_enabled())
        for engram, context in zip(self.engrams, contexts):
            engram._ids, engram._context, engram._keep, engram._next = None, context, keep, None


class KeepDecodeContext:
    """Forward hook of the root model: stores the Engram modules' contexts of this call on
    its KV cache (found in the kwargs or the output), for the call that continues it."""

    def __init__(self, engrams: Sequence[Engram]):
        self.engrams = list(engrams)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        contexts = [engram._next for engram in self.engrams]
        for engram in self.engrams:  # a direct Engram call after this one starts clean
            engram._context, engram._keep, engram._next = None, False, None
        cache = kv_cache(kwargs, output)
        if cache is None or any(c is None for c in contexts):
            return
        keep_on_cache(cache, _CONTEXT_ATTR, contexts)


class AddEngram:
    """Forward pre-hook of a block: adds its `engram` child's output to the hidden state the
    block receives (the first floating tensor argument, or hidden_states=)."""

    def __init__(self, attr: str = "engram"):
        self.attr = attr

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        key, hidden = find_hidden(args, kwargs)
        if hidden is None:
            raise RuntimeError(f"Engram: {type(module).__name__} was called without a floating "
                               "hidden-state argument")
        hidden = hidden + getattr(module, self.attr)(hidden).to(hidden.dtype)
        if isinstance(key, int):
            return args[:key] + (hidden,) + args[key + 1:], kwargs
        return args, {**kwargs, key: hidden}
