"""One decoding step of the NSA op against dense attention over the same KV cache.

Question: how fast is `ops.nsa_attention_decode` (the Triton decoding kernels on CUDA) for one
new query per sequence, against SDPA's step, at SPEC §6's decode shape (B=8, 64k cache) and
the kernel table's heads? The compressed keys are inputs of the op (the compressor's output,
kept with the cache), as in the forward benchmarks. Each time is the median of
`triton.testing.do_bench` (kernel launches included) and of CUDA-graph replays (how a decode
loop under `torch.compile(mode="reduce-overhead")` runs it). "floor" is the time to read the
bytes NSA must read (T/16 compressed + n·l' selected + window keys and values) at the
copy bandwidth measured in the same run. Ours is checked against the reference at the
smallest length.

    python benchmarks/bench_decode.py [--ts 8192,65536] [--batch 8] [--groups 64/4,32/8]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from nsa_compile import NSAConfig, bench
from nsa_compile.kernels.nsa import naive
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.ops import nsa_attention_decode


def _graph_ms(fn, reps: int = 200) -> float:
    """Median ms of one replay of a CUDA graph of `fn` (captured after a warm-up call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps // 20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return sorted(times)[len(times) // 2]


def _copy_tbps() -> float:
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / bench.ms(lambda: y.copy_(x)) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--groups", default="64/4,32/8")
    args = ap.parse_args()
    cfg, D, B, dt = NSAConfig(), bench.D, args.batch, bench.DT
    head = bench.header()
    tbps = _copy_tbps()
    title = " | ".join(f"{k} {v}" for k, v in head.items())
    print(f"{title} | copy {tbps:.2f} TB/s", flush=True)
    rows = []
    for group in args.groups.split(","):
        HQ, H = map(int, group.split("/"))
        for T in map(int, args.ts.split(",")):
            q = torch.randn(B, HQ, 1, D, device="cuda", dtype=dt)
            k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dt) for _ in range(2))
            gates = torch.rand(B, HQ, 1, 3, device="cuda", dtype=dt)
            l, d = cfg.compress_block, cfg.compress_stride
            kc, vc = naive.mean_pool(k, l, d), naive.mean_pool(v, l, d)
            ours = lambda: nsa_attention_decode(q, k, v, config=cfg, gates=gates, k_cmp=kc,
                                                v_cmp=vc)
            dense = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            with torch.no_grad():
                out = ours()
                assert out.isfinite().all()
                if T == min(map(int, args.ts.split(","))):
                    params = NSAParams.from_config(cfg, D ** -0.5)
                    want = naive.nsa_attention_ref(q, k, v, gates, kc, vc, params).float()
                    err = ((out.float() - want).norm() / want.norm()).item()
                    assert err < 1e-2, err
                row = dict(HQ=HQ, H=H, T=T, B=B, dense_ms=bench.ms(dense), ours_ms=bench.ms(ours),
                           dense_graph_ms=_graph_ms(dense), ours_graph_ms=_graph_ms(ours))
            tokens = kc.shape[2] + cfg.select_count * cfg.select_block + cfg.window
            row["floor_ms"] = B * H * tokens * 2 * D * 2 / (tbps * 1e12) * 1e3
            rows.append(row)
            print(f"HQ/H={HQ}/{H} T={T:6d} dense {row['dense_ms']:.4f} / graph "
                  f"{row['dense_graph_ms']:.4f} ms, ours {row['ours_ms']:.4f} / graph "
                  f"{row['ours_graph_ms']:.4f} ms, floor {row['floor_ms']:.4f}", flush=True)
            del q, k, v, kc, vc, gates
            torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_decode.json"), "w") as fh:
            json.dump(dict(header=head, copy_TBps=tbps, rows=rows), fh, indent=1)
    print(f"\n{title} | decode step, B={B}, D={D}, bf16, one query per sequence, ms")
    print("| HQ/H | T | dense | ours | ours vs dense | dense graph | ours graph | graph ratio "
          "| NSA byte floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['HQ']}/{r['H']} | {r['T']} | {r['dense_ms']:.4f} | {r['ours_ms']:.4f} | "
              f"{r['dense_ms'] / r['ours_ms']:.2f}x | {r['dense_graph_ms']:.4f} | "
              f"{r['ours_graph_ms']:.4f} | {r['dense_graph_ms'] / r['ours_graph_ms']:.2f}x | "
              f"{r['floor_ms']:.4f} |")


if __name__ == "__main__":
    main()
