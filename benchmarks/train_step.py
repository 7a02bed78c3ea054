"""One training step of a Llama-shaped model at long context: dense SDPA against the same model
after `nsa_compile.sparsify`, timed end to end in one GPU run.

python benchmarks/train_step.py [--seq-len 32768] [--layers 4] [--hidden 1024]
A step is forward with the loss, backward and a fused AdamW update, bf16 weights, batch 1,
eager (no torch.compile), median of --reps steps after two warm-up steps (which also tune the
NSA kernels on a cache miss). Prints a markdown table last and writes JSON to $OUT.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

from nsa_compile import NSAConfig, bench, sparsify


def build(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, T: int):
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=T, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()


def step_ms(model, ids, reps: int):
    """(median step ms, peak GiB) of forward + loss + backward + AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    head = bench.header()
    T = args.seq_len
    dense = build(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, T)
    ids = torch.randint(0, args.vocab, (1, T), device="cuda")
    sparse = sparsify(copy.deepcopy(dense), NSAConfig(), example_inputs=(ids[:, :256],))
    rows = {}
    for name, model in (("dense SDPA", dense), ("NSA (sparsify)", sparse)):
        rows[name] = step_ms(model, ids, args.reps)
        print(f"{name}: {rows[name][0]:.1f} ms, peak {rows[name][1]:.1f} GiB", flush=True)
        torch.cuda.empty_cache()
    shape = (f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} "
             f"heads of {args.hidden // args.heads}, vocab {args.vocab}, T={T}, batch 1, bf16")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "train_step.json"), "w") as fh:
            json.dump(dict(header=head, shape=shape, rows=rows), fh, indent=1)
    base = rows["dense SDPA"][0]
    print(f"\n{head['gpu']} | torch {head['torch']} | triton {head['triton']} | commit "
          f"{head['commit']} | {shape}, eager training step (fwd+bwd+AdamW)")
    print("| model | step ms | vs dense | peak GiB |\n|---|---|---|---|")
    for name, (t, mem) in rows.items():
        print(f"| {name} | {t:.1f} | {base / t:.2f}x | {mem:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
