"""Properties of the pass over a Hypothesis-generated zoo of tiny decoders (tests/zoo/generic.py):
every causal site is found and rewritten, non-causal ones are left alone, a dense-equivalent NSA
reproduces the model, NSA parameters learn, and state_dicts round-trip."""
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import nsa_compile
from nsa_compile import NSAConfig
from zoo.generic import ATTNS, GQAS, LAYOUTS, MASKS, SCALES, ZooModel, ZooSpec

DENSE = NSAConfig(branches=("window",), window=None, gate=(1.0,))
LEARNED = NSAConfig(compress_block=4, compress_stride=2, select_block=4, select_count=3,
                    select_initial=1, select_local=1, window=4)


@st.composite
def zoo_specs(draw, padding=False):
    attn = draw(st.sampled_from(ATTNS))
    n_kv = draw(st.sampled_from([1, 2, 3]))
    G = draw(st.sampled_from([1, 2, 4]))
    layout = draw(st.sampled_from(LAYOUTS if G == 1 else ("separate", "fused_split")))
    gqa = draw(st.sampled_from([g for g in GQAS if attn == "sdpa" or g != "enable_gqa"]))
    depth = draw(st.integers(1, 3))
    bidirectional = () if padding else tuple(sorted(draw(st.sets(st.integers(0, depth - 1),
                                                                  max_size=depth))))
    return ZooSpec(depth=depth, n_head=n_kv * G, n_kv_head=n_kv,
                   head_dim=draw(st.sampled_from([4, 8, 16])), layout=layout, attn=attn,
                   mask=draw(st.sampled_from(MASKS)), gqa=gqa, scale=draw(st.sampled_from(SCALES)),
                   upcast=draw(st.booleans()), bidirectional=bidirectional, padding=padding)


def _build(spec: ZooSpec, seed: int = 0) -> ZooModel:
    torch.manual_seed(seed)
    return ZooModel(spec).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _sparsify(model, config, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nsa_compile.sparsify(model, config, example_inputs=example)


@given(spec=zoo_specs(), T=st.sampled_from([2, 7, 15, 33]))
def test_zoo_dense_equivalence(spec, T):
    model = _build(spec)
    ids = torch.randint(0, spec.vocab, (2, T))
    ref = model(ids)
    report = nsa_compile.inspect(model, (ids,), nsa=DENSE)
    attn_sites = [s for s in report.sites if s.kind != "embedding"]
    assert {s.path for s in attn_sites if s.status == "rewrite"} == set(model.attention_paths(True))
    reasons = {s.path: s.reason for s in attn_sites if s.status == "skip"}
    assert set(reasons) == set(model.attention_paths(False))
    assert all("bidirectional" in r for r in reasons.values()), reasons
    want_kind = "sdpa" if spec.attn == "sdpa" else "manual"
    assert {s.kind for s in attn_sites} <= {want_kind}

    assert _sparsify(model, DENSE, (ids,)) is model
    out = model(ids)
    assert _rel(out, ref) < 1e-4
    for path in model.attention_paths(False):
        module = model.get_submodule(path)
        assert not hasattr(module, "nsa") and "forward" not in module.__dict__
    for path in model.attention_paths(True):
        nsa = model.get_submodule(path).nsa
        assert (nsa.num_heads, nsa.num_kv_heads) == (spec.n_head, spec.n_kv_head)


@given(spec=zoo_specs(padding=True), T=st.sampled_from([5, 16]), left=st.booleans())
def test_zoo_padding_real_tokens_match(spec, T, left):
    """A (B, T) 0/1 padding input: real tokens match the dense model, for left and right
    padding (left only where the original model stays finite: masks that fill with finfo.min)."""
    model = _build(spec)
    ids = torch.randint(0, spec.vocab, (2, T))
    ones = torch.ones(2, T, dtype=torch.long)
    pad = ones.clone()
    if left and spec.mask == "where" and spec.attn != "sdpa":
        pad[0, :2] = 0
    else:
        pad[0, -3:] = 0
    ref = model(ids, pad)
    _sparsify(model, DENSE, (ids, ones))
    out = model(ids, pad)
    real = pad.bool()
    assert _rel(out[real], ref[real]) < 1e-4


@given(spec=zoo_specs())
def test_zoo_learned_nsa_gets_gradients(spec):
    model = _build(spec)
    ids = torch.randint(0, spec.vocab, (2, 12))
    _sparsify(model, LEARNED, (ids,))
    model.train()
    model(ids).square().mean().backward()
    nsa_params = {n: p for n, p in model.named_parameters() if ".nsa." in n}
    assert len(nsa_params) > 0 or not model.attention_paths(True)
    for name, p in nsa_params.items():
        assert p.grad is not None, name
    moving = [n for n, p in nsa_params.items() if p.grad.abs().sum() > 0]
    # fc1 of a fresh MLP compressor sits behind a zero-initialised fc2: its gradient is zero
    assert all(any(n.endswith(s) for s in ("fc1.weight", "fc1.bias", "pos"))
               for n in set(nsa_params) - set(moving)), set(nsa_params) - set(moving)


@given(spec=zoo_specs())
def test_zoo_state_dict_round_trip(spec):
    ids = torch.randint(0, spec.vocab, (2, 12))
    a = _sparsify(_build(spec, seed=0), LEARNED, (ids,))
    with torch.no_grad():
        for name, p in a.named_parameters():
            if ".nsa." in name:
                p.add_(0.1 * torch.randn_like(p))
    state = a.state_dict()
    original = set(ZooModel(spec).state_dict())
    assert original <= set(state)
    b = _sparsify(_build(spec, seed=1), LEARNED, (ids,))
    b.load_state_dict(state)
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)


@pytest.mark.parametrize("gqa", ["repeat_kv", "repeat_interleave", "tile", "bthd", "enable_gqa"])
@pytest.mark.parametrize("attn", ["sdpa", "manual", "einsum_bthd"])
def test_hand_written_gqa_recovers_kv_heads(gqa, attn):
    """Hand-written GQA (8 query / 2 KV heads) in each repetition style: the NSA module sees
    the true 2 KV heads, and a dense-equivalent NSA reproduces the output."""
    if gqa == "enable_gqa" and attn != "sdpa":
        pytest.skip("enable_gqa is an SDPA flag")
    spec = ZooSpec(depth=1, n_head=8, n_kv_head=2, head_dim=8, attn=attn, gqa=gqa, mask="bool")
    model = _build(spec)
    ids = torch.randint(0, spec.vocab, (2, 11))
    ref = model(ids)
    _sparsify(model, DENSE, (ids,))
    nsa = model.blocks[0].attn.nsa
    assert nsa.num_kv_heads == 2
    assert model.blocks[0].attn._nsa_plan.kv_layout == ("tile" if gqa == "tile" else "interleave")
    assert _rel(model(ids), ref) < 1e-4


@given(spec=zoo_specs(), T=st.integers(1, 40), data=st.data())
def test_zoo_sparsified_is_causal_and_finite(spec, T, data):
    """With a sparse learned NSA: changing tokens after t changes nothing at or before t, and
    no length gives NaN (the example inputs had another length)."""
    model = _build(spec)
    _sparsify(model, LEARNED, (torch.randint(0, spec.vocab, (2, 12)),))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".nsa." in name:
                p.add_(0.2 * torch.randn_like(p))  # leave the initial state
    ids = torch.randint(0, spec.vocab, (2, T))
    t = data.draw(st.integers(0, T - 1))
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, spec.vocab, (2, T - t - 1))
    a, b = model(ids), model(changed)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if model.attention_paths(False):
        return  # a bidirectional layer lets later tokens in by design
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=1e-5, atol=1e-5)
