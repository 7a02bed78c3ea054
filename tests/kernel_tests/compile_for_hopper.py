"""Compiles recorded kernel launches for sm_90 (run without TRITON_INTERPRET, so the templates
load as compilable kernels): `python compile_for_hopper.py jobs.json`, jobs as
`test_nsa_triton_compile._job` writes them (Gluon kernels too). Prints each failure; exit
status 1 if any. With `--resources`, prints per job a JSON line of what ptxas reports."""
import contextlib
import importlib
import io
import json
import os
import re
import sys
import traceback

from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def compile_job(job: dict):
    """The CompiledKernel of one recorded launch (`test_nsa_triton_compile._job`) for sm_90."""
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    src = source(fn=kernel, signature=job["signature"],
                    constexprs={(i,): value for i, value in job["constexprs"]},
                    attrs={(i,): [["tt.divisibility", 16]] for i in job["aligned"]})
    return triton_compile(src, target=HOPPER, options=job["options"])


def resources(job: dict) -> dict:
    """What ptxas makes of one job's sm_90 compile: the warps it launches with, registers,
    spill bytes (stores + loads), the PTX's register reallocations (setmaxnreg counts,
    warp-specialised kernels) and the SASS innermost loops as
    `kernel_resources.innermost_loops` counts them. Compiles afresh: ptxas reports only when
    it runs."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from kernel_resources import innermost_loops
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile_job(job)
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    return dict(kernel=job["kernel"], num_warps=compiled.metadata.num_warps,
                registers=int(regs.group(1)),
                spill_bytes=sum(map(int, spills.groups())),
                setmaxnreg=sorted({int(n) for n in re.findall(
                    r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", compiled.asm["ptx"])}),
                loops=innermost_loops(sass))


def main(path: str, report: bool = False) -> int:
    failed = 0
    for job in json.loads(open(path).read()):
        try:
            if report:
                print(json.dumps(resources(job)))
            else:
                compile_job(job)
        except Exception:  # noqa: BLE001 — report every kernel that fails, then fail
            failed += 1
            print(f"{job['kernel']} {job['signature']} failed:\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--resources" in sys.argv[2:]))
