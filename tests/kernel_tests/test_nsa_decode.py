"""`ops.nsa_attention_decode`: the last Tq positions alone (decoding with a KV cache) equal the
whole-sequence op at those positions, for every branch set, GQA group, Dk != Dv and lengths
around the block sizes; bad inputs and gradients are refused."""
import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa.naive import mean_pool
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.ops import _op_args, nsa_attention, nsa_attention_decode

from .test_nsa_reference import BRUTE_CASES, TOL, make_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("Tq", [1, 3, "all"])
@pytest.mark.parametrize("T", [1, 15, 63, 111])
@pytest.mark.parametrize("case", BRUTE_CASES.values(), ids=BRUTE_CASES.keys())
def test_last_positions_equal_the_whole_sequence(case, T, Tq, dtype):
    cfg, B, HQ, H, Dk, Dv, given_cmp = case
    Tq = T if Tq == "all" else min(Tq, T)
    nb = len(cfg.branches) if cfg.fixed_gates is None else 0
    q, k, v, gates = [None if x is None else x.detach()
                      for x in make_inputs(B, HQ, H, T, Dk, Dv, dtype, gates=nb, seed=T)]
    l, d = cfg.compress_block, cfg.compress_stride
    # given compressed keys differ from the mean: a decode that re-pooled them would show
    kw = (dict(k_cmp=mean_pool(k, l, d) * 1.5, v_cmp=mean_pool(v, l, d) - 0.25) if given_cmp
          else {})
    full = nsa_attention(q, k, v, config=cfg, gates=gates, **kw)
    with torch.no_grad():
        out = nsa_attention_decode(q[:, :, T - Tq:].clone(), k, v, config=cfg,
                                   gates=None if gates is None else gates[:, :, T - Tq:], **kw)
    assert out.shape == (B, HQ, Tq, Dv)
    torch.testing.assert_close(out, full[:, :, T - Tq:], **TOL[dtype])


def test_bad_inputs_and_gradients_are_refused():
    cfg, B, HQ, H, Dk, Dv, _ = BRUTE_CASES["three-branches-learned"]
    q, k, v, gates = make_inputs(B, HQ, H, 20, Dk, Dv, torch.float32, gates=3)
    with pytest.raises(RuntimeError, match="not differentiable"):
        nsa_attention_decode(q[:, :, -1:], k, v, config=cfg, gates=gates[:, :, -1:])
    with torch.no_grad():
        with pytest.raises(ValueError, match="21 queries but only 20 keys"):
            nsa_attention_decode(torch.cat([q, q[:, :, :1]], 2), k, v, config=cfg,
                                 gates=torch.cat([gates, gates[:, :, :1]], 2))
        with pytest.raises(ValueError, match="gates has shape"):
            nsa_attention_decode(q[:, :, -1:], k, v, config=cfg, gates=gates)
        with pytest.raises(ValueError, match="v must match k"):
            nsa_attention_decode(q[:, :, -1:], k, v[:, :, 1:], config=cfg, gates=gates[:, :, -1:])


@pytest.mark.parametrize("learned", [True, False], ids=["learned", "fixed"])
def test_opcheck_nsa_decode(learned):
    """The decoding op's schema, fake (meta) function and registration are consistent."""
    cfg = BRUTE_CASES["three-branches-learned"][0]
    if not learned:
        cfg = NSAConfig(**{**cfg.to_dict(), "gate": (0.3, 0.5, 0.2)})
    q, k, v, gates = [None if x is None else x.detach()
                      for x in make_inputs(1, 4, 2, 30, 8, 8, torch.float32,
                                           gates=3 if learned else 0, seed=3)]
    p = NSAParams.from_config(cfg, 8 ** -0.5)
    l, d = cfg.compress_block, cfg.compress_stride
    torch.library.opcheck(torch.ops.nsa_compile.nsa_decode.default, (
        q[:, :, -3:].contiguous(), k, v, None if gates is None else gates[:, :, -3:].contiguous(),
        mean_pool(k, l, d), mean_pool(v, l, d), *_op_args(p)))


def test_decode_compiles_fullgraph():
    cfg, B, HQ, H, Dk, Dv, _ = BRUTE_CASES["three-branches-learned"]
    q, k, v, gates = [x.detach() for x in make_inputs(B, HQ, H, 40, Dk, Dv, torch.float32,
                                                      gates=3, seed=4)]
    step = lambda q, k, v, g: nsa_attention_decode(q, k, v, config=cfg, gates=g)
    torch._dynamo.reset()
    with torch.no_grad():
        want = step(q[:, :, -2:], k, v, gates[:, :, -2:])
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(
            q[:, :, -2:], k, v, gates[:, :, -2:])
    torch._dynamo.reset()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("lcd", [(32, 16, 64), (16, 8, 16), (8, 8, 8), (12, 4, 24)])
def test_block_importance_equals_the_overlap_weights(lcd):
    from nsa_compile.kernels.nsa import decode, naive
    l, d, lp = lcd
    p = NSAParams.from_config(NSAConfig(compress_block=l, compress_stride=d, select_block=lp,
                                        select_count=3), 1.0)
    for T in (l - 1, l, 3 * lp + 5):
        Tc = max(0, (T - l) // d + 1)
        Ns = -(-T // lp)
        p_cmp = torch.rand(2, 3, Tc, dtype=torch.float64)
        want = p_cmp @ naive.overlap_weights(Tc, Ns, p, dtype=torch.float64)
        torch.testing.assert_close(decode.block_importance(p_cmp, Ns, p), want)


def test_short_decoding_steps_gather_the_chosen_blocks(monkeypatch):
    """Up to MAX_GATHER_QUERIES queries the op's kernel reads only the chosen blocks (it never
    runs the reference, which scores every key), beyond that the reference's chunked pass."""
    from nsa_compile.kernels.nsa import decode, naive
    cfg, B, HQ, H, Dk, Dv, _ = BRUTE_CASES["three-branches-learned"]
    q, k, v, gates = [x.detach() for x in make_inputs(B, HQ, H, 40, Dk, Dv, torch.float32,
                                                      gates=3, seed=6)]
    ran = []
    ref = naive.nsa_attention_ref
    monkeypatch.setattr(naive, "nsa_attention_ref", lambda *a, **kw: ran.append(1) or ref(*a, **kw))
    with torch.no_grad():
        nsa_attention_decode(q[:, :, -decode.MAX_GATHER_QUERIES:], k, v, config=cfg,
                             gates=gates[:, :, -decode.MAX_GATHER_QUERIES:])
        assert not ran
        nsa_attention_decode(q[:, :, -17:], k, v, config=cfg, gates=gates[:, :, -17:])
        assert ran
