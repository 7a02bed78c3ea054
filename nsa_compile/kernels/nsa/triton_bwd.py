"""Launchers of the Triton NSA backward (templates/nsa_bwd.py) with explicit block sizes.

Reads what the forward kept (`triton_fwd.ForwardResult` with save=True): the ungated branch
outputs, each branch's lse and the selected blocks. Kernel order (each one adds into the fp32
gradient buffers the previous ones wrote, so the sum's order is fixed):
compressed dQ, dK_cmp/dV_cmp → selected dQ, dK/dV → window dQ, dK/dV; the window kernels,
adding last, store dQ, dK and dV in the input dtype.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..host import cdiv
from ...templates.nsa_bwd import (nsa_bwd_rows_kernel, nsa_dense_bwd_dkdv_kernel,
                                  nsa_dense_bwd_dq_kernel, nsa_slc_bwd_dkdv_kernel,
                                  nsa_slc_bwd_dq_kernel, nsa_slc_bwd_dq_merge_kernel,
                                  nsa_slc_bwd_reduce_kernel)
from ... import autotune
from ...templates.nsa_configs import DEFAULTS, KernelConfig, candidates
from .params import NSAParams, num_selection_blocks
from .inverted import Inverted, invert_selection, list_chunk, position_chunk, sms
from .triton_fwd import MERGE_ROWS, _pow2, launch_geometry, shape_keys, tile_pair

# The compressed dK/dV walk over queries is split into chunks of at least MIN_SPLIT_QUERIES
# queries, aiming at SPLIT_PROGRAMS_PER_SM programs per SM. The key tiles' walks differ in
# length (causal), so more, shorter programs balance the SMs: on the H100 512 / 16 took the
# kernel (with its split sums) from 23.9 to 21.0 ms at 64/4 64k, 12.4 to 10.9 at 32/8 64k
# and 0.55 / 0.34-0.38 to 0.51 / 0.31 at 8k, against 1024 / 4.
MIN_SPLIT_QUERIES, SPLIT_PROGRAMS_PER_SM = 512, 16
# The dQ merge only streams the shares: with its slot loop unrolled and 8 warps it took 0.43 ms
# instead of 0.59 at 32/8 8k on the H100 (unrolled alone 0.78, 8 warps alone 0.54).
MERGE_DQ_WARPS = 8
# Rows per program of the (untuned, memory-bound) rows kernel, 4 warps: on the H100 32 took
# 1.74 ms instead of 64's 1.89 at 64/4 64k, 0.87 instead of 0.96 at 32/8 64k.
ROWS_BLOCK = 32
# A dK/dV config with num_warps = WS_WARPS asks for the warp-specialised Gluon kernel
# (`templates.nsa_bwd_ws`, imported only then: two consumer warpgroups and a loader's; not a
# tuning candidate yet), whose register split gives the second consumer WS_CONSUMER_REGS (its
# loop compiles without spills at 232, tests/kernel_tests) and the loader WS_LOADER_REGS.
WS_WARPS, WS_CONSUMER_REGS, WS_LOADER_REGS = 12, 232, 32


def query_splits(T: int, tiles: int, device: torch.device) -> int:
    """Query chunks for the compressed dK/dV kernel: enough programs for
    SPLIT_PROGRAMS_PER_SM per SM."""
    return max(1, min(T // MIN_SPLIT_QUERIES,
                      cdiv(SPLIT_PROGRAMS_PER_SM * sms(device), tiles)))


def partial_slots(starts: Tensor, chunk: int) -> Tensor:
    """Where each list's chunks s >= 1 keep their partial dK/dV: (groups + 1,) int64 offsets,
    list g's in slots [out[g], out[g + 1])."""
    extra = (starts.diff() - 1).clamp_(min=0) // chunk
    return torch.cat([extra.new_zeros(1), extra.cumsum(0)])


class _Backward:
    """Everything the backward kernels share for one call, one method per kernel."""

    def __init__(self, do, q, k, v, k_cmp, v_cmp, params: NSAParams, stats: "RowStats",
                 configs: Dict[str, KernelConfig]):
        self.q, self.k, self.v, self.do, self.params = q, k, v, do, params
        self.stats, self.configs = stats, configs
        self.B, self.H, self.T, self.G, _, self.common, _ = launch_geometry(q, k, v, None, params)
        del self.common["HAS_GATES"]  # the gates reach the kernels in stats.rows
        self.n_rows = stats.rows[0, 0].numel()
        # Gradients keep their input's strides (the op's fake promises empty_like).
        self.dq = torch.empty_like(q, dtype=torch.float32)
        self.dk = torch.empty_like(k, dtype=torch.float32)
        self.dv = torch.empty_like(v, dtype=torch.float32)
        # The window kernels add to dQ and dK/dV last: they store the sums in the input dtype.
        last = params.has_win
        self.dq_out = torch.empty_like(q) if last else self.dq
        self.dk_out = torch.empty_like(k) if last else self.dk
        self.dv_out = torch.empty_like(v) if last else self.dv
        self.dk_cmp = None if k_cmp is None else torch.zeros_like(k_cmp)
        self.dv_cmp = None if v_cmp is None else torch.empty_like(v_cmp)
        # (keys, values, key stride, key position offset, window, dK, dV) per branch; the
        # window's dK/dV are the fp32 sums (its kernel stores into dk_out/dv_out)
        self.dense_keys = {
            "compressed": (k_cmp, v_cmp, params.compress_stride, params.compress_block - 1, 0,
                           self.dk_cmp, self.dv_cmp),
            "window": (k, v, 1, 0, params.window, self.dk, self.dv)}
        self.wrote_dq = self.wrote_dkv = False

    @staticmethod
    def _kind(name: str, kernel: str) -> str:
        return {"compressed": "cmp", "window": "win"}[name] + "_" + kernel

    def _branch(self, name: str) -> Tensor:
        """A branch's per-row statistics for `_row_stats`: (3, B, H, T, G)."""
        return self.stats.rows[self.params.gate_slot(name)]

    def _rows(self, kind: str):
        """(config, G_PAD, BLOCK_T) for a kernel whose tiles are block_m query rows."""
        cfg = self.configs[kind]
        g_pad = _pow2(self.G)
        return cfg, g_pad, max(1, cfg.block_m // g_pad)

    def _strides(self, keys: Tensor, values: Tensor, dims: int = 4):
        """q's, the keys', the values' and dO's strides, of their first `dims` dimensions (the
        Gluon kernels take 3: the last is 1)."""
        return tuple(st for x in (self.q, keys, values, self.do) for st in x.stride()[:dims])

    def dense_dq(self, name: str) -> None:
        """dQ of the compressed or window branch."""
        keys, values, key_stride, key_last, window, _, _ = self.dense_keys[name]
        rows = self._branch(name)
        cfg, g_pad, block_t = self._rows(self._kind(name, "dq"))
        k_tiles, v_tiles, tma = tile_pair(keys, values, cfg.block_n)
        nsa_dense_bwd_dq_kernel[(cdiv(self.T, block_t), self.B * self.H)](
            self.q, keys, values, k_tiles, v_tiles, self.do, rows, self.dq,
            self.dq_out if name == "window" else self.dq, *self._strides(keys, values),
            *self.dq.stride(), self.T, keys.shape[2], self.n_rows, self.params.scale,
            G_PAD=g_pad, BLOCK_T=block_t, BLOCK_K=cfg.block_n, KEY_STRIDE=key_stride,
            KEY_LAST=key_last, WINDOW=window, ACCUMULATE=self.wrote_dq, TMA=tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **self.common)
        self.wrote_dq = True

    def dense_dkdv(self, name: str) -> None:
        """dK/dV (window: added to the selected branch's fp32 sums, stored in the input dtype)
        or dK_cmp/dV_cmp.

        The compressed keys are few and each is seen by every later query: their walk is cut
        into query chunks run by separate programs, whose fp32 partial sums are then added in
        chunk order (deterministic)."""
        keys, values, key_stride, key_last, window, dk, dv = self.dense_keys[name]
        n_keys = keys.shape[2]
        if n_keys:
            rows = self._branch(name)
            cfg, g_pad, block_t = self._rows(self._kind(name, "dkdv"))
            programs = cdiv(n_keys, cfg.block_n) * self.B * self.H
            splits = query_splits(self.T, programs, self.q.device) if name == "compressed" else 1
            q_chunk = cdiv(cdiv(self.T, splits), block_t) * block_t
            out_k, out_v = (self.dk_out, self.dv_out) if name == "window" else (dk, dv)
            if splits > 1:
                out_k = dk.new_empty(splits, *dk.shape, dtype=torch.float32)
                out_v = dv.new_empty(splits, *dv.shape, dtype=torch.float32)
            args = (self.T, n_keys, self.n_rows, q_chunk, dk.numel(), self.params.scale)
            # the outputs' strides: one chunk's of the split sums, else dK's/dV's
            k_strides = out_k[0].stride() if splits > 1 else dk.stride()
            v_strides = out_v[0].stride() if splits > 1 else dv.stride()
            grid = (cdiv(n_keys, cfg.block_n), self.B * self.H, splits)
            accumulate = name == "window" and self.wrote_dkv
            if cfg.num_warps == WS_WARPS:
                self._check_ws(cfg, self._kind(name, "dkdv"), keys=(keys, values))
                from ...templates import nsa_bwd_ws
                nsa_bwd_ws.nsa_dense_bwd_dkdv_ws_kernel[grid](
                    self.q, keys, values, self.do, rows, dk, dv, out_k, out_v,
                    *self._strides(keys, values, 3), *k_strides[:3], *v_strides[:3], *args,
                    H=self.H, G=self.G,
                    BLOCK_T=cfg.block_m // self.G, BLOCK_K=cfg.block_n, KEY_STRIDE=key_stride,
                    KEY_LAST=key_last, WINDOW=window, D=self.q.shape[-1], ACCUMULATE=accumulate,
                    STAGES=cfg.num_stages, CONSUMER_REGS=WS_CONSUMER_REGS,
                    LOADER_REGS=WS_LOADER_REGS, num_warps=4)
            else:
                q_tiles, do_tiles, tma = tile_pair(self.q, self.do, block_t, g_pad)
                nsa_dense_bwd_dkdv_kernel[grid](
                    self.q, keys, values, self.do, q_tiles, do_tiles, rows, dk, dv, out_k,
                    out_v, *self._strides(keys, values), *k_strides, *v_strides, *args,
                    G_PAD=g_pad,
                    BLOCK_T=block_t, BLOCK_K=cfg.block_n, KEY_STRIDE=key_stride,
                    KEY_LAST=key_last, WINDOW=window, ACCUMULATE=accumulate, TMA=tma,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **self.common)
            if splits > 1:
                dk.copy_(out_k.sum(0))
                dv.copy_(out_v.sum(0))
        self.wrote_dkv |= name == "window"

    def selected_dq(self, block_idx: Tensor) -> None:
        p, cfg = self.params, self.configs["slc_dq"]
        k_tiles, v_tiles, tma = tile_pair(self.k, self.v, p.select_block)
        nsa_slc_bwd_dq_kernel[(self.T, self.B * self.H)](
            self.q, self.k, self.v, k_tiles, v_tiles, self.do, block_idx,
            self._branch("selected"), self.dq, *self._strides(self.k, self.v),
            *self.dq.stride(), self.T, self.n_rows, p.scale, G_PAD=_pow2(self.G, 16),
            LP=p.select_block, N=p.select_count, N_PAD=block_idx.shape[-1],
            ACCUMULATE=self.wrote_dq, TMA=tma, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **self.common)
        self.wrote_dq = True

    def selected(self, block_idx: Tensor) -> None:
        """dQ and dK/dV of the selected branch. configs["slc_dq"].block_n picks how dQ is
        made: 0 — its own kernel, a program per position walking its n blocks; 1 — inside the
        block-centric dK/dV kernel (which computes the same dS), as a share per (query, slot)
        pair that a merge kernel sums, one chunk of positions at a time so the shares fit
        `inverted.PARTIAL_BUDGET`."""
        p = self.params
        fuse = bool(self.configs["slc_dq"].block_n)
        if not fuse:
            self.selected_dq(block_idx)
        B, H, T, n_pad = block_idx.shape
        DK = self.common["DK"]
        # the shares in the input dtype (as the forward's partial outputs): half the bytes of
        # fp32, twice the positions per chunk; the merge sums them in fp32
        elem = self.q.element_size()
        # (unfused there are no shares: one chunk)
        chunk = position_chunk(T, B * H * n_pad * self.G * DK * elem if fuse else 0)
        dq_part = self.q.new_empty(B * H * chunk * n_pad * self.G * DK) if fuse else None
        g_pad = _pow2(self.G)
        merge_t = max(1, MERGE_ROWS // g_pad)
        # every chunk's grid spans all blocks: the first writes each block's dK/dV
        n_blocks = num_selection_blocks(T, p.select_block)
        for t_lo in range(0, T, chunk):
            n_pos = min(chunk, T - t_lo)
            inv = invert_selection(block_idx[:, :, t_lo:t_lo + n_pos], n_blocks, t_lo)
            self.selected_dkdv(inv, n_pos, n_blocks, dq_part)
            if fuse:
                nsa_slc_bwd_dq_merge_kernel[(cdiv(n_pos, merge_t), B * H)](
                    block_idx, dq_part, self.dq, *self.dq.stride(), T, t_lo, n_pos, H=H,
                    G=self.G, G_PAD=g_pad, BLOCK_T=merge_t, N=p.select_count, N_PAD=n_pad,
                    DK=DK, DK_PAD=self.common["DK_PAD"], ACCUMULATE=self.wrote_dq,
                    num_warps=MERGE_DQ_WARPS)
        self.wrote_dq = True

    def selected_dkdv(self, inv: Inverted, n_pos: int, n_blocks: int,
                      dq_part: Optional[Tensor]) -> None:
        """dK/dV (and with dq_part the pairs' dQ shares) of the selected branch from the
        inverted selection of n_pos positions: lists in chunks of `list_chunk` entries, the
        chunks after a list's first summed into dK/dV in order by the reduce kernel
        (deterministic, no host sync)."""
        p = self.params
        cfg, g_pad, block_t = self._rows("slc_dkdv")
        entries = self.B * self.H * n_pos * min(p.select_count, n_blocks)
        chunk = list_chunk(entries, block_t, self.q.device)
        slots = partial_slots(inv.starts, chunk)
        n_slots = entries // chunk + 1  # >= slots[-1]: sum over lists of (len - 1) // chunk
        dk_part = self.dk.new_empty(n_slots, p.select_block, self.dk.shape[-1])
        dv_part = self.dv.new_empty(n_slots, p.select_block, self.dv.shape[-1])
        out_strides = (*self.dk.stride(), *self.dv.stride())
        grid = (cdiv(n_pos, chunk), self.B * self.H, n_blocks)
        if cfg.num_warps == WS_WARPS:
            self._selected_dkdv_ws(cfg, grid, inv, slots, dk_part, dv_part, chunk, dq_part)
        else:
            # the halved dQ shares: fused only, and from Dk = 32 on (as `nsa_configs._fits`
            # prunes)
            halves = dq_part is not None and cfg.block_n == 1 and self.common["DK"] >= 32
            nsa_slc_bwd_dkdv_kernel[grid](
                self.q, self.k, self.v, self.do, self._branch("selected"), inv.queries,
                inv.starts, inv.pairs, slots, self.dk, self.dv, dk_part, dv_part,
                self.dq if dq_part is None else dq_part, *self._strides(self.k, self.v),
                *out_strides, self.T, n_blocks, self.n_rows, chunk, p.scale, G_PAD=g_pad,
                BLOCK_T=block_t, LP=p.select_block, ACCUMULATE=self.wrote_dkv,
                FUSE_DQ=dq_part is not None, DQ_HALVES=halves, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **self.common)
        nsa_slc_bwd_reduce_kernel[(self.B * self.H, n_blocks)](
            dk_part, dv_part, slots, self.dk, self.dv, *out_strides, self.T, n_blocks, H=self.H,
            LP=p.select_block, DK=self.common["DK"], DK_PAD=self.common["DK_PAD"],
            DV=self.common["DV"], DV_PAD=self.common["DV_PAD"])
        self.wrote_dkv = True

    def _selected_dkdv_ws(self, cfg: KernelConfig, grid, inv: Inverted, slots: Tensor,
                          dk_part: Tensor, dv_part: Tensor, chunk: int,
                          dq_part: Optional[Tensor]) -> None:
        """selected_dkdv's kernel in its warp-specialised Gluon form (`templates.nsa_bwd_ws`;
        the fused dQ shares whole-width)."""
        self._check_ws(cfg, "slc_dkdv")
        from ...templates import nsa_bwd_ws
        fuse = dq_part is not None
        nsa_bwd_ws.nsa_slc_bwd_dkdv_ws_kernel[grid](
            self.q, self.k, self.v, self.do, self._branch("selected"), inv.queries, inv.starts,
            inv.pairs, slots, self.dk, self.dv, dk_part, dv_part,
            dq_part if fuse else self.dq, *self._strides(self.k, self.v, 3),
            *self.dk.stride()[:3], *self.dv.stride()[:3], self.T, grid[2], self.n_rows, chunk,
            self.params.scale, H=self.H, G=self.G, BLOCK_T=cfg.block_m // self.G,
            LP=self.params.select_block, D=self.q.shape[-1], ACCUMULATE=self.wrote_dkv,
            FUSE_DQ=fuse, STAGES=cfg.num_stages, CONSUMER_REGS=WS_CONSUMER_REGS,
            LOADER_REGS=WS_LOADER_REGS, num_warps=4)

    def _check_ws(self, cfg: KernelConfig, kind: str,
                  keys: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        keys = keys or (self.k, self.v)
        reason = warp_specialised_limits(self.q, *keys, self.do, cfg, kind,
                                         self.params.select_block)
        if reason:
            raise ValueError(f"{kind} config {cfg} asks for the warp-specialised dK/dV kernel "
                             f"(num_warps {WS_WARPS}), which {reason}; use a Triton config "
                             f"(num_warps 4 or 8)")


def warp_specialised_limits(q: Tensor, k: Tensor, v: Tensor, do: Tensor, cfg: KernelConfig,
                            kind: str, select_block: int = 64) -> Optional[str]:
    """None when `templates.nsa_bwd_ws` handles kind's ("slc_dkdv", "cmp_dkdv", "win_dkdv")
    dK/dV for these inputs and config cfg, else what it lacks (words to follow "the
    kernel"): a Hopper GPU, Dk == Dv in {64, 128}, 16-bit inputs, a power-of-two group of at
    most its tile's rows, row strides of 16-element multiples, its tile shape (for the
    selected branch: whole-width dQ shares, block_n 0), enough stages to hold the second
    consumer's sums, and for the selected branch 64-key selection blocks."""
    G = q.shape[1] // k.shape[1]
    strides = [st for x in (q, k, v, do) for st in x.stride()[:3]]
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "runs on Hopper (sm_90) GPUs only"
    from ...templates.nsa_bwd_ws import KEYS_PER_TILE, ROWS_PER_TILE
    checks = [
        (kind == "slc_dkdv" and cfg.block_n != 0,
         "forms the fused dQ shares whole-width only (slc_dkdv block_n 0)"),
        (kind == "slc_dkdv" and select_block != KEYS_PER_TILE,
         f"needs select_block {KEYS_PER_TILE} (one wgmma tile of keys)"),
        (q.shape[-1] != v.shape[-1] or q.shape[-1] not in (64, 128), "needs Dk == Dv in {64, 128}"),
        (q.element_size() != 2, "needs 16-bit inputs"),
        (G & (G - 1) or G > ROWS_PER_TILE, f"needs a power-of-two GQA group <= {ROWS_PER_TILE}"),
        (any(st % 16 for st in strides) or any(x.stride(-1) != 1 or x.data_ptr() % 16
                                               for x in (q, k, v, do)),
         "needs contiguous rows at 16-element multiples (cp.async of 16 bytes)"),
        (cfg.block_m != ROWS_PER_TILE or kind != "slc_dkdv" and cfg.block_n != KEYS_PER_TILE,
         f"takes block_m {ROWS_PER_TILE}" + ("" if kind == "slc_dkdv" else
                                             f" and block_n {KEYS_PER_TILE}")),
        (cfg.num_stages * ROWS_PER_TILE < 2 * KEYS_PER_TILE,
         f"needs num_stages >= {2 * KEYS_PER_TILE // ROWS_PER_TILE}"),
    ]
    return next((why for bad, why in checks if bad), None)


class RowStats(NamedTuple):
    """What every backward kernel reads per query row, from `row_stats`.

    rows: (n_branches, 3, B, H, T, G) fp32, per row of branch c: its lse in log2 units,
    D_c = rowsum(dO ∘ o_c) and its gate weight, each KV head's rows position-major
    (`nsa_bwd_rows_kernel`); dgates: the gates' gradient (D_c, shaped like the gates), None
    without learned gates."""

    rows: Tensor
    dgates: Optional[Tensor]


def row_stats(do: Tensor, branch_out: Tensor, lse: Tensor, gates: Optional[Tensor],
              params: NSAParams, kv_heads: int) -> RowStats:
    """do: (B, HQ, T, Dv); branch_out: (n_branches, B, HQ, T, Dv) and lse: (n_branches, B, HQ,
    T) as the forward saved them (made contiguous here when they are not)."""
    do, branch_out, lse = do.contiguous(), branch_out.contiguous(), lse.contiguous()
    nb = branch_out.shape[0]
    B, HQ, T, DV = do.shape
    n_rows = B * HQ * T
    rows = do.new_empty(nb, 3, B, kv_heads, T, HQ // kv_heads, dtype=torch.float32)
    dgates = None if gates is None else torch.empty_like(gates)
    fixed = params.gate_weights
    nsa_bwd_rows_kernel[(cdiv(n_rows, ROWS_BLOCK),)](
        do, branch_out, lse, gates, dgates, rows, n_rows, T,
        *(gates.stride() if gates is not None else (0, 0, 0, 0)),
        *(dgates.stride() if dgates is not None else (0, 0, 0, 0)), *(fixed + [0.0] * (3 - nb)),
        NB=nb, H=kv_heads, G=HQ // kv_heads, DV=DV, DV_PAD=_pow2(DV, 16),
        HAS_GATES=gates is not None, BLOCK=ROWS_BLOCK)
    return RowStats(rows, dgates)


def nsa_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor],
                 k_cmp: Optional[Tensor], v_cmp: Optional[Tensor], params: NSAParams,
                 branch_out: Tensor, lse: Tensor, block_idx: Optional[Tensor],
                 configs: Optional[Dict[str, KernelConfig]] = None,
                 stats: Optional[RowStats] = None) -> Tuple[Optional[Tensor], ...]:
    """Gradients (dq, dk, dv, dgates, dk_cmp, dv_cmp) like `naive.nsa_attention_backward_ref`.

    do: (B, HQ, T, Dv); branch_out: (n_branches, B, HQ, T, Dv) and lse: (n_branches, B, HQ, T)
    per present branch from the forward; block_idx: (B, H, T, N_PAD) when the selected branch
    runs. configs maps the backward kinds ("cmp_dq", …) to block sizes (missing ones:
    DEFAULTS); stats: `row_stats` when already computed."""
    configs = {**DEFAULTS, **(configs or {})}
    p = params
    do = do.contiguous()
    if stats is None:
        stats = row_stats(do, branch_out, lse, gates, p, k.shape[1])
    run = _Backward(do, q, k, v, k_cmp, v_cmp, p, stats, configs)
    if p.has_cmp:
        run.dense_dq("compressed")
        run.dense_dkdv("compressed")
    if p.has_slc:
        run.selected(block_idx)
    if p.has_win:
        run.dense_dq("window")
        run.dense_dkdv("window")
    if not run.wrote_dkv:
        run.dk.zero_()
        run.dv.zero_()
    return (run.dq_out.to(q.dtype), run.dk_out.to(k.dtype), run.dv_out.to(v.dtype),
            stats.dgates, run.dk_cmp, run.dv_cmp)


def tuned_configs(do: Tensor, q: Tensor, k: Tensor, v: Tensor, k_cmp: Optional[Tensor],
                  v_cmp: Optional[Tensor], params: NSAParams, stats: RowStats,
                  block_idx: Optional[Tensor]) -> Dict[str, KernelConfig]:
    """Block sizes per backward kernel from the autotune cache, tuning missing entries (each
    kernel timed alone on these inputs) when allowed."""
    from triton.testing import do_bench

    name = torch.cuda.get_device_name(q.device)
    steps = {
        "cmp_dq": lambda run: run.dense_dq("compressed"),
        "cmp_dkdv": lambda run: run.dense_dkdv("compressed"),
        "win_dq": lambda run: run.dense_dq("window"),
        "win_dkdv": lambda run: run.dense_dkdv("window"),
        # the selected dQ may be fused into dK/dV: both kinds time the whole branch
        "slc_dq": lambda run: run.selected(block_idx),
        "slc_dkdv": lambda run: run.selected(block_idx),
    }
    chosen: Dict[str, KernelConfig] = {}
    elem, HQ, H = q.element_size(), q.shape[1], k.shape[1]
    space = lambda kind: candidates(kind, _pow2(HQ // H), q.shape[-1], v.shape[-1], elem)

    def time_config(kind: str, cfg: KernelConfig, others: Dict[str, KernelConfig]) -> float:
        run = _Backward(do, q, k, v, k_cmp, v_cmp, params, stats,
                        {**DEFAULTS, **chosen, **others, kind: cfg})
        return do_bench(lambda: steps[kind](run), warmup=5, rep=20, return_mode="median")

    def bench(kind: str):
        if kind != "slc_dkdv":
            return lambda cfg: time_config(kind, cfg, {})
        # Each dK/dV candidate is timed with the selected dQ made both ways (its own kernel,
        # fused into dK/dV) and keeps the faster: fused, the kernel does more per step and
        # wants other block sizes. slc_dq, tuned after it, then picks the way. The halved
        # dQ shares (block_n 1) exist only fused.
        ways = [DEFAULTS["slc_dq"], next(c for c in space("slc_dq") if c.block_n)]
        return lambda cfg: min(time_config(kind, cfg, {"slc_dq": dq})
                               for dq in (ways[1:] if cfg.block_n else ways))

    keys = shape_keys(q, k, v, params, backward=True)
    for kind in sorted(keys, key=lambda kind: kind == "slc_dq"):  # slc_dq after slc_dkdv
        chosen[kind] = autotune.pick(name, kind, keys[kind], lambda: space(kind), bench(kind))
    return chosen


def nsa_bwd_cuda(do, q, k, v, gates, k_cmp, v_cmp, params: NSAParams, branch_out: Tensor,
                 lse: Tensor, block_idx: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """CUDA kernel of nsa_compile::nsa_bwd when the forward saved its residuals: block sizes
    from the autotune cache."""
    do = do.contiguous()
    stats = row_stats(do, branch_out, lse, gates, params, k.shape[1])
    configs = tuned_configs(do, q, k, v, k_cmp, v_cmp, params, stats, block_idx)
    return nsa_backward(do, q, k, v, gates, k_cmp, v_cmp, params, branch_out, lse, block_idx,
                        configs, stats=stats)
