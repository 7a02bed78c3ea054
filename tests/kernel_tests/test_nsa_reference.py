"""The NSA reference (`kernels/nsa/naive.py`) and its op (`ops.nsa_attention`) against SPEC §3.

Truths used: F.scaled_dot_product_attention for the dense equivalences, and `brute_force`, a
per-query transcription of SPEC §3 in fp64 (Python loops, explicit key sets) whose autograd
also checks the analytic backward.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

from nsa_compile import NSAConfig
from nsa_compile.config import BRANCHES
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.ops import nsa_attention

from nsa_strategies import nsa_configs

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def make_inputs(B, HQ, H, T, Dk, Dv=None, dtype=torch.float64, gates=0, seed=0):
    """Random q (B, HQ, T, Dk), k (B, H, T, Dk), v (B, H, T, Dv) and gates (B, HQ, T, gates)
    in (0, 1) (None when gates == 0), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk
    shapes = [(B, HQ, T, Dk), (B, H, T, Dk), (B, H, T, Dv)]
    xs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    g = torch.rand(B, HQ, T, gates, generator=gen, dtype=dtype) if gates else None
    return [x.requires_grad_() for x in xs] + [None if g is None else g.requires_grad_()]


def compressed_mean(x, l, d):
    """Mean of keys [i*d, i*d + l) for every full block i, by hand: (B, H, Tc, D)."""
    T = x.shape[2]
    Tc = 0 if T < l else (T - l) // d + 1
    return torch.stack([x[:, :, i * d:i * d + l].mean(2) for i in range(Tc)], 2) if Tc else \
        x.new_zeros(*x.shape[:2], 0, x.shape[-1])


def chunk_weight(i, j, cfg):
    """Stride-d chunks of compressed block i that lie inside selection block j."""
    d, lp = cfg.compress_stride, cfg.select_block
    starts = range(i * d, i * d + cfg.compress_block, d)
    return sum(j * lp <= s and s + d <= (j + 1) * lp for s in starts)


def brute_selection(p_group, t, cfg):
    """Chosen block indices for query t from the group's compressed probabilities p_group
    (G, Tc): forced initial/local blocks first, then importance, ties to the lower index."""
    lp = cfg.select_block
    own = t // lp
    candidates = list(range(own + 1))
    imp = [sum(chunk_weight(i, j, cfg) * p_group[:, i].sum().item()
               for i in range(p_group.shape[1])) for j in candidates]
    forced = [j for j in candidates
              if j < cfg.select_initial or own - cfg.select_local < j <= own]
    rest = sorted((j for j in candidates if j not in forced), key=lambda j: (-imp[j], j))
    return sorted((forced + rest)[:cfg.select_count])


def brute_force(q, k, v, gates, k_cmp, v_cmp, cfg, scale=None):
    """SPEC §3 one query at a time, in fp64. Output (B, HQ, T, Dv) starts as NaN, so a
    position the loops skip fails the comparison. Differentiable except for the block choice.
    Returns (output, chosen blocks {(b, h, t): [j, ...]})."""
    q, k, v = q.double(), k.double(), v.double()
    B, HQ, T, Dk = q.shape
    H, Dv = k.shape[1], v.shape[-1]
    G = HQ // H
    l, d, lp = cfg.compress_block, cfg.compress_stride, cfg.select_block
    scale = Dk ** -0.5 if scale is None else scale
    if k_cmp is None:
        k_cmp = compressed_mean(k, l, d)
    if v_cmp is None:
        v_cmp = compressed_mean(v, l, d)
    k_cmp, v_cmp = k_cmp.double(), v_cmp.double()
    weights = cfg.fixed_gates
    out = torch.full((B, HQ, T, Dv), float("nan"), dtype=torch.float64)
    chosen = {}

    def attend(qv, keys, values):
        if keys.shape[0] == 0:
            return values.new_zeros(Dv)
        return torch.softmax(keys @ qv * scale, dim=0) @ values

    for b in range(B):
        for h in range(H):
            for t in range(T):
                vis = [i for i in range(k_cmp.shape[2]) if i * d + l - 1 <= t]
                with torch.no_grad():
                    p_group = torch.stack([
                        torch.softmax(k_cmp[b, h, vis] @ q[b, h * G + g, t] * scale, 0)
                        for g in range(G)]) if vis else torch.zeros(G, 0, dtype=torch.float64)
                    blocks = brute_selection(p_group, t, cfg)
                chosen[b, h, t] = blocks
                sel = [key for j in blocks for key in range(j * lp, min((j + 1) * lp, t + 1))]
                lo = 0 if cfg.window is None else max(0, t - cfg.window + 1)
                for g in range(G):
                    hq = h * G + g
                    qv = q[b, hq, t]
                    parts = {
                        "compressed": attend(qv, k_cmp[b, h, vis], v_cmp[b, h, vis]),
                        "selected": attend(qv, k[b, h, sel], v[b, h, sel]),
                        "window": attend(qv, k[b, h, lo:t + 1], v[b, h, lo:t + 1]),
                    }
                    o = 0
                    for c, name in enumerate(cfg.branches):
                        w = gates[b, hq, t, c].double() if weights is None else weights[c]
                        o = o + w * parts[name]
                    out[b, hq, t] = o
    return out, chosen


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def grads(out, inputs, seed=1):
    """Gradients of <out, random cotangent> w.r.t. inputs (None entries skipped)."""
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                     dtype=torch.float64).to(out.dtype)  # same values whatever out's dtype
    present = [x for x in inputs if x is not None]
    # An input the output does not depend on (empty k_cmp when T < l) gets zeros.
    return torch.autograd.grad(out, present, go, allow_unused=True, materialize_grads=True)


def assert_close_all(actual, expected, dtype):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e.double(), **TOL[dtype])


DENSE_T = (1, 15, 63, 111, 1000)


def dense_configs(T):
    return {
        "window-unbounded": NSAConfig(branches=("window",), window=None, gate=(1.0,)),
        # n >= ceil(T / l') with the paper's blocks: every started block is chosen.
        "selected-all": NSAConfig(branches=("selected",), gate=(1.0,),
                                  select_count=max(3, math.ceil(T / 64))),
        "selected-all-small-blocks": NSAConfig(
            branches=("selected",), gate=(1.0,), compress_block=4, compress_stride=2,
            select_block=8, select_count=max(3, math.ceil(T / 8))),
    }


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("T", DENSE_T)
@pytest.mark.parametrize("mode", list(dense_configs(1)))
def test_dense_equivalence_with_sdpa(mode, T, dtype):
    cfg = dense_configs(T)[mode]
    B, HQ, H, D = (1, 4, 2, 8) if T >= 1000 else (2, 6, 2, 8)
    q, k, v, _ = make_inputs(B, HQ, H, T, D, dtype=dtype, seed=T)
    out = nsa_attention(q, k, v, config=cfg)
    ref = sdpa(q, k, v)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    # The analytic backward against autograd through SDPA.
    assert_close_all(grads(out, (q, k, v)), grads(ref, (q, k, v)), dtype)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_bounded_window_matches_banded_sdpa(window):
    T = 63
    q, k, v, _ = make_inputs(1, 4, 2, T, 8, seed=window)
    cfg = NSAConfig(branches=("window",), window=window, gate=(1.0,))
    out = nsa_attention(q, k, v, config=cfg)
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    assert_close_all(grads(out, (q, k, v)), grads(ref, (q, k, v)), torch.float64)


BRUTE_CASES = {
    # name: (NSAConfig, B, HQ, H, Dk, Dv, given k_cmp/v_cmp instead of mean pooling)
    "three-branches-learned": (NSAConfig(compress_block=8, compress_stride=4, select_block=16,
                                         select_count=3, select_local=1, window=12),
                               1, 4, 2, 8, 8, True),
    "no-forced-blocks-fixed-gates": (NSAConfig(compress_block=4, compress_stride=2,
                                               select_block=8, select_count=2, select_initial=0,
                                               select_local=0, window=7, gate=(0.2, 0.5, 0.3)),
                                     1, 3, 1, 4, 4, False),
    "l-equals-lprime-Dk-ne-Dv": (NSAConfig(compress_block=8, compress_stride=8, select_block=8,
                                           select_count=4, select_initial=2, select_local=1,
                                           window=None, compressor="mean"),
                                 2, 2, 2, 6, 3, False),
    "cmp-and-window": (NSAConfig(compress_block=6, compress_stride=2, select_block=12,
                                 branches=("compressed", "window"), window=9),
                       1, 4, 1, 4, 5, True),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("T", (1, 15, 63))
@pytest.mark.parametrize("case", BRUTE_CASES.values(), ids=BRUTE_CASES.keys())
def test_matches_brute_force(case, T, dtype):
    cfg, B, HQ, H, Dk, Dv, given_cmp = case
    nb = len(cfg.branches) if cfg.fixed_gates is None else 0
    q, k, v, g = make_inputs(B, HQ, H, T, Dk, Dv, dtype=dtype, gates=nb, seed=T + 7)
    kc = vc = None
    if given_cmp:
        # Compressed keys unrelated to k, as a learned compressor gives.
        Tc = max(0, (T - cfg.compress_block) // cfg.compress_stride + 1)
        gen = torch.Generator().manual_seed(T + 8)
        kc = torch.randn(B, H, Tc, Dk, generator=gen, dtype=dtype, requires_grad=True)
        if "compressed" in cfg.branches:
            vc = torch.randn(B, H, Tc, Dv, generator=gen, dtype=dtype, requires_grad=True)
    out = nsa_attention(q, k, v, config=cfg, gates=g, k_cmp=kc, v_cmp=vc)
    ref, _ = brute_force(q, k, v, g, kc, vc, cfg)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    inputs = (q, k, v, g, kc, vc)
    assert_close_all(grads(out, inputs), grads(ref, inputs), dtype)


def test_brute_force_sees_every_branch():
    """Guard on the truth itself: each branch changes the brute-force output."""
    cfg = BRUTE_CASES["three-branches-learned"][0]
    q, k, v, g = make_inputs(1, 4, 2, 40, 8, gates=3)
    with torch.no_grad():
        base, _ = brute_force(q, k, v, g, None, None, cfg)
        for c in range(3):
            g2 = g.clone()
            g2[..., c] = 0
            assert not torch.allclose(brute_force(q, k, v, g2, None, None, cfg)[0], base)


@given(config=nsa_configs(), T=st.integers(2, 70), data=st.data())
def test_causality(config, T, data):
    """Changing q, k, v and gates after position t changes no output at or before t."""
    config = dataclasses.replace(config, branches=BRANCHES, gate="learned")
    t = data.draw(st.integers(0, T - 2), label="t")
    q, k, v, g = make_inputs(1, 4, 2, T, 4, gates=3, seed=T)
    with torch.no_grad():
        out = nsa_attention(q, k, v, config=config, gates=g)
        q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 3
        g2[:, :, t + 1:] = torch.rand_like(g2[:, :, t + 1:])
        out2 = nsa_attention(q2, k2, v2, config=config, gates=g2)
    # fp64 rounding level, not exact: reductions over differently aligned copies may differ
    # by an ulp; a causality leak moves outputs by O(1).
    torch.testing.assert_close(out2[:, :, :t + 1], out[:, :, :t + 1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])


@given(config=nsa_configs(), T=st.integers(1, 150), H=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 3]))
@example(config=NSAConfig(), T=1, H=1, G=2)
@example(config=NSAConfig(), T=31, H=2, G=1)
@example(config=NSAConfig(compressor="mean", gate=(0.5, 0.25, 0.25)), T=63, H=1, G=4)
def test_no_nan_and_finite_gradients(config, T, H, G):
    nb = len(config.branches) if config.fixed_gates is None else 0
    q, k, v, g = make_inputs(1, H * G, H, T, 4, 3, dtype=torch.float32, gates=nb, seed=T)
    out = nsa_attention(q, k, v, config=config, gates=g)
    assert out.shape == (1, H * G, T, 3) and torch.isfinite(out).all()
    for x, dx in zip((q, k, v, g), grads(out, (q, k, v, g))):
        assert dx.shape == x.shape and torch.isfinite(dx).all()


@pytest.mark.parametrize("T", [1, 20, 31])
def test_short_sequences_no_compressed_block(T):
    """T < l: no compressed block exists; compressed output is zero, the rest still attend."""
    cfg = NSAConfig()  # l = 32
    q, k, v, g = make_inputs(1, 4, 2, T, 8, gates=3, dtype=torch.float32)
    out = nsa_attention(q, k, v, config=cfg, gates=g)
    ref = sdpa(q, k, v) * (g[..., 1:2] + g[..., 2:3])  # selected and window both see all keys
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for dx in grads(out, (q, k, v, g)):
        assert torch.isfinite(dx).all()


def test_compressed_branch_zero_before_first_block():
    """o_cmp is exactly 0 (not NaN) for t < l - 1 and nonzero from t = l - 1 on."""
    cfg = NSAConfig(branches=("compressed",), gate=(1.0,))
    l = cfg.compress_block
    q, k, v, _ = make_inputs(1, 2, 1, 2 * l, 8, dtype=torch.float32)
    out = nsa_attention(q, k, v, config=cfg)
    assert torch.equal(out[:, :, :l - 1], torch.zeros_like(out[:, :, :l - 1]))
    assert (out[:, :, l - 1:].abs().sum(-1) > 0).all()
    # Query l - 1 sees exactly block 0: the output is the mean of v[0:l].
    torch.testing.assert_close(out[:, :, l - 1], v[:, :, :l].mean(2).expand(1, 2, 8))
    dq = grads(out, (q,))[0]
    assert torch.equal(dq[:, :, :l - 1], torch.zeros_like(dq[:, :, :l - 1]))


def test_overlap_weights_paper_blocks():
    """l/d/l' = 32/16/64: selection block j gets 1,2,2,2,1 from compressed blocks 4j-1 … 4j+3."""
    params = NSAParams.from_config(NSAConfig(), 1.0)
    T = 320
    Tc, Ns = (T - 32) // 16 + 1, T // 64  # 19, 5
    w = naive.overlap_weights(Tc, Ns, params)
    assert w.shape == (19, 5)
    assert w[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1] + [0] * 11
    assert w[:, 2].tolist() == [0] * 7 + [1, 2, 2, 2, 1] + [0] * 7
    assert w[:, 0].tolist() == [2, 2, 2, 1] + [0] * 15  # no block -1
    assert w.sum(1).tolist() == [2.0] * 19  # each block's two chunks land somewhere
    # Against the interval-containment definition, for a few other shapes.
    for l, d, lp in [(32, 16, 64), (8, 2, 8), (12, 4, 16), (16, 16, 32)]:
        cfg = NSAConfig(compress_block=l, compress_stride=d, select_block=lp)
        Tc, Ns = 9, 5
        w = naive.overlap_weights(Tc, Ns, NSAParams.from_config(cfg, 1.0))
        expect = [[chunk_weight(i, j, cfg) for j in range(Ns)] for i in range(Tc)]
        assert w.tolist() == expect, (l, d, lp)


def _select(importance, t, **kw):
    cfg = NSAConfig(compress_block=64, compress_stride=64, select_block=64, **kw)
    params = NSAParams.from_config(cfg, 1.0)
    return naive.select_blocks(torch.tensor([importance]), torch.tensor([t]), params)[0].tolist()


def test_select_forced_initial_and_local_blocks():
    # t = 323 is in block 5: forced are block 0 (initial) and blocks 4, 5 (local); the free
    # slot goes to block 2; blocks 6, 7 have not started and are never chosen.
    imp = [0.0, 0.1, 0.9, 0.5, 0.05, 0.0, 5.0, 5.0]
    assert _select(imp, 323, select_count=4, select_initial=1, select_local=2) == [0, 2, 4, 5]
    # Without forced blocks the top-4 started blocks win.
    assert _select(imp, 323, select_count=4, select_initial=0, select_local=0) == [1, 2, 3, 4]
    # Two initial blocks, one local.
    assert _select(imp, 323, select_count=4, select_initial=2, select_local=1) == [0, 1, 2, 5]


def test_select_ties_go_to_lower_index():
    imp = [0.0, 0.3, 0.3, 0.3, 0.0, 0.0]
    assert _select(imp, 5 * 64, select_count=4, select_initial=1, select_local=2) == [0, 1, 4, 5]
    assert _select([0.5] * 6, 5 * 64, select_count=2, select_initial=0, select_local=0) == [0, 1]


def test_select_fewer_blocks_than_n_pads_with_minus_one():
    assert _select([0.0] * 8, 70, select_count=4) == [0, 1, -1, -1]
    assert _select([0.0] * 8, 0, select_count=3) == [0, -1, -1]


def test_select_overlapping_forced_blocks_count_once():
    # t in block 1: initial {0} and local {0, 1} overlap; each block is listed once.
    assert _select([0, 0, 0, 0], 100, select_count=3, select_initial=1, select_local=2) \
        == [0, 1, -1]


def _group_case():
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_count=3,
                    select_initial=0, select_local=1, branches=("selected",), gate=(1.0,))
    B, HQ, H, T, D = 2, 6, 2, 64, 8
    q, k, v, _ = make_inputs(B, HQ, H, T, D, seed=3)
    return cfg, q.detach(), k.detach(), v.detach()


def test_gqa_group_shares_block_choice():
    """The chunk's block_idx is per KV head and equals the choice made from the importance
    summed over the group's query heads; every head of a group attends the same key set."""
    cfg, q, k, v = _group_case()
    params = NSAParams.from_config(cfg, q.shape[-1] ** -0.5)
    kc = naive.mean_pool(k, cfg.compress_block, cfg.compress_stride)
    _, chosen = brute_force(q, k, v, None, kc, None, cfg)
    t0, C = 24, 40
    parts = naive.chunk_parts(q[:, :, t0:t0 + C], t0, k, v, kc, None, params)
    idx = parts["block_idx"]
    assert idx.shape == (2, 2, C, 3)
    for b in range(2):
        for h in range(2):
            for c in range(C):
                assert idx[b, h, c].tolist() == chosen[b, h, t0 + c]
    # Summing matters: query head g of each group (q[:, g::3], G = 1) would choose differently
    # on its own somewhere.
    alone = [naive.chunk_parts(q[:, g::3, t0:t0 + C], t0, k, v, kc, None, params)["block_idx"]
             for g in range(3)]
    assert all(not torch.equal(a, idx) for a in alone)
    branches, _ = naive.chunk_probs(q[:, :, t0:t0 + C], t0, k, kc, params)
    seen = branches["selected"].probs > 0  # (B, H, G, C, K)
    assert torch.equal(seen, seen[:, :, :1].expand_as(seen))


def test_gqa_group_outputs_ignore_unselected_keys():
    """Black box: with k_cmp fixed (so the choice is fixed), changing keys/values outside the
    blocks a group chose for query t leaves every head of that group unchanged at t; changing
    one key inside a chosen block changes every head of the group."""
    cfg, q, k, v = _group_case()
    kc = naive.mean_pool(k, cfg.compress_block, cfg.compress_stride)
    _, chosen = brute_force(q, k, v, None, kc, None, cfg)
    out = nsa_attention(q, k, v, config=cfg, k_cmp=kc)
    lp, G = cfg.select_block, 3
    for b, h, t in [(0, 0, 63), (1, 1, 40), (0, 1, 17)]:
        blocks = chosen[b, h, t]
        outside = [p for p in range(64) if p // lp not in blocks]
        k2, v2 = k.clone(), v.clone()
        k2[b, h, outside] += 5.0
        v2[b, h, outside] -= 5.0
        out2 = nsa_attention(q, k2, v2, config=cfg, k_cmp=kc)
        heads = slice(h * G, (h + 1) * G)
        torch.testing.assert_close(out2[b, heads, t], out[b, heads, t], rtol=1e-12, atol=1e-12)
        inside = blocks[0] * lp
        k3 = k.clone()
        k3[b, h, inside] += 5.0
        out3 = nsa_attention(q, k3, v, config=cfg, k_cmp=kc)
        assert ((out3[b, heads, t] - out[b, heads, t]).abs().amax(-1) > 1e-6).all()


def _tiny_cfg(**kw):
    return NSAConfig(compress_block=4, compress_stride=2, select_block=8, select_count=2,
                     select_initial=0, select_local=1, window=5, **kw)


def test_gradcheck_learned_gates_given_compressed():
    q, k, v, g = make_inputs(1, 2, 1, 19, 3, 2, gates=3, seed=11)
    kc, vc = (torch.randn(1, 1, 8, D, dtype=torch.float64, requires_grad=True) for D in (3, 2))
    cfg = _tiny_cfg()
    fn = lambda q, k, v, g, kc, vc: nsa_attention(q, k, v, config=cfg, gates=g, k_cmp=kc,
                                                  v_cmp=vc)
    assert torch.autograd.gradcheck(fn, (q, k, v, g, kc, vc))


def test_gradcheck_fixed_gates_mean_pooled():
    q, k, v, _ = make_inputs(1, 4, 2, 17, 3, seed=12)
    cfg = _tiny_cfg(gate=(0.3, 0.5, 0.2), compressor="mean")
    assert torch.autograd.gradcheck(lambda q, k, v: nsa_attention(q, k, v, config=cfg),
                                    (q, k, v))


def _op_args(learned):
    cfg = _tiny_cfg() if learned else _tiny_cfg(gate=(0.3, 0.5, 0.2))
    q, k, v, g = make_inputs(1, 4, 2, 21, 4, 3, dtype=torch.float32, gates=3 if learned else 0)
    kc, vc = naive.mean_pool(k.detach(), 4, 2), naive.mean_pool(v.detach(), 4, 2)
    p = NSAParams.from_config(cfg, 0.5)
    return (q, k, v, g, kc.requires_grad_(), vc.requires_grad_(), p.compress_block,
            p.compress_stride, p.select_block, p.select_count, p.select_initial, p.select_local,
            p.window, [p.has_cmp, p.has_slc, p.has_win], list(p.fixed_gates), p.scale)


@pytest.mark.parametrize("learned", [True, False], ids=["learned", "fixed"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
def test_opcheck_nsa_fwd(learned, save):
    torch.library.opcheck(torch.ops.nsa_compile.nsa_fwd.default, (*_op_args(learned), save))


def test_opcheck_nsa_bwd():
    q, k, v, g, kc, vc, *params = [a.detach() if isinstance(a, torch.Tensor) else a
                                   for a in _op_args(True)]
    go = torch.randn(1, 4, 21, 3)
    residuals = (q.new_empty(0), q.new_empty(0), q.new_empty(0, dtype=torch.int32))
    torch.library.opcheck(torch.ops.nsa_compile.nsa_bwd.default,
                          (go, q, k, v, g, kc, vc, *residuals, *params))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    cfg = _tiny_cfg()

    def fn(q, k, v, g):
        return nsa_attention(q, k, v, config=cfg, gates=g) * 2.0

    q, k, v, g = make_inputs(1, 4, 2, 19, 4, dtype=torch.float32, gates=3)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v, g)
    out_e = fn(q, k, v, g)
    torch.testing.assert_close(out_c, out_e)
    assert_close_all(grads(out_c, (q, k, v, g)), grads(out_e, (q, k, v, g)), torch.float32)
    torch._dynamo.reset()
    with torch.no_grad():
        out_i = torch.compile(fn, fullgraph=True)(q, k, v, g)  # inductor, CPU
    torch.testing.assert_close(out_i, out_e.detach())


BAD_INPUTS = {
    "q-3d": (dict(q=(4, 9, 8)), "4-D"),
    "k-length": (dict(k=(1, 2, 8, 8)), "k has shape"),
    "k-head-dim": (dict(k=(1, 2, 9, 4)), "k has shape"),
    "v-heads": (dict(v=(1, 3, 9, 8)), "v has shape"),
    "hq-not-multiple": (dict(q=(1, 3, 9, 8)), "not a multiple"),
    "gates-missing": (dict(gates=None), "needs gates"),
    "gates-shape": (dict(gates=(1, 4, 9, 2)), "gates has shape"),
    "gates-with-fixed-config": (dict(config=NSAConfig(gate=(0.3, 0.3, 0.4))), "is fixed"),
    "k-cmp-length": (dict(k_cmp=(1, 2, 2, 8)), "k_cmp has shape"),
    "v-cmp-dim": (dict(v_cmp=(1, 2, 1, 5)), "v_cmp has shape"),
    "dtype-mismatch": (dict(v_dtype=torch.float64), "dtypes differ"),
}


@pytest.mark.parametrize("change,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_input_validation(change, message):
    shapes = dict(q=(1, 4, 9, 8), k=(1, 2, 9, 8), v=(1, 2, 9, 8), gates=(1, 4, 9, 3),
                  k_cmp=None, v_cmp=None)
    config = change.pop("config", NSAConfig(compress_block=4, compress_stride=2, select_block=8))
    v_dtype = change.pop("v_dtype", torch.float32)
    shapes.update(change)
    x = {n: None if s is None else torch.randn(s) for n, s in shapes.items()}
    x["v"] = x["v"].to(v_dtype)
    with pytest.raises(ValueError, match=message):
        nsa_attention(x["q"], x["k"], x["v"], config=config, gates=x["gates"],
                      k_cmp=x["k_cmp"], v_cmp=x["v_cmp"])


def test_config_must_be_nsa_config():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(TypeError, match="NSAConfig"):
        nsa_attention(q, q, q, config={"window": 4})


def test_half_precision_inputs_computed_in_fp32():
    cfg = NSAConfig(branches=("window",), window=None, gate=(1.0,))
    q, k, v, _ = make_inputs(1, 4, 2, 111, 16, dtype=torch.float16)
    out = nsa_attention(q, k, v, config=cfg)
    assert out.dtype == torch.float16
    ref = sdpa(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)
