"""NSA forward and forward+backward speed against dense SDPA, FlexAttention (window 512) and
fla-core's NSA.

Run on a GPU (one device call):
    python benchmarks/bench_nsa.py [--ts 8192,16384] [--only ours] [--groups 64/4]
All numbers come from this one run; prints a markdown table last and writes JSON to $OUT.
Shapes and peers: `nsa_compile.bench` (also `nsa-compile bench`, which adds a plot).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nsa_compile import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default=",".join(str(t) for t in bench.LENGTHS))
    ap.add_argument("--only", default=",".join(bench.IMPLS))
    ap.add_argument("--groups", default=",".join(f"{hq}/{h}" for hq, h in bench.GROUPS),
                    help="HQ/H pairs, e.g. 64/4,32/8")
    args = ap.parse_args()
    head = bench.header()
    print(head, flush=True)
    rows = []
    groups = [tuple(map(int, g.split("/"))) for g in args.groups.split(",")]
    lengths = [int(x) for x in args.ts.split(",")]
    for name, HQ, H, T in bench.cases(lengths, args.only.split(","), groups):
        t0 = time.time()
        try:
            row = bench.measure(name, HQ, H, T)
        except Exception as exc:  # a peer failing must not stop the table
            print(f"{name} HQ={HQ} H={H} T={T} failed: {type(exc).__name__}: "
                  f"{str(exc)[:300]}", flush=True)
            continue
        rows.append(row)
        print(f"{name:6s} HQ={HQ} H={H} T={T:6d} fwd={row['fwd_ms']:8.3f} ms "
              f"fwd+bwd={row['fwd_bwd_ms']:8.3f} ms mem={row['peak_MiB']} "
              f"({time.time() - t0:.0f}s)", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_nsa.json"), "w") as fh:
            json.dump(dict(header=head, rows=rows), fh, indent=1)
    for metric in bench.METRICS:
        print()
        print(bench.table(head, rows, metric))


if __name__ == "__main__":
    sys.exit(main())
