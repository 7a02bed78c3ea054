"""Every NSA kernel launch compiles for a Hopper GPU (sm_90), with tensor descriptors and
without. The interpreter runs a kernel's Python, not Triton's compiler: its type checks (a
helper's return types in a branch the run never takes) and its GPU passes happen only here.
No GPU needed: ptxas ships with Triton. The launches are recorded from a forward and backward
run in the interpreter, with the GPU's default block sizes, and compiled in a process without
the interpreter (`compile_for_hopper.py`)."""
import contextlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.templates.nsa_common import LENGTHS

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


def _specialization(name: str, x) -> tuple:
    """How Triton's launcher specialises argument `name`: ("constexpr", 1) for an int equal
    to 1, else (type, "D" when divisible by 16 — ints and tensor addresses — or None); the
    lengths `jit_kernel` leaves unspecialised keep their type only."""
    from triton.backends.compiler import BaseBackend
    from triton._C.libtriton import native_specialize_impl
    if not isinstance(x, (int, torch.Tensor)) or isinstance(x, bool):
        return _arg_type(x), None
    return native_specialize_impl(BaseBackend, x, False, name not in LENGTHS, True)


def _job(kernel, args, kwargs) -> dict:
    """What compiling one recorded launch takes, as the GPU launch would compile it: the
    kernel's module and name, the argument types ("constexpr" for constexpr and None
    arguments, and for ints equal to 1, which Triton specialises), constexpr values, the
    arguments Triton marks divisible by 16, launch options."""
    fn = kernel.fn
    names = list(inspect.signature(fn).parameters)
    values = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
    signature, constexprs, aligned = {}, [], []
    for i, name in enumerate(names):
        x = values[name]
        if name in kwargs or x is None:
            signature[name] = "constexpr"
            constexprs.append([i, x])
            continue
        ty, attr = _specialization(name, x)
        if ty == "constexpr":
            constexprs.append([i, attr])
        elif attr == "D":
            aligned.append(i)
        signature[name] = ty if ty == "constexpr" else _arg_type(x)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature,
                constexprs=constexprs, aligned=aligned, options=options)


@contextlib.contextmanager
def recording():
    """The NSA launchers' kernels replaced by `_Recorder`s for the block; yields the list of
    (kernel, args, kwargs) their launches append to."""
    from nsa_compile.kernels.nsa import triton_bwd, triton_decode, triton_fwd
    launches, saved = [], []
    for module in (triton_fwd, triton_bwd, triton_decode):
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel"):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(obj, launches))
    try:
        yield launches
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def _record_launches(monkeypatch, tma: bool) -> list:
    monkeypatch.setenv("NSA_COMPILE_TMA", "1" if tma else "0")
    from nsa_compile.kernels.nsa import triton_decode
    from tests.kernel_tests.test_nsa_triton_bwd import _forward_backward, _inputs
    from tests.kernel_tests.test_nsa_triton_decode import _inputs as decode_inputs
    nsa = ref.SMALL_NSA
    with recording() as launches:
        # G = 3 (a padded group), learned and fixed gates, both loops of the selected branch
        # (block by block: the fused dQ shares whole and in halves of Dk)
        for cfg, configs in ((NSAConfig(**nsa), None),
                             (NSAConfig(**nsa, gate=(0.5, 1.0, 0.25)),
                              ref.GPU_ORDERS["blocks"]),
                             (NSAConfig(**nsa), ref.GPU_ORDERS["halves"])):
            _forward_backward(*_inputs(1, 6, 2, 150, 64, 64, cfg, torch.float16),
                              configs=configs)
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
    out = _compile_for_hopper(list(jobs.values()), tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def _compile_for_hopper(jobs: list, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`compile_for_hopper.py` on these jobs in a process without the interpreter and with a
    fresh compile cache."""
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    import nsa_compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(nsa_compile.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    helper = Path(__file__).with_name("compile_for_hopper.py")
    return subprocess.run([sys.executable, str(helper), str(path), *flags], env=env,
                          capture_output=True, text=True)


def _warp_specialised_job(kernel: str, G: int, D: int, stages: int, **constexprs) -> dict:
    """A launch of one of the warp-specialised dK/dV kernels (`templates.nsa_bwd_ws`) as
    `triton_bwd._Backward` makes it (bf16, strides multiples of 16; the window's dK/dV stored
    in bf16), built by hand: Gluon has no interpreter to record it in."""
    from nsa_compile.kernels.nsa.triton_bwd import WS_CONSUMER_REGS, WS_LOADER_REGS
    from nsa_compile.templates import nsa_bwd_ws
    fn = getattr(nsa_bwd_ws, kernel).fn
    names = list(inspect.signature(fn).parameters)
    out = "*bf16" if constexprs.get("WINDOW") else "*fp32"
    pointers = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", ROWS="*fp32", QUERIES="*i32",
                    STARTS="*i64", PAIRS="*i64", SLOTS="*i64", DK_OUT=out, DV_OUT=out,
                    DK_PART="*fp32", DV_PART="*fp32", DQ_PART="*bf16", DK_SUM="*fp32",
                    DV_SUM="*fp32")
    constexprs = dict(H=2, G=G, BLOCK_T=nsa_bwd_ws.ROWS_PER_TILE // G, D=D, STAGES=stages,
                      CONSUMER_REGS=WS_CONSUMER_REGS, LOADER_REGS=WS_LOADER_REGS,
                      **constexprs)
    pointers = {n: t for n, t in pointers.items() if n in names}
    strides = [n for n in names if n.startswith("s") and n != "scale"]
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else
                                 "fp32" if n == "scale" else "i32") for n in names}
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature,
                constexprs=[[names.index(n), v] for n, v in constexprs.items()],
                aligned=[names.index(n) for n in [*pointers, *strides]],
                options=dict(num_warps=4))


SELECTED = dict(LP=64, ACCUMULATE=False, FUSE_DQ=False)
FUSED = dict(LP=64, ACCUMULATE=True, FUSE_DQ=True)
COMPRESSED = dict(BLOCK_K=64, KEY_STRIDE=16, KEY_LAST=31, WINDOW=0, ACCUMULATE=False)
WINDOW = dict(BLOCK_K=64, KEY_STRIDE=1, KEY_LAST=0, WINDOW=512, ACCUMULATE=True)
WS_CASES = {
    "selected-G1": ("nsa_slc_bwd_dkdv_ws_kernel", 1, 128, SELECTED),
    "selected-G4": ("nsa_slc_bwd_dkdv_ws_kernel", 4, 128, SELECTED),
    "selected-G16": ("nsa_slc_bwd_dkdv_ws_kernel", 16, 128, SELECTED),
    "selected-G8-D64": ("nsa_slc_bwd_dkdv_ws_kernel", 8, 64, SELECTED),
    "selected-fused-dq-G4": ("nsa_slc_bwd_dkdv_ws_kernel", 4, 128, FUSED),
    "selected-fused-dq-G16": ("nsa_slc_bwd_dkdv_ws_kernel", 16, 128, FUSED),
    "selected-fused-dq-G2-D64": ("nsa_slc_bwd_dkdv_ws_kernel", 2, 64, FUSED),
    "compressed-G16": ("nsa_dense_bwd_dkdv_ws_kernel", 16, 128, COMPRESSED),
    "compressed-G4-D64": ("nsa_dense_bwd_dkdv_ws_kernel", 4, 64, COMPRESSED),
    "window-G4": ("nsa_dense_bwd_dkdv_ws_kernel", 4, 128, WINDOW),
    "window-G16": ("nsa_dense_bwd_dkdv_ws_kernel", 16, 128, WINDOW),
}


@pytest.mark.parametrize("name", list(WS_CASES))
def test_warp_specialised_dkdv_compiles_without_spills(name, tmp_path):
    """The Gluon kernels compile for sm_90 to the launch the configs name (num_warps
    WS_WARPS), with their register split (setmaxnreg down to the loader's count, up to the
    consumers') and nothing spilled in the consumers' loops (those with MMAs: two, one per
    consumer)."""
    from nsa_compile.kernels.nsa.triton_bwd import WS_CONSUMER_REGS, WS_LOADER_REGS, WS_WARPS
    kernel, G, D, constexprs = WS_CASES[name]
    out = _compile_for_hopper([_warp_specialised_job(kernel, G, D, 4, **constexprs)], tmp_path,
                              "--resources")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["num_warps"] == WS_WARPS, report
    consumers = [loop for loop in report["loops"] if loop[1]]  # (instructions, MMAs, ld, st)
    assert len(consumers) == 2 and all(loop[2:] == [0, 0] for loop in consumers), report
    assert {WS_CONSUMER_REGS, WS_LOADER_REGS} <= set(report["setmaxnreg"]), report
