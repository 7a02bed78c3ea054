"""Which loop order of the selected branch is faster, by GQA group size and length?

Per position (a program walks one position's n blocks: each block's K/V is read once per
choosing position) against block by block (a program walks the queries that chose one block,
then a merge pass), for the forward kernel and for the backward's dQ (own kernel, or fused
into the block-centric dK/dV kernel). Each variant is timed with its best config of a small
fixed set, on the block choice of the real selection kernel.

Run on a GPU: python benchmarks/selected_order.py [--ts 8192,65536] [--groups 16/8,32/8,32/4,64/4]
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive, triton_bwd, triton_fwd
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.templates.nsa_configs import DEFAULTS, KernelConfig

D = 128
FWD = {"positions": [KernelConfig(16, 0, w, s) for w in (2, 4) for s in (1, 2)],
       "blocks": [KernelConfig(m, 1, w, s) for m in (32, 64, 128) for w in (4, 8)
                  for s in (1, 2) if (m, w) != (128, 4)]}
BWD = {"own dQ kernel": [KernelConfig(16, 0, w, s) for w in (2, 4) for s in (1, 2)],
       "fused dQ": [KernelConfig(16, 1, 4, 1)]}


def best(fn, configs):
    times = {c: do_bench(lambda: fn(c), warmup=5, rep=20, return_mode="median") for c in configs}
    c = min(times, key=times.get)
    return times[c], c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,65536")
    ap.add_argument("--groups", default="16/8,32/8,32/4,64/4")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    rows = []
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            torch.manual_seed(0)
            make = lambda h: torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16)
            q, k, v, do = make(HQ), make(H), make(H), make(HQ)
            gates = torch.rand(1, HQ, T, 3, device="cuda", dtype=torch.bfloat16)
            kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
            p = NSAParams.from_config(NSAConfig(), D ** -0.5)
            res = triton_fwd.nsa_forward(q, k, v, gates, kc, vc, p, save=True)
            a = triton_fwd._Launch(q, k, v, gates, kc, vc, p, torch.empty_like(q))
            fwd = {name: best(lambda c: triton_fwd.run_slc(a, c, res.block_idx), cfgs)
                   for name, cfgs in FWD.items()}
            stats = triton_bwd.row_stats(do, res.branch_out, res.branch_lse(), gates, p, H)

            def selected_bwd(c, dkdv=DEFAULTS["slc_dkdv"]):
                run = triton_bwd._Backward(do, q, k, v, kc, vc, p, stats,
                                           {**DEFAULTS, "slc_dq": c, "slc_dkdv": dkdv})
                run.selected(res.block_idx)

            dkdv = [KernelConfig(m, 0, w, s) for m in (32, 64, 128) for w in (4, 8) for s in (1, 2)]
            bwd = {}
            for name, cfgs in BWD.items():
                _, c_dq = best(selected_bwd, cfgs)
                bwd[name] = best(lambda c: selected_bwd(c_dq, c), dkdv)
            rows.append((HQ, H, T, fwd, bwd))
            line = " ".join(f"{n}={t:.2f}ms{c}" for n, (t, c) in {**fwd, **bwd}.items())
            print(f"HQ/H={HQ}/{H} T={T}: {line}", flush=True)
            del q, k, v, do, gates, kc, vc, res, a, stats
            torch.cuda.empty_cache()
    print("\n| HQ/H | G | T | fwd per position | fwd block by block | bwd own dQ kernel "
          "| bwd dQ fused |")
    print("|---|---|---|---|---|---|---|")
    for HQ, H, T, fwd, bwd in rows:
        f = [fwd[n][0] for n in FWD]
        b = [bwd[n][0] for n in BWD]
        print(f"| {HQ}/{H} | {HQ // H} | {T} | {f[0]:.2f} | {f[1]:.2f} | {b[0]:.2f} | {b[1]:.2f} |")


if __name__ == "__main__":
    main()
