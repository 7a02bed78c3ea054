"""Compiles recorded kernel launches for sm_90 (run without TRITON_INTERPRET, so the templates
load as compilable kernels): `python compile_for_hopper.py jobs.json`, jobs as
`test_nsa_triton_compile._job` writes them (Gluon kernels too). Prints each failure; exit
status 1 if any. With `--resources`, prints per job a JSON line of what the compiler made of
it (`kernel_resources.resources`)."""
import importlib
import json
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


def main(path: str, report: bool = False) -> int:
    from kernel_resources import resources
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
