"""Every NSA kernel launch compiles for a Hopper GPU (sm_90), with tensor descriptors and
without. The interpreter runs a kernel's Python, not Triton's compiler: its type checks (a
helper's return types in a branch the run never takes) and its GPU passes happen only here.
No GPU needed: ptxas ships with Triton. The launches are recorded from a forward and backward
run in the interpreter, with the GPU's default block sizes, and compiled in a process without
the interpreter (`compile_for_hopper.py`)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_compile import NSAConfig

import nsa_reference as ref

triton = pytest.importorskip("triton")

from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
          torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    """Stands in for a kernel in a launcher's namespace: records each launch, then runs it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _arg_type(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + DTYPES[x.dtype]
    if isinstance(x, TensorDescriptor):
        return f"tensordesc<{DTYPES[x.base.dtype]}[{','.join(map(str, x.block_shape))}]>"
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2 ** 31 <= x < 2 ** 31 else "i64"
    assert isinstance(x, float), type(x)
    return "fp32"


def _job(kernel, args, kwargs) -> dict:
    """What compiling one recorded launch takes: the kernel's module and name, the argument
    types ("constexpr" for constexpr and None arguments), constexpr values, launch options."""
    fn = kernel.fn
    names = list(inspect.signature(fn).parameters)
    values = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
    signature, constexprs = {}, []
    for i, name in enumerate(names):
        x = values[name]
        if name in kwargs or x is None:
            signature[name] = "constexpr"
            constexprs.append([i, x])
        else:
            signature[name] = _arg_type(x)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature,
                constexprs=constexprs, options=options)


def _record_launches(monkeypatch, tma: bool) -> list:
    from nsa_compile.kernels.nsa import triton_bwd, triton_decode, triton_fwd
    monkeypatch.setenv("NSA_COMPILE_TMA", "1" if tma else "0")
    launches = []
    for module in (triton_fwd, triton_bwd, triton_decode):
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Recorder(obj, launches))
    from tests.kernel_tests.test_nsa_triton_bwd import _forward_backward, _inputs
    nsa = ref.SMALL_NSA
    # G = 3 (a padded group), learned and fixed gates, both loops of the selected branch
    for cfg, configs in ((NSAConfig(**nsa), None),
                         (NSAConfig(**nsa, gate=(0.5, 1.0, 0.25)), ref.GPU_ORDERS["blocks"])):
        _forward_backward(*_inputs(1, 6, 2, 150, 64, 64, cfg, torch.float16), configs=configs)
    from tests.kernel_tests.test_nsa_triton_decode import _inputs as decode_inputs
    for cfg in (NSAConfig(**nsa), NSAConfig(**{**nsa, "window": None}, gate=(1.0, 1.0),
                                            branches=("selected", "window"))):
        triton_decode.nsa_decode_cuda(*decode_inputs(1, 6, 2, 150, 2, 64, 64, cfg,
                                                     torch.float16))
    return launches


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_every_kernel_launch_compiles_for_hopper(tma, monkeypatch, tmp_path):
    jobs = {}
    for launch in _record_launches(monkeypatch, tma):
        job = _job(*launch)
        jobs.setdefault(json.dumps(job, sort_keys=True), job)
    assert {"nsa_cmp_fwd_kernel", "nsa_select_kernel", "nsa_slc_fwd_kernel",
            "nsa_slc_fwd_blocks_kernel", "nsa_win_fwd_kernel", "nsa_dense_bwd_dq_kernel",
            "nsa_dense_bwd_dkdv_kernel", "nsa_slc_bwd_dq_kernel",
            "nsa_slc_bwd_dkdv_kernel", "nsa_decode_cmp_kernel", "nsa_decode_select_kernel",
            "nsa_decode_attend_kernel", "nsa_decode_combine_kernel"} <= {
                job["kernel"] for job in jobs.values()}
    if tma:
        assert any("tensordesc" in str(job["signature"]) for job in jobs.values())
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(list(jobs.values())))
    import nsa_compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(nsa_compile.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    helper = Path(__file__).with_name("compile_for_hopper.py")
    out = subprocess.run([sys.executable, str(helper), str(path)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
