"""The `nsa-compile` command.

    nsa-compile inspect hf:llama            # a small Hugging Face model, no download
    nsa-compile inspect mypkg.models:make   # a callable returning (model, example_inputs)
    nsa-compile demo --quick                # train dense / NSA / NSA+Engram, report.md + plots
    nsa-compile bench                       # GPU: the kernel benchmark table and a plot
    nsa-compile autotune --seq-lens 8192,65536 --heads 32 --kv-heads 8 --head-dim 128

Errors are one line on stderr and a non-zero exit (2 for bad arguments, 1 otherwise); add
--traceback to see where an unexpected error came from.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO, Tuple

PROG = "nsa-compile"


class UserError(Exception):
    """A problem the user can fix; shown as one line, exit status 1."""


class _UsageError(Exception):
    """Bad command-line arguments; shown as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage block and exit
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal; elsewhere (logs, pipes) one
    line at each quarter and at the end."""

    WIDTH = 24

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None):
        self.total, self.label = max(1, total), label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n, self.info, self.closed = 0, "", False
        self.start = self.drawn = time.monotonic()
        self.quarter = 0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = int(self.WIDTH * self.n / self.total)
        eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
        clock = lambda s: f"{int(s) // 60:d}:{int(s) % 60:02d}"
        return (f"{self.label:>11s} [{'#' * done}{'.' * (self.WIDTH - done)}] "
                f"{self.n}/{self.total} {clock(elapsed)}<{clock(eta)} {self.info}").rstrip()

    def update(self, n: int = 1, info: str = "") -> None:
        self.n, self.info = min(self.total, self.n + n), info
        now = time.monotonic()
        if self.tty:
            if now - self.drawn >= 0.1 or self.n == self.total:
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
                self.drawn = now
        elif 4 * self.n // self.total > self.quarter:
            self.quarter = 4 * self.n // self.total
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 8192,16384, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _writable_dir(path: str) -> Path:
    """Creates path if needed and checks a file can be written there."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".nsa_compile_probe"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}; choose "
                        "another directory with --out DIR") from None
    return out


def _need_gpu(command: str) -> None:
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"'{command}' needs a CUDA GPU and PyTorch {torch.__version__} sees "
                        "none; on a CPU, `nsa-compile demo --quick` shows the pass at work")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError(f"'{command}' needs Triton: pip install \"nsa_compile[triton]\"") from None


def _need_plots(command: str) -> None:
    from . import plots
    if not plots.available():
        raise UserError(f"'{command}' draws its plots with matplotlib, which is not installed: "
                        f"{plots.INSTALL}")


def load_target(spec: str) -> Tuple[Any, Any]:
    """(model, example_inputs) of an `inspect` TARGET: "hf:<model_type>" (example_inputs None:
    the model's dummy inputs) or "package.module:factory" (factory() returns both)."""
    from torch import Tensor, nn

    if spec.startswith("hf:"):
        from .models import tiny_hf
        model_type = spec[3:]
        if not model_type:
            raise UserError("target 'hf:' names no model type; try hf:llama")
        try:
            return tiny_hf(model_type), None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        except ImportError as exc:
            raise UserError(f"hf: targets need Hugging Face transformers ({_one_line(exc)}): "
                            "pip install transformers") from None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"target {spec!r} is neither hf:<model_type> (e.g. hf:llama) nor "
                        "package.module:factory (a callable returning (model, example_inputs))")
    # As `python -m` does, modules in the current directory can be named.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"target {spec!r}: cannot import {module_name!r} "
                        f"({_one_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"target {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"target {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable "
                        "returning (model, example_inputs)")
    try:
        result = obj()
    except Exception as exc:
        raise UserError(f"target {spec!r}: {attr}() raised {type(exc).__name__}: "
                        f"{_one_line(exc)}") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise UserError(f"target {spec!r}: {attr}() must return (model, example_inputs) with an "
                        f"nn.Module first, got {type(result).__name__}")
    model, example = result
    return model, (example,) if isinstance(example, Tensor) else example


def cmd_inspect(args: argparse.Namespace) -> int:
    import nsa_compile
    model, example = load_target(args.target)
    print(nsa_compile.inspect(model, example_inputs=example))
    return 0


def _device(name: Optional[str]):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: PyTorch {torch.__version__} sees no CUDA GPU; use "
                        "--device cpu (with --quick for a few minutes' run)")
    return torch.device(name)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    _need_plots("demo")
    device = _device(args.device)
    out = _writable_dir(args.out)
    setup = demo.with_steps(demo.QUICK if args.quick else demo.FULL, args.steps)
    try:
        demo.run(setup, out, device, quick=args.quick, echo=print,
                 progress=lambda total, label: Progress(total, label),
                 command=" ".join([PROG, *args.argv]))
    except demo.DemoError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _need_gpu("bench")
    _need_plots("bench")
    from . import bench, plots
    out = _writable_dir(args.out)
    lengths = args.seq_lens or ((8192, 16384) if args.quick else bench.LENGTHS)
    unknown = set(args.only) - set(bench.IMPLS)
    if unknown:
        raise UserError(f"--only: unknown {sorted(unknown)}; choose from {', '.join(bench.IMPLS)}")
    head = bench.header()
    print(f"{head['gpu']}, torch {head['torch']}, Triton {head['triton']}, commit "
          f"{head['commit']}")
    cases = bench.cases(lengths, args.only)
    bar = Progress(len(cases), "bench")
    rows, missing = [], set()
    for name, HQ, H, T in cases:
        if name not in missing:
            try:
                rows.append(bench.measure(name, HQ, H, T))
            except ImportError as exc:  # a peer that is not installed: say so once
                missing.add(name)
                print(f"\n{name}: not measured ({_one_line(exc)})", file=sys.stderr)
            except Exception as exc:  # one failing case must not stop the table
                print(f"\n{name} HQ={HQ} H={H} T={T} failed: {type(exc).__name__}: "
                      f"{_one_line(exc)[:300]}", file=sys.stderr)
        bar.update(1, f"{name} {HQ}/{H} T={T}")
    bar.close()
    tables = "\n\n".join(bench.table(head, rows, metric) for metric in bench.METRICS)
    print("\n" + tables)
    (out / "bench.md").write_text(tables + "\n")
    (out / "bench.json").write_text(json.dumps(dict(header=head, rows=rows), indent=1))
    title = f"{head['gpu']}, bf16, B=1, D={bench.D}, commit {head['commit']}"
    plotted = (("bench.png", "fwd_ms"), ("bench_fwd_bwd.png", "fwd_bwd_ms"))
    pngs = [plots.kernel_table(out / name, rows, title, metric) for name, metric in plotted]
    print(f"\nwrote {out / 'bench.md'}, {out / 'bench.json'}, {', '.join(map(str, pngs))}")
    return 0


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cmd_autotune(args: argparse.Namespace) -> int:
    _need_gpu("autotune")
    import torch
    from . import autotune
    from .config import NSAConfig
    from .kernels.nsa import triton_fwd
    from .kernels.nsa.naive import mean_pool
    from .kernels.nsa.params import NSAParams

    if os.environ.get("NSA_COMPILE_AUTOTUNE", "1") == "0":
        raise UserError("autotuning is disabled by NSA_COMPILE_AUTOTUNE=0; unset it to tune")
    try:
        config = NSAConfig.from_dict(json.loads(args.config)) if args.config else NSAConfig()
    except (ValueError, TypeError) as exc:
        raise UserError(f"--config: {_one_line(exc)}") from None
    if args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    dtype = getattr(torch, _DTYPES[args.dtype])
    params = NSAParams.from_config(config, args.head_dim ** -0.5)
    reason = triton_fwd.supported(params, args.head_dim, args.head_dim)
    if reason is not None:
        raise UserError(f"no Triton kernel for these shapes ({reason}); nothing to tune")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    cache, shipped = autotune.user_cache(name), autotune.shipped_cache(name)
    print(f"Tuning NSA forward and backward block sizes on {name}: {args.dtype}, "
          f"{args.heads} query / {args.kv_heads} KV heads, head dim {args.head_dim}, "
          f"NSAConfig({config.to_dict()})")
    bar = Progress(len(args.seq_lens), "autotune")
    rows = []
    for T in args.seq_lens:
        make = lambda h: torch.randn(1, h, T, args.head_dim, device=device, dtype=dtype)
        q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
        gates = (torch.rand(1, args.heads, T, params.num_branches, device=device, dtype=dtype)
                 if config.fixed_gates is None else None)
        l, d = config.compress_block, config.compress_stride
        k_cmp = mean_pool(k, l, d) if params.needs_cmp else None
        v_cmp = mean_pool(v, l, d) if params.has_cmp else None
        known = set(cache.entries)
        chosen = triton_fwd.tuned_configs(q, k, v, gates, k_cmp, v_cmp, params)
        chosen.update(_tune_backward(q, k, v, gates, k_cmp, v_cmp, params, chosen))
        keys = {**triton_fwd.shape_keys(q, k, v, params),
                **triton_fwd.shape_keys(q, k, v, params, backward=True)}
        for kind, key in keys.items():
            source = ("cached" if key in known else "tuned now" if key in cache.entries
                      else "shipped" if shipped.get(key) is not None else "default")
            rows.append((T, autotune.length_bucket(T), kind, chosen[kind], source))
        del q, k, v, gates, k_cmp, v_cmp
        torch.cuda.empty_cache()
        bar.update(1, f"T={T}")
    bar.close()
    print("\n| T | bucket | kernel | block_m | block_n | warps | stages | from |")
    print("|---|---|---|---|---|---|---|---|")
    for T, bucket, kind, cfg, source in rows:
        print(f"| {T} | {bucket} | {kind} | {cfg.block_m} | {cfg.block_n} | {cfg.num_warps} | "
              f"{cfg.num_stages} | {source} |")
    state = "written" if cache.path.exists() else "not written: nothing needed tuning"
    print(f"\nautotune cache for {name}: {cache.path} ({state}; {len(cache.entries)} entries)")
    print(f"shipped defaults: {shipped.path}"
          f"{'' if shipped.path.exists() else ' (none for this GPU)'}")
    print("Set NSA_COMPILE_CACHE_DIR to keep the cache elsewhere.")
    return 0


def _tune_backward(q, k, v, gates, k_cmp, v_cmp, params, forward_configs):
    """The backward kernels' block sizes, tuned on the residuals of one saved forward."""
    import torch
    from .kernels.nsa import triton_bwd, triton_fwd
    res = triton_fwd.nsa_forward(q, k, v, gates, k_cmp, v_cmp, params, forward_configs,
                                 save=True)
    do = torch.randn_like(res.o)
    stats = triton_bwd.row_stats(do, res.branch_out, res.branch_lse(), gates, params, k.shape[1])
    return triton_bwd.tuned_configs(do, q, k, v, k_cmp, v_cmp, params, stats, res.block_idx)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of an unexpected error")
    parser = _Parser(prog=PROG, description="Native Sparse Attention and Engram for PyTorch "
                     "models: inspect a model, run the demo, benchmark and autotune the kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", parents=[common], help="what sparsify would change in a model",
                       description="Print the sites nsa_compile.sparsify would rewrite or skip.")
    p.add_argument("target", metavar="TARGET",
                   help="hf:<model_type> (a small model of that Hugging Face type, random "
                        "weights, e.g. hf:llama, hf:qwen2, hf:mistral, hf:gpt2, hf:phi3) or "
                        "package.module:factory (a callable returning (model, example_inputs))")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[common], help="train dense, NSA and NSA+Engram models",
                       description="Inspect and sparsify a small Llama, check the dense-"
                       "equivalent rewrite, train dense / NSA / NSA+Engram on the Python standard "
                       "library's sources; writes report.md and PNG plots.")
    p.add_argument("--out", default="nsa-compile-demo", metavar="DIR",
                   help="directory for report.md and the plots (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller model and run: a few minutes on a 2-core CPU")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="training steps per model (default: 150 with --quick, else 600)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", parents=[common], help="GPU kernel benchmark: table and plot",
                       description="NSA forward against dense SDPA, FlexAttention and fla-core "
                       "NSA (when installed), bf16, B=1, D=128, HQ/H 64/4 and 32/8.")
    p.add_argument("--seq-lens", type=_int_list, metavar="T,T,...",
                   help="sequence lengths (default: 8192 ... 131072; with --quick 8192,16384)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                   default=["dense", "flex", "fla", "ours"], metavar="IMPL,...",
                   help="any of dense,flex,fla,ours (default: all)")
    p.add_argument("--quick", action="store_true", help="two lengths only")
    p.add_argument("--out", default="nsa-compile-bench", metavar="DIR",
                   help="directory for bench.md, bench.json and the plots bench.png (forward), "
                   "bench_fwd_bwd.png (default: %(default)s)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("autotune", parents=[common], help="tune this GPU's kernel cache",
                       description="Tune the NSA forward kernels' block sizes for the given "
                       "shapes and store them in this GPU's autotune cache.")
    p.add_argument("--seq-lens", type=_int_list, default=(8192, 16384, 32768, 65536),
                   metavar="T,T,...", help="sequence lengths (default: 8192,16384,32768,65536; "
                   "the cache keeps one entry per power-of-two bucket)")
    p.add_argument("--heads", type=_positive_int, default=32, help="query heads (default: 32)")
    p.add_argument("--kv-heads", type=_positive_int, default=8,
                   help="key/value heads (default: 8)")
    p.add_argument("--head-dim", type=_positive_int, default=128,
                   help="head dimension (default: 128)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16")
    p.add_argument("--config", metavar="JSON",
                   help='NSAConfig fields as JSON, e.g. \'{"window": 256}\' (default: NSAConfig())')
    p.set_defaults(func=cmd_autotune)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except _UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except UserError as exc:
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\n{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.traceback:
                raise
            print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} (run with "
                  "--traceback for details)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
