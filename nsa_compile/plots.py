"""PNG line plots of the demo and the benchmark, drawn with matplotlib (the `demo` extra:
pip install "nsa_compile[demo]"). Only the object API is used (no pyplot), so no GUI backend
or global figure state is involved."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

INSTALL = 'pip install "nsa_compile[demo]"  (or: pip install matplotlib)'


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(ncols: int):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.2 * ncols, 4.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for n, x in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * x
        out.append(avg / (1 - weight ** n))
    return out


def loss_curves(path: Path, train: Mapping[str, Sequence[float]],
                val: Mapping[str, Sequence[Tuple[int, float]]], title: str) -> Path:
    """train: name -> loss per step (drawn raw and smoothed); val: name -> [(step, loss)]."""
    fig, (ax,) = _figure(1)
    for n, (name, losses) in enumerate(train.items()):
        color = f"C{n}"
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(losses), color=color, label=f"{name} (train)")
        if val.get(name):
            xs, ys = zip(*val[name])
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=4,
                    label=f"{name} (held-out)")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _log_log_axes(ax, ylabel: str, title: str) -> None:
    """Time against sequence length, both on log scales, with the legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def times_vs_length(path: Path, rows: Sequence[Dict[str, float]], title: str) -> Path:
    """rows: {T, dense_fwd, dense_fwd_bwd, nsa_fwd, nsa_fwd_bwd} in ms (bench.attention_times)."""
    fig, axes = _figure(2)
    ts = [r["T"] for r in rows]
    for ax, part, label in zip(axes, ("fwd", "fwd_bwd"), ("forward", "forward + backward")):
        for n, name in enumerate(("dense", "nsa")):
            ax.plot(ts, [r[f"{name}_{part}"] for r in rows], marker="o", color=f"C{n}",
                    label="dense SDPA" if name == "dense" else "NSA (nsa_compile)")
        _log_log_axes(ax, "ms (median)", f"{label}\n{title}")
    fig.savefig(path)
    return path


def kernel_table(path: Path, rows: Sequence[Dict[str, object]], title: str,
                 metric: str = "fwd_ms") -> Path:
    """rows of bench.measure: `metric` (forward or forward+backward ms) against T, one panel
    per HQ/H, one line per impl."""
    groups = sorted({(r["HQ"], r["H"]) for r in rows}, reverse=True)
    fig, axes = _figure(max(1, len(groups)))
    labels = dict(dense="dense SDPA", flex="FlexAttention window 512", fla="fla NSA cmp+slc",
                  ours="ours (3 branches)")
    for ax, (HQ, H) in zip(axes, groups):
        for n, impl in enumerate(labels):
            pts = sorted((r["T"], r[metric]) for r in rows if r["impl"] == impl
                         and (r["HQ"], r["H"]) == (HQ, H) and r.get(metric) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=f"C{n}", label=labels[impl])
        label = {"fwd_ms": "forward", "fwd_bwd_ms": "forward+backward"}[metric]
        _log_log_axes(ax, f"{label} ms (median)", f"HQ/H = {HQ}/{H}\n{title}")
    fig.savefig(path)
    return path
