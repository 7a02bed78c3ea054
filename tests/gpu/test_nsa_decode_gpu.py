"""GPU: `ops.nsa_attention_decode` (the last positions of a sequence, decoding with a KV cache)
in bf16 against the whole-sequence reference on the same inputs."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.ops import nsa_attention_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("Tq", [1, 5])
@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("T", [17, 1000, 8229])
def test_decode_matches_the_whole_sequence_reference(T, G, Tq):
    torch.manual_seed(T + G)
    H, D, dev, dt = 2, 128, "cuda", torch.bfloat16
    q = torch.randn(1, G * H, T, D, device=dev, dtype=dt)
    k, v = (torch.randn(1, H, T, D, device=dev, dtype=dt) for _ in range(2))
    gates = torch.rand(1, G * H, T, 3, device=dev, dtype=dt)
    cfg = NSAConfig()
    p = NSAParams.from_config(cfg, D ** -0.5)
    kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
    full = naive.nsa_attention_ref(q, k, v, gates, kc, vc, p)[:, :, T - Tq:].float()
    with torch.no_grad():
        out = nsa_attention_decode(q[:, :, T - Tq:], k, v, config=cfg,
                                   gates=gates[:, :, T - Tq:], k_cmp=kc, v_cmp=vc)
    assert out.dtype == dt and out.shape == (1, G * H, Tq, D)
    assert ((out.float() - full).norm() / full.norm()).item() < 1e-2


@pytest.mark.parametrize("T,B,G,D", [(4096, 1, 4, 64), (4096, 1, 4, 256), (65536, 2, 16, 128),
                                     (65536, 8, 4, 128)])
def test_decode_long_cache_and_head_dims(T, B, G, D):
    """Many compressed-key splits and selection blocks (64k: 1024 of them), D 64 to 256."""
    torch.manual_seed(T + G + D)
    H, dev, dt = 2, "cuda", torch.bfloat16
    q = torch.randn(B, G * H, 1, D, device=dev, dtype=dt)
    k, v = (torch.randn(B, H, T, D, device=dev, dtype=dt) for _ in range(2))
    gates = torch.rand(B, G * H, 1, 3, device=dev, dtype=dt)
    cfg = NSAConfig()
    p = NSAParams.from_config(cfg, D ** -0.5)
    kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
    want = naive.nsa_attention_ref(q, k, v, gates, kc, vc, p).float()
    with torch.no_grad():
        out = nsa_attention_decode(q, k, v, config=cfg, gates=gates, k_cmp=kc, v_cmp=vc)
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2
