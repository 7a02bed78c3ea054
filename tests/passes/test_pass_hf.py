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


def _sparse_llama():
    """A tiny HF Llama under a sparse NSA with gates that differ per branch and position and
    compressors whose MLP is not zero (as after training)."""
    torch.manual_seed(0)
    model = tiny_hf("llama", "sdpa")
    _quiet_sparsify(model, LEARNED)
    for m in model.modules():
        if isinstance(m, NSAAttention):
            torch.nn.init.normal_(m.gate.proj.weight, std=0.5)
            for c in (m.k_compress, m.v_compress):
                torch.nn.init.normal_(c.fc2.weight, std=0.2)
    return model


@pytest.mark.parametrize("pad", ["unpadded", "left-padded", "left-padded-alike", "beams"])
def test_hf_generate_with_cache_matches_without_under_sparse_nsa(pad):
    """With a sparse NSA (every branch, blocks shorter than the prompt), decoding with a KV
    cache takes the last-positions path (`NSAAttention.decode`) and must reproduce decoding
    without a cache, which reruns the whole sequence through the op at every step. Where the
    batch's padding allows (none, or the same prefix in every row; beam search reorders the
    rows), each step continues the compressed keys kept on the cache: its compressors see only
    the keys past the blocks already compressed."""
    model = _sparse_llama()
    ids = _ids(T=14)
    mask = torch.ones_like(ids)
    if pad.startswith("left-padded"):
        rows = slice(None) if pad == "left-padded-alike" else slice(0, 1)
        mask[rows, :4] = 0
        ids[rows, :4] = 0
    calls, seen = [], []
    decode = NSAAttention.decode
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
              output_scores=True, return_dict_in_generate=True,
              num_beams=2 if pad == "beams" else 1)
    ref = model.generate(use_cache=False, **kw)
    first = next(m for m in model.modules() if isinstance(m, NSAAttention))
    spy = first.k_compress.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[2]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NSAAttention, "decode",
                   lambda *a, **k: calls.append(1) or decode(*a, **k))
        out = model.generate(use_cache=True, **kw)
    spy.remove()
    assert calls  # the cached steps went through the decode path
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert _rel(a, b) < 1e-4
    if pad == "left-padded":  # rows padded differently: each row decoded alone, no memo
        assert min(seen[1:]) >= 14 - 4
    else:  # the prefill, one full compression, then only the keys past the kept blocks
        assert max(seen[2:]) <= LEARNED.compress_block, seen


def test_kept_compressed_keys_are_not_continued_after_a_crop():
    """A memo continues its cache only if the step's keys are its keys plus the new ones: after
    a crop (as assisted decoding makes) the next step compresses from scratch and gives the
    uncached output."""
    from transformers import DynamicCache
    model = _sparse_llama().eval()
    ids = _ids(B=1, T=20)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :12], past_key_values=cache, use_cache=True)
        model(ids[:, 12:13], past_key_values=cache, use_cache=True)
        model(ids[:, 13:14], past_key_values=cache, use_cache=True)
        assert cache._nsa_compile_nsa[0].keys == 14
        cache.crop(-4)  # back to 10 positions
        cropped = model(ids[:, 10:13], past_key_values=cache, use_cache=True).logits
        want = model(ids[:, :13]).logits[:, 10:]
    assert _rel(cropped, want) < 1e-4


def test_a_compiled_step_drops_the_kept_compressed_keys():
    """torch.compile'd steps compress every key and keep no memo: one left by an eager step
    is dropped, so a later eager step cannot continue a cache that grew without it."""
    from transformers import DynamicCache
    model = _sparse_llama().eval()
    ids = _ids(B=1, T=16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :12], past_key_values=cache, use_cache=True)
        model(ids[:, 12:13], past_key_values=cache, use_cache=True)
        assert cache._nsa_compile_nsa is not None
        mid = compiled(ids[:, 13:14], past_key_values=cache, use_cache=True).logits
        assert cache._nsa_compile_nsa is None
        last = model(ids[:, 14:16], past_key_values=cache, use_cache=True).logits
        want = model(ids).logits
    torch._dynamo.reset()
    assert _rel(mid, want[:, 13:14]) < 1e-4
    assert _rel(last, want[:, 14:16]) < 1e-4


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
