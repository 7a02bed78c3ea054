"""The flat, schema-friendly form of an NSAConfig that the op and its kernels take."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

from ...config import BRANCHES, NSAConfig


class NSAParams(NamedTuple):
    """NSAConfig reduced to ints/floats so it can cross `torch.library` schemas.

    window == 0 means unbounded. has_cmp/has_slc/has_win say which branches run; gate index c
    refers to the c-th present branch in (compressed, selected, window) order.
    """

    compress_block: int
    compress_stride: int
    select_block: int
    select_count: int
    select_initial: int
    select_local: int
    window: int
    has_cmp: bool
    has_slc: bool
    has_win: bool
    fixed_gates: Tuple[float, ...]
    scale: float

    @classmethod
    def from_config(cls, config: NSAConfig, scale: float) -> "NSAParams":
        return cls(
            config.compress_block, config.compress_stride, config.select_block,
            config.select_count, config.select_initial, config.select_local, config.window or 0,
            "compressed" in config.branches, "selected" in config.branches,
            "window" in config.branches, tuple(config.fixed_gates or ()), float(scale))

    @property
    def num_branches(self) -> int:
        return int(self.has_cmp) + int(self.has_slc) + int(self.has_win)

    @property
    def gate_weights(self) -> List[float]:
        """Each present branch's fixed gate weight, 1.0 each when none are set (the kernels
        read these where no per-row gates are passed)."""
        return list(self.fixed_gates) or [1.0] * self.num_branches

    @property
    def needs_cmp(self) -> bool:
        """Compressed keys are read by the compressed branch and by block selection."""
        return self.has_cmp or self.has_slc

    def gate_slot(self, branch: str) -> int:
        present = [b for b, on in zip(BRANCHES, (self.has_cmp, self.has_slc, self.has_win)) if on]
        return present.index(branch)


def num_compressed(T: int, block: int, stride: int) -> int:
    """Tc = floor((T - l) / d) + 1 compressed blocks, 0 when T < l."""
    return 0 if T < block else (T - block) // stride + 1


def num_selection_blocks(T: int, select_block: int) -> int:
    return -(-T // select_block)


def supported(params: NSAParams, dk: int, dv: int) -> Optional[str]:
    """None when the Triton path handles these parameters, else the reason it does not."""
    if params.needs_cmp:
        r = params.select_block // params.compress_stride
        if r & (r - 1):
            return f"select_block / compress_stride = {r} is not a power of two"
    if params.has_slc and params.select_block < 16:
        return f"select_block={params.select_block} < 16"
    if max(dk, dv) > 256:
        return f"head dim {max(dk, dv)} > 256"
    return None


def window_or_none(params: NSAParams) -> Optional[int]:
    return params.window or None
