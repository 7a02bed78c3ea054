"""Each detection rule on a pattern shaped after a real model (tests/zoo/patterns.py): skipped
with a reason a user understands, or rewritten exactly."""
import warnings

import pytest
import torch

import nsa_compile
from nsa_compile import NSAConfig
from zoo import patterns as P

DENSE = NSAConfig(branches=("window",), window=None, gate=(1.0,))


def _x(B=2, T=9):
    return torch.randn(B, T, P.D_MODEL)


def _only_attention_site(report):
    sites = [s for s in report.sites if s.kind != "embedding"]
    assert len(sites) == 1, str(report)
    return sites[0]


@pytest.mark.parametrize("module, inputs, kind, words", [
    (P.Encoder, lambda: (_x(),), "sdpa", "bidirectional"),
    (P.CrossAttention, lambda: (_x(T=9), _x(T=9)), "sdpa", "cross-attention"),
    (P.CrossAttention, lambda: (_x(T=9), _x(T=5)), "sdpa", "cross-attention"),
    (P.ALiBi, lambda: (_x(),), "sdpa", "additive attention bias"),
    (P.PrefixLM, lambda: (_x(),), "sdpa", "neither causal nor causal with padding"),
    (P.UserMask, lambda: (_x(), torch.ones(2, 9, 9, dtype=torch.bool).tril()), "sdpa",
     "depends on the values of input"),
    (P.Softcap, lambda: (_x(),), "manual", "unsupported ops"),
    (P.LearnedTemperature, lambda: (_x(),), "manual", "learned attention temperature"),
    (P.TwoCalls, lambda: (_x(),), "sdpa", "2 attention calls"),
    (P.Batched3D, lambda: (_x(),), "manual", "3-D"),
    (P.Causal, lambda: (_x(T=1),), "sdpa", "sequence length 1"),
])
def test_skipped_with_reason(module, inputs, kind, words):
    torch.manual_seed(0)
    model = module().eval()
    args = inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = nsa_compile.inspect(model, args)
    site = _only_attention_site(report) if module is not P.TwoCalls else \
        [s for s in report.sites if s.kind != "embedding"][0]
    assert (site.kind, site.status) == (kind, "skip"), str(report)
    assert words in site.reason, site.reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nsa_compile.sparsify(model, DENSE, example_inputs=args)
    assert any("no attention site was rewritten" in str(w.message) for w in caught)
    assert not hasattr(model, "nsa") and "forward" not in model.__dict__
    assert model.state_dict().keys() == before.keys()


def test_shared_module_rewritten_once():
    """A module called at several layers (ALBERT) is planned alike at each call and rewritten
    once; the dense-equivalent NSA reproduces the output."""
    torch.manual_seed(0)
    model = P.Shared().eval()
    x = _x()
    ref = model(x)
    report = nsa_compile.inspect(model, (x,))
    assert _only_attention_site(report).status == "rewrite"
    nsa_compile.sparsify(model, DENSE, example_inputs=(x,))
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_causal_root_module():
    """The attention module may be the model itself (path "")."""
    torch.manual_seed(0)
    model = P.Causal().eval()
    x = _x()
    ref = model(x)
    nsa_compile.sparsify(model, DENSE, example_inputs=(x,))
    assert hasattr(model, "nsa")
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert "<root>" in str(model._nsa_compile_report)
