"""GPU: the Triton NSA backward in bf16 against fp64 reference gradients (SPEC §5 sweep), its
determinism, a compiled training step through the op's autograd, and the op with its autograd
in a CUDA graph."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams

import nsa_reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(T, G, D) for T in (1, 17, 1000, 4096, 8229) for G in (1, 4, 16) for D in (64, 128, 256)]
NAMES = ("dq", "dk", "dv", "dgates", "dk_cmp", "dv_cmp")


def _inputs(T, G, D, seed):
    torch.manual_seed(seed)
    H = 2 if G < 16 else 1
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, G * H, T, D, device=dev, dtype=dt)
    k = torch.randn(1, H, T, D, device=dev, dtype=dt)
    v = torch.randn(1, H, T, D, device=dev, dtype=dt)
    gates = torch.rand(1, G * H, T, 3, device=dev, dtype=dt)
    kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
    do = torch.randn(1, G * H, T, D, device=dev, dtype=dt)
    return q, k, v, gates, kc, vc, do


def _run(q, k, v, gates, kc, vc, do, p, order=None):
    """Forward and backward with the cached block sizes, or with the selected branch's loop
    order forced (ref.GPU_ORDERS)."""
    from nsa_compile.kernels.nsa import triton_bwd, triton_fwd
    if order is None:
        res = triton_fwd.nsa_fwd_cuda(q, k, v, gates, kc, vc, p, save=True)
        return res, triton_bwd.nsa_bwd_cuda(do, q, k, v, gates, kc, vc, p, res.branch_out,
                                            res.branch_lse(), res.block_idx)
    configs = ref.GPU_ORDERS[order]
    res = triton_fwd.nsa_forward(q, k, v, gates, kc, vc, p, configs, save=True)
    return res, triton_bwd.nsa_backward(do, q, k, v, gates, kc, vc, p, res.branch_out,
                                        res.branch_lse(), res.block_idx, configs)


def _skip_unsupported(order, D):
    """The warp-specialised dK/dV kernels ("ws…") run on Hopper only, for D of 64 or 128."""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    if order.startswith("ws") and not (hopper and D in (64, 128)):
        pytest.skip("the warp-specialised dK/dV kernels need sm_90 and D in {64, 128}")


@pytest.mark.parametrize("order", ["positions", "blocks", "halves", "ws", "ws-fused"])
@pytest.mark.parametrize("T,G,D", SHAPES, ids=[f"T{T}-G{G}-D{D}" for T, G, D in SHAPES])
def test_backward_bf16_matches_fp64(T, G, D, order):
    _skip_unsupported(order, D)
    q, k, v, gates, kc, vc, do = _inputs(T, G, D, T * 131 + G * 7 + D)
    p = NSAParams.from_config(NSAConfig(), D ** -0.5)
    res, got = _run(q, k, v, gates, kc, vc, do, p, order)
    torch.cuda.synchronize()
    # The forward test checks that these blocks carry the top-n importance.
    idx = res.block_idx[..., :p.select_count]
    want = ref.gradients(do, q, k, v, gates, kc, vc, p, idx)
    for name, g, w in zip(NAMES, got, want):
        assert not g.isnan().any(), name
        if w.numel():
            err = ((g.double() - w).norm() / w.norm().clamp_min(w.numel() ** 0.5)).item()
            assert err < 2e-2, (name, err)


@pytest.mark.parametrize("order", [None, "blocks", "ws", "ws-fused"])
def test_backward_is_deterministic(order):
    _skip_unsupported(order or "", 128)
    args = _inputs(8229, 4, 128, 0)
    p = NSAParams.from_config(NSAConfig(), 128 ** -0.5)
    _, first = _run(*args, p, order)
    _, second = _run(*args, p, order)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_compiled_training_step_uses_triton_backward(monkeypatch):
    """fullgraph compile of forward + loss, backward through AOTAutograd: no graph break, the
    Triton backward runs, and the gradients match eager's."""
    from nsa_compile.kernels.nsa import triton_bwd
    from nsa_compile.ops import nsa_attention

    calls = []
    real = triton_bwd.nsa_bwd_cuda
    monkeypatch.setattr(triton_bwd, "nsa_bwd_cuda", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    cfg = NSAConfig()
    q, k, v, gates, _, _, do = _inputs(2048, 4, 64, 5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gates)]

    def step(q, k, v, gates):
        o = nsa_attention(q, k, v, config=cfg, gates=gates)
        return (o.float() * do.float()).sum()

    eager = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    assert len(calls) == 2
    for a, b in zip(got, eager):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


@pytest.mark.parametrize("G", [4, 16])
def test_cuda_graph_replays_forward_and_backward(G):
    """The op and its backward captured in a CUDA graph (no host sync, no tuning during
    capture, every kernel reading its inputs where the graph keeps them): a replay on new
    inputs gives eager's results bit for bit, at a group size that runs the selected branch
    block by block (4) and one that runs it per position (16)."""
    from nsa_compile.ops import nsa_attention

    cfg = NSAConfig()
    static = list(_inputs(4096, G, 128, 11))  # q, k, v, gates, k_cmp, v_cmp, dO
    leaves = [x.requires_grad_() for x in static[:6]]

    def step():
        o = nsa_attention(*leaves[:3], config=cfg, gates=leaves[3], k_cmp=leaves[4],
                          v_cmp=leaves[5])
        return (o, *torch.autograd.grad(o, leaves, static[6]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and any tuning) before capture, as graphs want
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for x, y in zip(static, _inputs(4096, G, 128, 12)):
            x.copy_(y)
    graph.replay()
    want = step()
    torch.cuda.synchronize()
    for name, a, b in zip(("o",) + NAMES, captured, want):
        assert torch.equal(a, b), name
