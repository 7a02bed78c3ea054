"""Are the warp-specialised Gluon dK/dV kernels (`templates.nsa_bwd_ws`) faster than the tuned
Triton kernels, and do they give the same sums?

Run on a Hopper GPU: python benchmarks/dkdv_ws.py [--ts 8192,65536] [--groups 64/4,32/8]
  [--stages 4,6]
Per shape (NSA defaults, D = 128, bf16, random inputs, learned-style gates) and per dK/dV step
of the backward — selected (inverted lists in chunks, the kernel, the reduce kernel; dQ per
position, unfused), compressed (with its query splits), window (adding to the selected sums):
do_bench medians in ms of the step with the shipped Triton pick and with the Gluon kernel at
each stage count (config (32, 64, 12, stages)), and the largest relative difference of the
Gluon step's dK/dV from the Triton one's (fp32 sums of bf16 products in another order: ~1e-6
expected; the window step stores bf16, ~4e-3).
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from nsa_compile import NSAConfig, bench
from nsa_compile.kernels.nsa import naive, triton_bwd, triton_fwd
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.templates.nsa_configs import KernelConfig


def backward_state(HQ: int, H: int, T: int):
    """(run, the selected dK/dV step's arguments, the tuned configs): a `triton_bwd._Backward`
    after one whole backward (dQ of the selected branch per position), captured when it
    reached the selected dK/dV."""
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


def steps(run, selected_args):
    """{kind: (the step, the tensors it writes)}."""
    def selected():
        run.wrote_dkv = False  # the step writes the sums afresh
        run.selected_dkdv(*selected_args)

    def window():
        run.wrote_dkv = True  # added to the selected sums, as in the backward
        run.dense_dkdv("window")

    return {"slc_dkdv": (selected, (run.dk, run.dv)),
            "cmp_dkdv": (lambda: run.dense_dkdv("compressed"), (run.dk_cmp, run.dv_cmp)),
            "win_dkdv": (window, (run.dk_out, run.dv_out))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,65536")
    ap.add_argument("--groups", default="64/4,32/8")
    ap.add_argument("--stages", default="4,6")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| HQ/H | T | step | Triton pick | Triton ms | Gluon stages | Gluon ms | speed-up "
          "| rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            run, selected_args, configs = backward_state(HQ, H, T)
            each = steps(run, selected_args)
            for kind, (step, outs) in each.items():
                tuned = configs[kind]
                run.configs = configs
                # the window step adds to the selected step's sums: those of the Triton pick
                each["slc_dkdv"][0]()
                step()
                want = [x.clone() for x in outs]
                t_tri = do_bench(step, warmup=10, rep=200, return_mode="median")
                for stages in map(int, args.stages.split(",")):
                    ws = KernelConfig(32, 0 if kind == "slc_dkdv" else 64, triton_bwd.WS_WARPS,
                                      stages)
                    run.configs = {**configs, kind: ws}
                    for x in outs:  # an element the Gluon step leaves unwritten shows
                        x.fill_(float("nan"))
                    step()
                    diff = max(((g.float() - w.float()).norm() / w.float().norm()).item()
                               for g, w in zip(outs, want))
                    t_ws = do_bench(step, warmup=10, rep=200, return_mode="median")
                    print(f"| {grp} | {T} | {kind} | {tuned.to_dict()} | {t_tri:.3f} | "
                          f"{stages} | {t_ws:.3f} | {t_tri / t_ws:.2f}x | {diff:.1e} |",
                          flush=True)
            del run, selected_args, each
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
