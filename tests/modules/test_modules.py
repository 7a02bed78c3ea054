"""The NSA modules: Compressor, BranchGate, NSAAttention."""
import math

import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.modules import BranchGate, Compressor, NSAAttention
from nsa_compile.ops import nsa_attention


def _loop_mean(x, l, d):
    T = x.shape[2]
    return torch.stack([x[:, :, i:i + l].mean(2) for i in range(0, T - l + 1, d)], 2)


@pytest.mark.parametrize("T,l,d", [(64, 32, 16), (45, 8, 4), (7, 4, 1), (33, 16, 16)])
def test_compressor_mean_is_block_mean(T, l, d):
    x = torch.randn(2, 3, T, 5)
    c = Compressor(5, l, d, kind="mean")
    out = c(x)
    assert out.shape == (2, 3, (T - l) // d + 1, 5)
    torch.testing.assert_close(out, naive.mean_pool(x, l, d))
    torch.testing.assert_close(out, _loop_mean(x, l, d))
    assert not list(c.parameters())


@pytest.mark.parametrize("kind", ["mean", "mlp"])
def test_compressor_shorter_than_block_is_empty(kind):
    out = Compressor(4, 8, 4, kind=kind)(torch.randn(1, 2, 7, 4))
    assert out.shape == (1, 2, 0, 4)


def test_compressor_mlp_starts_as_mean_and_learns():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 40, 6)
    c = Compressor(6, 8, 4, kind="mlp")
    assert c.pos.shape == (8, 6) and c.pos.abs().sum() > 0  # a real position embedding
    # The module's mean part is mean_pool itself, and the MLP adds exactly zero at first.
    torch.testing.assert_close(c(x), naive.mean_pool(x, 8, 4), rtol=0, atol=0)
    target = torch.randn(2, 2, 9, 6)
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    loss = (c(x) - target).square().mean()
    loss.backward()
    # The zero-initialised last layer is what gets gradient first...
    assert c.fc2.weight.grad.abs().sum() > 0 and c.fc2.bias.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    assert not torch.allclose(c(x), naive.mean_pool(x, 8, 4))
    loss2 = (c(x) - target).square().mean()
    assert loss2 < loss
    loss2.backward()
    # ...and once it moved, the first layer and the position embedding learn too.
    for p in (c.fc1.weight, c.fc1.bias, c.pos):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_compressor_mlp_uses_position_inside_block():
    """Permuting keys inside a block changes an mlp compressor (not the mean)."""
    torch.manual_seed(0)
    c = Compressor(4, 4, 4, kind="mlp")
    torch.nn.init.normal_(c.fc2.weight)
    x = torch.randn(1, 1, 4, 4)
    flipped = x.flip(2)
    torch.testing.assert_close(naive.mean_pool(x, 4, 4), naive.mean_pool(flipped, 4, 4))
    assert not torch.allclose(c(x), c(flipped))


def test_compressor_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        Compressor(4, 8, 4, kind="conv")


@pytest.mark.parametrize("nb", [1, 2, 3])
def test_branch_gate_from_query_heads(nb):
    gate = BranchGate(in_features=8, num_heads=4, num_branches=nb)
    x = torch.randn(2, 4, 11, 8)
    g = gate(x)
    assert g.shape == (2, 4, 11, nb)
    # Starts as an average of the branches (capped at 0.95 for a single branch).
    torch.testing.assert_close(g, torch.full_like(g, min(1 / nb, 0.95)))
    torch.nn.init.normal_(gate.proj.weight, std=0.5)
    g = gate(x)
    assert ((g >= 0) & (g <= 1)).all() and g.std() > 0.1
    torch.testing.assert_close(g, torch.sigmoid(x @ gate.proj.weight.T + gate.proj.bias))


def test_branch_gate_from_hidden_layout():
    """(B, T, hidden) -> (B, heads, T, branches) with output h*nb + c of the projection at
    [:, h, :, c]."""
    heads, nb = 3, 2
    gate = BranchGate(in_features=5, num_heads=heads, num_branches=nb, from_hidden=True)
    x = torch.randn(2, 7, 5)
    assert gate(x).shape == (2, heads, 7, nb)
    torch.testing.assert_close(gate(x), torch.full((2, heads, 7, nb), 0.5))
    torch.nn.init.normal_(gate.proj.weight)
    with torch.no_grad():
        gate.proj.bias.copy_(torch.arange(heads * nb, dtype=torch.float32))
    logits = x @ gate.proj.weight.T + gate.proj.bias  # (B, T, heads * nb)
    g = gate(x)
    for h in range(heads):
        for c in range(nb):
            torch.testing.assert_close(g[:, h, :, c], torch.sigmoid(logits[..., h * nb + c]))


def _qkv(B=2, HQ=4, H=2, T=40, Dk=8, Dv=6):
    torch.manual_seed(1)
    return (torch.randn(B, HQ, T, Dk, requires_grad=True),
            torch.randn(B, H, T, Dk, requires_grad=True),
            torch.randn(B, H, T, Dv, requires_grad=True))


SMALL = dict(compress_block=8, compress_stride=4, select_block=16, select_count=3, window=12)


@pytest.mark.parametrize("hidden_size", [None, 16], ids=["gate-from-q", "gate-from-hidden"])
def test_nsa_attention_forward_backward(hidden_size):
    m = NSAAttention(NSAConfig(**SMALL), num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6,
                     hidden_size=hidden_size)
    q, k, v = _qkv()
    hidden = torch.randn(2, 40, 16, requires_grad=True) if hidden_size else None
    out = m(q, k, v, hidden=hidden)
    assert out.shape == (2, 4, 40, 6) and torch.isfinite(out).all()
    out.square().sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.abs().sum() > 0
    if hidden_size:
        # The gate's weight starts at zero, so the gradient reaches hidden once it moved.
        assert hidden.grad is not None and torch.equal(hidden.grad, torch.zeros_like(hidden))
        torch.nn.init.normal_(m.gate.proj.weight, std=0.1)
        m(q, k, v, hidden=hidden).sum().backward()
        assert hidden.grad.abs().sum() > 0
    names = {n for n, _ in m.named_parameters()}
    assert {"gate.proj.weight", "k_compress.fc2.weight", "v_compress.fc2.weight"} <= names
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name in ("gate.proj.weight", "gate.proj.bias", "v_compress.fc2.weight"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name


def test_nsa_attention_starts_as_mean_pooled_average():
    """Fresh module = the op with mean-pooled compressed keys and gates 1/3 everywhere."""
    cfg = NSAConfig(**SMALL)
    m = NSAAttention(cfg, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6)
    q, k, v = _qkv()
    gates = torch.full((2, 4, 40, 3), 1 / 3)
    ref = nsa_attention(q, k, v, config=cfg, gates=gates)
    torch.testing.assert_close(m(q, k, v), ref)


def test_nsa_attention_fixed_mean_has_no_parameters():
    cfg = NSAConfig(**SMALL, gate=(0.2, 0.3, 0.5), compressor="mean")
    m = NSAAttention(cfg, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=6, scale=0.25)
    assert not list(m.parameters())
    q, k, v = _qkv()
    torch.testing.assert_close(m(q, k, v), nsa_attention(q, k, v, config=cfg, scale=0.25))


def test_nsa_attention_window_only_has_no_compressor():
    cfg = NSAConfig(branches=("window",), window=None, gate=(1.0,))
    m = NSAAttention(cfg, num_heads=4, num_kv_heads=2, head_dim=8)
    assert not list(m.parameters())
    q, k, v = _qkv(Dv=8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True)
    torch.testing.assert_close(m(q, k, v), ref, rtol=1e-5, atol=1e-5)


def test_nsa_attention_needs_hidden_for_hidden_gates():
    m = NSAAttention(NSAConfig(**SMALL), num_heads=4, num_kv_heads=2, head_dim=8,
                     hidden_size=16)
    q, k, v = _qkv(Dv=8)
    with pytest.raises(ValueError, match="hidden"):
        m(q, k, v)


def test_nsa_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NSAAttention(NSAConfig(), num_heads=6, num_kv_heads=4, head_dim=8)


def test_nsa_attention_scale_default():
    m = NSAAttention(NSAConfig(**SMALL), num_heads=4, num_kv_heads=2, head_dim=8)
    q, k, v = _qkv(Dv=8)
    gates = torch.full((2, 4, 40, 3), 1 / 3)
    ref = nsa_attention(q, k, v, config=m.config, gates=gates, scale=1 / math.sqrt(8))
    torch.testing.assert_close(m(q, k, v), ref)
