"""Config spaces of the NSA kernels: tuning as data, pruned by rules, never by GPU name."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Dict, List


@dataclass(frozen=True)
class KernelConfig:
    """block_m: rows per program (query positions x padded GQA group); block_n: keys (or
    compressed keys) per inner step; num_warps/num_stages: Triton launch parameters."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, int]) -> "KernelConfig":
        return cls(**{k: int(data[k]) for k in ("block_m", "block_n", "num_warps", "num_stages")})


SPACES = {
    # compressed branch: block_n is the compressed-key tile
    "cmp": dict(block_m=(64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    # top-n selection: block_n is the number of selection blocks scored per step (NJ)
    "sel": dict(block_m=(64, 128, 256), block_n=(16, 32, 64), num_warps=(4, 8), num_stages=(1, 2)),
    # selected branch: block_n 0 — one position per program, block_m is the padded group (16);
    # block_n 1 — one selection block per program over the queries that chose it, block_m rows
    "slc": dict(block_m=(16, 32, 64, 128), block_n=(0, 1), num_warps=(2, 4, 8),
                num_stages=(1, 2)),
    "win": dict(block_m=(64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    # backward, compressed/window branch: block_m query rows, block_n keys per tile
    "cmp_dq": dict(block_m=(64, 128), block_n=(32, 64), num_warps=(4, 8), num_stages=(1, 2)),
    "cmp_dkdv": dict(block_m=(32, 64), block_n=(64, 128), num_warps=(4, 8), num_stages=(1, 2)),
    "win_dq": dict(block_m=(64, 128), block_n=(32, 64), num_warps=(4, 8), num_stages=(1, 2)),
    "win_dkdv": dict(block_m=(32, 64), block_n=(64, 128), num_warps=(4, 8), num_stages=(1, 2)),
    # backward, selected branch: dq block_n 0 — one position per program (block_m = padded
    # group), 1 — fused into dkdv (no launch of its own: one candidate stands for it);
    # dkdv block_m query rows per step over a block's inverted selection; block_n 1 — the fused
    # dQ shares formed in two halves of Dk (Dk of 32 or more, `nsa_slc_bwd_dkdv_kernel`)
    "slc_dq": dict(block_m=(16,), block_n=(0, 1), num_warps=(2, 4, 8), num_stages=(1, 2)),
    "slc_dkdv": dict(block_m=(32, 64, 128), block_n=(0, 1), num_warps=(4, 8),
                     num_stages=(1, 2)),
}

# The kernels whose block sizes each kind picks: (template module, kernel names). An autotune
# entry stays valid while these kernels, the template helpers they call, the kind's config
# space and its pruned candidates are unchanged (`autotune.source_hash`).
KERNELS = {
    "cmp": ("nsa_fwd", ("nsa_cmp_fwd_kernel",)),
    "sel": ("nsa_fwd", ("nsa_select_kernel",)),
    # block by block, the merge kernel after the tuned ones runs untuned (MERGE_ROWS rows),
    # but its work (which slots it merges) is part of what the loop orders are timed on
    "slc": ("nsa_fwd", ("nsa_slc_fwd_kernel", "nsa_slc_fwd_blocks_kernel",
                        "nsa_slc_fwd_combine_kernel")),
    "win": ("nsa_fwd", ("nsa_win_fwd_kernel",)),
    "cmp_dq": ("nsa_bwd", ("nsa_dense_bwd_dq_kernel",)),
    "cmp_dkdv": ("nsa_bwd", ("nsa_dense_bwd_dkdv_kernel",)),
    "win_dq": ("nsa_bwd", ("nsa_dense_bwd_dq_kernel",)),
    "win_dkdv": ("nsa_bwd", ("nsa_dense_bwd_dkdv_kernel",)),
    "slc_dq": ("nsa_bwd", ("nsa_slc_bwd_dq_kernel", "nsa_slc_bwd_dkdv_kernel")),
    # the reduce kernel after it runs untuned (one program per selection block)
    "slc_dkdv": ("nsa_bwd", ("nsa_slc_bwd_dkdv_kernel",)),
}

DEFAULTS = {
    "cmp": KernelConfig(64, 64, 4, 2),
    "sel": KernelConfig(64, 16, 4, 2),
    "slc": KernelConfig(16, 0, 4, 2),
    "win": KernelConfig(64, 64, 4, 2),
    "cmp_dq": KernelConfig(64, 64, 4, 2),
    "cmp_dkdv": KernelConfig(64, 64, 8, 2),
    "win_dq": KernelConfig(64, 64, 4, 2),
    "win_dkdv": KernelConfig(64, 64, 8, 2),
    "slc_dq": KernelConfig(16, 0, 4, 2),
    "slc_dkdv": KernelConfig(64, 0, 8, 2),
}


def _fits(kind: str, cfg: KernelConfig, group_pad: int, dk: int, dv: int, elem: int) -> bool:
    """Pruning rules: tiles must hold at least one position, fit in ~200 KB of shared memory,
    and keep q (elem bytes), the fp32 accumulator and the fp32 scores under ~200 registers
    per thread."""
    if kind in ("slc", "slc_dq") and not cfg.block_n:
        return cfg.block_m == 16
    if kind == "slc_dq":
        return (cfg.num_warps, cfg.num_stages) == (4, 1)
    if kind == "slc" and (cfg.num_warps < 4 or cfg.block_m < 32):
        return False
    if cfg.block_m < group_pad:
        return False
    threads_bytes = cfg.num_warps * 32 * 4
    if kind == "slc_dkdv" and cfg.block_n and dk < 32:
        return False
    if kind.endswith("dkdv"):
        # resident: the key tile and its fp32 dK/dV; per step: q/dO rows and fp32 P/dS
        keys = 64 if kind == "slc_dkdv" else cfg.block_n  # the selected tile: one block
        regs = (keys * (dk + dv) * 4 + cfg.block_m * keys * 4 * 2) / threads_bytes
        smem = (cfg.num_stages * cfg.block_m + keys) * (dk + dv) * elem
        return regs <= 256 and smem <= 200 * 1024
    if kind.endswith("dq"):
        regs = cfg.block_m * (dk * 4 + (dk + dv) * elem + cfg.block_n * 4 * 2) / threads_bytes
        smem = cfg.num_stages * cfg.block_n * (dk + dv) * elem
        return regs <= 256 and smem <= 200 * 1024
    if kind == "sel":
        # block_n selection blocks = block_n * l'/d compressed keys (4 per block by default)
        keys = cfg.block_n * 4
        regs = cfg.block_m * (dk * elem + keys * 4 * 2) / threads_bytes
        return regs <= 200 and cfg.num_stages * keys * dk * elem <= 200 * 1024
    keys = 64 if kind == "slc" else cfg.block_n  # the selected tile is one selection block
    smem = cfg.num_stages * keys * (dk + dv) * elem + cfg.block_m * dk * elem
    regs = cfg.block_m * (dk * elem + dv * 4 + keys * 4) / threads_bytes
    return smem <= 200 * 1024 and regs <= 200


def candidates(kind: str, group_pad: int, dk: int, dv: int, elem: int) -> List[KernelConfig]:
    space = SPACES[kind]
    out = [KernelConfig(*vals) for vals in itertools.product(
        space["block_m"], space["block_n"], space["num_warps"], space["num_stages"])]
    return [c for c in out if _fits(kind, c, group_pad, dk, dv, elem)]
