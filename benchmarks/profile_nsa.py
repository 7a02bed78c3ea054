"""Where the NSA forward's time goes: each Triton kernel timed alone, over its config space.

Run on a GPU: python benchmarks/profile_nsa.py [--ts 65536] — prints, per group size and
length, each kernel's best and default time and the best config.
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from nsa_compile import NSAConfig
from nsa_compile.kernels.nsa import naive
from nsa_compile.ops import nsa_attention
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.kernels.nsa.triton_fwd import _Launch, run_cmp, run_sel, run_slc, run_win
from nsa_compile.templates.nsa_configs import DEFAULTS, candidates

D = 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="65536")
    ap.add_argument("--groups", default="64/4,32/8")
    ap.add_argument("--kernels", default="cmp,sel,slc,win")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
            g = torch.rand(1, HQ, T, 3, device="cuda", dtype=torch.bfloat16)
            kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
            p = NSAParams.from_config(NSAConfig(), D ** -0.5)
            o = torch.empty_like(q)
            full = _Launch(q, k, v, g, kc, vc, p, o)
            lse = run_cmp(full, DEFAULTS["cmp"])
            idx = run_sel(full, DEFAULTS["sel"], lse)
            jobs = {
                "cmp": ("cmp", lambda c: run_cmp(full, c)),
                "sel": ("sel", lambda c: run_sel(full, c, lse)),
                "slc": ("slc", lambda c: run_slc(full, c, idx)),
                "win": ("win", lambda c: run_win(full, c)),
            }
            total = 0.0
            for name, (kind, fn) in jobs.items():
                if name not in args.kernels.split(","):
                    continue
                res = []
                for cfg in candidates(kind, HQ // H if HQ // H > 1 else 1, D, D, 2):
                    try:
                        res.append((do_bench(lambda: fn(cfg), warmup=5, rep=30,
                                             return_mode="median"), cfg))
                    except Exception as exc:  # report and go on
                        print(f"  {name} {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                best = min(res, key=lambda r: r[0])
                dflt = do_bench(lambda: fn(DEFAULTS[kind]), warmup=5, rep=30, return_mode="median")
                total += best[0]
                print(f"HQ/H={HQ}/{H} T={T} {name:11s} best {best[0]:8.3f} ms  default "
                      f"{dflt:8.3f} ms  {best[1]}", flush=True)
            print(f"HQ/H={HQ}/{H} T={T} sum of best kernels {total:.3f} ms", flush=True)
            cfg = NSAConfig()
            t_pool = do_bench(lambda: naive.mean_pool(k, 32, 16), warmup=5, rep=30,
                              return_mode="median")
            op = lambda: nsa_attention(q, k, v, config=cfg, gates=g)
            op()
            t_op = do_bench(op, warmup=5, rep=30, return_mode="median")
            print(f"HQ/H={HQ}/{H} T={T} mean_pool {t_pool:.3f} ms, whole op {t_op:.3f} ms",
                  flush=True)
            del q, k, v, g, kc, vc, o, lse, idx
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
