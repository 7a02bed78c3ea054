"""Are the warp-specialised Gluon dK/dV kernels (`templates.nsa_bwd_ws`) faster than the tuned
Triton kernels, and do they give the same sums?

Run on a Hopper GPU: python benchmarks/dkdv_ws.py [--ts 8192,65536] [--groups 64/4,32/8]
  [--stages 4,6]
Per shape (NSA defaults, D = 128, bf16, random inputs, learned-style gates), do_bench medians
in ms of three steps of the backward, with the shipped Triton picks and with the Gluon kernels
at each stage count (config (32, 0 | 64, 12, stages)):
- selected: the whole selected branch's dQ and dK/dV (inverted lists in chunks, the kernels,
  the reduce and merge kernels); Triton as tuned, Gluon with the dQ per position ("ws") and
  fused into the dK/dV kernel as shares ("ws-fused");
- compressed dK/dV (with its query splits), window dK/dV (adding to the selected sums).
The last column is the largest relative difference of the step's gradients from the Triton
ones (fp32 sums of bf16 products in another order: ~1e-6 expected; the window step stores bf16,
~4e-3).
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from nsa_compile import NSAConfig, bench
from nsa_compile.kernels.nsa import naive, triton_bwd, triton_fwd
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.templates.nsa_configs import KernelConfig

PER_POSITION, FUSED = KernelConfig(16, 0, 2, 2), KernelConfig(16, 1, 4, 1)  # slc_dq


def backward_state(HQ: int, H: int, T: int):
    """(a `triton_bwd._Backward` after one whole backward with the tuned block sizes, the
    forward's block choice, the tuned configs)."""
    q, k, v = bench.inputs(HQ, H, T)
    gates = torch.rand(1, HQ, T, 3, device="cuda", dtype=q.dtype)
    kc, vc = naive.mean_pool(k, 32, 16), naive.mean_pool(v, 32, 16)
    do = torch.randn_like(q)
    p = NSAParams.from_config(NSAConfig(), q.shape[-1] ** -0.5)
    res = triton_fwd.nsa_fwd_cuda(q, k, v, gates, kc, vc, p, save=True)
    stats = triton_bwd.row_stats(do, res.branch_out, res.branch_lse(), gates, p, H)
    configs = triton_bwd.tuned_configs(do, q, k, v, kc, vc, p, stats, res.block_idx)
    run = triton_bwd._Backward(do, q, k, v, kc, vc, p, stats, configs)
    return run, res.block_idx, configs


def steps(run, block_idx):
    """{step: (the call, the gradients it writes)}."""
    def selected():
        run.wrote_dq = run.wrote_dkv = False  # the step writes its sums afresh
        run.selected(block_idx)

    def window():
        run.wrote_dkv = True  # added to the selected sums, as in the backward
        run.dense_dkdv("window")

    return {"selected": (selected, (run.dq, run.dk, run.dv)),
            "cmp_dkdv": (lambda: run.dense_dkdv("compressed"), (run.dk_cmp, run.dv_cmp)),
            "win_dkdv": (window, (run.dk_out, run.dv_out))}


def gluon_configs(step: str, stages: int):
    """{variant: the configs the Gluon kernels run the step with}."""
    ws = KernelConfig(32, 0 if step == "selected" else 64, triton_bwd.WS_WARPS, stages)
    if step == "selected":
        return {"ws": {"slc_dkdv": ws, "slc_dq": PER_POSITION},
                "ws-fused": {"slc_dkdv": ws, "slc_dq": FUSED}}
    return {"ws": {step: ws}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,65536")
    ap.add_argument("--groups", default="64/4,32/8")
    ap.add_argument("--stages", default="4,6")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| HQ/H | T | step | Triton ms | Gluon | stages | Gluon ms | speed-up | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            run, block_idx, configs = backward_state(HQ, H, T)
            each = steps(run, block_idx)
            for step, (call, outs) in each.items():
                run.configs = configs
                each["selected"][0]()  # the window step adds to the Triton selected sums
                call()
                want = [x.clone() for x in outs]
                t_tri = do_bench(call, warmup=10, rep=200, return_mode="median")
                for stages in map(int, args.stages.split(",")):
                    for variant, cfgs in gluon_configs(step, stages).items():
                        run.configs = {**configs, **cfgs}
                        for x in outs:  # an element the Gluon step leaves unwritten shows
                            x.fill_(float("nan"))
                        call()
                        diff = max(((g.float() - w.float()).norm() / w.float().norm()).item()
                                   for g, w in zip(outs, want))
                        t_ws = do_bench(call, warmup=10, rep=200, return_mode="median")
                        print(f"| {grp} | {T} | {step} | {t_tri:.3f} | {variant} | {stages} | "
                              f"{t_ws:.3f} | {t_tri / t_ws:.2f}x | {diff:.1e} |", flush=True)
            tuned = {k: configs[k].to_dict() for k in ("slc_dq", "slc_dkdv", "cmp_dkdv",
                                                          "win_dkdv")}
            print(f"(the Triton picks: {tuned})")
            del run, block_idx, each
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
