"""plan_engram / apply_engram on a hand-written GPT and a Hugging Face Llama: detection, the
report, output unchanged at insertion, causality, batching, errors, state_dict, training,
torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nsa_compile
from nsa_compile import Engram, EngramConfig
from nsa_compile.passes.engram import apply_engram, plan_engram
from nsa_compile.passes.report import Report

from engram_models import TinyGPT, tiny_llama, wake_engrams

CFG = EngramConfig(layers=(0, 2), orders=(2, 3), heads=2, table_size=61, head_dim=8)


def logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def ids_for(model, B=2, T=13, seed=0):
    vocab = 97 if isinstance(model, TinyGPT) else model.config.vocab_size
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["gpt", "llama"])
def model(request):
    torch.manual_seed(0)
    return TinyGPT().eval() if request.param == "gpt" else tiny_llama()


def test_plan_without_config_reports_embedding_skip(model):
    sites = plan_engram(model, None, (ids_for(model),))
    assert sites[0].kind == "embedding" and sites[0].status == "skip"
    assert sites[0].path in ("wte", "model.embed_tokens")
    assert "no EngramConfig given" in sites[0].reason
    assert not any(isinstance(m, Engram) for m in model.modules())


def test_plan_reports_embedding_and_insertion_points(model):
    sites = plan_engram(model, CFG, (ids_for(model),))
    blocks = "blocks" if isinstance(model, TinyGPT) else "model.layers"
    assert [s.path for s in sites[1:]] == [f"{blocks}.0", f"{blocks}.2"]
    assert all(s.status == "rewrite" and s.kind == "embedding" for s in sites)
    assert "input_ids" in sites[0].reason or "idx" in sites[0].reason
    print(Report(sites))


def test_insertion_leaves_output_unchanged(model):
    ids = ids_for(model)
    before = logits(model, ids)
    keys = set(model.state_dict())
    sites = apply_engram(model, CFG, (ids,))
    assert len(sites) == 3
    assert torch.equal(logits(model, ids), before)
    new = set(model.state_dict())
    assert keys < new and all(".engram." in k for k in new - keys)
    assert sum(isinstance(m, Engram) for m in model.modules()) == 2


def test_engram_changes_output_once_woken_and_stays_causal(model):
    ids = ids_for(model, T=17)
    apply_engram(model, CFG, (ids,))
    before = logits(model, ids)
    wake_engrams(model)
    after = logits(model, ids)
    assert not torch.allclose(before, after)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 5) % 97
    out = logits(model, changed)
    torch.testing.assert_close(out[:, :9], after[:, :9], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, 9:], after[:, 9:])


def test_batched_rows_are_independent(model):
    ids = ids_for(model, B=3, T=11)
    apply_engram(model, CFG, (ids[:1],))
    wake_engrams(model)
    whole = logits(model, ids)
    for b in range(3):
        torch.testing.assert_close(logits(model, ids[b:b + 1]), whole[b:b + 1],
                                   rtol=1e-5, atol=1e-5)


def test_errors_are_clear(model):
    ids = ids_for(model)
    with pytest.raises(ValueError, match=r"block index 9 is out of range.*has [34] blocks"):
        apply_engram(model, EngramConfig(layers=(1, 9)), (ids,))
    assert not any(isinstance(m, Engram) for m in model.modules())
    apply_engram(model, CFG, (ids,))
    with pytest.raises(ValueError, match="already has Engram"):
        apply_engram(model, CFG, (ids,))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 4), 10_000))


def test_inputs_embeds_call_fails_clearly(llama):
    ids = ids_for(llama)
    apply_engram(llama, CFG, (ids,))
    llama(ids)  # leaves ids behind; the next call must not reuse them
    with pytest.raises(RuntimeError, match="no token ids"):
        llama(inputs_embeds=torch.randn(2, 13, 32))


def test_model_without_token_embedding():
    class Floats(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    x = (torch.randn(2, 5, 8),)
    assert plan_engram(Floats(), None, x) == []
    with pytest.raises(ValueError, match="has no token embedding"):
        apply_engram(Floats(), CFG, x)


def test_position_embedding_input_is_not_the_token_embedding():
    class WithPositions(TinyGPT):
        def forward(self, idx, pos):
            x = self.wte(idx) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    m = WithPositions(max_len=200).eval()
    ids = torch.randint(0, 97, (2, 6))
    sites = plan_engram(m, CFG, (ids, torch.arange(6).expand(2, 6)))
    assert sites[0].path == "wte"
    assert sites[-1].path == "wpe" and sites[-1].status == "skip"


def test_state_dict_round_trip_into_fresh_model(model):
    ids = ids_for(model)
    apply_engram(model, CFG, (ids,))
    wake_engrams(model)
    expected = logits(model, ids)
    torch.manual_seed(123)
    fresh = TinyGPT().eval() if isinstance(model, TinyGPT) else tiny_llama()
    apply_engram(fresh, EngramConfig(**{**CFG.to_dict(), "seed": 7}), (ids,))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=0)


def test_training_tables_get_gradients_and_loss_falls():
    """Memorise a fixed sequence: the tables receive gradients (once W_V has left zero) and
    the loss falls, with the tables in their own param group."""
    torch.manual_seed(0)
    model = TinyGPT(layers=2).train()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 97, (4, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    apply_engram(model, EngramConfig(layers=(0, 1), heads=2, table_size=211, head_dim=8), (x,))
    groups = nsa_compile.param_groups(model, lr=3e-3, weight_decay=0.1)
    tables = [m.table for m in model.modules() if isinstance(m, Engram)]
    assert [gr["name"] for gr in groups] == ["default", "engram_tables"]
    assert groups[1]["lr"] == pytest.approx(1.5e-2) and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(t) for t in tables}
    opt = torch.optim.AdamW(groups)
    losses = []
    for step in range(40):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        if step == 3:
            assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_compile_fullgraph_no_graph_break(name):
    """fullgraph=True turns any graph break into an error; forward and gradients match eager
    (aot_eager: the custom ops and hooks go through AOTAutograd without Inductor's cost)."""
    torch.manual_seed(0)
    model = TinyGPT() if name == "gpt" else tiny_llama()
    ids = ids_for(model, B=2, T=10)
    apply_engram(model, CFG, (ids,))
    wake_engrams(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for T in (10, 7):
        batch = ids_for(model, B=2, T=T, seed=T)
        eager = logits(model, batch)
        out = logits(compiled, batch)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    table = model.get_submodule("blocks.0.engram" if name == "gpt"
                                else "model.layers.0.engram").table
    logits(compiled, batch).square().mean().backward()
    g_compiled = table.grad.clone()
    table.grad = None
    logits(model, batch).square().mean().backward()
    torch.testing.assert_close(g_compiled, table.grad, rtol=1e-4, atol=1e-6)


def test_compile_inductor(gpt):
    ids = ids_for(gpt, B=2, T=9)
    apply_engram(gpt, CFG, (ids,))
    wake_engrams(gpt)
    compiled = torch.compile(gpt, fullgraph=True)
    torch.testing.assert_close(compiled(ids), gpt(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="outside"):
        compiled(torch.full((2, 9), 500))
