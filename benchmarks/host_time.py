"""How much host (CPU) time one NSA call costs, apart from its GPU time.

Run on a GPU: python benchmarks/host_time.py [--ts 8192] [--groups 32/8] [--profile]
The GPU is first kept busy (torch.cuda._sleep), so the calls below only queue kernels: their
wall time is host time. Prints, per shape, the host ms, the wall ms (calls back to back:
host- or GPU-bound) and the wall ms of CUDA graph replays (no host work) of one forward and of
one forward+backward; with --profile, the Python functions the host spends most in (cProfile)
and the torch ops and CUDA API calls with the most CPU time (torch.profiler).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time

import torch

from nsa_compile import bench

# Calls per host measurement: few enough that their kernels fit the GPU's launch queue (a
# full queue blocks the host until kernels finish, which would count GPU time as host time).
CALLS, HOST_CALLS = 20, 4


@contextlib.contextmanager
def gpu_busy():
    """Keeps the GPU busy with a sleep kernel while the block runs (~0.5 s of GPU time: far
    more than HOST_CALLS calls queue), so the block's calls only queue their kernels."""
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    yield
    torch.cuda.synchronize()


def host_ms(fn, calls: int = HOST_CALLS) -> float:
    """Median wall ms of `calls` calls of `fn` while the GPU is busy."""
    times = []
    with gpu_busy():
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def wall_ms(fn, calls: int = CALLS) -> float:
    """Wall ms per call, back to back, synchronised at the end (host- or GPU-bound)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def graph_ms(fn, calls: int = CALLS) -> float:
    """Wall ms per replay of `fn` captured in a CUDA graph, back to back: the host's work per
    call is gone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs want
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return wall_ms(graph.replay, calls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192")
    ap.add_argument("--groups", default="64/4,32/8")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    rows = []
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            fwd, both = bench.nsa_calls(HQ, H, T)
            both()
            row = (HQ, H, T, host_ms(fwd), wall_ms(fwd), graph_ms(fwd), host_ms(both),
                   wall_ms(both), graph_ms(both))
            rows.append(row)
            if args.profile:
                for name, fn in (("forward", fwd), ("forward+backward", both)):
                    prof = cProfile.Profile()
                    with gpu_busy():
                        prof.enable()
                        for _ in range(HOST_CALLS):
                            fn()
                        prof.disable()
                    print(f"\n{HQ}/{H} T={T} {name}: {HOST_CALLS} calls")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                    with gpu_busy(), torch.profiler.profile(
                            activities=[torch.profiler.ProfilerActivity.CPU]) as tprof:
                        for _ in range(HOST_CALLS):
                            fn()
                    print(tprof.key_averages().table(sort_by="self_cpu_time_total",
                                                     row_limit=30, max_name_column_width=60))
    print("\n| HQ/H | T | fwd host ms | fwd wall ms | fwd graph ms | fwd+bwd host ms | "
          "fwd+bwd wall ms | fwd+bwd graph ms |")
    print("|---|---|---|---|---|---|---|---|")
    for HQ, H, T, *ms in rows:
        print(f"| {HQ}/{H} | {T} | " + " | ".join(f"{x:.2f}" for x in ms) + " |")


if __name__ == "__main__":
    main()
