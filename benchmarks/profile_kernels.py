"""Where one NSA forward+backward call spends its GPU time, kernel by kernel (torch.profiler).

Run on a GPU: python benchmarks/profile_kernels.py [--ts 65536] [--groups 64/4,32/8]
Uses the tuned block sizes (tunes on a cache miss before profiling); prints, per shape, each
CUDA kernel's total ms over one call and its share.
"""
from __future__ import annotations

import argparse

import torch

from nsa_compile import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="65536")
    ap.add_argument("--groups", default="64/4,32/8")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    for grp in args.groups.split(","):
        HQ, H = map(int, grp.split("/"))
        for T in map(int, args.ts.split(",")):
            call = bench.nsa_calls(HQ, H, T)[1]
            call()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            total = sum(e.device_time_total for e in events)
            print(f"\nHQ/H={HQ}/{H} T={T}: {total / 1e3:.2f} ms of kernels")
            for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
                share = 100 * e.device_time_total / total
                print(f"  {e.device_time_total / 1e3:8.2f} ms {share:5.1f}%"
                      f"  x{e.count:<3d} {e.key[:70]}")
            del call  # and with it the inputs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
