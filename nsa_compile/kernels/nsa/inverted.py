"""The inverted selection — for each selection block, the queries that chose it — and how the
block-centric selected kernels (forward, backward dK/dV and fused dQ) cut their work.

Walking a block's choosing queries loads the block's K/V once and feeds the MMAs with many
(query, head) rows, however small the GQA group; the price is a result per (query, slot)
pair that a second kernel combines. Those partial results live in a buffer sized for one
chunk of query positions at a time (`position_chunk`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

# A block's list is taken in chunks of this many entries at most (and at least MIN_LIST_CHUNK,
# so the partial sums stay few).
MIN_LIST_CHUNK, MAX_LIST_CHUNK = 512, 4096
# Bytes the per-(query, slot) partial results of one position chunk may take, and the fewest
# positions a chunk holds.
PARTIAL_BUDGET, MIN_POSITION_CHUNK = 1 << 30, 64


class Inverted(NamedTuple):
    """queries[starts[g] : starts[g + 1]] are the ascending positions that chose block j of
    head (b, h), g = (b·H + h)·n_blocks + j; pairs[e] is entry e's (query, slot) pair as the
    flat index ((b·H + h)·C + t − t0)·N_PAD + slot into the selection of positions
    [t0, t0 + C)."""

    queries: Tensor
    starts: Tensor
    pairs: Tensor


def sms(device: torch.device) -> int:
    return (torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda" else 8)


def list_chunk(entries: int, block_t: int, device: torch.device) -> int:
    """Entries per program of a block-centric kernel, a multiple of block_t: about an eighth
    of an SM's share of all `entries`, so no list (block 0's holds every query) runs much
    longer than the rest of the kernel."""
    chunk = min(MAX_LIST_CHUNK, max(MIN_LIST_CHUNK, entries // (8 * sms(device))))
    return triton.cdiv(chunk, block_t) * block_t


def position_chunk(T: int, bytes_per_position: int) -> int:
    """Query positions per pass of a kernel that keeps `bytes_per_position` of partial results
    for each: all T when they fit in PARTIAL_BUDGET, else the largest multiple of
    MIN_POSITION_CHUNK that does (at least one)."""
    fit = PARTIAL_BUDGET // max(1, bytes_per_position)
    step = MIN_POSITION_CHUNK
    return T if fit >= T else max(step, fit // step * step)


def invert_selection(block_idx: Tensor, n_blocks: int, t0: int = 0,
                     skip_forced: Optional[Tuple[int, int, int]] = None) -> Inverted:
    """The queries that chose each block: block_idx (B, H, C, N_PAD) — the selection of
    positions [t0, t0 + C), -1 = none — to an `Inverted` (queries int32 absolute positions,
    starts int64 (B·H·n_blocks + 1,), pairs int64). skip_forced = (l', initial, local) leaves
    out each position's forced blocks (the first `initial`, and the `local` ones ending at its
    own block), which the window kernel attends to instead (`triton_fwd.folds`).

    One sort of (group, position) keys — int32 where they fit (half the radix passes of
    int64) — deterministic, no host sync."""
    B, H, C, n_pad = block_idx.shape
    dev = block_idx.device
    groups = B * H * n_blocks
    kt = torch.int32 if (groups + 1) * C < 2**31 else torch.int64
    bh = torch.arange(B * H, device=dev, dtype=kt).view(B, H, 1, 1)
    t = torch.arange(C, device=dev, dtype=kt).view(1, 1, C, 1)
    key = (bh * n_blocks + block_idx.to(kt)) * C + t
    listed = block_idx >= 0
    if skip_forced is not None:
        lp, initial, local = skip_forced
        own = (t + t0) // lp
        listed = listed & (block_idx >= initial) & (block_idx <= own - local)
    key = torch.where(listed, key, groups * C).flatten()
    key, pairs = torch.sort(key)  # keys are unique but for the unlisted, which sort last
    starts = torch.searchsorted(key, torch.arange(groups + 1, device=dev, dtype=kt) * C)
    return Inverted((key % C + t0).to(torch.int32), starts, pairs)
