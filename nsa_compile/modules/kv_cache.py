"""What the inserted modules keep on a KV cache object between generation steps.

A transformers Cache object (anything with `get_seq_length`) found in the root model's call
carries, under an attribute per kind of state, one entry per module; beam search's
`reorder_cache(beam_idx)` is wrapped so the entries follow the reordered rows. Used by Engram
(its n-gram context) and NSA (its compressed keys).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


def kv_cache(kwargs: dict, output: Any = None) -> Any:
    """The call's KV cache: a kwarg or an output attribute with `get_seq_length` (transformers'
    Cache classes), or None."""
    found = [kwargs.get(name) for name in CACHE_KWARGS]
    found += [getattr(output, name, None) for name in CACHE_KWARGS]
    return next((c for c in found if hasattr(c, "get_seq_length")), None)


def keep_on_cache(cache: Any, attr: str, entries: Optional[list]) -> None:
    """Stores `entries` (objects with `select(rows)`, or None) as `cache.<attr>`, making beam
    search's reordering of the cache reorder them too."""
    if entries is not None and hasattr(cache, "reorder_cache"):
        wrapped = cache.__dict__.setdefault("_nsa_compile_reordered", set())
        if attr not in wrapped:
            wrapped.add(attr)
            reorder = cache.reorder_cache

            def reorder_cache(beam_idx: Tensor, *args, **kwargs):
                out = reorder(beam_idx, *args, **kwargs)
                held = getattr(cache, attr, None)
                if held is not None:
                    setattr(cache, attr, [None if e is None else e.select(beam_idx)
                                          for e in held])
                return out

            cache.reorder_cache = reorder_cache
    setattr(cache, attr, entries)
