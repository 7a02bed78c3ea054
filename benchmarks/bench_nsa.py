"""NSA forward speed against dense SDPA, FlexAttention (window 512) and fla-core's NSA.

Run on a GPU (one device call): python benchmarks/bench_nsa.py [--quick] [--ts 8192,16384]
All numbers come from this one run; prints a markdown table last and writes JSON to $OUT.
Shapes (SPEC §6): bf16, B=1, D=128, HQ/H = 64/4 and 32/8, NSA defaults (32/16/64/16/512).
Ours runs all three branches with learned-style gates and mean-pooled compressed keys
(computed inside the timed region, as fla does); fla runs compression + selection, no window.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nsa_compile import NSAConfig
from nsa_compile.ops import nsa_attention

DT = torch.bfloat16
D = 128
GROUPS = [(64, 4), (32, 8)]
rows = []


def ms(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def inputs(HQ, H, T, layout="bhtd"):
    if layout == "bthd":
        shape_q, shape_kv = (1, T, HQ, D), (1, T, H, D)
    else:
        shape_q, shape_kv = (1, HQ, T, D), (1, H, T, D)
    return (torch.randn(shape_q, device="cuda", dtype=DT), torch.randn(shape_kv, device="cuda", dtype=DT),
            torch.randn(shape_kv, device="cuda", dtype=DT))


def peak(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def dense(HQ, H, T):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = inputs(HQ, H, T)
    best = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    try:
        ke, ve = k.repeat_interleave(HQ // H, 1), v.repeat_interleave(HQ // H, 1)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            best = min(best, ms(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)))
        del ke, ve
    except RuntimeError as exc:
        print(f"cudnn T={T}: {exc}", flush=True)
    return best, None


def flex(HQ, H, T, W=512):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention)
    bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W), None, None, T, T,
                           device="cuda")
    q, k, v = inputs(HQ, H, T)
    return ms(lambda: fa(q, k, v, block_mask=bm, enable_gqa=True)), None


def fla(HQ, H, T):
    from fla.ops.nsa import parallel_nsa
    q, k, v = inputs(HQ, H, T, "bthd")
    g = [torch.rand(1, T, HQ, device="cuda", dtype=DT) for _ in range(2)]
    f = lambda: parallel_nsa(q, k, v, g_cmp=g[0], g_slc=g[1], block_counts=16, block_size=64,
                             window_size=0)
    return ms(f), peak(f)


def ours(HQ, H, T):
    q, k, v = inputs(HQ, H, T)
    gates = torch.rand(1, HQ, T, 3, device="cuda", dtype=DT)
    cfg = NSAConfig()
    f = lambda: nsa_attention(q, k, v, config=cfg, gates=gates)
    f()  # tunes this shape's bucket on a cache miss
    return ms(f), peak(f)


def commit():
    env = os.environ.get("NSA_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--only", default="dense,flex,fla,ours")
    args = ap.parse_args()
    import triton
    head = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, commit=commit())
    print(head, flush=True)
    which = args.only.split(",")
    fns = dict(dense=dense, flex=flex, fla=fla, ours=ours)
    for HQ, H in GROUPS:
        for T in [int(x) for x in args.ts.split(",")]:
            for name in which:
                if T > 65536 and name in ("flex", "fla"):
                    continue
                t0 = time.time()
                try:
                    fwd, mem = fns[name](HQ, H, T)
                except Exception as exc:  # a peer failing must not stop the table
                    print(f"{name} HQ={HQ} H={H} T={T} failed: {type(exc).__name__}: "
                          f"{str(exc)[:300]}", flush=True)
                    continue
                rows.append(dict(impl=name, HQ=HQ, H=H, T=T, fwd_ms=fwd, peak_MiB=mem))
                print(f"{name:6s} HQ={HQ} H={H} T={T:6d} fwd={fwd:8.3f} ms mem={mem} "
                      f"({time.time() - t0:.0f}s)", flush=True)
                torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_nsa.json"), "w") as fh:
            json.dump(dict(header=head, rows=rows), fh, indent=1)
    print_table(head, rows)


def print_table(head, rows):
    print(f"\n{head['gpu']} | torch {head['torch']} | triton {head['triton']} | "
          f"commit {head['commit']} | bf16 B=1 D=128, forward ms")
    print("| HQ/H | T | dense | flex w512 | fla cmp+slc | ours (3 branches) | ours vs dense | "
          "ours vs fla | ours peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["HQ"], r["H"], r["T"]) for r in rows}, key=lambda x: (-x[0], x[2]))
    for HQ, H, T in keys:
        get = {r["impl"]: r for r in rows if (r["HQ"], r["H"], r["T"]) == (HQ, H, T)}
        f = lambda n: f"{get[n]['fwd_ms']:.2f}" if n in get else "-"
        ratio = lambda a, b: (f"{get[a]['fwd_ms'] / get[b]['fwd_ms']:.2f}x"
                              if a in get and b in get else "-")
        mem = f"{get['ours']['peak_MiB']:.0f}" if "ours" in get else "-"
        print(f"| {HQ}/{H} | {T} | {f('dense')} | {f('flex')} | {f('fla')} | {f('ours')} | "
              f"{ratio('dense', 'ours')} | {ratio('fla', 'ours')} | {mem} |")


if __name__ == "__main__":
    sys.exit(main())
