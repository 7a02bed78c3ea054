"""GPU: the Triton NSA forward in bf16 against an fp64 reference (SPEC §5 sweep)."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams

import nsa_reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(T, G, D) for T in (1, 17, 1000, 4096, 8229) for G in (1, 4, 16) for D in (64, 128, 256)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("order", ["positions", "blocks"])
@pytest.mark.parametrize("T,G,D", SHAPES, ids=[f"T{T}-G{G}-D{D}" for T, G, D in SHAPES])
def test_forward_bf16_matches_fp64(T, G, D, order):
    from nsa_compile.kernels.nsa.triton_fwd import nsa_forward
    torch.manual_seed(T * 131 + G * 7 + D)
    H = 2 if G < 16 else 1
    B, HQ = 1, G * H
    dev, dt = "cuda", torch.bfloat16
    cfg = NSAConfig()
    q = torch.randn(B, HQ, T, D, device=dev, dtype=dt)
    k = torch.randn(B, H, T, D, device=dev, dtype=dt)
    v = torch.randn(B, H, T, D, device=dev, dtype=dt)
    gates = torch.rand(B, HQ, T, 3, device=dev, dtype=dt)
    kc = naive.mean_pool(k, 32, 16)
    vc = naive.mean_pool(v, 32, 16)
    p = NSAParams.from_config(cfg, D ** -0.5)
    # the selected branch per position (default blocks) or block by block
    res = nsa_forward(q, k, v, gates, kc, vc, p, ref.GPU_ORDERS[order])
    torch.cuda.synchronize()
    assert not res.o.isnan().any()

    n = min(cfg.select_count, -(-T // 64))
    idx = res.block_idx[..., :n]
    imp = ref.importance(q, kc, p)
    want = imp.sort(-1, descending=True).values[..., :n]
    got = torch.gather(imp, -1, idx.long().clamp_min(0))
    got = torch.where(idx >= 0, got, -torch.inf).sort(-1, descending=True).values
    finite = want.isfinite()
    assert torch.equal(got.isinf(), want.isinf()), "forced or missing blocks differ"
    scale = want.masked_fill(~finite, 0).abs().amax().clamp_min(1e-6)
    assert ((got - want).masked_fill(~finite, 0).abs() / scale).max() < 2e-2

    p_no_slc = p._replace(has_slc=False)
    g64 = gates.double()
    o_ref = naive.nsa_attention_ref(q.double(), k.double(), v.double(), g64[..., [0, 2]],
                                    kc.double(), vc.double(), p_no_slc)
    o_ref = o_ref + g64[..., 1:2] * ref.selected_output(q, k, v, idx, p)
    assert _rel(res.o, o_ref) < 1.5e-2
