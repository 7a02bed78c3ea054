"""After sparsify, torch.compile(fullgraph=True) on CPU: zero graph breaks, compiled == eager,
no recompiles over three same-shape calls, and gradients through the compiled graph."""
import warnings

import pytest
import torch
import torch._dynamo.testing

import nsa_compile
from nsa_compile import NSAConfig
from zoo.generic import ZooModel, ZooSpec
from zoo.hf import FAMILIES, VOCAB, tiny_hf
from zoo.nanogpt import GPT, GPTConfig

LEARNED = NSAConfig(compress_block=8, compress_stride=4, select_block=8, select_count=3,
                    select_initial=1, select_local=1, window=8)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sparsified(name):
    """(model, args, kwargs, to_tensor) for a named tiny model, sparsified with learned gates."""
    torch.manual_seed(0)
    if name.startswith("nanogpt"):
        model = GPT(GPTConfig(flash=name.endswith("flash")))
        args, kwargs, get = (torch.randint(0, 97, (2, 40)),), {}, lambda o: o
        example = args
    elif name.startswith("zoo"):
        spec = ZooSpec(depth=2, n_head=4, n_kv_head=2, attn="einsum_bthd", mask="where", gqa="tile",
                       padding=True)
        model = ZooModel(spec)
        ids = torch.randint(0, spec.vocab, (2, 40))
        pad = torch.ones_like(ids)
        pad[1, -5:] = 0
        args, kwargs, get, example = (ids, pad), {}, lambda o: o, (ids, torch.ones_like(ids))
    else:
        family, impl = name.split("-")
        model = tiny_hf(family, impl, attn_pdrop=0.0) if family == "gpt2" else tiny_hf(family, impl)
        ids = torch.randint(1, VOCAB, (2, 40))
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        args, get = (), lambda o: o.logits
        kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
        example = {"input_ids": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsa_compile.sparsify(model, LEARNED, example_inputs=example)
    return model.eval(), args, kwargs, get


NAMES = ["nanogpt-flash", "nanogpt-manual", "zoo-einsum-tile-padding"] + \
    [f"{f}-{impl}" for f in FAMILIES for impl in ("sdpa", "eager")]


def _compiled_three_times(model, args, kwargs, get, backend):
    """Output of the third call of torch.compile(fullgraph=True); asserts one compiled frame."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(3):
        out = get(compiled(*args, **kwargs))
    assert counter.frame_count == 1
    return out


@pytest.mark.parametrize("name", NAMES)
def test_fullgraph_no_breaks_no_recompiles(name):
    model, args, kwargs, get = _sparsified(name)
    ref = get(model(*args, **kwargs))
    explain = torch._dynamo.explain(model)(*args, **kwargs)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    out = _compiled_three_times(model, args, kwargs, get, "aot_eager")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["nanogpt-manual", "llama-sdpa"])
def test_inductor_matches_eager_with_gradients(name):
    model, args, kwargs, get = _sparsified(name)
    model.train()
    ref = get(model(*args, **kwargs))
    ref.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".nsa." in n}
    model.zero_grad()
    out = _compiled_three_times(model, args, kwargs, get, "inductor")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    model.zero_grad()
    out.square().mean().backward()
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-3,
                                   atol=1e-5, msg=n)
