"""One decoding step of a rewritten attention site: the last query alone against T cached keys.

Question: what does a KV-cache step cost now that the rewrite sends it through
`NSAAttention.decode` (the last positions only, cost ~T) instead of padding the queries to the
cache's length and running the whole-sequence op (cost ~T^2, what every step paid before)?
Both are timed in one process on the same inputs, each checked against the other, and so is
dense attention's step (SDPA of the one query over all T keys) for scale, and the decode step
that continues the compressed keys kept from the step before (as a sparsified model's steps
do through its KV cache: the compressors see only the last block's keys). Shapes:
B=1, HQ=8, H=2, D=64, default NSAConfig (32/16/64/16/512), learned gates and MLP compressors
as `sparsify` inserts them; fp32 on CPU, bf16 on a GPU.

    python benchmarks/decode_step.py [T ...]      # default: 2048 8192
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from nsa_compile import NSAConfig
from nsa_compile.modules import NSAAttention
from nsa_compile.modules.nsa_attention import CompressedKeys, HandCompressedKeys


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class _KeptCache:
    """Stands in for a KV cache that carries compressed keys kept by the step before."""

    def __init__(self, memos):
        self._nsa_compile_nsa = memos

    def get_seq_length(self) -> int:
        return 0  # not read by HandCompressedKeys


def main(lengths) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    B, HQ, H, D = 1, 8, 2, 64
    torch.manual_seed(0)
    nsa = NSAAttention(NSAConfig(), num_heads=HQ, num_kv_heads=H, head_dim=D).to(dev, dtype)
    torch.nn.init.normal_(nsa.gate.proj.weight, std=0.1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "CPU"
    print(f"{name} | torch {torch.__version__} | commit {commit} | {dtype} | B={B} "
          f"HQ/H={HQ}/{H} D={D} | NSAConfig() | median of 3 after a warm-up\n")
    print("| T | padded whole-sequence op (ms) | decode (ms) | speed-up | max abs diff | "
          "decode, kept compressed keys (ms) | dense SDPA step (ms) | kept vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for T in lengths:
        q = torch.randn(B, HQ, 1, D, device=dev, dtype=dtype)
        k = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        v = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        padded = lambda: nsa(torch.cat([q.new_zeros(B, HQ, T - 1, D), q], dim=2), k, v)[:, :, -1:]
        step = lambda: nsa.decode(q, k, v)
        dense = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        with torch.no_grad():
            memo = CompressedKeys(nsa.k_compress(k[:, :, :-1]), nsa.v_compress(v[:, :, :-1]),
                                  T - 1)
            cache = _KeptCache([memo])
            hand = HandCompressedKeys([nsa])

            def kept():  # a sparsified model's root pre-hook hands the memo over each step
                hand(None, (), dict(past_key_values=cache))
                return nsa.decode(q, k, v, keep=True)

            diff = (padded().float() - step().float()).abs().max().item()
            diff = max(diff, (kept().float() - step().float()).abs().max().item())
            old, new, base = _median_s(padded, 3), _median_s(step, 3), _median_s(dense, 10)
            fast = _median_s(kept, 10)
        print(f"| {T} | {old * 1e3:.1f} | {new * 1e3:.2f} | {old / new:.0f}x | {diff:.1e} | "
              f"{fast * 1e3:.2f} | {base * 1e3:.3f} | {base / fast:.2f}x |")


if __name__ == "__main__":
    main([int(t) for t in sys.argv[1:]] or [2048, 8192])
