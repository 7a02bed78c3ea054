"""The Triton NSA decoding kernels in the CPU interpreter (fp32/fp16) against the fp64 reference:
the last Tq queries of a sequence over its whole KV cache."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams

import nsa_reference as ref

triton = pytest.importorskip("triton")

SMALL_NSA = ref.SMALL_NSA

# (B, HQ, H, T, Tq, DK, DV, config, dtype, split): split = compressed keys per split (None:
# the launcher's choice; 64 with T >= 600 gives several splits).
CASES = {
    "all-learned-T37-G2": (1, 4, 2, 37, 1, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, None),
    "all-T700-G3-splits-Tq3": (1, 3, 1, 700, 3, 16, 16, NSAConfig(**SMALL_NSA), torch.float32,
                               64),
    "all-T300-n6-B2-dk-ne-dv": (2, 4, 2, 300, 2, 16, 32, NSAConfig(
        **{**SMALL_NSA, "select_count": 6}), torch.float32, None),
    "all-T129-fp16-G8": (1, 8, 1, 129, 1, 32, 32, NSAConfig(**SMALL_NSA), torch.float16, None),
    "fixed-T50-Tq4": (1, 2, 1, 50, 4, 16, 16, NSAConfig(
        compress_block=16, compress_stride=8, select_block=32, select_count=3, window=20,
        gate=(0.5, 1.0, 0.25)), torch.float32, None),
    "local-only-T150-n5": (1, 4, 2, 150, 1, 16, 16, NSAConfig(
        **{**SMALL_NSA, "select_count": 5, "select_initial": 0, "select_local": 3}),
        torch.float32, None),
    "selected-window-unbounded-T40": (1, 2, 1, 40, 2, 16, 16, NSAConfig(
        **{**SMALL_NSA, "window": None}, branches=("selected", "window"), gate=(1.0, 1.0)),
        torch.float32, None),
    "compressed-only-T111": (1, 2, 1, 111, 1, 16, 16, NSAConfig(
        **SMALL_NSA, branches=("compressed",), gate=(1.0,)), torch.float32, None),
    "window-only-T63": (1, 4, 2, 63, 2, 16, 16, NSAConfig(
        **SMALL_NSA, branches=("window",), gate=(0.7,)), torch.float32, None),
    # fewer keys than one compressed block: the compressed branch sees nothing
    "all-T10-Tq3": (1, 2, 1, 10, 3, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, None),
    # every position of the sequence at once (Tq == T)
    "all-Tq-eq-T-33": (1, 2, 1, 33, 33, 16, 16, NSAConfig(**SMALL_NSA), torch.float32, None),
}


def _inputs(B, HQ, H, T, Tq, DK, DV, cfg, dtype):
    torch.manual_seed(T + HQ)
    q = torch.randn(B, HQ, Tq, DK, dtype=dtype)
    k, v = torch.randn(B, H, T, DK, dtype=dtype), torch.randn(B, H, T, DV, dtype=dtype)
    gates = torch.rand(B, HQ, Tq, len(cfg.branches), dtype=dtype) if cfg.gate == "learned" else None
    p = NSAParams.from_config(cfg, DK ** -0.5)
    l, d = cfg.compress_block, cfg.compress_stride
    kc = naive.mean_pool(k, l, d) if p.needs_cmp else None
    vc = naive.mean_pool(v, l, d) if p.has_cmp else None
    return q, k, v, gates, kc, vc, p


@pytest.mark.parametrize("name", list(CASES))
def test_triton_decode_matches_reference(name):
    _check_case(name)


@pytest.mark.parametrize("name", ["all-T700-G3-splits-Tq3", "all-T300-n6-B2-dk-ne-dv",
                                  "local-only-T150-n5"])
def test_triton_decode_ranks_candidates_of_several_tiles(name, monkeypatch):
    """Tiles of 16 selection blocks (1 to 3 tiles here): the chosen blocks come from the ranking
    of every tile's candidates, as in a long cache (`select_tile`: about four tiles)."""
    from nsa_compile.kernels.nsa import triton_decode
    monkeypatch.setattr(triton_decode, "select_tile", lambda n_blocks, G: 16)
    _check_case(name)


@pytest.mark.parametrize("unrolled", [4, 0], ids=["unrolled", "looped"])
@pytest.mark.parametrize("name", ["all-T700-G3-splits-Tq3", "all-T300-n6-B2-dk-ne-dv",
                                  "all-T129-fp16-G8"])
def test_triton_decode_merges_in_chunks(name, unrolled, monkeypatch):
    """Parts merged 2 per load (several chunks per branch, partial for odd counts; unrolled, or
    looped as merges too long to unroll are) and the combine in tiles of 16 columns (Dv = 32:
    two), as the shipped 8 / 16 do on long caches and wide heads."""
    from nsa_compile.kernels.nsa import triton_decode
    monkeypatch.setattr(triton_decode, "PART_CHUNK", 2)
    monkeypatch.setattr(triton_decode, "COMBINE_COLUMNS", 16)
    monkeypatch.setattr(triton_decode, "MAX_UNROLLED_CHUNKS", unrolled)
    _check_case(name)


@pytest.mark.parametrize("name", ["all-T700-G3-splits-Tq3", "window-only-T63"])
def test_triton_decode_pointer_loads(name, monkeypatch):
    """The tiles through pointer loads (NSA_COMPILE_TMA=0, or a GPU before Hopper) instead of
    the tensor descriptors the interpreter takes otherwise."""
    monkeypatch.setenv("NSA_COMPILE_TMA", "0")
    _check_case(name)


def _check_case(name):
    from nsa_compile.kernels.nsa.triton_decode import decode_with_blocks
    B, HQ, H, T, Tq, DK, DV, cfg, dtype, split = CASES[name]
    q, k, v, gates, kc, vc, p = _inputs(B, HQ, H, T, Tq, DK, DV, cfg, dtype)
    out, blocks = decode_with_blocks(q, k, v, gates, kc, vc, p, split)
    assert out.shape == (B, HQ, Tq, DV) and out.dtype == dtype and not out.isnan().any()
    dd = lambda x: None if x is None else x.double()
    if p.has_slc:
        # The chosen blocks carry the reference's top-n importance at each position (compared
        # by score, not index: near-ties may order differently in fp32).
        padded = torch.cat([q.new_zeros(B, HQ, T - Tq, DK), q], dim=2)
        imp = ref.importance(padded, kc, p)[:, :, T - Tq:]
        n = min(p.select_count, imp.shape[-1])
        want = imp.sort(-1, descending=True).values[..., :n]
        got = torch.gather(imp, -1, blocks[..., :n].long().clamp_min(0))
        got = torch.where(blocks[..., :n] >= 0, got, -torch.inf).sort(-1, descending=True).values
        assert torch.equal(got.isinf(), want.isinf())
        fin = want.isfinite()
        assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-6)
        assert (blocks[..., n:] == -1).all()
    o_ref = naive.nsa_attention_ref(dd(q), dd(k), dd(v), dd(gates), dd(kc), dd(vc), p)
    err = ((out.double() - o_ref).norm() / o_ref.norm().clamp_min(1e-30)).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


def test_triton_decode_strided_inputs():
    """(B, T, H, D) storage seen through SDPA's layout, as a KV cache of that layout gives it."""
    from nsa_compile.kernels.nsa.triton_decode import nsa_decode_cuda
    cfg = NSAConfig(**SMALL_NSA)
    q = torch.randn(1, 3, 4, 16).transpose(1, 2)  # HQ = 4, Tq = 3
    k, v = (torch.randn(1, 90, 2, 16).transpose(1, 2) for _ in range(2))
    gates = torch.rand(1, 4, 3, 3)
    p = NSAParams.from_config(cfg, 0.25)
    kc, vc = naive.mean_pool(k, 16, 8), naive.mean_pool(v, 16, 8)
    out = nsa_decode_cuda(q, k, v, gates, kc, vc, p)
    o_ref = naive.nsa_attention_ref(q.double(), k.double(), v.double(), gates.double(),
                                    kc.double(), vc.double(), p)
    assert ((out.double() - o_ref).norm() / o_ref.norm()).item() < 1e-5


def test_select_tile_by_cache_length_and_group():
    from nsa_compile.kernels.nsa.triton_decode import select_tile
    assert select_tile(1024, 16) == 128  # 64k cache: capped by G·tile <= 2048 scores
    assert select_tile(1024, 4) == 256  # four tiles
    assert select_tile(2048, 4) == 256  # at most 256
    assert select_tile(2048, 12) == 128  # 2048 / 12 -> the power of two below
    assert select_tile(128, 16) == 64  # 8k cache: at least 64
    assert select_tile(1, 1) == 64


def test_compressed_split_gives_every_sm_programs():
    from nsa_compile.kernels.nsa.triton_decode import BLOCK_N, compressed_split
    cpu = torch.device("cpu")  # counts as 8 SMs
    assert compressed_split(4095, 32, cpu) == 4096  # 32 programs fill 8 SMs x 4: one split
    assert compressed_split(4095, 1, cpu) == 128  # 32 splits of one program's 4095 keys
    assert compressed_split(10, 1, cpu) == BLOCK_N
    assert compressed_split(0, 4, cpu) == BLOCK_N


def test_decode_falls_back_beyond_the_selection_registers():
    from nsa_compile.kernels.nsa.triton_decode import MAX_SELECTION_BLOCKS, decode_supported
    p = NSAParams.from_config(NSAConfig(), 128 ** -0.5)
    assert decode_supported(p, MAX_SELECTION_BLOCKS * 64, 128, 128) is None
    assert "selection blocks" in decode_supported(p, MAX_SELECTION_BLOCKS * 64 + 1, 128, 128)
    assert decode_supported(p._replace(has_slc=False), 10 ** 7, 128, 128) is None
