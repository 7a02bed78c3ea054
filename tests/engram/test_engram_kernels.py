"""Engram lookup kernels: Triton (CPU interpreter) against the reference, the custom ops'
registration (fake, autograd) and the table gradient's determinism."""
import os

import pytest
import torch

from nsa_compile import Engram, EngramConfig
from nsa_compile.kernels.engram import naive
from nsa_compile.kernels.engram.op import engram_bwd, engram_fwd

CASES = {  # name: (B, T, orders, heads, head_dim)
    "T1": (1, 1, (2, 3), 2, 8),
    "T15-unsorted-orders": (2, 15, (3, 2, 5), 3, 24),
    "T63-one-head": (1, 63, (2,), 1, 32),
    "T111-batch3": (3, 111, (2, 3), 4, 16),
}


def _engram(orders, heads, head_dim, vocab=300, table_size=31):
    cfg = EngramConfig(orders=orders, heads=heads, table_size=table_size, head_dim=head_dim)
    return Engram(cfg, hidden_size=8, vocab_size=vocab, layer=2)


def _args(e, ids, table):
    return (ids, e.canon, e.multipliers, e.primes, e.offsets, e.pad_id, table, list(e.orders),
            e.heads)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Fresh kernel outputs start as NaN (floats) or -1 (ints): an unwritten element fails."""
    empty = torch.empty

    def filled(*shape, dtype=None, **kw):
        out = empty(*shape, dtype=dtype, **kw)
        return out.fill_(float("nan") if out.is_floating_point() else -1)
    monkeypatch.setattr(torch, "empty", filled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_reference(case, dtype, nan_outputs):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from nsa_compile.kernels.engram.triton_lookup import engram_lookup, engram_table_grad
    B, T, orders, heads, dh = CASES[case]
    e = _engram(orders, heads, dh)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (B, T), generator=g)
    table = torch.randn(e.table.shape, generator=g).to(dtype)
    emb_ref, rows_ref = naive.engram_lookup_ref(*_args(e, ids, table))
    emb, rows = engram_lookup(*_args(e, ids, table))
    assert torch.equal(rows, rows_ref) and torch.equal(rows, e.hash(ids))
    assert torch.equal(emb, emb_ref)  # a gather: bit-exact in any dtype
    # small tables force many repeated rows, so segments are long
    grad = torch.randn(emb.shape, generator=g).to(dtype)
    d_ref = naive.engram_table_grad_ref(grad.double(), rows, table.shape[0])
    d = engram_table_grad(grad, rows, table.shape[0])
    assert d.dtype == dtype and not d.isnan().any()
    tol = {torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(d.double(), d_ref, rtol=tol, atol=tol * d_ref.abs().max().item())


def test_triton_clamps_out_of_vocab_ids():
    """The module rejects bad ids; the kernel itself must still never read out of range."""
    from nsa_compile.kernels.engram.triton_lookup import engram_lookup
    e = _engram((2, 3), 2, 8, vocab=20)
    ids = torch.tensor([[3, 25, -4, 19]])
    emb, rows = engram_lookup(*_args(e, ids, e.table.detach()))
    emb_ref, rows_ref = naive.engram_lookup_ref(*_args(e, ids.clamp(0, 19), e.table.detach()))
    assert torch.equal(rows, rows_ref) and torch.equal(emb, emb_ref)


@pytest.mark.parametrize("block_n", [4, 16, 64])
def test_table_grad_runs_across_blocks(block_n, nan_outputs):
    """Runs of equal rows much longer than a block, starting and ending anywhere: the carry
    kernel must add every block's share exactly once. Bitwise reproducible."""
    from nsa_compile.kernels.engram.triton_lookup import EngramKernelConfig, engram_table_grad
    g = torch.Generator().manual_seed(block_n)
    rows = torch.cat([torch.randint(0, 3, (1, 50, 2), generator=g),  # long runs
                      torch.randint(3, 40, (1, 7, 2), generator=g)], dim=1)  # short ones
    grad = torch.randn(1, 57, 2 * 8, generator=g, dtype=torch.float64).float()
    cfg = EngramKernelConfig(block_n=block_n)
    first = engram_table_grad(grad, rows, 45, cfg)
    ref = naive.engram_table_grad_ref(grad.double(), rows, 45)
    torch.testing.assert_close(first.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, engram_table_grad(grad, rows, 45, cfg))
    assert torch.equal(first[40:], torch.zeros(5, 8))  # untouched rows stay zero


def test_custom_ops_opcheck():
    e = _engram((2, 3), 2, 8)
    ids = torch.randint(0, 300, (2, 9))
    table = torch.randn(e.table.shape, requires_grad=True)
    torch.library.opcheck(engram_fwd, _args(e, ids, table))
    emb, rows = engram_fwd(*_args(e, ids, table))
    torch.library.opcheck(engram_bwd, (torch.randn(emb.shape), rows, table.shape[0]))


def test_autograd_matches_indexing():
    e = _engram((2, 3), 3, 4)
    ids = torch.randint(0, 300, (2, 11))
    table = torch.randn(e.table.shape, dtype=torch.float64, requires_grad=True)
    emb, rows = engram_fwd(*_args(e, ids, table))
    w = torch.randn(emb.shape, dtype=torch.float64)
    (dt,) = torch.autograd.grad((emb * w).sum(), table)
    plain = table[rows.reshape(-1)].reshape(emb.shape)
    (dt_ref,) = torch.autograd.grad((plain * w).sum(), table)
    torch.testing.assert_close(dt, dt_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: engram_fwd(*_args(e, ids[:1, :4], t))[0],
                                     (table,), fast_mode=True)
