"""Engram under incremental decoding with a KV cache: each step sees only its new tokens, but
its n-grams and conv reach back into the cache's positions, so stepping through a sequence
must give the full-sequence forward's output (greedy and beam search through generate(), and
a hand-written loop); a cache Engram cannot continue is refused."""
import inspect

import pytest
import torch

from nsa_compile import EngramConfig
from nsa_compile.passes.engram import apply_engram

from engram_models import tiny_llama, wake_engrams

# orders up to 3: the n-grams reach 2 ids back and the conv 9 positions, longer than a step
CFG = EngramConfig(layers=(0, 2), orders=(2, 3), heads=2, table_size=61, head_dim=8)


def ids_of(B, T, seed=0, vocab=128):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def step(model, ids, cache=None, original=None):
    """(logits, cache) of one call over `cache`; transformers renamed past_key_values to cache
    in 5.x, as a kwarg and as an output field (`original`: the model a compiled one wraps)."""
    forward = (original or model).forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    out = model(ids, use_cache=True, **{name: cache})
    return out.logits, getattr(out, name)


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = tiny_llama()
    apply_engram(model, CFG, (ids_of(1, 8),))
    wake_engrams(model, std=0.5)
    return model


@pytest.mark.parametrize("steps", [(5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), (1, 2, 7, 3, 11)],
                         ids=["prompt5-then-1s", "ragged"])
def test_stepping_through_a_cache_matches_the_full_forward(model, steps):
    """Chunks shorter and longer than the n-gram and conv reach, from a 1-token prompt too."""
    ids = ids_of(2, sum(steps), seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, start, parts = None, 0, []
        for n in steps:
            logits, cache = step(model, ids[:, start:start + n], cache)
            start += n
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
def test_generate_with_cache_matches_generate_without(model, beams):
    prompt = ids_of(2, 6, seed=3)
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
              do_sample=False, num_beams=beams, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    ref = model.generate(use_cache=False, **kw)
    out = model.generate(use_cache=True, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_cache_engram_cannot_continue_is_refused(model):
    ids = ids_of(1, 10, seed=4)
    with torch.no_grad():
        _, cache = step(model, ids[:, :6])
        cache.crop(-2)
        with pytest.raises(RuntimeError, match="continues a KV cache of 4 positions.*6 posi"):
            step(model, ids[:, 4:5], cache)
    model.train()
    _, cache = step(model, ids[:, :6])  # a training step leaves no context
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="carries Engram's context for none"):
        step(model, ids[:, 6:7], cache)


def test_batch_size_must_match_the_cache(model):
    with torch.no_grad():
        _, cache = step(model, ids_of(2, 5))
        with pytest.raises(ValueError, match="holds 2 sequences but this call has 1"):
            step(model, ids_of(1, 1), cache)


def test_compiled_decoding_matches_and_does_not_recompile_per_step(model):
    """The contexts pass through torch.compile's graphs: right outputs, and the graphs do not
    grow with the steps (a position count carried as an int recompiled at every step)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests' graphs
    compiled = torch.compile(model, backend="aot_eager")
    steps = (5,) + (1,) * 9
    ids = ids_of(2, sum(steps), seed=5)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, start, parts = None, 0, []
        for n in steps:
            logits, cache = step(compiled, ids[:, start:start + n], cache, model)
            start += n
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
    torch._dynamo.reset()
