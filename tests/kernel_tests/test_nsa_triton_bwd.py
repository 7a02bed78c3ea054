"""The Triton NSA backward kernels in the CPU interpreter (fp32/fp16) against the fp64 reference
gradients given the forward kernel's block choice."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.templates.nsa_configs import KernelConfig

import nsa_reference as ref

triton = pytest.importorskip("triton")

SMALL, SMALL_NSA = ref.SMALL, ref.SMALL_NSA

CASES = {
    "all-learned-T37-G2": (1, 4, 2, 37, 16, 16, NSAConfig(**SMALL_NSA), torch.float32),
    "all-learned-T1": (1, 4, 2, 1, 16, 16, NSAConfig(**SMALL_NSA), torch.float32),
    "all-learned-T15-fp16": (1, 4, 1, 15, 16, 16, NSAConfig(**SMALL_NSA), torch.float16),
    "fixed-dk-ne-dv-B2-G1-T63": (2, 2, 2, 63, 16, 32, NSAConfig(
        **SMALL_NSA, gate=(0.5, 1.0, 0.25)), torch.float32),
    "all-learned-G3-T50-n3-fp16": (1, 3, 1, 50, 16, 16, NSAConfig(
        compress_block=16, compress_stride=8, select_block=32, select_count=3, window=20),
        torch.float16),
    "selected-window-unbounded-T40": (1, 4, 1, 40, 16, 16, NSAConfig(
        **{**SMALL_NSA, "window": None}, branches=("selected", "window"), gate=(1.0, 1.0)),
        torch.float32),
    "selected-only-G8-T70": (1, 8, 1, 70, 16, 16, NSAConfig(
        **SMALL_NSA, branches=("selected",), gate=(1.0,)), torch.float32),
    "compressed-only-T111": (1, 2, 1, 111, 16, 16, NSAConfig(
        **SMALL_NSA, branches=("compressed",), gate=(0.7,)), torch.float32),
    "window-only-learned-T63": (1, 8, 2, 63, 32, 16, NSAConfig(
        **SMALL_NSA, branches=("window",)), torch.float16),
    "dk48-learned-T37-G2": (1, 4, 2, 37, 48, 16, NSAConfig(**SMALL_NSA), torch.float32),
    "dk48-learned-T30-G4-fp16": (1, 4, 1, 30, 48, 32, NSAConfig(**SMALL_NSA), torch.float16),
}


def _inputs(B, HQ, H, T, DK, DV, cfg, dtype, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    if transposed:  # (B, T, heads, D) storage seen in SDPA's layout, as HF models pass it
        tr = lambda b, h, t, d: rand(b, t, h, d).transpose(1, 2)
        q, k, v = tr(B, HQ, T, DK), tr(B, H, T, DK), tr(B, H, T, DV)
    else:
        q, k, v = rand(B, HQ, T, DK), rand(B, H, T, DK), rand(B, H, T, DV)
    gates = None
    if cfg.gate == "learned":
        gates = torch.rand(B, T, HQ, len(cfg.branches), generator=gen).to(dtype)
        gates = gates.transpose(1, 2) if transposed else gates.transpose(1, 2).contiguous()
    p = NSAParams.from_config(cfg, DK ** -0.5)
    kc = naive.mean_pool(k, cfg.compress_block, cfg.compress_stride) if p.needs_cmp else None
    vc = naive.mean_pool(v, cfg.compress_block, cfg.compress_stride) if p.has_cmp else None
    do = rand(B, HQ, T, DV)
    return q, k, v, gates, kc, vc, p, do


def _forward_backward(q, k, v, gates, kc, vc, p, do, configs=SMALL):
    from nsa_compile.kernels.nsa.triton_bwd import nsa_backward
    from nsa_compile.kernels.nsa.triton_fwd import nsa_forward
    res = nsa_forward(q, k, v, gates, kc, vc, p, configs, save=True)
    return res, nsa_backward(do, q, k, v, gates, kc, vc, p, res.branch_out, res.branch_lse(),
                             res.block_idx, configs)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_backward_matches_reference(name, transposed=False, configs=SMALL):
    *shape, cfg, dtype = CASES[name]
    q, k, v, gates, kc, vc, p, do = _inputs(*shape, cfg, dtype, transposed=transposed)
    res, got = _forward_backward(q, k, v, gates, kc, vc, p, do, configs)
    idx = None if res.block_idx is None else res.block_idx[..., :p.select_count]
    want = ref.gradients(do, q, k, v, gates, kc, vc, p, idx)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    for name, g, w, x in zip(("dq", "dk", "dv", "dgates", "dk_cmp", "dv_cmp"), got, want,
                             (q, k, v, gates, kc, vc)):
        if x is None:
            assert g is None, name
            continue
        assert g.shape == x.shape and g.dtype == x.dtype and g.stride() == x.stride(), name
        assert not g.isnan().any(), name
        if w.numel():
            # relative error, with an absolute floor: a gradient that is zero in exact
            # arithmetic (one visible key: dS = P(dP - D) = 0) is rounding noise here
            err = ((g.double() - w).norm() / w.norm().clamp_min(w.numel() ** 0.5)).item()
            assert err < tol, (name, err)


@pytest.mark.parametrize("order", ["per-position", "block-by-block"])
def test_triton_forward_and_backward_of_an_empty_sequence(order):
    """T = 0 (SDPA accepts it): empty outputs and gradients, whichever loop order."""
    configs = SMALL if order == "per-position" else {**SMALL, **ref.SMALL_BLOCKS}
    q, k, v, gates, kc, vc, p, do = _inputs(1, 4, 2, 0, 16, 16, NSAConfig(**SMALL_NSA),
                                            torch.float32)
    res, got = _forward_backward(q, k, v, gates, kc, vc, p, do, configs)
    assert res.o.shape == (1, 4, 0, 16)
    for g, x in zip(got, (q, k, v, gates, kc, vc)):
        assert g.shape == x.shape


@pytest.mark.parametrize("name", ["compressed-only-T111", "all-learned-G3-T50-n3-fp16"])
def test_triton_backward_split_compressed_walk(name, monkeypatch):
    """The compressed dK/dV walk cut into query chunks (on the GPU from 1024 queries on)."""
    from nsa_compile.kernels.nsa import triton_bwd
    monkeypatch.setattr(triton_bwd, "MIN_SPLIT_QUERIES", 16)
    assert triton_bwd.query_splits(111, 1, torch.device("cpu")) == 6
    test_triton_backward_matches_reference(name)


@pytest.mark.parametrize("name", ["selected-only-G8-T70", "all-learned-T37-G2"])
def test_triton_backward_split_selection_lists(name, monkeypatch):
    """Long inverted-selection lists cut into chunks whose partial dK/dV the reduce kernel adds
    (on the GPU from 512 entries on)."""
    from nsa_compile.kernels.nsa import inverted, triton_bwd
    monkeypatch.setattr(inverted, "MIN_LIST_CHUNK", 4)
    monkeypatch.setattr(inverted, "MAX_LIST_CHUNK", 4)
    slots = []
    partial_slots = triton_bwd.partial_slots
    monkeypatch.setattr(triton_bwd, "partial_slots",
                        lambda *a: slots.append(partial_slots(*a)) or slots[-1])
    test_triton_backward_matches_reference(name)
    assert slots and slots[-1][-1] > 0  # some lists did run in several chunks


def test_partial_slots_count_the_chunks_after_each_lists_first():
    from nsa_compile.kernels.nsa.inverted import list_chunk
    from nsa_compile.kernels.nsa.triton_bwd import partial_slots
    starts = torch.tensor([0, 10, 10, 13, 17])  # lists of 10, 0, 3 and 4 entries
    assert partial_slots(starts, 4).tolist() == [0, 2, 2, 2, 2]
    assert list_chunk(10 ** 6, 12, torch.device("cpu")) % 12 == 0


@pytest.mark.parametrize("name", ["all-learned-T37-G2", "all-learned-G3-T50-n3-fp16"])
def test_triton_backward_pointer_loads(name, monkeypatch):
    """Without tensor descriptors (GPUs before Hopper, layouts TMA cannot read)."""
    monkeypatch.setenv("NSA_COMPILE_TMA", "0")
    test_triton_backward_matches_reference(name)


def test_triton_backward_strided_inputs_and_gradients():
    """Non-contiguous q/k/v/gates: read through their strides, gradients in the same strides."""
    test_triton_backward_matches_reference("all-learned-T37-G2", transposed=True)


def test_triton_backward_is_deterministic():
    args = _inputs(1, 4, 2, 45, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, seed=3)
    _, first = _forward_backward(*args)
    _, second = _forward_backward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_invert_selection_lists_each_blocks_queries_in_order():
    from nsa_compile.kernels.nsa.inverted import invert_selection
    # B=1, H=2, T=3, N_PAD=2 over 3 blocks; -1 = no block
    idx = torch.tensor([[[[0, -1], [0, 1], [1, 2]],
                         [[2, 0], [-1, -1], [0, 2]]]], dtype=torch.int32)
    queries, starts, pairs = invert_selection(idx, 3)
    lists = [queries[starts[g]:starts[g + 1]].tolist() for g in range(6)]
    assert lists == [[0, 1], [1, 2], [2], [0, 2], [], [0, 2]]
    # each entry's (query, slot) pair, as a flat index into idx
    flat = idx.flatten()
    for g in range(6):
        for e in range(starts[g], starts[g + 1]):
            assert flat[pairs[e]] == g % 3 and pairs[e] // 2 % 3 == queries[e]
    # the selection of positions [5, 8): same lists, absolute positions
    shifted = invert_selection(idx, 3, t0=5)
    assert torch.equal(shifted.queries, queries + 5) and torch.equal(shifted.pairs, pairs)


def test_position_chunks_are_few_equal_and_within_budget(monkeypatch):
    from nsa_compile.kernels.nsa import inverted
    monkeypatch.setattr(inverted, "PARTIAL_BUDGET", 100)
    monkeypatch.setattr(inverted, "MIN_POSITION_CHUNK", 4)
    assert inverted.position_chunk(100, 1) == 100  # all fit: one chunk
    assert inverted.position_chunk(0, 1) == 1
    assert inverted.position_chunk(130, 1) == 68  # two chunks (68 + 62), not 100 + 30
    assert inverted.position_chunk(130, 2) == 44  # budget 50 positions: three chunks
    assert inverted.position_chunk(10, 1000) == 4  # nothing fits: the smallest chunk


def test_invert_selection_can_leave_out_the_forced_blocks():
    """With skip_forced = (l', initial, local) each position's forced blocks are not listed
    (the forward's window kernel attends to them)."""
    from nsa_compile.kernels.nsa.inverted import invert_selection
    # l' = 2, 1 initial, 1 local: position t's forced blocks are 0 and t // 2
    idx = torch.tensor([[[[0, -1, -1], [0, -1, -1], [0, 1, -1], [0, 1, -1], [0, 2, 1],
                          [0, 2, 1]]]], dtype=torch.int32)
    inv = invert_selection(idx, 3, skip_forced=(2, 1, 1))
    lists = [inv.queries[inv.starts[g]:inv.starts[g + 1]].tolist() for g in range(3)]
    assert lists == [[], [4, 5], []]
    # positions [2, 6): t // 2 from the absolute position
    late = invert_selection(idx[:, :, 2:], 3, t0=2, skip_forced=(2, 1, 1))
    assert [late.queries[late.starts[g]:late.starts[g + 1]].tolist()
            for g in range(3)] == [[], [4, 5], []]


@pytest.mark.parametrize("name", ["all-learned-T37-G2", "fixed-dk-ne-dv-B2-G1-T63",
                                  "all-learned-G3-T50-n3-fp16", "selected-only-G8-T70"])
def test_triton_backward_selected_dq_fused_into_dkdv(name):
    """dQ of the selected branch as per-(query, slot) shares of the block-centric dK/dV
    kernel, summed by the merge kernel (with the block-by-block forward)."""
    test_triton_backward_matches_reference(name, configs={**SMALL, **ref.SMALL_BLOCKS})


@pytest.mark.parametrize("name", ["dk48-learned-T37-G2", "dk48-learned-T30-G4-fp16"])
def test_triton_backward_fused_dq_in_halves_of_dk(name):
    """The fused dQ shares as two products over K's column halves (slc_dkdv block_n 1): Dk
    = 48 pads to 64, so the second half has 16 live columns of 32."""
    test_triton_backward_matches_reference(name, configs={
        **SMALL, **ref.SMALL_BLOCKS, "slc_dkdv": KernelConfig(16, 1, 4, 1)})


def test_triton_backward_fused_dq_in_position_chunks(monkeypatch):
    """dQ shares over budget: chunks of 16 positions (on the GPU when B·H·T·n·G·Dk·elem bytes
    pass 1.25 GiB)."""
    chunks = ref.record_position_chunks(monkeypatch, "triton_bwd")
    test_triton_backward_matches_reference("selected-only-G8-T70",
                                           configs={**SMALL, **ref.SMALL_BLOCKS})
    assert chunks == [0, 16, 32, 48, 64]


def test_triton_backward_fused_dq_is_deterministic():
    args = _inputs(1, 4, 2, 45, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, seed=3)
    configs = {**SMALL, **ref.SMALL_BLOCKS}
    _, first = _forward_backward(*args, configs=configs)
    _, second = _forward_backward(*args, configs=configs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_warp_specialised_dkdv_off_hopper_says_why():
    """A dK/dV config with num_warps 12 asks for the Gluon kernels (no interpreter, sm_90
    only): elsewhere a ValueError naming the kind, the limit and the configs that work."""
    args = _inputs(1, 4, 2, 37, 16, 16, NSAConfig(**SMALL_NSA), torch.float32)
    for kind, cfg in (("slc_dkdv", KernelConfig(32, 0, 12, 4)),
                      ("win_dkdv", KernelConfig(32, 64, 12, 4))):
        with pytest.raises(ValueError, match=rf"{kind} .* warp-specialised .* Hopper .*"
                                             r"num_warps 4 or 8"):
            _forward_backward(*args, configs={**SMALL, kind: cfg})


def test_warp_specialised_limits_name_each_unmet_need(monkeypatch):
    """With a Hopper GPU assumed, each input or config the Gluon kernels cannot take has its
    reason."""
    from nsa_compile.kernels.nsa import triton_bwd
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    ws, dense = KernelConfig(32, 0, 12, 4), KernelConfig(32, 64, 12, 4)

    def limits(HQ=16, H=1, D=128, DV=128, dtype=torch.bfloat16, cfg=ws, kind="slc_dkdv",
               select_block=64):
        q = torch.empty(1, HQ, 64, D, dtype=dtype, device="meta")
        k = torch.empty(1, H, 64, D, dtype=dtype, device="meta")
        v = torch.empty(1, H, 64, DV, dtype=dtype, device="meta")
        with monkeypatch.context() as m:  # meta tensors standing in for CUDA ones
            m.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
            m.setattr(torch.Tensor, "data_ptr", lambda self: 0)
            return triton_bwd.warp_specialised_limits(q, k, v, q, cfg, kind, select_block)

    assert limits() is None
    assert limits(cfg=dense, kind="cmp_dkdv", select_block=16) is None
    assert "whole-width" in limits(cfg=KernelConfig(32, 1, 12, 4))
    assert "select_block 64" in limits(select_block=32)
    assert "Dk == Dv" in limits(DV=64)
    assert "Dk == Dv" in limits(D=256, DV=256)
    assert "16-bit" in limits(dtype=torch.float32)
    assert "power-of-two" in limits(HQ=12, H=1)
    assert "block_m 32" in limits(cfg=KernelConfig(64, 0, 12, 4))
    assert "block_n 64" in limits(cfg=KernelConfig(32, 128, 12, 4), kind="win_dkdv")
    assert "num_stages >= 4" in limits(cfg=KernelConfig(32, 0, 12, 2))
