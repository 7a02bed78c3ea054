"""Configuration dataclasses: one frozen, validated dataclass per verb.

`NSAConfig` holds Native Sparse Attention's block parameters (arXiv 2502.11089, defaults
from the paper's Table of hyper-parameters); `EngramConfig` holds the hashed n-gram memory's
(arXiv 2601.07372). Both validate on construction and round-trip through `to_dict`/`from_dict`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

BRANCHES: Tuple[str, ...] = ("compressed", "selected", "window")
COMPRESSORS: Tuple[str, ...] = ("mlp", "mean")


def _from_dict(cls, data: dict):
    """cls(**data), refusing keys that are not fields (a typo would otherwise vanish)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}; known: {sorted(fields)}")
    return cls(**data)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NSAConfig.{name} must be a positive int, got {value!r}")


def _check_nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"NSAConfig.{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class NSAConfig:
    """Native Sparse Attention parameters.

    compress_block (l) and compress_stride (d) shape the compressed branch: block i covers keys
    [i*d, i*d + l). select_block (l') is the selection granularity; select_count (n) blocks are
    attended per query, *including* the select_initial leading and select_local trailing forced
    blocks. window is the sliding-window length (None = unbounded). branches is a non-empty,
    ordered subset of ("compressed", "selected", "window"); gate is "learned" (sigmoid gates) or
    one fixed float per branch. compressor is "mlp" (learned, starts as the mean) or "mean".
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_count: int = 16
    select_initial: int = 1
    select_local: int = 2
    window: Optional[int] = 512
    branches: Tuple[str, ...] = BRANCHES
    gate: Union[str, Tuple[float, ...]] = "learned"
    compressor: str = "mlp"

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the dataclass stays hashable.
        object.__setattr__(self, "branches", tuple(self.branches))
        if not isinstance(self.gate, str):
            object.__setattr__(self, "gate", tuple(float(g) for g in self.gate))
        for name in ("compress_block", "compress_stride", "select_block", "select_count"):
            _check_positive_int(name, getattr(self, name))
        for name in ("select_initial", "select_local"):
            _check_nonnegative_int(name, getattr(self, name))
        l, d, lp = self.compress_block, self.compress_stride, self.select_block
        if l % d:
            raise ValueError(
                f"NSAConfig.compress_stride={d} must divide compress_block={l}; "
                f"pick a stride such as {math.gcd(l, lp)}")
        if lp % d:
            raise ValueError(
                f"NSAConfig.compress_stride={d} must divide select_block={lp}; "
                f"pick a stride such as {math.gcd(l, lp)}")
        if l > lp:
            raise ValueError(
                f"NSAConfig.compress_block={l} must be <= select_block={lp}; "
                "raise select_block or lower compress_block")
        forced = self.select_initial + self.select_local
        if self.select_count < forced:
            raise ValueError(
                f"NSAConfig.select_count={self.select_count} is smaller than the forced blocks "
                f"(select_initial={self.select_initial} + select_local={self.select_local}); "
                f"use select_count >= {forced}")
        if self.window is not None:
            _check_positive_int("window", self.window)
        if not self.branches:
            raise ValueError("NSAConfig.branches must name at least one of " f"{BRANCHES}")
        unknown = [b for b in self.branches if b not in BRANCHES]
        if unknown:
            raise ValueError(f"NSAConfig.branches has unknown names {unknown}; choose from {BRANCHES}")
        if list(self.branches) != [b for b in BRANCHES if b in self.branches]:
            raise ValueError(
                f"NSAConfig.branches={self.branches} must be distinct and in the order {BRANCHES}")
        if isinstance(self.gate, str):
            if self.gate != "learned":
                raise ValueError(
                    f"NSAConfig.gate={self.gate!r}: use 'learned' or a tuple of floats, one per branch")
        else:
            if len(self.gate) != len(self.branches):
                raise ValueError(
                    f"NSAConfig.gate has {len(self.gate)} weights but branches has "
                    f"{len(self.branches)}; give one fixed weight per branch")
            if not all(math.isfinite(g) for g in self.gate):
                raise ValueError(f"NSAConfig.gate={self.gate} must hold finite floats")
        if self.compressor not in COMPRESSORS:
            raise ValueError(
                f"NSAConfig.compressor={self.compressor!r}: choose one of {COMPRESSORS}")

    @property
    def fixed_gates(self) -> Optional[Tuple[float, ...]]:
        """The fixed per-branch weights, or None when the gates are learned."""
        return None if isinstance(self.gate, str) else self.gate

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["branches"] = list(self.branches)
        if not isinstance(self.gate, str):
            out["gate"] = list(self.gate)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "NSAConfig":
        return _from_dict(cls, data)


def _check_layers(layers: Sequence[int]) -> Tuple[int, ...]:
    out = tuple(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in out):
        raise ValueError(f"EngramConfig.layers must be block indices >= 0, got {layers!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"EngramConfig.layers={layers!r} repeats a block index")
    return out


@dataclass(frozen=True)
class EngramConfig:
    """Engram hashed n-gram memory parameters.

    layers: indices of the blocks whose input hidden state receives the memory. orders: the
    n-gram orders (each >= 2). heads: hash heads per order. table_size: rows per head (rounded
    up to distinct primes). head_dim: width of one row. conv: add the dilated depthwise causal
    conv. seed: seeds the hash multipliers. tokenizer: a Hugging Face tokenizer or a list of
    token strings for the canonical-id map (None = identity); not serialised by `to_dict`.
    """

    layers: Tuple[int, ...] = (1,)
    orders: Tuple[int, ...] = (2, 3)
    heads: int = 8
    table_size: int = 65536
    head_dim: int = 32
    conv: bool = True
    seed: int = 0
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers(self.layers))
        object.__setattr__(self, "orders", tuple(self.orders))
        if not self.layers:
            raise ValueError("EngramConfig.layers must name at least one block, e.g. layers=(1,)")
        if not self.orders or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.orders):
            raise ValueError(f"EngramConfig.orders={self.orders!r} must be ints >= 2, e.g. (2, 3)")
        if len(set(self.orders)) != len(self.orders):
            raise ValueError(f"EngramConfig.orders={self.orders!r} repeats an order")
        for name in ("heads", "table_size", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngramConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"EngramConfig.seed must be an int, got {self.seed!r}")
        tok = self.tokenizer
        if isinstance(tok, (list, tuple)):
            if not all(isinstance(t, str) for t in tok):
                raise ValueError("EngramConfig.tokenizer: a list must hold one string per token id")
        elif tok is not None and not (hasattr(tok, "decode") and (
                hasattr(tok, "convert_ids_to_tokens") or hasattr(tok, "decode_batch"))):
            raise ValueError(f"EngramConfig.tokenizer must be a Hugging Face tokenizer, a "
                             f"tokenizers.Tokenizer, a list of token strings or None, got "
                             f"{type(tok).__name__}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tokenizer"}
        out["layers"] = list(self.layers)
        out["orders"] = list(self.orders)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EngramConfig":
        return _from_dict(cls, data)
