"""`nsa-compile demo`: what the pass does to a small causal LM, and what it buys.

A randomly initialised Hugging Face Llama (built from a config, no download) is inspected,
sparsified with a dense-equivalent NSA configuration to show the rewrite keeps its output, then
trained three ways for the same steps on the same batches — dense, NSA, NSA + Engram — on the
Python standard library's own source files (byte-level tokens, read from the running
interpreter). On a GPU it also times dense attention and NSA against sequence length. Writes
`report.md` and PNG plots. Progress and messages go through the `echo`/`progress` callables the
caller passes (the command line prints them); this module prints nothing itself.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import platform
import statistics
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple,
                    Union)

import torch
from torch import Tensor, nn

from . import bench, plots
from .config import EngramConfig, NSAConfig
from .models import tiny_hf
from .optim import param_groups
from .passes.api import inspect, sparsify
from .passes.report import Report

# Window-only NSA with an unbounded window and gate 1 is dense causal attention (SPEC §3).
DENSE_EQUIVALENT = NSAConfig(branches=("window",), window=None, gate=(1.0,))


class DemoError(RuntimeError):
    """A failure the user can act on (no corpus, failed equivalence check)."""


@dataclass(frozen=True)
class Setup:
    """Sizes of one demo run. nsa is the paper's configuration scaled to seq_len (blocks of
    16/8/32 instead of 32/16/64, a shorter window); engram adds a small memory to block 1."""

    seq_len: int
    batch: int
    steps: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    nsa: NSAConfig
    engram: EngramConfig
    lr: float = 2e-3
    evals: int = 5
    eval_batches: int = 4
    corpus_bytes: int = 4 << 20
    timing_lengths: Tuple[int, ...] = (1024, 2048, 4096, 8192)
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


QUICK = Setup(seq_len=256, batch=8, steps=150, hidden=128, layers=4, heads=2, kv_heads=1,
              head_dim=64,
              nsa=NSAConfig(compress_block=16, compress_stride=8, select_block=32,
                            select_count=4, window=64),
              engram=EngramConfig(layers=(1,), heads=4, table_size=1024, head_dim=16))
FULL = Setup(seq_len=1024, batch=8, steps=600, hidden=256, layers=6, heads=4, kv_heads=2,
             head_dim=64,
             nsa=NSAConfig(compress_block=16, compress_stride=8, select_block=32,
                           select_count=8, window=128),
             engram=EngramConfig(layers=(1,), heads=4, table_size=4096, head_dim=32),
             eval_batches=8, corpus_bytes=64 << 20,
             timing_lengths=(1024, 2048, 4096, 8192, 16384))


class ProgressBar(Protocol):
    def update(self, n: int = 1, info: str = "") -> None: ...

    def close(self) -> None: ...


Echo = Callable[[str], None]
MakeProgress = Callable[[int, str], ProgressBar]


@dataclass
class Corpus:
    """Byte tokens of the standard library's .py files; every 10th file is held out."""

    root: Path
    files: int
    train: Tensor
    val: Tensor

    def describe(self) -> str:
        return (f"{self.files} .py files of the Python {platform.python_version()} standard "
                f"library ({self.root}): {len(self.train) / 1e6:.1f} MB train, "
                f"{len(self.val) / 1e6:.1f} MB held out, byte-level tokens (vocab 256)")


def load_corpus(max_bytes: int, root: Optional[Path] = None) -> Corpus:
    """Reads the interpreter's standard library sources in path order until max_bytes."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]
    parts: Tuple[List[bytes], List[bytes]] = ([], [])
    total = used = 0
    for n, path in enumerate(files):
        if total >= max_bytes:
            break
        try:
            data = path.read_bytes() + b"\n"
        except OSError:
            continue
        parts[n % 10 == 9].append(data)
        total += len(data)
        used += 1
    train, val = (b"".join(p) for p in parts)
    if not val or len(train) < 1 << 16:
        raise DemoError(f"too few Python sources under {root} for the demo corpus (found "
                        f"{len(files)} .py files, {total} bytes); is the standard library "
                        "installed as source files?")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return Corpus(root, used, as_tensor(train), as_tensor(val))


def windows(data: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """(batch, length) int64 windows at random offsets of the uint8 token stream."""
    starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
    return torch.stack([data[s:s + length] for s in starts.tolist()]).long()


def build_model(setup: Setup) -> nn.Module:
    """The demo's randomly initialised Llama (seeded), fp32, eval mode."""
    torch.manual_seed(setup.seed)
    model = tiny_hf("llama", vocab_size=256, hidden_size=setup.hidden,
                    intermediate_size=setup.hidden * 8 // 3 // 16 * 16,
                    num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                    num_key_value_heads=setup.kv_heads, head_dim=setup.head_dim,
                    max_position_embeddings=max(setup.seq_len, 128), attn_implementation="sdpa")
    return model


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_equivalence(model: nn.Module, ids: Tensor,
                      device: torch.device) -> Tuple[float, float, Report]:
    """Sparsifies a copy with DENSE_EQUIVALENT (on the CPU, where the model is) and runs both on
    device; (max |logit error|, max |logit|, the copy's report). model is left unchanged."""
    twin = sparsify(copy.deepcopy(model), DENSE_EQUIVALENT, example_inputs=(ids,))
    ids = ids.to(device)
    ref = logits(copy.deepcopy(model).to(device), ids)
    err = (logits(twin.to(device), ids) - ref).abs().max().item()
    return err, ref.abs().max().item(), twin._nsa_compile_report


@dataclass
class Run:
    """One trained variant: loss per step, held-out loss at eval steps, step times (s)."""

    name: str
    params: int
    report: Optional[Report]
    losses: List[float] = field(default_factory=list)
    val: List[Tuple[int, float]] = field(default_factory=list)
    step_s: List[float] = field(default_factory=list)

    @property
    def final_train(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def variants(base: nn.Module, setup: Setup, example: Tensor) -> Iterator[Tuple[str, nn.Module]]:
    """dense (an untouched copy), NSA, NSA + Engram: copies of the same initial weights."""
    yield "dense", copy.deepcopy(base)
    torch.manual_seed(setup.seed + 1)
    yield "NSA", sparsify(copy.deepcopy(base), setup.nsa, example_inputs=(example,))
    torch.manual_seed(setup.seed + 1)
    yield "NSA+Engram", sparsify(copy.deepcopy(base), setup.nsa, engram=setup.engram,
                                 example_inputs=(example,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: nn.Module, batches: Sequence[Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train()
    return loss


def train(name: str, model: nn.Module, corpus: Corpus, setup: Setup, device: torch.device,
          bar: ProgressBar) -> Run:
    """AdamW (Engram tables at 5x lr, nsa_compile.param_groups), linear warm-up then cosine
    decay to 10%, gradient clipping at 1; the batches depend only on setup.seed, so every
    variant sees the same data. Held-out loss at setup.evals evenly spaced steps and step 0."""
    model.to(device).train()
    run = Run(name, sum(p.numel() for p in model.parameters()),
              getattr(model, "_nsa_compile_report", None))
    opt = torch.optim.AdamW(param_groups(model, lr=setup.lr), betas=(0.9, 0.95))
    warm = max(1, setup.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(1, setup.steps)))))
    gen = torch.Generator().manual_seed(setup.seed)
    val_gen = torch.Generator().manual_seed(setup.seed + 1)
    val = [windows(corpus.val, setup.batch, setup.seq_len, val_gen).to(device)
           for _ in range(setup.eval_batches)]
    at = {round(setup.steps * i / setup.evals) for i in range(setup.evals + 1)}
    run.val.append((0, evaluate(model, val)))
    try:
        for step in range(1, setup.steps + 1):
            ids = windows(corpus.train, setup.batch, setup.seq_len, gen).to(device)
            _sync(device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            run.losses.append(loss.item())  # also waits for the step to finish
            run.step_s.append(time.perf_counter() - t0)
            if step in at:
                run.val.append((step, evaluate(model, val)))
            bar.update(1, f"loss {run.losses[-1]:.3f}")
    finally:
        bar.close()
    return run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}), {torch.get_num_threads()} threads"


def versions() -> Dict[str, str]:
    import transformers
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    for pkg in ("triton", "nsa_compile"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["commit"] = bench.commit()
    return out


def _config_line(cfg) -> str:
    """`NSAConfig(window=None, ...)`: the fields that differ from the defaults."""
    default = type(cfg)()
    changed = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if f.compare and getattr(cfg, f.name) != getattr(default, f.name)]
    return f"{type(cfg).__name__}({', '.join(changed)})"


def _ms(seconds: Sequence[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.0f}" if seconds else "-"


def write_report(path: Path, *, command: str, setup: Setup, quick: bool, device: torch.device,
                 corpus: Corpus,
                 base: nn.Module, found: Report, equiv: Tuple[float, float], runs: List[Run],
                 timings: Union[None, str, List[Dict[str, float]]], pngs: Dict[str, str],
                 seconds: float) -> Path:
    vers = versions()
    params = sum(p.numel() for p in base.parameters())
    lines = [
        "# nsa_compile demo", "",
        f"`{command}` — "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {seconds / 60:.1f} min "
        f"({'quick' if quick else 'full'} setup).", "",
        "## Setup", "",
        f"- device: {device.type} — {device_name(device)}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- model: Hugging Face `LlamaForCausalLM` from a config, random init: {setup.layers} "
        f"layers, hidden {setup.hidden}, {setup.heads} query / {setup.kv_heads} KV heads of "
        f"dim {setup.head_dim}, vocab 256, {params / 1e6:.2f} M parameters, fp32",
        f"- data: {corpus.describe()}",
        f"- training: {setup.steps} steps of {setup.batch} x {setup.seq_len} tokens, AdamW lr "
        f"{setup.lr} (Engram tables 5x), warm-up + cosine, same batches for every model", "",
        "## What the pass found", "",
        "`nsa_compile.inspect(model)` before any change:", "",
        "```text", str(found), "```", "",
        "## The rewrite keeps the model's output", "",
        f"Sparsified with the dense-equivalent `{_config_line(DENSE_EQUIVALENT)}` "
        f"(window-only, unbounded window, gate 1): max |logit difference| = {equiv[0]:.2e} "
        f"(logits up to {equiv[1]:.2f}).", "",
        "## What was rewritten for training", "",
        f"- NSA: `{_config_line(setup.nsa)}`",
        f"- Engram: `{_config_line(setup.engram)}`", "",
    ]
    with_engram = runs[-1].report
    if with_engram is not None:
        lines += ["Sites of the NSA + Engram model:", "", "```text", str(with_engram), "```", ""]
    lines += [
        "## Training", "",
        "| model | parameters | train loss (last 10% of steps) | held-out loss | held-out "
        "bits/byte | median step ms | tokens/s | total s |",
        "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        held = r.val[-1][1]
        total = sum(r.step_s)
        lines.append(
            f"| {r.name} | {r.params / 1e6:.3f} M | {r.final_train:.3f} | {held:.3f} | "
            f"{held / math.log(2):.3f} | {_ms(r.step_s)} | "
            f"{setup.tokens_per_step * len(r.step_s) / max(total, 1e-9):.0f} | {total:.1f} |")
    lines += ["", "Losses are cross-entropy in nats per byte (uniform guessing: ln 256 = 5.55); "
              "held-out loss on the same held-out windows for every model."]
    if device.type == "cpu":
        lines += ["On the CPU, NSA runs its pure-PyTorch reference (the test truth), which is "
                  "slower than PyTorch's fused dense attention at these lengths; NSA's speed "
                  "comes from the Triton kernels on a GPU (see `nsa-compile bench`)."]
    else:
        lines += ["On the GPU, NSA's forward runs the Triton kernels; its backward still runs "
                  "the PyTorch reference (Triton backward kernels are not written yet)."]
    if "loss" in pngs:
        lines += ["", f"![loss curves]({pngs['loss']})"]
    if isinstance(timings, str):
        lines += ["", "## Attention time against sequence length", "",
                  f"The timing sweep failed: `{timings}`."]
    elif timings:
        lines += [
            "", "## Attention time against sequence length", "",
            f"`nsa_compile.ops.nsa_attention` with the default `NSAConfig()` (all three "
            f"branches, learned-style gates) against causal SDPA; bf16, B=1, 32 query / 8 KV "
            f"heads of dim {bench.D}, median ms.", "",
            "| T | dense fwd | NSA fwd | dense fwd+bwd | NSA fwd+bwd |", "|---|---|---|---|---|"]
        for t in timings:
            lines.append(f"| {t['T']} | {t['dense_fwd']:.2f} | {t['nsa_fwd']:.2f} | "
                         f"{t['dense_fwd_bwd']:.2f} | {t['nsa_fwd_bwd']:.2f} |")
        if "times" in pngs:
            lines += ["", f"![attention time]({pngs['times']})"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(setup: Setup, out: Path, device: torch.device, *, quick: bool, echo: Echo,
        progress: MakeProgress, command: str = "nsa-compile demo") -> Path:
    """The whole demo; returns the path of report.md. command: shown in the report."""
    started = time.perf_counter()
    corpus = load_corpus(setup.corpus_bytes)
    echo(f"Corpus: {corpus.describe()}")
    base = build_model(setup)
    example = windows(corpus.val, 1, setup.seq_len, torch.Generator().manual_seed(setup.seed))
    echo(f"Model: tiny Llama, {setup.layers} layers, hidden {setup.hidden}, "
         f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters; device "
         f"{device_name(device)}\n")
    found = inspect(base, example_inputs=(example,))
    echo("What nsa_compile.inspect finds:\n" + str(found) + "\n")
    err, scale, _ = dense_equivalence(base, example, device)
    # fp32 on the CPU; the Triton kernels multiply fp32 in TF32 (10-bit mantissa) on a GPU.
    tol = (1e-4 if device.type == "cpu" else 1e-2) * max(1.0, scale)
    echo(f"Dense-equivalent NSA (window-only, unbounded, gate 1) reproduces the logits: "
         f"max error {err:.2e} ({'ok' if err <= tol else 'FAILED'}, tolerance {tol:.0e})\n")
    if not err <= tol:
        raise DemoError(f"the dense-equivalent NSA model differs from the original by {err:.2e} "
                        f"> {tol:.0e}; please report this with report.md")
    echo(f"Training dense, NSA and NSA+Engram for {setup.steps} steps of {setup.batch} x "
         f"{setup.seq_len} bytes each")
    runs = []
    for name, model in variants(base, setup, example):
        runs.append(train(name, model, corpus, setup, device, progress(setup.steps, name)))
        del model
    echo("")
    for r in runs:
        echo(f"  {r.name:11s} train loss {r.final_train:.3f}  held-out {r.val[-1][1]:.3f}  "
             f"median step {_ms(r.step_s)} ms  ({r.params / 1e6:.3f} M parameters)")
    pngs = {"loss": plots.loss_curves(
        out / "loss.png", {r.name: r.losses for r in runs}, {r.name: r.val for r in runs},
        f"byte-level LM on the Python stdlib, {setup.batch}x{setup.seq_len} tokens/step, "
        f"{device.type}").name}
    timings = None
    if device.type == "cuda":
        lengths = setup.timing_lengths
        bar = progress(len(lengths), "timing")
        try:
            timings = bench.attention_times(device, lengths,
                                            on_length=lambda T: bar.update(1, f"T={T}"))
        except Exception as exc:  # out of memory, a kernel failing to compile, ...
            # The training results are worth the report even when the sweep fails.
            timings = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            echo(f"attention timing failed ({timings}); the report says so")
        finally:
            bar.close()
        if not isinstance(timings, str):
            pngs["times"] = plots.times_vs_length(
                out / "attention_time.png", timings,
                f"{torch.cuda.get_device_name(device)}, bf16, 32/8 heads, D={bench.D}").name
    report = write_report(out / "report.md", command=command, setup=setup, quick=quick,
                          device=device, corpus=corpus, base=base, found=found,
                          equiv=(err, scale), runs=runs, timings=timings, pngs=pngs,
                          seconds=time.perf_counter() - started)
    for name in ["report.md", *pngs.values()]:
        echo(f"wrote {out / name}")
    return report


def with_steps(setup: Setup, steps: Optional[int]) -> Setup:
    return setup if steps is None else dataclasses.replace(setup, steps=steps)
