"""Is the warp-specialised Gluon selected dK/dV (`templates.nsa_bwd_ws`) faster than the tuned
Triton kernel, and does it give the same sums?

Run on a Hopper GPU: python benchmarks/selected_dkdv_ws.py [--ts 8192,65536]
  [--groups 64/4,32/8] [--stages 4,6]
Per shape (NSA defaults, D = 128, bf16, random inputs, learned-style gates): the forward's
selection, then the selected branch's dK/dV step alone (inverted lists in chunks, the kernel,
the reduce kernel; dQ per position, unfused) with the shipped Triton pick and with the Gluon
kernel at each stage count: do_bench medians in ms, and the Gluon sums' relative difference
from the Triton ones (both fp32 sums of bf16 products; ~1e-6 expected).
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from nsa_compile import NSAConfig, bench
from nsa_compile.kernels.nsa import naive, triton_bwd, triton_fwd
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.templates.nsa_configs import KernelConfig


def selected_step(HQ: int, H: int, T: int):
    """(run, the step's arguments, the tuned configs): a `triton_bwd._Backward` holding a
    backward's state, captured when it reaches the selected dK/dV."""
    q, k, v = bench.inputs(HQ, H, T)
    gates = torch.rand(1, HQ, T, 3, device="cuda", dtype=q.dtype)
    kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
    do = torch.randn_like(q)
    p = NSAParams.from_config(NSAConfig(), q.shape[-1] ** -0.5)
    res = triton_fwd.nsa_fwd_cuda(q, k, v, gates, kc, vc, p, save=True)
    stats = triton_bwd.row_stats(do, res.branch_out, res.branch_lse(), gates, p, H)
    configs = triton_bwd.tuned_configs(do, q, k, v, kc, vc, p, stats, res.block_idx)
    configs["slc_dq"] = KernelConfig(16, 0, 2, 2)  # per position: the Gluon kernel is unfused
    seen = {}
    real = triton_bwd._Backward.selected_dkdv

    def capture(run, *args):
        seen.setdefault("step", (run, args))
        return real(run, *args)

    triton_bwd._Backward.selected_dkdv = capture
    try:
        triton_bwd.nsa_backward(do, q, k, v, gates, kc, vc, p, res.branch_out,
                                res.branch_lse(), res.block_idx, configs, stats=stats)
    finally:
        triton_bwd._Backward.selected_dkdv = real
    return (*seen["step"], configs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,65536")
    ap.add_argument("--groups", default="64/4,32/8")
    ap.add_argument("--stages", default="4,6")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| HQ/H | T | Triton pick | Triton ms | Gluon stages | Gluon ms | speed-up | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            run, step, configs = selected_step(HQ, H, T)

            def call(cfg):
                run.configs = {**configs, "slc_dkdv": cfg}
                run.wrote_dkv = False  # each call writes the sums afresh
                run.selected_dkdv(*step)

            tuned = configs["slc_dkdv"]
            call(tuned)
            want = run.dk.clone(), run.dv.clone()
            t_tri = do_bench(lambda: call(tuned), warmup=10, rep=200, return_mode="median")
            for stages in map(int, args.stages.split(",")):
                ws = KernelConfig(32, triton_bwd.WARP_SPECIALISED, 4, stages)
                run.dk.fill_(float("nan"))
                run.dv.fill_(float("nan"))
                call(ws)
                got = run.dk, run.dv
                diff = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
                t_ws = do_bench(lambda: call(ws), warmup=10, rep=200, return_mode="median")
                print(f"| {grp} | {T} | {tuned.to_dict()} | {t_tri:.3f} | {stages} | "
                      f"{t_ws:.3f} | {t_tri / t_ws:.2f}x | {diff:.1e} |", flush=True)
            del run, step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
