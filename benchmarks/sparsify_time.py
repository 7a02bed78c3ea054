"""How long does `nsa_compile.sparsify` take on a 32-layer Llama (hidden 256) on CPU?

Run: python benchmarks/sparsify_time.py [--layers 32] [--hidden 256] [--seq 16] [--repeats 3]
Prints a table with the machine, torch/transformers versions and commit; the time is split into
tracing (torch.export), detection and the rewrite. Target: under 10 s.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time
import warnings

import torch
import transformers

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile.passes import api, detect, rewrite, trace


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _model(layers: int, hidden: int, impl: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden,
                                   intermediate_size=4 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=2,
                                   max_position_embeddings=4096)
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg).eval()


class _Timer:
    """Accumulates wall time spent in the pass's stages by wrapping their entry points."""

    def __init__(self):
        self.t = {"trace": 0.0, "detect": 0.0, "rewrite": 0.0}

    def wrap(self, owner, name, key):
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0
        setattr(owner, name, timed)
        return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"# sparsify time | CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | commit {_commit()}")
    print(f"# Llama: {a.layers} layers, hidden {a.hidden}, {a.hidden // 64} heads / 2 KV heads, "
          f"example input (1, {a.seq}); best of {a.repeats}")
    print("| attn impl | total s | trace s | detect s | rewrite s | sites rewritten |")
    print("|---|---|---|---|---|---|")
    for impl in ("sdpa", "eager"):
        best = None
        for _ in range(a.repeats):
            torch.manual_seed(0)
            model = _model(a.layers, a.hidden, impl)
            ids = torch.randint(0, 32000, (1, a.seq))
            timer = _Timer()
            saved = [(api, "trace_model", timer.wrap(api, "trace_model", "trace")),
                     (api, "detect", timer.wrap(api, "detect", "detect")),
                     (api, "install", timer.wrap(api, "install", "rewrite"))]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    nsa_compile.sparsify(model, NSAConfig(), example_inputs={"input_ids": ids})
                    total = time.perf_counter() - t0
            finally:
                for owner, name, fn in saved:
                    setattr(owner, name, fn)
            n = sum(1 for m in model.modules() if rewrite.is_rewritten(m))
            row = (total, timer.t["trace"], timer.t["detect"], timer.t["rewrite"], n)
            best = row if best is None or row[0] < best[0] else best
        print(f"| {impl} | {best[0]:.2f} | {best[1]:.2f} | {best[2]:.2f} | {best[3]:.2f} | "
              f"{best[4]}/{a.layers} |")


if __name__ == "__main__":
    main()
