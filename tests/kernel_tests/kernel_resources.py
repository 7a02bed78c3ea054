"""Registers, spills and inner-loop instruction counts of the NSA kernels as a Hopper GPU
compiles them, on a machine without one (ptxas and nvdisasm ship with Triton).

    python tests/kernel_tests/kernel_resources.py [--gpu nvidia_h200] [--t 8192]
                                                  [--groups 64/4,32/8] [--kernels slc_bwd,win]

Records the kernel launches of one forward and backward (NSA defaults, D = 128, the block
sizes shipped for that GPU at that length bucket) in the Triton interpreter, in a process of
its own, then compiles each launch for sm_90 the way the GPU's launcher would (ints equal to 1
and 16-byte alignment specialised, bf16) and prints per kernel: registers per thread, spill
bytes (ptxas), for each innermost loop of its SASS the instructions, tensor-core MMAs and
local-memory loads/stores (spills that run every iteration), and whether ptxas serialised the
kernel's wgmma MMAs for want of registers. A kernel at 255 registers with local loads inside
its loop is a candidate for fewer live tiles.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TUNED = ROOT / "nsa_compile" / "templates" / "tuned"
RECORD_T = 160  # positions of the recorded run: every kernel and loop runs, quickly
POLL_LOOP = 8  # loops of fewer instructions wait on a barrier (mbarrier try_wait)
# ptxas's note that it made every wgmma wait for the one before (short of registers)
SERIALISED = "C7512"


def shipped_configs(gpu: str, group: int, t_bucket: int) -> dict:
    """{kind: KernelConfig} shipped for `gpu` (a file name in templates/tuned) at NSA defaults,
    bf16, D = 128, GQA group `group` and length bucket `t_bucket` (versions not checked: the
    entries are only read)."""
    from nsa_compile.templates.nsa_configs import KernelConfig
    entries = json.loads((TUNED / f"{gpu}.json").read_text())["entries"]
    out = {}
    for key, cfg in entries.items():
        kind, dtype, dk, dv, g, _, t = key.split("|")
        if (dtype, dk, dv, g, t) == ("bfloat16", "dk128", "dv128", f"g{group}", f"T{t_bucket}"):
            out[kind] = KernelConfig.from_dict(cfg)
    if not out:
        raise SystemExit(f"no entries for g{group} T{t_bucket} in {TUNED / (gpu + '.json')}")
    return out


def record(path: str, gpu: str, t_bucket: int, groups: list) -> None:
    """(In the interpreter.) The launches of a forward and backward per group, as compile jobs
    (fp16 recorded, bf16 compiled: the interpreter's bf16 dots are wrong, the types are not)."""
    import torch
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from nsa_compile import NSAConfig
    from tests.kernel_tests.test_nsa_triton_bwd import _forward_backward, _inputs
    from tests.kernel_tests.test_nsa_triton_compile import _job, recording
    jobs, seen = [], set()
    for hq, h in groups:
        configs = shipped_configs(gpu, hq // h, t_bucket)
        with recording() as launches:
            _forward_backward(*_inputs(1, hq, h, RECORD_T, 128, 128, NSAConfig(),
                                       torch.float16), configs=configs)
        for launch in launches:
            job = _job(*launch)
            job["signature"] = {k: v.replace("fp16", "bf16") for k, v in job["signature"].items()}
            job["group"] = f"{hq}/{h}"
            key = json.dumps(job, sort_keys=True)
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    Path(path).write_text(json.dumps(jobs))


def _compile(job: dict):
    """-> (CompiledKernel, ptxas log) of one job for sm_90."""
    from compile_for_hopper import compile_job
    log = io.StringIO()  # ptxas's report, printed when TRITON_DUMP_PTXAS_LOG is set (`main`)
    with contextlib.redirect_stdout(log):
        compiled = compile_job(job)
    return compiled, log.getvalue()


def innermost_loops(sass: str) -> list:
    """[(instructions, MMAs, local loads, local stores)] of each innermost loop of a SASS
    listing (backward branches' ranges), leaving out the few-instruction loops that poll a
    barrier."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            ins.append((addr, m.group(2)))
    ranges = []
    for addr, text in ins:
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), addr) < addr:
            ranges.append((labels[target.group(1)], addr))
    bodies = {r: [text for addr, text in ins if r[0] <= addr <= r[1]] for r in set(ranges)}
    # shortest first, each range kept unless it overlaps one kept: an outer loop holds an
    # inner one, and code the compiler placed after the function's end jumps back into a loop
    # (a range that straddles it)
    kept = []
    for r in sorted((r for r in bodies if len(bodies[r]) >= POLL_LOOP),
                    key=lambda r: len(bodies[r])):
        if not any(r[0] <= o[1] and o[0] <= r[1] for o in kept):
            kept.append(r)
    out = []
    for lo, hi in sorted(kept):
        body = bodies[lo, hi]
        out.append((len(body), sum(bool(re.search(r"\bH(G)?MMA\b", t)) for t in body),
                    sum("LDL" in t for t in body), sum("STL" in t for t in body)))
    return out


def resources(job: dict) -> dict:
    """What the GPU compiler makes of one job for sm_90: the warps it launches with, registers
    and spill bytes (stores, loads) per ptxas (None where it says nothing), the PTX's register
    reallocations (setmaxnreg counts: warp-specialised kernels), the SASS innermost loops
    (`innermost_loops`) and whether ptxas serialised its wgmma. Compiles afresh where the
    cache is fresh: ptxas reports only when it runs."""
    import triton
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    compiled, log = _compile(job)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    return dict(kernel=job["kernel"], num_warps=compiled.metadata.num_warps,
                registers=int(regs.group(1)) if regs else None,
                spills=tuple(map(int, spills.groups())) if spills else None,
                setmaxnreg=sorted({int(n) for n in re.findall(
                    r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", compiled.asm["ptx"])}),
                loops=innermost_loops(sass), serialised=SERIALISED in log)


def report(jobs: list, kernels: list) -> None:
    print("| HQ/H | kernel | constexprs | warps/stages | regs | spill st/ld B | innermost loops "
          "(instr, MMA, local ld, local st) | wgmma |")
    print("|---|---|---|---|---|---|---|---|")
    for job in jobs:
        if kernels and not any(k in job["kernel"] for k in kernels):
            continue
        found = resources(job)
        names = list(job["signature"])
        shown = {names[i]: v for i, v in job["constexprs"]
                 if names[i] in ("BLOCK_T", "BLOCK_K", "BLOCK_C", "WINDOW", "KEY_STRIDE",
                                 "FOLD", "FUSE_DQ", "DQ_HALVES", "ACCUMULATE")}
        options = job["options"]
        spills = found["spills"]
        print(f"| {job['group']} | {job['kernel']} | {shown} | {options.get('num_warps', 4)}/"
              f"{options.get('num_stages', 3)} | {found['registers'] or '?'} | "
              f"{'/'.join(map(str, spills)) if spills else '?'} | {found['loops']} | "
              f"{'serialised' if found['serialised'] else ''} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="nvidia_h200", help="shipped tuning file (templates/tuned)")
    ap.add_argument("--t", type=int, default=8192, help="length bucket of the block sizes")
    ap.add_argument("--groups", default="64/4,32/8", help="HQ/H pairs")
    ap.add_argument("--kernels", default="", help="substrings of the kernels to report")
    ap.add_argument("--record", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    groups = [tuple(map(int, g.split("/"))) for g in args.groups.split(",")]
    if args.record:
        record(args.record, args.gpu, args.t, groups)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jobs.json")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        subprocess.run([sys.executable, __file__, "--record", path, "--gpu", args.gpu,
                        "--t", str(args.t), "--groups", args.groups], env=env, check=True)
        jobs = json.loads(Path(path).read_text())
        # a fresh compile cache, so that ptxas runs (and reports) for every kernel
        os.environ.update(TRITON_CACHE_DIR=os.path.join(tmp, "cache"), TRITON_DUMP_PTXAS_LOG="1")
        os.environ.pop("TRITON_INTERPRET", None)
        sys.path.insert(0, str(ROOT))
        report(jobs, [k for k in args.kernels.split(",") if k])
    return 0


if __name__ == "__main__":
    sys.exit(main())
