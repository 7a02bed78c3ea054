"""Engram lookup on the GPU: throughput and effective memory bandwidth of the Triton kernels.

Question: how close do the fused hash+gather forward and the sorted, deterministic table
gradient come to the GPU's memory bandwidth, and how do they compare with the same
computation in eager PyTorch (the reference, `kernels/engram/naive.py`) and with
torch.compile of that reference, in the same run?

Shapes: B=1, T tokens, orders (2, 3), 8 heads per order (K=16 rows per token), head_dim 32,
table_size 65536 (1.05 M rows per layer), vocab 128k, bf16 table unless --dtype. Bytes counted
(lower bounds, each byte once): forward = table rows read + embedding written + rows written +
ids and canonical ids read; backward = table gradient zero-filled and written + incoming
gradient read + sort (rows and permutation, read/written once each) + rows read.

    python benchmarks/bench_engram.py [--tokens 8192 32768 131072] [--dtype bf16|fp16|fp32]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nsa_compile import EngramConfig  # noqa: E402
from nsa_compile.kernels.engram import naive  # noqa: E402
from nsa_compile.kernels.engram.triton_lookup import engram_lookup, engram_table_grad  # noqa: E402
from nsa_compile.modules.engram import Engram  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _commit() -> str:
    if os.environ.get("NSA_COMMIT"):
        return os.environ["NSA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(__file__), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("NSA_COMMIT", "unknown")


def main() -> None:
    import triton
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_engram.py needs a CUDA GPU")
    dev, dtype = "cuda", DTYPES[args.dtype]
    cfg = EngramConfig(layers=(0,), orders=(2, 3), heads=8, table_size=65536, head_dim=32)
    eng = Engram(cfg, hidden_size=1024, vocab_size=args.vocab).to(dev)
    table = eng.table.detach().to(dtype)
    consts = (eng.canon, eng.multipliers, eng.primes, eng.offsets, eng.pad_id)
    orders, heads = list(cfg.orders), cfg.heads
    K, dh, R, es = len(orders) * heads, cfg.head_dim, table.shape[0], table.element_size()

    def ref_fwd(ids):
        return naive.engram_lookup_ref(ids, *consts[:4], consts[4], table, orders, heads)

    compiled_fwd = None if args.no_compile else torch.compile(ref_fwd, dynamic=False)

    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__} | commit {_commit()}")
    print(f"B=1, orders={tuple(orders)}, heads={heads} (K={K}), head_dim={dh}, rows={R}, "
          f"vocab={args.vocab}, table {args.dtype}; times in ms (median, triton do_bench)")
    print()
    head = (f"{'T':>7} | {'fwd triton':>10} {'GB/s':>6} | {'fwd eager':>9} | {'fwd compiled':>12} | "
            f"{'bwd triton':>10} {'GB/s':>6} {'(sort)':>6} | {'bwd eager':>9} | match")
    print(head)
    print("-" * len(head))
    for T in args.tokens:
        ids = torch.randint(0, args.vocab, (1, T), device=dev)
        emb, rows = engram_lookup(ids, *consts[:4], consts[4], table, orders, heads)
        emb_ref, rows_ref = ref_fwd(ids)
        grad = torch.randn_like(emb)
        d_tri = engram_table_grad(grad, rows, R)
        d_ref = naive.engram_table_grad_ref(grad, rows_ref, R)
        d_again = engram_table_grad(grad, rows, R)
        ok = (torch.equal(rows, rows_ref) and torch.equal(emb, emb_ref)
              and torch.equal(d_tri, d_again)
              and torch.allclose(d_tri.float(), d_ref.float(), rtol=1e-2, atol=1e-2))

        t_fwd = do_bench(lambda: engram_lookup(ids, *consts[:4], consts[4], table, orders, heads))
        t_ref = do_bench(lambda: ref_fwd(ids))
        t_cmp = do_bench(lambda: compiled_fwd(ids)) if compiled_fwd else float("nan")
        t_bwd = do_bench(lambda: engram_table_grad(grad, rows, R))
        t_sort = do_bench(lambda: torch.sort(rows.reshape(-1).to(torch.int32), stable=True))
        t_bref = do_bench(lambda: naive.engram_table_grad_ref(grad, rows_ref, R))

        n = T * K
        fwd_bytes = 2 * n * dh * es + n * 8 + T * 8 * (1 + max(orders))
        bwd_bytes = 2 * R * dh * es + n * dh * es + n * 8 * 5
        print(f"{T:>7} | {t_fwd:>10.3f} {fwd_bytes / t_fwd / 1e6:>6.0f} | {t_ref:>9.3f} | "
              f"{t_cmp:>12.3f} | {t_bwd:>10.3f} {bwd_bytes / t_bwd / 1e6:>6.0f} {t_sort:>6.3f} | "
              f"{t_bref:>9.3f} | {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
