"""The inverted selection — for each selection block, the queries that chose it — and how the
block-centric selected kernels (forward, backward dK/dV and fused dQ) cut their work.

Walking a block's choosing queries loads the block's K/V once and feeds the MMAs with many
(query, head) rows, however small the GQA group; the price is a result per (query, slot)
pair that a second kernel combines. Those partial results live in a buffer sized for one
chunk of query positions at a time (`position_chunk`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..host import cdiv

# A block's list is taken in chunks of this many entries at most (and at least MIN_LIST_CHUNK,
# so the partial sums stay few).
MIN_LIST_CHUNK, MAX_LIST_CHUNK = 512, 4096
# Bytes the per-(query, slot) partial results of one position chunk may take, and the fewest
# positions a chunk holds. Each chunk costs the host an inversion and two launches (~1 ms on
# the H100's host): 1.25 GiB holds the G=4 forward's at T=8192 (1.02 GiB) in one chunk.
PARTIAL_BUDGET, MIN_POSITION_CHUNK = 5 << 28, 64


class Inverted(NamedTuple):
    """queries[starts[g] : starts[g + 1]] are the ascending positions that chose block j of
    head (b, h), g = (b·H + h)·n_blocks + j; pairs[e] is entry e's (query, slot) pair as the
    flat index ((b·H + h)·C + t − t0)·N_PAD + slot into the selection of positions
    [t0, t0 + C)."""

    queries: Tensor
    starts: Tensor
    pairs: Tensor


@functools.lru_cache(maxsize=None)
def cuda_properties(device_index: int):
    """torch.cuda.get_device_properties, asked once per device (the launchers ask before every
    launch)."""
    return torch.cuda.get_device_properties(device_index)


def sms(device: torch.device) -> int:
    return cuda_properties(device.index).multi_processor_count if device.type == "cuda" else 8


def list_chunk(entries: int, block_t: int, device: torch.device) -> int:
    """Entries per program of a block-centric kernel, a multiple of block_t: about an eighth
    of an SM's share of all `entries`, so no list (block 0's holds every query) runs much
    longer than the rest of the kernel."""
    chunk = min(MAX_LIST_CHUNK, max(MIN_LIST_CHUNK, entries // (8 * sms(device))))
    return cdiv(chunk, block_t) * block_t


def position_chunk(T: int, bytes_per_position: int) -> int:
    """Query positions per pass of a kernel that keeps `bytes_per_position` of partial results
    for each: all T (at least 1, a step for range()) when they fit in PARTIAL_BUDGET, else as
    few chunks as fit (each a multiple of MIN_POSITION_CHUNK, at least one), of equal size but
    for the last."""
    fit = PARTIAL_BUDGET // max(1, bytes_per_position)
    if fit >= T:
        return max(T, 1)
    step = MIN_POSITION_CHUNK
    fit = max(step, fit // step * step)
    return cdiv(cdiv(T, cdiv(T, fit)), step) * step


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
    # Few, whole-tensor ops: at T=8192 each costs the host more than its kernel takes.
    base = (torch.arange(0, groups * C, n_blocks * C, device=dev, dtype=kt).view(B, H, 1, 1)
            + torch.arange(C, device=dev, dtype=kt).view(1, 1, C, 1))
    key = torch.add(base, block_idx, alpha=C)
    if skip_forced is None:
        unlisted = block_idx < 0
    else:
        lp, initial, local = skip_forced
        last = torch.arange(t0, t0 + C, device=dev, dtype=torch.int32).div_(
            lp, rounding_mode="floor").sub_(local)  # a position's last unforced block
        unlisted = (block_idx < max(initial, 0)) | (block_idx > last.view(1, 1, C, 1))
    key = key.masked_fill_(unlisted, groups * C).flatten()
    key, pairs = torch.sort(key)  # keys are unique but for the unlisted, which sort last
    starts = torch.searchsorted(key, torch.arange(0, (groups + 1) * C, C, device=dev, dtype=kt))
    return Inverted(key.remainder_(C).add_(t0).to(torch.int32), starts, pairs)
