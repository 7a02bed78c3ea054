"""Benchmarks of the NSA op, shared by `nsa-compile bench`, the demo and benchmarks/bench_nsa.py.

`cases` + `measure`: the kernel table (SPEC §6 shapes: bf16, B=1, D=128, HQ/H = 64/4 and 32/8,
NSA defaults) of our forward and forward+backward against dense SDPA, FlexAttention (window
512) and fla-core's NSA; CUDA and Triton only. Ours runs all three branches with learned-style gates and mean-pooled
compressed keys (computed inside the timed region, as fla does); fla runs compression +
selection, no window. `attention_times`: forward and forward+backward of dense attention and
NSA against sequence length, on any device.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import NSAConfig
from .ops import nsa_attention

DT = torch.bfloat16
D = 128
GROUPS: Tuple[Tuple[int, int], ...] = ((64, 4), (32, 8))
LENGTHS: Tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
IMPLS: Tuple[str, ...] = ("dense", "flex", "fla", "ours")
# FlexAttention's block mask and fla's buffers do not fit beyond this length.
PEER_MAX_T = 65536


def ms(fn: Callable[[], object]) -> float:
    """Median forward time in ms (Triton's do_bench: warm-up, L2 flush, CUDA events)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def inputs(HQ: int, H: int, T: int, layout: str = "bhtd"):
    """Random bf16 q, k, v on the GPU: (1, HQ|H, T, D) for "bhtd", (1, T, HQ|H, D) for "bthd"."""
    if layout == "bthd":
        shape_q, shape_kv = (1, T, HQ, D), (1, T, H, D)
    else:
        shape_q, shape_kv = (1, HQ, T, D), (1, H, T, D)
    return (torch.randn(shape_q, device="cuda", dtype=DT),
            torch.randn(shape_kv, device="cuda", dtype=DT),
            torch.randn(shape_kv, device="cuda", dtype=DT))


def peak(fn: Callable[[], object]) -> float:
    """MiB allocated by one call of fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _timings(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor],
             memory: bool = False) -> Tuple[float, float, Optional[float]]:
    """(forward ms without autograd, forward+backward ms, forward peak MiB or None)."""
    with torch.no_grad():
        fwd = ms(fn)
        mem = peak(fn) if memory else None
    grad = torch.randn_like(fn())
    return fwd, ms(lambda: torch.autograd.grad(fn(), leaves, grad)), mem


def _grad(*xs: torch.Tensor) -> List[torch.Tensor]:
    return [x.requires_grad_() for x in xs]


def dense(HQ: int, H: int, T: int) -> Tuple[float, float, Optional[float]]:
    """The faster of SDPA with enable_gqa (auto backend) and cuDNN SDPA on expanded K/V (taken
    as given: the expansion and its gradient's reduction are not timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _grad(*inputs(HQ, H, T))
    best = _timings(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=True), (q, k, v))
    try:
        ke, ve = _grad(k.detach().repeat_interleave(HQ // H, 1),
                       v.detach().repeat_interleave(HQ // H, 1))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = _timings(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True),
                             (q, ke, ve))
        best = tuple(min(a, b) for a, b in zip(best[:2], cudnn[:2])) + (None,)
        del ke, ve
    except RuntimeError:  # no cuDNN attention for this shape or build: keep the SDPA time
        pass
    return best


def flex(HQ: int, H: int, T: int, W: int = 512) -> Tuple[float, float, Optional[float]]:
    """FlexAttention with a sliding-window block mask (one NSA branch only)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention)
    bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W), None, None, T, T,
                           device="cuda")
    q, k, v = _grad(*inputs(HQ, H, T))
    return _timings(lambda: fa(q, k, v, block_mask=bm, enable_gqa=True), (q, k, v))


def fla(HQ: int, H: int, T: int) -> Tuple[float, float, Optional[float]]:
    """fla-core's parallel_nsa: compressed + selected branches, gates given, no window."""
    from fla.ops.nsa import parallel_nsa
    q, k, v = _grad(*inputs(HQ, H, T, "bthd"))
    g = _grad(*(torch.rand(1, T, HQ, device="cuda", dtype=DT) for _ in range(2)))
    f = lambda: parallel_nsa(q, k, v, g_cmp=g[0], g_slc=g[1], block_counts=16, block_size=64,
                             window_size=0)
    return _timings(f, (q, k, v, *g), memory=True)


def ours(HQ: int, H: int, T: int) -> Tuple[float, float, Optional[float]]:
    """nsa_attention, all three branches, NSA defaults, autotuned block sizes."""
    q, k, v, gates = _grad(*inputs(HQ, H, T), torch.rand(1, HQ, T, 3, device="cuda", dtype=DT))
    cfg = NSAConfig()
    f = lambda: nsa_attention(q, k, v, config=cfg, gates=gates)
    # tunes this shape's bucket, forward and backward, on a cache miss
    torch.autograd.grad(f(), (q, k, v, gates), torch.randn(q.shape, device="cuda", dtype=DT))
    return _timings(f, (q, k, v, gates), memory=True)


def nsa_calls(HQ: int, H: int, T: int) -> Tuple[Callable[[], object], Callable[[], object]]:
    """What the profiling scripts time at one shape: (the forward without autograd, forward +
    backward) of nsa_attention on random inputs, all three branches, NSA defaults, learned-style
    gates."""
    q, k, v, gates = _grad(*inputs(HQ, H, T), torch.rand(1, HQ, T, 3, device="cuda", dtype=DT))
    do = torch.randn_like(q)
    cfg = NSAConfig()
    fwd = lambda: nsa_attention(q.detach(), k.detach(), v.detach(), config=cfg,
                                gates=gates.detach())
    both = lambda: torch.autograd.grad(nsa_attention(q, k, v, config=cfg, gates=gates),
                                       (q, k, v, gates), do)
    return fwd, both


MEASURE = dict(dense=dense, flex=flex, fla=fla, ours=ours)


def cases(lengths: Iterable[int] = LENGTHS, impls: Iterable[str] = IMPLS,
          groups: Iterable[Tuple[int, int]] = GROUPS) -> List[Tuple[str, int, int, int]]:
    """(impl, HQ, H, T) of every measurement of the table, peers only up to PEER_MAX_T."""
    return [(name, HQ, H, T) for HQ, H in groups for T in lengths for name in impls
            if not (T > PEER_MAX_T and name in ("flex", "fla"))]


def measure(name: str, HQ: int, H: int, T: int) -> Dict[str, object]:
    """One row of the tables: {impl, HQ, H, T, fwd_ms, fwd_bwd_ms, peak_MiB (forward)};
    raises if the impl fails."""
    fwd, fwd_bwd, mem = MEASURE[name](HQ, H, T)
    torch.cuda.empty_cache()
    return dict(impl=name, HQ=HQ, H=H, T=T, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, peak_MiB=mem)


def commit() -> str:
    """$NSA_COMMIT, else the short git commit of this checkout, else "unknown"."""
    env = os.environ.get("NSA_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header() -> Dict[str, str]:
    """GPU, torch, Triton and commit of this run: the first line of every table."""
    import triton
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, commit=commit())


METRICS = {"fwd_ms": "forward ms", "fwd_bwd_ms": "forward+backward ms"}


def table(head: Dict[str, str], rows: Sequence[Dict[str, object]],
          metric: str = "fwd_ms") -> str:
    """The markdown table of benchmarks/RESULTS.md for one metric of METRICS, "-" where an
    impl did not run."""
    lines = [f"{head['gpu']} | torch {head['torch']} | triton {head['triton']} | "
             f"commit {head['commit']} | bf16 B=1 D={D}, {METRICS[metric]}",
             "| HQ/H | T | dense | flex w512 | fla cmp+slc | ours (3 branches) | ours vs dense | "
             "ours vs fla | ours fwd peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["HQ"], r["H"], r["T"]) for r in rows}, key=lambda x: (-x[0], x[2]))
    for HQ, H, T in keys:
        get = {r["impl"]: r for r in rows
               if (r["HQ"], r["H"], r["T"]) == (HQ, H, T) and r.get(metric) is not None}
        f = lambda n: f"{get[n][metric]:.2f}" if n in get else "-"
        ratio = lambda a, b: (f"{get[a][metric] / get[b][metric]:.2f}x"
                              if a in get and b in get else "-")
        mem = (f"{get['ours']['peak_MiB']:.0f}"
               if get.get("ours", {}).get("peak_MiB") is not None else "-")
        lines.append(f"| {HQ}/{H} | {T} | {f('dense')} | {f('flex')} | {f('fla')} | {f('ours')} "
                     f"| {ratio('dense', 'ours')} | {ratio('fla', 'ours')} | {mem} |")
    return "\n".join(lines)


def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn: Callable[[], object]) -> float:
        fn()  # warm-up; tunes the kernels' block sizes on a cache miss
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    return run


def attention_times(device: torch.device | str, lengths: Sequence[int], *, heads: int = 32,
                    kv_heads: int = 8, head_dim: int = D, dtype: torch.dtype = DT,
                    config: NSAConfig = NSAConfig(), reps: int = 5,
                    on_length: Optional[Callable[[int], None]] = None) -> List[Dict[str, float]]:
    """Median ms of forward and forward+backward, B=1, for dense causal SDPA and nsa_attention
    (learned-style gates, mean-pooled compressed keys) at each length T: rows {T, dense_fwd,
    dense_fwd_bwd, nsa_fwd, nsa_fwd_bwd}. on_length(T) is called after each length."""
    device = torch.device(device)
    timed = _timer(device, reps)
    rows = []
    for T in lengths:
        gen = torch.Generator(device=device).manual_seed(T)
        make = lambda h, d=head_dim: torch.randn(1, h, T, d, device=device, dtype=dtype,
                                                 generator=gen).requires_grad_()
        q, k, v = make(heads), make(kv_heads), make(kv_heads)
        gates = torch.rand(1, heads, T, len(config.branches), device=device, dtype=dtype,
                           generator=gen) if config.fixed_gates is None else None
        grad = torch.randn(1, heads, T, head_dim, device=device, dtype=dtype, generator=gen)
        fns = dict(
            dense=lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True),
            nsa=lambda: nsa_attention(q, k, v, config=config, gates=gates))
        row = dict(T=T)
        for name, fn in fns.items():
            with torch.no_grad():
                row[f"{name}_fwd"] = timed(fn)
            row[f"{name}_fwd_bwd"] = timed(
                lambda: torch.autograd.grad(fn(), (q, k, v), grad))
        rows.append(row)
        if on_length is not None:
            on_length(T)
    return rows
