"""NSAConfig / EngramConfig: validation naming the field, dict/JSON round-trip, frozen."""
import dataclasses
import json

import pytest
from hypothesis import given

from nsa_compile import EngramConfig, NSAConfig

from nsa_strategies import nsa_configs

# (field the message must name, kwargs) — each one invalid for exactly that reason.
INVALID_NSA = {
    "stride-not-dividing-block": ("compress_stride", dict(compress_block=32, compress_stride=12)),
    "stride-not-dividing-select": ("compress_stride", dict(compress_block=16, compress_stride=16,
                                                           select_block=40)),
    "block-larger-than-select": ("compress_block", dict(compress_block=128, compress_stride=16,
                                                        select_block=64)),
    "count-below-forced": ("select_count", dict(select_count=2, select_initial=1, select_local=2)),
    "count-zero": ("select_count", dict(select_count=0, select_initial=0, select_local=0)),
    "block-zero": ("compress_block", dict(compress_block=0)),
    "stride-negative": ("compress_stride", dict(compress_stride=-16)),
    "select-block-float": ("select_block", dict(select_block=64.0)),
    "block-bool": ("compress_block", dict(compress_block=True)),
    "initial-negative": ("select_initial", dict(select_initial=-1)),
    "local-float": ("select_local", dict(select_local=1.5)),
    "window-zero": ("window", dict(window=0)),
    "window-negative": ("window", dict(window=-512)),
    "branches-empty": ("branches", dict(branches=(), gate="learned")),
    "branches-unknown": ("branches", dict(branches=("compressed", "sliding"))),
    "branches-order": ("branches", dict(branches=("window", "selected"), gate=(0.5, 0.5))),
    "branches-repeated": ("branches", dict(branches=("window", "window"), gate=(0.5, 0.5))),
    "gate-unknown-string": ("gate", dict(gate="fixed")),
    "gate-count": ("gate", dict(gate=(1.0, 1.0))),
    "gate-nan": ("gate", dict(branches=("window",), gate=(float("nan"),))),
    "compressor-unknown": ("compressor", dict(compressor="conv")),
}


@pytest.mark.parametrize("field,kwargs", INVALID_NSA.values(), ids=INVALID_NSA.keys())
def test_nsa_config_invalid_names_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"NSAConfig\.{field}\b"):
        NSAConfig(**kwargs)


def test_nsa_config_defaults_are_the_papers():
    c = NSAConfig()
    assert (c.compress_block, c.compress_stride, c.select_block, c.select_count) == (32, 16, 64, 16)
    assert (c.select_initial, c.select_local, c.window) == (1, 2, 512)
    assert c.branches == ("compressed", "selected", "window")
    assert c.gate == "learned" and c.compressor == "mlp" and c.fixed_gates is None


@pytest.mark.parametrize("kwargs", [
    dict(window=None),
    dict(select_initial=0, select_local=0, select_count=1),
    dict(compress_block=64, compress_stride=64, select_block=64),
    dict(branches=("selected",), gate=(1.0,), compressor="mean"),
    dict(branches=["compressed", "window"], gate=[0.25, 0.75]),
], ids=["window-unbounded", "no-forced", "l-equals-lprime", "selected-only", "lists"])
def test_nsa_config_valid_edge_cases(kwargs):
    c = NSAConfig(**kwargs)
    assert isinstance(c.branches, tuple)
    if not isinstance(c.gate, str):
        assert isinstance(c.gate, tuple) and c.fixed_gates == c.gate
    hash(c)  # lists from JSON became tuples: still hashable


def test_nsa_config_fixed_gate_ints_become_floats():
    assert NSAConfig(branches=("window",), gate=(1,)).gate == (1.0,)


@given(nsa_configs())
def test_nsa_config_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    back = NSAConfig.from_dict(data)
    assert back == config and hash(back) == hash(config)
    assert back.to_dict() == config.to_dict()


def test_nsa_config_from_dict_rejects_unknown_field():
    data = NSAConfig().to_dict() | {"block_size": 64}
    with pytest.raises(ValueError, match="block_size"):
        NSAConfig.from_dict(data)


def test_nsa_config_from_dict_validates():
    data = NSAConfig().to_dict() | {"compress_stride": 12}
    with pytest.raises(ValueError, match=r"NSAConfig\.compress_stride"):
        NSAConfig.from_dict(data)


def test_nsa_config_is_frozen():
    c = NSAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.window = 128
    assert dataclasses.replace(c, window=128).window == 128 and c.window == 512
    with pytest.raises(ValueError, match=r"NSAConfig\.window"):
        dataclasses.replace(c, window=0)


INVALID_ENGRAM = {
    "layers-empty": ("layers", dict(layers=())),
    "layers-negative": ("layers", dict(layers=(-1,))),
    "layers-repeated": ("layers", dict(layers=(1, 1))),
    "orders-one": ("orders", dict(orders=(1, 2))),
    "orders-repeated": ("orders", dict(orders=(2, 2))),
    "orders-empty": ("orders", dict(orders=())),
    "heads-zero": ("heads", dict(heads=0)),
    "table-size-float": ("table_size", dict(table_size=1000.0)),
    "head-dim-negative": ("head_dim", dict(head_dim=-4)),
    "seed-str": ("seed", dict(seed="0")),
}


@pytest.mark.parametrize("field,kwargs", INVALID_ENGRAM.values(), ids=INVALID_ENGRAM.keys())
def test_engram_config_invalid_names_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"EngramConfig\.{field}\b"):
        EngramConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(layers=[0, 5], orders=[2, 3, 4], heads=4, table_size=1009, head_dim=16, conv=False,
         seed=7),
], ids=["defaults", "custom"])
def test_engram_config_json_round_trip(kwargs):
    config = EngramConfig(**kwargs)
    data = json.loads(json.dumps(config.to_dict()))
    back = EngramConfig.from_dict(data)
    assert back == config and back.to_dict() == config.to_dict()
    assert isinstance(back.layers, tuple) and isinstance(back.orders, tuple)


def test_engram_config_tokenizer_is_not_serialised():
    config = EngramConfig(tokenizer=["a", "b", "c"])
    assert "tokenizer" not in config.to_dict()
    assert EngramConfig.from_dict(config.to_dict()) == config  # tokenizer is compare=False


def test_engram_config_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="vocab"):
        EngramConfig.from_dict({"layers": [1], "vocab": 100})


def test_engram_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngramConfig().heads = 4
