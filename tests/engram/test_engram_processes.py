"""Hashing is the same in every process: whatever PYTHONHASHSEED, and after a state_dict round
trip into a fresh process whose Engram was built differently."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from nsa_compile import Engram, EngramConfig

# Varied token strings, so a map built by iterating a set or hashing strings would differ.
TOKENS = [f"{w}{s}" for w in ("Hello", "hello", "Café", "cafe", "x", "ÿ", "  ", "日本")
          for s in ("", " ", "!", "ing")]
IDS = [[3, 17, 5, 5, 30, 1, 0, 31, 12], [8, 8, 8, 2, 9, 30, 21, 4, 16]]

BUILD = """
import json, sys, torch
from nsa_compile import Engram, EngramConfig
TOKENS, IDS = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
cfg = EngramConfig(orders=(2, 3, 4), heads=3, table_size=97, head_dim=4, seed=5,
                   tokenizer=TOKENS)
e = Engram(cfg, hidden_size=8, vocab_size=40, layer=3)
"""


def run(code: str, hashseed: str, *args: str) -> list:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), json.dumps(TOKENS),
                          json.dumps(IDS), *args], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hash_identical_across_pythonhashseed(tmp_path):
    code = BUILD + "print(json.dumps([e.hash(IDS).tolist(), e.canon.tolist()]))"
    results = [run(code, seed) for seed in ("0", "1", "4242")]
    assert results[0] == results[1] == results[2]
    cfg = EngramConfig(orders=(2, 3, 4), heads=3, table_size=97, head_dim=4, seed=5,
                       tokenizer=TOKENS)
    here = Engram(cfg, hidden_size=8, vocab_size=40, layer=3)
    assert here.hash(torch.tensor(IDS)).tolist() == results[0][0]


def test_hash_survives_state_dict_round_trip_into_fresh_process(tmp_path):
    path = str(tmp_path / "engram.pt")
    save = BUILD + "torch.save(e.state_dict(), sys.argv[3]); print(json.dumps(e.hash(IDS).tolist()))"
    # The fresh process builds its Engram without the tokenizer and with another seed and
    # layer: everything the hash depends on must come from the state_dict.
    load = """
    import json, sys, torch
    from nsa_compile import Engram, EngramConfig
    IDS = torch.tensor(json.loads(sys.argv[2]))
    e = Engram(EngramConfig(orders=(2, 3, 4), heads=3, table_size=97, head_dim=4, seed=99),
               hidden_size=8, vocab_size=40, layer=0)
    before = e.hash(IDS).tolist()
    e.load_state_dict(torch.load(sys.argv[3]))
    print(json.dumps([before, e.hash(IDS).tolist()]))
    """
    saved = run(save, "1", path)
    before, loaded = run(load, "2", path)
    assert loaded == saved and before != saved
