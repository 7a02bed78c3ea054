"""Engram hashing and the canonical-id map: the spec's formula, ranges, collisions, causality."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_compile import Engram, EngramConfig
from nsa_compile.kernels.engram import naive
from nsa_compile.modules.engram import _is_prime, canonical_ids, normalize_token

VOCAB = 50


def make(orders=(2, 3), heads=4, table_size=101, seed=0, layer=0, vocab=VOCAB, tokenizer=None):
    cfg = EngramConfig(layers=(layer,), orders=orders, heads=heads, table_size=table_size,
                       head_dim=4, seed=seed, tokenizer=tokenizer)
    return Engram(cfg, hidden_size=16, vocab_size=vocab, layer=layer)


def spec_rows(e: Engram, ids: torch.Tensor) -> list:
    """The spec's formula with Python's unbounded ints: exact, so any int64 overflow in the
    implementation would show."""
    canon, m = e.canon.tolist(), e.multipliers.tolist()
    pad, primes, offsets = int(e.pad_id), e.primes.tolist(), e.offsets.tolist()
    out = []
    for b in range(ids.shape[0]):
        seq = ids[b].tolist()
        per_t = []
        for t in range(len(seq)):
            row = []
            for i, n in enumerate(e.orders):
                y = [canon[seq[t - j]] if t - j >= 0 else pad for j in range(n)]
                h = y[0] * m[0]
                for j in range(1, n):
                    h ^= y[j] * m[j]
                assert 0 <= h < 2 ** 63
                for k in range(e.heads):
                    c = i * e.heads + k
                    row.append(h % primes[c] + offsets[c])
            per_t.append(row)
        out.append(per_t)
    return out


@st.composite
def ids_and_config(draw):
    orders = tuple(draw(st.lists(st.integers(2, 5), min_size=1, max_size=3, unique=True)))
    heads = draw(st.integers(1, 3))
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, max(orders) + 3))  # includes T = 1 and T < the largest order
    ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=B * T, max_size=B * T))
    return orders, heads, torch.tensor(ids, dtype=torch.int64).view(B, T)


@given(ids_and_config())
def test_hash_matches_spec_formula_and_ranges(case):
    orders, heads, ids = case
    e = make(orders=orders, heads=heads)
    rows = e.hash(ids)
    assert rows.shape == (*ids.shape, len(orders) * heads) and rows.dtype == torch.int64
    assert rows.tolist() == spec_rows(e, ids)
    lo, hi = e.offsets, e.offsets + e.primes
    assert bool(((rows >= lo) & (rows < hi)).all())
    emb, op_rows = naive.engram_lookup_ref(ids, e.canon, e.multipliers, e.primes, e.offsets,
                                           e.pad_id, e.table, list(orders), heads)
    assert torch.equal(op_rows, rows)
    assert not emb.isnan().any()


@given(ids_and_config())
def test_hash_is_causal_and_local(case):
    """Row t depends only on ids[t-n+1 .. t] (the pad before the start): a prefix hashes as
    the prefix of the whole, and a change at position s leaves rows before s unchanged."""
    orders, heads, ids = case
    e = make(orders=orders, heads=heads)
    rows = e.hash(ids)
    T = ids.shape[1]
    for t in range(T):
        assert torch.equal(e.hash(ids[:, :t + 1]), rows[:, :t + 1])
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert torch.equal(e.hash(changed)[:, :-1], rows[:, :-1])


def test_same_ngram_same_rows_anywhere():
    e = make(orders=(2, 3))
    a = torch.tensor([[5, 7, 9, 1, 2, 7, 9]])
    rows = e.hash(a)
    # order 2 columns: the bigram (7, 9) ends at t=2 and at t=6
    assert torch.equal(rows[0, 2, :4], rows[0, 6, :4])
    # order 3 differs: (5, 7, 9) vs (2, 7, 9)
    assert not torch.equal(rows[0, 2, 4:], rows[0, 6, 4:])


def test_distinct_primes_and_offsets():
    e = make(orders=(2, 3, 4), heads=5, table_size=1000)
    primes = e.primes.tolist()
    assert len(set(primes)) == len(primes) and all(p >= 1000 and _is_prime(p) for p in primes)
    assert e.offsets.tolist() == [sum(primes[:i]) for i in range(len(primes))]
    assert e.table.shape == (sum(primes), 4)
    assert all(m % 2 == 1 for m in e.multipliers.tolist())


def test_layers_get_different_multipliers_and_seed_is_reproducible():
    assert not torch.equal(make(layer=1).multipliers, make(layer=8).multipliers)
    assert torch.equal(make(layer=1, seed=3).multipliers, make(layer=1, seed=3).multipliers)
    assert not torch.equal(make(seed=3).multipliers, make(seed=4).multipliers)


def test_few_collisions_for_distinct_ngrams():
    """1000 distinct bigrams into heads of >= 10007 rows: each head keeps close to the
    birthday-bound number of distinct rows, and no two bigrams collide in every head."""
    V = 40
    e = make(orders=(2,), heads=4, table_size=10007, vocab=V)
    g = torch.Generator().manual_seed(0)
    pairs = torch.randperm(V * V, generator=g)[:1000]
    ids = torch.stack([pairs // V, pairs % V], dim=1)  # (1000, 2): bigram ends at t = 1
    rows = e.hash(ids)[:, 1]  # (1000, heads)
    for k in range(e.heads):
        assert rows[:, k].unique().numel() >= 0.9 * 1000
    assert len({tuple(r) for r in rows.tolist()}) == 1000


def test_out_of_vocab_ids_raise_clearly():
    e = make()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
        e.hash(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.hash(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer"):
        e.hash(torch.tensor([[1.0, 2.0]]))


def test_normalize_token():
    assert normalize_token(" Hello") == "hello"
    assert normalize_token("Café") == normalize_token("cafe") == "cafe"
    assert normalize_token("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    assert normalize_token("\t\n") == " "
    assert normalize_token("a \t b") == "a b"


def test_canonical_ids_from_token_list():
    tokens = ["<pad>", "Hello", " hello", "HELLO", "café", "cafe", "world", "\ufffd", "\n"]
    canon = canonical_ids(tokens, vocab_size=12).tolist()
    assert len(canon) == 12
    assert canon[1] == canon[2] == canon[3]
    assert canon[4] == canon[5]
    assert len({canon[0], canon[1], canon[4], canon[6], canon[7], canon[8]}) == 6
    # padded embedding rows past the tokenizer each get their own id
    assert len(set(canon[9:])) == 3 and not set(canon[9:]) & set(canon[:9])
    # numbered by first appearance: each new id is one more than the largest so far
    assert all(c <= max(canon[:i], default=-1) + 1 for i, c in enumerate(canon))


def test_canonical_ids_identity_without_tokenizer():
    assert torch.equal(canonical_ids(None, 7), torch.arange(7))


def _train_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    corpus = ["Hello hello HELLO world", "Café cafe CAFE world", "the The THE end"] * 20
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return tok


def test_canonical_ids_from_locally_trained_tokenizer():
    from transformers import PreTrainedTokenizerFast
    raw = _train_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")
    for tok in (raw, hf):
        canon = canonical_ids(tok, vocab_size=len(hf))
        vocab = hf.get_vocab()
        same = lambda *ws: len({int(canon[vocab[w]]) for w in ws}) == 1
        assert same("Hello", "hello", "HELLO") and same("Café", "cafe", "CAFE")
        assert same("the", "The", "THE")
        assert not same("hello", "world")
        assert int(canon.max()) + 1 == len(hf) - 6  # 9 words fold into 3, specials kept


def test_engram_with_tokenizer_hashes_case_variants_alike():
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), unk_token="[UNK]")
    e = make(vocab=len(hf), tokenizer=hf)
    a = torch.tensor([hf.encode("Hello world the end")])
    b = torch.tensor([hf.encode("HELLO world THE end")])
    assert not torch.equal(a, b) and torch.equal(e.hash(a), e.hash(b))


def test_config_rejects_bad_tokenizer():
    with pytest.raises(ValueError, match="EngramConfig.tokenizer"):
        EngramConfig(tokenizer=[1, 2])
    with pytest.raises(ValueError, match="EngramConfig.tokenizer"):
        EngramConfig(tokenizer=object())
