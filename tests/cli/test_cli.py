"""The nsa-compile command: one-line errors with non-zero exits, inspect on Hugging Face and
factory targets, the quick demo's report and plots, clean refusal of GPU commands on a CPU."""
import importlib.metadata
import io
import subprocess
import sys
import textwrap

import pytest
import torch

from nsa_compile import NSAConfig, bench, plots
from nsa_compile.cli import Progress, main

PNG = b"\x89PNG\r\n\x1a\n"

FACTORY = '''
import torch
import torch.nn.functional as F
from torch import nn


class Attn(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.qkv, self.out = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(50, 32), Attn(), nn.Linear(32, 50)

    def forward(self, ids):
        return self.head(self.attn(self.emb(ids)))


def make():
    return LM().eval(), torch.randint(0, 50, (1, 16))


def wrong():
    return "not a model"
'''


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nsa-compile: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["inspect"], ["demo", "--steps", "0"], ["demo", "--device", "tpu"],
    ["autotune", "--seq-lens", "8k"], ["bench", "--seq-lens", ""],
], ids=["none", "unknown", "no-target", "steps0", "device", "seq-lens", "empty-lens"])
def test_argument_errors_are_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--help" in line


@pytest.mark.parametrize("target, says", [
    ("hf:not_a_model_type", "unknown Hugging Face model type"),
    ("hf:t5", "no causal language model"),
    ("hf:", "names no model type"),
    ("llama", "neither hf:<model_type>"),
    ("no_such_module_xyz:make", "cannot import"),
], ids=["unknown-type", "not-causal", "empty", "no-colon", "no-module"])
def test_bad_targets(target, says, capsys):
    assert main(["inspect", target]) == 1
    assert says in _one_error_line(capsys.readouterr().err)


def test_inspect_hf_llama(capsys):
    assert main(["inspect", "hf:llama"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn" in out and "model.layers.1.self_attn" in out
    assert "2 to rewrite, 1 skipped" in out
    assert "path" in out.splitlines()[0] and "reason" in out.splitlines()[0]


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2", "phi3"])
def test_inspect_other_hf_families(family, capsys):
    assert main(["inspect", f"hf:{family}"]) == 0
    assert "2 to rewrite" in capsys.readouterr().out


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    (tmp_path / "nsa_cli_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("nsa_cli_factory", None)


def test_inspect_module_factory(factory_dir, capsys):
    assert main(["inspect", "nsa_cli_factory:make"]) == 0
    out = capsys.readouterr().out
    assert "attn" in out and "sdpa" in out and "1 to rewrite" in out


@pytest.mark.parametrize("target, says", [
    ("nsa_cli_factory:wrong", "must return (model, example_inputs)"),
    ("nsa_cli_factory:missing", "has no attribute"),
])
def test_bad_factories(factory_dir, target, says, capsys):
    assert main(["inspect", target]) == 1
    assert says in _one_error_line(capsys.readouterr().err)


def test_demo_quick_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max error" in printed and "reproduces the logits" in printed
    report = (out / "report.md").read_text()
    for needed in ("## What the pass found", "max |logit difference|", "| dense |", "| NSA |",
                   "| NSA+Engram |", "torch 2.", "device: cpu", "![loss curves](loss.png)"):
        assert needed in report, needed
    assert (out / "loss.png").read_bytes()[:8] == PNG


def test_demo_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 1
    assert "cannot write to --out" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("argv", [["bench"], ["autotune"], ["demo", "--device", "cuda"]])
def test_gpu_commands_refuse_cleanly_without_gpu(argv, capsys):
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "GPU" in line


def test_console_script_is_registered_and_errors_cleanly():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "nsa-compile" and ep.value == "nsa_compile.cli:main" for ep in scripts)
    proc = subprocess.run([sys.executable, "-m", "nsa_compile.cli", "inspect", "no_such_mod:f"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    _one_error_line(proc.stderr)


def test_progress_bar_without_terminal_writes_quarters():
    stream = io.StringIO()
    bar = Progress(8, "train", stream=stream)
    for step in range(8):
        bar.update(1, f"loss {step}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "8/8" in lines[-1] and "loss 7" in lines[-1]


def test_attention_times_and_plots_on_cpu(tmp_path):
    """The demo's GPU timing sweep and the bench plot, run small on the CPU."""
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_count=3,
                    window=16)
    rows = bench.attention_times("cpu", [33, 64], heads=4, kv_heads=2, head_dim=16,
                                 dtype=torch.float32, config=cfg, reps=1)
    assert [r["T"] for r in rows] == [33, 64]
    assert all(r[k] > 0 for r in rows for k in ("dense_fwd", "dense_fwd_bwd", "nsa_fwd",
                                                 "nsa_fwd_bwd"))
    assert plots.times_vs_length(tmp_path / "t.png", rows, "cpu").read_bytes()[:8] == PNG
    fake = [dict(impl=i, HQ=64, H=4, T=T, fwd_ms=ms, fwd_bwd_ms=3 * ms, peak_MiB=1.0)
            for i, ms in (("dense", 2.0), ("ours", 1.0)) for T in (8192, 16384)]
    head = dict(gpu="GPU", torch="t", triton="tr", commit="c")
    assert "| 64/4 | 8192 | 2.00 | - | - | 1.00 | 2.00x | - | 1 |" in bench.table(head, fake)
    fb = bench.table(head, fake, "fwd_bwd_ms")
    assert "forward+backward ms" in fb and "| 64/4 | 8192 | 6.00 | - | - | 3.00 | 2.00x |" in fb
    assert plots.kernel_table(tmp_path / "k.png", fake, "x").read_bytes()[:8] == PNG
    assert plots.kernel_table(tmp_path / "b.png", fake, "x", "fwd_bwd_ms").read_bytes()[:8] == PNG
