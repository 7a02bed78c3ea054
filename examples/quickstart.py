"""Quickstart: Native Sparse Attention next to dense attention, on CPU.

1. Two NSA configurations that must equal dense causal attention (window-only with an unbounded
   window; selected-only with every block chosen) are checked against
   F.scaled_dot_product_attention, forward and gradients.
2. Full NSA (compressed + selected + window branches, learned gates, MLP compressors) runs
   forward and backward through the `NSAAttention` module the compiler pass inserts.
3. Both are timed. On CPU, NSA runs its pure-PyTorch reference (the test truth), which is
   slower than PyTorch's fused dense kernel; the speed-up is the job of the Triton kernels on
   the GPU (see benchmarks/).

    python examples/quickstart.py            # about 10-30 s on 2 CPU cores
"""
import math
import time

import torch
import torch.nn.functional as F

from nsa_compile import NSAConfig
from nsa_compile.modules import NSAAttention
from nsa_compile.ops import nsa_attention

B, HQ, H, T, D = 1, 8, 2, 2048, 64


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def fwd_bwd(fn, *xs):
    for x in xs:
        x.grad = None
    out = fn(*xs)
    out.backward(torch.ones_like(out))
    return out


def best_time(fn, reps=3):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(B, HQ, T, D, requires_grad=True)
    k = torch.randn(B, H, T, D, requires_grad=True)
    v = torch.randn(B, H, T, D, requires_grad=True)
    print(f"q {tuple(q.shape)}, k/v {tuple(k.shape)}: B={B}, {HQ} query heads sharing {H} "
          f"KV heads, T={T}, head dim {D}, fp32, {torch.get_num_threads()} CPU threads\n")

    fwd_bwd(sdpa, q, k, v)
    dense_grads = [x.grad.clone() for x in (q, k, v)]
    equivalent = {
        "window-only, window=None": NSAConfig(branches=("window",), window=None, gate=(1.0,)),
        f"selected-only, n={math.ceil(T / 64)} blocks": NSAConfig(
            branches=("selected",), gate=(1.0,), select_count=math.ceil(T / 64)),
    }
    print("1. Configurations that must equal dense causal attention (fp32):")
    worst = 0.0
    with torch.no_grad():
        dense = sdpa(q, k, v)
    for name, cfg in equivalent.items():
        out = fwd_bwd(lambda q, k, v: nsa_attention(q, k, v, config=cfg), q, k, v)
        err_out = (out - dense).abs().max().item()
        # Gradients relative to their largest entry: dv sums over up to T queries.
        err_grad = max(((x.grad - g).abs().max() / g.abs().max()).item()
                       for x, g in zip((q, k, v), dense_grads))
        worst = max(worst, err_out, err_grad)
        print(f"   {name:28s} max |NSA - SDPA| output {err_out:.1e}, "
              f"gradients {err_grad:.1e} (relative)")
    if worst > 1e-4:
        raise SystemExit(f"dense equivalence failed: max error {worst:.2e}")

    cfg = NSAConfig()  # the paper's l/d/l'/n/window = 32/16/64/16/512, three branches
    attn = NSAAttention(cfg, num_heads=HQ, num_kv_heads=H, head_dim=D)
    out = fwd_bwd(attn, q, k, v)
    n_params = sum(p.numel() for p in attn.parameters())
    print(f"\n2. Full NSA, {cfg.branches}, learned gates, '{cfg.compressor}' compressors "
          f"({n_params} parameters):")
    print(f"   output {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}; "
          f"|dq| {q.grad.norm():.3g}, |dk| {k.grad.norm():.3g}, |dv| {v.grad.norm():.3g}, "
          f"gate weight grad {attn.gate.proj.weight.grad.norm():.3g}")
    Tc = (T - cfg.compress_block) // cfg.compress_stride + 1
    print(f"   the last query reads {Tc} compressed blocks + "
          f"{cfg.select_count * cfg.select_block} selected keys + {cfg.window} window keys, "
          f"dense reads {T}")

    t_dense = best_time(lambda: fwd_bwd(sdpa, q, k, v))
    t_nsa = best_time(lambda: fwd_bwd(attn, q, k, v))
    print("\n3. Forward + backward time on CPU (best of 3):")
    print(f"   dense SDPA (fused C++ kernel)       {t_dense * 1e3:8.1f} ms")
    print(f"   NSA pure-PyTorch reference          {t_nsa * 1e3:8.1f} ms")
    print("   The CPU path is the reference implementation, kept simple as the test truth;\n"
          "   NSA's speed comes from the Triton kernels on the GPU (benchmarks/).")


if __name__ == "__main__":
    main()
