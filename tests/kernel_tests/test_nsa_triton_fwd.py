"""The Triton NSA forward kernels in the CPU interpreter (fp32/fp16) against the reference."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams

import nsa_reference as ref

triton = pytest.importorskip("triton")

# Small tiles keep the interpreter fast; the GPU uses the tuned ones.
SMALL, SMALL_NSA = ref.SMALL, ref.SMALL_NSA

CASES = {
    "all-learned-T37-G2": (1, 4, 2, 37, 16, 16, NSAConfig(**SMALL_NSA), torch.float32),
    "all-learned-T1": (1, 4, 2, 1, 16, 16, NSAConfig(**SMALL_NSA), torch.float32),
    "all-T15-fp16": (1, 4, 1, 15, 16, 16, NSAConfig(**SMALL_NSA), torch.float16),
    "dk-ne-dv-B2-G1-T63": (2, 2, 2, 63, 16, 32, NSAConfig(**SMALL_NSA), torch.float32),
    "fixed-G3-T50-n3": (1, 3, 1, 50, 16, 16, NSAConfig(
        compress_block=16, compress_stride=8, select_block=32, select_count=3, window=20,
        gate=(0.5, 1.0, 0.25)), torch.float32),
    "selected-window-unbounded-T40": (1, 4, 1, 40, 16, 16, NSAConfig(
        **{**SMALL_NSA, "window": None}, branches=("selected", "window"), gate=(1.0, 1.0)),
        torch.float32),
    "compressed-only-T111": (1, 2, 1, 111, 16, 16, NSAConfig(
        **SMALL_NSA, branches=("compressed",), gate=(1.0,)), torch.float32),
    # long enough for compressed-key tiles every query of a tile sees (the unmasked loop)
    "compressed-only-T300-G1": (1, 2, 2, 300, 16, 16, NSAConfig(
        **SMALL_NSA, branches=("compressed",), gate=(1.0,)), torch.float32),
    # 13 selection blocks, 6 chosen: blocks beyond the forced ones at most positions
    "all-learned-T200-n6": (1, 4, 2, 200, 16, 16, NSAConfig(**{**SMALL_NSA, "select_count": 6}),
                            torch.float32),
    # no initial block: the forced ones are the local ones alone
    "local-only-T150-n5": (1, 4, 2, 150, 16, 16, NSAConfig(
        **{**SMALL_NSA, "select_count": 5, "select_initial": 0, "select_local": 3}),
        torch.float32),
    "window-only-T63": (1, 8, 2, 63, 32, 16, NSAConfig(
        **SMALL_NSA, branches=("window",), gate=(0.7,)), torch.float16),
}


def _run(B, HQ, H, T, DK, DV, cfg, dtype, transposed=False, configs=SMALL, save=False):
    from nsa_compile.kernels.nsa.triton_fwd import nsa_forward
    if transposed:  # (B, T, H, D) storage seen through SDPA's layout: non-contiguous strides
        q = torch.randn(B, T, HQ, DK, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, T, H, DK, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, T, H, DV, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, HQ, T, DK, dtype=dtype)
        k = torch.randn(B, H, T, DK, dtype=dtype)
        v = torch.randn(B, H, T, DV, dtype=dtype)
    gates = torch.rand(B, HQ, T, len(cfg.branches), dtype=dtype) if cfg.gate == "learned" else None
    p = NSAParams.from_config(cfg, DK ** -0.5)
    kc = naive.mean_pool(k, cfg.compress_block, cfg.compress_stride) if p.needs_cmp else None
    vc = naive.mean_pool(v, cfg.compress_block, cfg.compress_stride) if p.has_cmp else None
    res = nsa_forward(q, k, v, gates, kc, vc, p, configs, save=save)
    return q, k, v, gates, kc, vc, p, res


def _check(q, k, v, gates, kc, vc, p, res, tol):
    dd = lambda x: None if x is None else x.double()
    if p.has_slc:
        # The kernel's blocks must carry the reference's top-n importance ...
        n = min(p.select_count, -(-q.shape[2] // p.select_block))
        idx = res.block_idx[..., :n]
        imp = ref.importance(q, kc, p)
        want = imp.sort(-1, descending=True).values[..., :n]
        got = torch.gather(imp, -1, idx.long().clamp_min(0))
        got = torch.where(idx >= 0, got, -torch.inf).sort(-1, descending=True).values
        assert torch.equal(got.isinf(), want.isinf())
        fin = want.isfinite()
        assert torch.allclose(got[fin], want[fin], rtol=tol, atol=tol)
        # ... and the output is the reference's for those blocks.
        rest = p._replace(has_slc=False)
        g = dd(gates)
        slot = p.gate_slot("selected")
        w = g[..., slot:slot + 1] if g is not None else p.fixed_gates[slot]
        others = [i for i in range(p.num_branches) if i != slot]
        o_ref = ref.selected_output(q, k, v, idx, p) * w
        if rest.num_branches:
            rest = rest._replace(fixed_gates=tuple(p.fixed_gates[i] for i in others)
                                 if p.fixed_gates else ())
            o_ref = o_ref + naive.nsa_attention_ref(
                dd(q), dd(k), dd(v), None if g is None else g[..., others], dd(kc), dd(vc), rest)
    else:
        o_ref = naive.nsa_attention_ref(dd(q), dd(k), dd(v), dd(gates), dd(kc), dd(vc), p)
    err = ((res.o.double() - o_ref).norm() / o_ref.norm().clamp_min(1e-30)).item()
    assert err < tol, err


@pytest.mark.parametrize("name", list(CASES))
def test_triton_forward_matches_reference(name):
    B, HQ, H, T, DK, DV, cfg, dtype = CASES[name]
    out = _run(B, HQ, H, T, DK, DV, cfg, dtype)
    assert not out[-1].o.isnan().any()
    _check(*out, tol=1e-5 if dtype == torch.float32 else 2e-3)


def test_triton_forward_strided_inputs():
    out = _run(1, 4, 2, 40, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, transposed=True)
    _check(*out, tol=1e-5)


@pytest.mark.parametrize("name", ["all-learned-T37-G2", "compressed-only-T300-G1"])
def test_triton_forward_pointer_loads(name, monkeypatch):
    """Without tensor descriptors (GPUs before Hopper, layouts TMA cannot read) the kernels
    load key tiles through pointers."""
    from nsa_compile.kernels.nsa.triton_fwd import tiles
    monkeypatch.setenv("NSA_COMPILE_TMA", "0")
    B, HQ, H, T, DK, DV, cfg, dtype = CASES[name]
    out = _run(B, HQ, H, T, DK, DV, cfg, dtype)
    assert tiles(out[1], 16) == (out[1], False)
    _check(*out, tol=1e-5)


def test_tiles_take_a_descriptor_only_where_tma_can_read():
    from nsa_compile.kernels.nsa.triton_fwd import tiles
    x = torch.randn(2, 3, 40, 16)
    src, tma = tiles(x, 16, heads=2)
    assert tma and src.block_shape == [1, 2, 16, 16] and list(src.shape) == [2, 3, 40, 16]
    assert tiles(torch.randn(2, 40, 3, 16).transpose(1, 2), 16)[1]  # (B, T, H, D) storage
    assert not tiles(torch.randn(2, 3, 40, 24), 16)[1]  # D not a power of two
    assert not tiles(torch.randn(2, 3, 16, 40).transpose(2, 3), 16)[1]  # D not contiguous
    assert not tiles(torch.randn(2 * 3 * 40 * 16 + 1)[1:].view(2, 3, 40, 16), 16)[1]  # unaligned
    assert not tiles(torch.randn(1, 3, 40, 16), 512)[1]  # a block TMA cannot copy
    assert not tiles(x[:, :, :0], 16)[1]


def test_triton_lse_is_inf_where_no_compressed_block_is_visible():
    *_, p, res = _run(1, 2, 1, 20, 16, 16, NSAConfig(**SMALL_NSA), torch.float32)
    # Block 0 covers keys 0..15: visible from t = 15 on.
    assert torch.isinf(res.lse_cmp[..., :15]).all()
    assert torch.isfinite(res.lse_cmp[..., 15:]).all()



@pytest.mark.parametrize("rows,nj,n", [(16, 4, 4), (16, 8, 3), (16, 16, 5), (64, 8, 4)])
def test_triton_selection_merges_chunks_of_blocks(rows, nj, n):
    """The running top-n across chunks of nj selection blocks (13 blocks at T=200): chunks of
    exactly n_pad blocks (sorted whole) and of more (their top-n first), n below n_pad; 64
    rows = 32 positions, where the group is summed before the importance MMA."""
    from nsa_compile.templates.nsa_configs import KernelConfig
    cfg = NSAConfig(**{**SMALL_NSA, "select_count": n})
    out = _run(1, 4, 2, 200, 16, 16, cfg, torch.float32,
               configs={**SMALL, "sel": KernelConfig(rows, nj, 4, 1)})
    _check(*out, tol=1e-5)
    idx = out[-1].block_idx
    # best first: the forced blocks (+inf) lead, in index order
    assert (idx[..., 0][..., 16:] == 0).all()

# The selected branch block by block (the queries that chose each block, then a merge pass).
BLOCKS = {**SMALL, "slc": ref.SMALL_BLOCKS["slc"]}


@pytest.mark.parametrize("name", ["all-learned-T37-G2", "all-T15-fp16", "dk-ne-dv-B2-G1-T63",
                                  "fixed-G3-T50-n3", "selected-window-unbounded-T40",
                                  "all-learned-T200-n6"])
def test_triton_forward_selected_block_by_block(name):
    B, HQ, H, T, DK, DV, cfg, dtype = CASES[name]
    out = _run(B, HQ, H, T, DK, DV, cfg, dtype, configs=BLOCKS)
    assert not out[-1].o.isnan().any()
    _check(*out, tol=1e-5 if dtype == torch.float32 else 2e-3)


def test_triton_forward_selected_block_by_block_in_position_chunks(monkeypatch):
    """Partial results over budget: the positions run in chunks of 16 (on the GPU when
    B·H·T·n·G·(Dv·elem + 4) bytes pass 1.25 GiB)."""
    chunks = ref.record_position_chunks(monkeypatch, "triton_fwd")
    out = _run(1, 4, 2, 50, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, configs=BLOCKS)
    assert chunks == [0, 16, 32, 48]
    _check(*out, tol=1e-5)


@pytest.mark.parametrize("order", ["per-position", "block-by-block"])
@pytest.mark.parametrize("name", ["all-learned-T37-G2", "all-T15-fp16", "fixed-G3-T50-n3",
                                  "selected-window-unbounded-T40", "all-learned-T200-n6",
                                  "local-only-T150-n5"])
def test_triton_forward_window_kernel_finishes_the_selected_branch(name, order):
    """Beside a window branch, the forced blocks are the window kernel's: the selected
    branch's saved output and lse (what the backward reads) are still the whole branch's."""
    from nsa_compile.kernels.nsa.triton_fwd import folds
    B, HQ, H, T, DK, DV, cfg, dtype = CASES[name]
    configs = BLOCKS if order == "block-by-block" else SMALL
    q, k, v, gates, kc, vc, p, res = _run(B, HQ, H, T, DK, DV, cfg, dtype, configs=configs,
                                          save=True)
    assert folds(p)
    n = min(p.select_count, -(-T // p.select_block))
    o_ref, lse_ref = ref.selected_output(q, k, v, res.block_idx[..., :n], p, with_lse=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    o_slc = res.branch_out[p.gate_slot("selected")].double()
    assert ((o_slc - o_ref).norm() / o_ref.norm()).item() < tol
    torch.testing.assert_close(res.lse_slc.double(), lse_ref, rtol=tol, atol=tol)
