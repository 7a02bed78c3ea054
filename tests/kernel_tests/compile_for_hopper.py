"""Compiles recorded kernel launches for sm_90 (run without TRITON_INTERPRET, so the templates
load as compilable kernels): `python compile_for_hopper.py jobs.json`, jobs as
`test_nsa_triton_compile._job` writes them. Prints each failure; exit status 1 if any."""
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
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    src = ASTSource(fn=kernel, signature=job["signature"],
                    constexprs={(i,): value for i, value in job["constexprs"]},
                    attrs={(i,): [["tt.divisibility", 16]] for i in job["aligned"]})
    return triton_compile(src, target=HOPPER, options=job["options"])


def main(path: str) -> int:
    failed = 0
    for job in json.loads(open(path).read()):
        try:
            compile_job(job)
        except Exception:  # noqa: BLE001 — report every kernel that fails, then fail
            failed += 1
            print(f"{job['kernel']} {job['signature']} failed:\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
