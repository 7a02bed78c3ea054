"""CPU reference cost: time and peak memory of nsa_attention forward+backward.

Question: is the pure-PyTorch reference (the CPU kernel of nsa_compile::nsa_fwd/nsa_bwd)
usable on CPU, and is its memory linear in T? Each length runs in a fresh subprocess so
ru_maxrss is that length's own peak. Shapes: B=1, HQ=8, H=2, D=64, fp32, default NSAConfig
(32/16/64/16/512, three branches), learned gates given as a random tensor requiring grad,
mean-pooled compressed keys. Dense SDPA (causal, GQA) is timed beside it in the same process.

    python benchmarks/cpu_reference.py [T ...]      # default: 4096 16384
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(T: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from nsa_compile import NSAConfig
    from nsa_compile.ops import nsa_attention

    torch.manual_seed(0)
    B, HQ, H, D = 1, 8, 2, 64
    cfg = NSAConfig()

    def inputs():
        q = torch.randn(B, HQ, T, D, requires_grad=True)
        k = torch.randn(B, H, T, D, requires_grad=True)
        v = torch.randn(B, H, T, D, requires_grad=True)
        g = torch.rand(B, HQ, T, len(cfg.branches), requires_grad=True)
        return q, k, v, g

    def nsa_step(q, k, v, g):
        out = nsa_attention(q, k, v, config=cfg, gates=g)
        out.backward(torch.ones_like(out))

    def sdpa_step(q, k, v, g):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))

    small = [t.detach()[:, :, :256].clone().requires_grad_() for t in inputs()]
    nsa_step(*small)  # load kernels and libraries before the baseline reading
    xs = inputs()
    base = _maxrss_mib()
    times = []
    for _ in range(reps + 1):  # the first full-size run warms the allocator; report the best
        t0 = time.perf_counter()
        nsa_step(*xs)
        times.append(time.perf_counter() - t0)
    peak = _maxrss_mib()
    sdpa = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        sdpa_step(*xs)
        sdpa.append(time.perf_counter() - t0)
    return {"T": T, "nsa_fwd_bwd_s": min(times[1:]), "sdpa_fwd_bwd_s": min(sdpa[1:]),
            "rss_before_mib": base, "rss_peak_mib": peak, "threads": torch.get_num_threads()}


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        print(json.dumps(measure(int(argv[1]), int(argv[2]))))
        return
    import torch
    lengths = [int(a) for a in argv] or [4096, 16384]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    print(f"# CPU reference: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"commit {commit}")
    print("| T | NSA fwd+bwd (s) | dense SDPA fwd+bwd (s) | peak RSS (MiB) | RSS before (MiB) "
          "| NSA working set (MiB) |")
    print("|---|---|---|---|---|---|")
    for T in lengths:
        reps = 3 if T <= 8192 else 2
        res = subprocess.run([sys.executable, __file__, "--child", str(T), str(reps)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {T} | {r['nsa_fwd_bwd_s']:.2f} | {r['sdpa_fwd_bwd_s']:.2f} | "
              f"{r['rss_peak_mib']:.0f} | {r['rss_before_mib']:.0f} | "
              f"{r['rss_peak_mib'] - r['rss_before_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
