"""The pass on real Hugging Face architectures (tiny configs, no download) and on nanoGPT."""
import warnings

import pytest
import torch

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile.modules import NSAAttention
from zoo.hf import FAMILIES, IMPLS, VOCAB, kv_heads_of, tiny_hf
from zoo.nanogpt import GPT, GPTConfig

DENSE = NSAConfig(branches=("window",), window=None, gate=(1.0,))
LEARNED = NSAConfig(compress_block=4, compress_stride=2, select_block=4, select_count=3,
                    select_initial=1, select_local=1, window=4)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _quiet_sparsify(model, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nsa_compile.sparsify(model, config, **kw)


def _ids(B=2, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_detect_and_dense_equivalence(family, impl):
    """Every layer's attention is found (SDPA for "sdpa", a hand-written chain for "eager"),
    the true KV heads recovered, and a dense-equivalent NSA reproduces the logits — with a
    left-padded batch at run time although the example inputs had no padding."""
    torch.manual_seed(0)
    model = tiny_hf(family, impl)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    report = nsa_compile.inspect(model)  # Hugging Face dummy inputs
    attn = [s for s in report.sites if s.kind != "embedding"]
    assert len(attn) == 2 and all(s.status == "rewrite" for s in attn), str(report)
    assert {s.kind for s in attn} == {"sdpa" if impl == "sdpa" else "manual"}

    assert _quiet_sparsify(model, DENSE, example_inputs={"input_ids": ids}) is model
    for site in attn:
        nsa = model.get_submodule(site.path).nsa
        assert nsa.num_kv_heads == kv_heads_of(family)
    out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert _rel(out[real], ref[real]) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_example_inputs_with_padding(family, impl):
    """Example inputs that carry an attention_mask: detection proves the mask is causal key
    padding by perturbing it, and reports it."""
    torch.manual_seed(0)
    model = tiny_hf(family, impl)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    report = nsa_compile.inspect(model, {"input_ids": ids, "attention_mask": mask})
    attn = [s for s in report.sites if s.kind != "embedding"]
    assert all(s.status == "rewrite" and "padding from 'attention_mask'" in s.reason
               for s in attn), str(report)
    _quiet_sparsify(model, DENSE, example_inputs={"input_ids": ids, "attention_mask": mask})
    out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert _rel(out[real], ref[real]) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_hf_generate_with_cache_matches_dense(impl):
    """Decoding with a KV cache and left padding (queries shorter than keys, transformers'
    pack_gqa on the SDPA path) gives the dense model's scores under a dense-equivalent NSA."""
    torch.manual_seed(0)
    model = tiny_hf("llama", impl)
    ids = _ids(T=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    ref = model.generate(**kw)
    _quiet_sparsify(model, DENSE)
    out = model.generate(**kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("left_pad", [False, True], ids=["unpadded", "left-padded"])
def test_hf_generate_with_cache_matches_without_under_sparse_nsa(left_pad):
    """With a sparse NSA (every branch, blocks shorter than the prompt), decoding with a KV
    cache takes the last-positions path (`NSAAttention.decode`) and must reproduce decoding
    without a cache, which reruns the whole sequence through the op at every step."""
    torch.manual_seed(0)
    model = tiny_hf("llama", "sdpa")
    _quiet_sparsify(model, LEARNED)
    for m in model.modules():  # gates that differ per branch and position
        if isinstance(m, NSAAttention):
            torch.nn.init.normal_(m.gate.proj.weight, std=0.5)
    ids = _ids(T=14)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :4] = 0
        ids[0, :4] = 0
    calls = []
    decode = NSAAttention.decode
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    ref = model.generate(use_cache=False, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NSAAttention, "decode",
                   lambda *a, **k: calls.append(1) or decode(*a, **k))
        out = model.generate(use_cache=True, **kw)
    assert calls  # the cached steps went through the decode path
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert _rel(a, b) < 1e-4


def test_gpt2_attention_dropout_in_training_is_skipped():
    """GPT-2 keeps attn_pdrop=0.1: in training mode the sites are skipped with a reason; in eval
    they are rewritten, and training the rewritten model with that dropout raises."""
    torch.manual_seed(0)
    model = tiny_hf("gpt2", "eager").train()
    report = nsa_compile.inspect(model)
    assert all(s.status == "skip" and "dropout p=0.1" in s.reason
               for s in report.sites if s.kind != "embedding"), str(report)
    model.eval()
    _quiet_sparsify(model, DENSE)
    model.train()
    with pytest.raises(RuntimeError, match="attention dropout"):
        model(input_ids=_ids())


def test_mistral_sliding_window_is_reported():
    torch.manual_seed(0)
    model = tiny_hf("mistral", "sdpa", sliding_window=4)
    report = nsa_compile.inspect(model, {"input_ids": _ids()})
    attn = [s for s in report.sites if s.kind != "embedding"]
    assert all(s.status == "rewrite" and "sliding-window" in s.reason for s in attn), str(report)


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt(flash):
    """nanoGPT's flash (SDPA is_causal) and manual (tril buffer + masked_fill) paths."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(flash=flash)).eval()
    ids = torch.randint(0, 97, (2, 23))
    ref = model(ids)
    report = nsa_compile.inspect(model, (ids,))
    attn = [s for s in report.sites if s.kind != "embedding"]
    assert [s.path for s in attn] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(s.status == "rewrite" and s.kind == ("sdpa" if flash else "manual") for s in attn)
    _quiet_sparsify(model, DENSE, example_inputs=(ids,))
    assert _rel(model(ids), ref) < 1e-4
    plan = model.transformer.h[0].attn._nsa_plan
    # the tril buffer lives inside the module; an SDPA call may get a mask at run time
    assert plan.external_mask is flash


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_trains_with_optimizer_created_after(flash):
    torch.manual_seed(0)
    model = GPT(GPTConfig(flash=flash))
    ids = torch.randint(0, 97, (2, 24))
    _quiet_sparsify(model, LEARNED, example_inputs=(ids,))
    assert model.training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    gate = model.transformer.h[0].attn.nsa.gate.proj.weight
    assert gate.abs().sum() > 0
