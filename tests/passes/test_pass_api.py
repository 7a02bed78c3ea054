"""The public verbs: inspect changes nothing, sparsify works in place, refuses what it must,
honours filter_fn and nsa=None, and hands Engram its sites."""
import warnings

import pytest
import torch

import nsa_compile
from nsa_compile import EngramConfig, NSAConfig
from nsa_compile.passes.report import Report, Site
from zoo.hf import tiny_hf
from zoo.nanogpt import GPT, GPTConfig

DENSE = NSAConfig(branches=("window",), window=None, gate=(1.0,))


def _gpt(flash=True, layers=3):
    torch.manual_seed(0)
    return GPT(GPTConfig(flash=flash, n_layer=layers)).eval()


def _ids(T=13):
    return torch.randint(0, 97, (2, T))


def test_inspect_changes_nothing_and_prints_a_table():
    model = _gpt()
    ids = _ids()
    ref = model(ids)
    keys = list(model.state_dict())
    report = nsa_compile.inspect(model, (ids,))
    assert isinstance(report, Report) and all(isinstance(s, Site) for s in report.sites)
    assert list(model.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)
    text = str(report)
    assert text.splitlines()[0].split() == ["path", "kind", "status", "reason"]
    assert "transformer.h.2.attn" in text and "3 to rewrite" in text
    assert {s.kind for s in report.sites} == {"sdpa", "embedding"}


def test_sparsify_in_place_keeps_keys_and_training_flag():
    model = _gpt().train()
    ids = _ids()
    keys = set(model.state_dict())
    same = nsa_compile.sparsify(model, NSAConfig(), example_inputs=(ids,))
    assert same is model and model.training
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert new and all(".attn.nsa." in k for k in new)
    assert type(model.transformer.h[0].attn).__name__ == "CausalSelfAttention"


def test_refuses_double_sparsify():
    model = _gpt()
    nsa_compile.sparsify(model, DENSE, example_inputs=(_ids(),))
    with pytest.raises(ValueError, match="already sparsified"):
        nsa_compile.sparsify(model, DENSE, example_inputs=(_ids(),))


def test_refuses_compiled_model():
    model = _gpt()
    with pytest.raises(ValueError, match="already compiled.*sparsify"):
        nsa_compile.sparsify(torch.compile(model), DENSE, example_inputs=(_ids(),))
    model.compile()
    with pytest.raises(ValueError, match="already compiled"):
        nsa_compile.sparsify(model, DENSE, example_inputs=(_ids(),))


def test_bad_arguments():
    model = _gpt()
    with pytest.raises(TypeError, match="NSAConfig"):
        nsa_compile.sparsify(model, {"window": 4}, example_inputs=(_ids(),))
    with pytest.raises(ValueError, match="nothing to do"):
        nsa_compile.sparsify(model, None, example_inputs=(_ids(),))
    with pytest.raises(ValueError, match="example_inputs"):
        nsa_compile.inspect(model)


def test_filter_fn_limits_sites():
    model = _gpt()
    ids = _ids()
    seen = []

    def only_first(module, path):
        seen.append((type(module).__name__, path))
        return path.endswith("h.0.attn")

    nsa_compile.sparsify(model, DENSE, example_inputs=(ids,), filter_fn=only_first)
    assert ("CausalSelfAttention", "transformer.h.1.attn") in seen
    assert hasattr(model.transformer.h[0].attn, "nsa")
    assert not hasattr(model.transformer.h[1].attn, "nsa")
    reasons = {s.path: s.reason for s in model._nsa_compile_report.sites}
    assert reasons["transformer.h.1.attn"] == "excluded by filter_fn"


def test_changed_attention_implementation_raises():
    """Switching a Hugging Face model to another attention implementation after sparsify would
    silently bypass NSA; the rewritten module notices and raises."""
    torch.manual_seed(0)
    model = tiny_hf("llama", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsa_compile.sparsify(model, DENSE)
    model.config._attn_implementation = "eager"
    with pytest.raises(RuntimeError, match="did not make the sdpa attention call"):
        model(input_ids=torch.randint(1, 64, (1, 7)))


def test_engram_only_and_both():
    pytest.importorskip("nsa_compile.passes.engram")
    model = _gpt()
    ids = _ids()
    ref = model(ids)
    nsa_compile.sparsify(model, None, engram=EngramConfig(layers=(1,), table_size=101, heads=2,
                                                          head_dim=8), example_inputs=(ids,))
    sites = model._nsa_compile_report.sites
    assert all(s.status == "skip" and s.reason.startswith("nsa=None") for s in sites
               if s.kind != "embedding")
    assert any(s.kind == "embedding" and s.status == "rewrite" for s in sites)
    assert not any(hasattr(b.attn, "nsa") for b in model.transformer.h)
    torch.testing.assert_close(model(ids), ref)  # Engram starts as the identity (W_V = 0)
    with pytest.raises(ValueError, match="already sparsified"):
        nsa_compile.sparsify(model, DENSE, example_inputs=(ids,))

    both = _gpt()
    nsa_compile.sparsify(both, DENSE, engram=EngramConfig(layers=(0, 2), table_size=101, heads=2,
                                                          head_dim=8), example_inputs=(ids,))
    kinds = {(s.kind, s.status) for s in both._nsa_compile_report.sites}
    assert ("sdpa", "rewrite") in kinds and ("embedding", "rewrite") in kinds
    torch.testing.assert_close(both(ids), ref, rtol=1e-4, atol=1e-5)


def test_inspect_lists_embedding_sites():
    pytest.importorskip("nsa_compile.passes.engram")
    report = nsa_compile.inspect(_gpt(), (_ids(),))
    emb = [s for s in report.sites if s.kind == "embedding"]
    assert emb and emb[0].path == "transformer.wte"


def test_sparsified_model_deep_copies_and_pickles():
    import copy
    import io
    model = _gpt(flash=False)
    ids = _ids()
    nsa_compile.sparsify(model, NSAConfig(compress_block=4, compress_stride=2, select_block=4,
                                          select_count=2, select_initial=1, select_local=1,
                                          window=4), example_inputs=(ids,))
    ref = model(ids)
    twin = copy.deepcopy(model)
    assert twin.transformer.h[0].attn.forward.module is twin.transformer.h[0].attn
    torch.testing.assert_close(twin(ids), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(ids), ref, rtol=0, atol=0)
