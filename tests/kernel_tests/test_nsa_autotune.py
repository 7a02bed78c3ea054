"""The per-GPU autotune cache (SPEC §5): keys, atomic writes, stale/corrupt files, lookup order,
and that a cache hit launches nothing."""
import json
import warnings

import pytest
import torch

from nsa_compile import NSAConfig, autotune
from nsa_compile.kernels.nsa.params import NSAParams
from nsa_compile.templates import nsa_configs
from nsa_compile.templates.nsa_configs import DEFAULTS, KernelConfig, candidates

DEVICE = "NVIDIA Test GPU 80GB"
NSA = (32, 16, 64, 16, 1, 2, 512)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_caches", {})
    monkeypatch.setattr(autotune, "_shipped", {})
    monkeypatch.setattr(autotune, "_siblings", {})
    monkeypatch.setattr(autotune, "SHIPPED", tmp_path / "shipped")
    return tmp_path


def test_key_names_device_shapes_and_bucket():
    key = autotune.shape_key("cmp", torch.bfloat16, 128, 64, 16, NSA, 5000)
    assert key == "cmp|bfloat16|dk128|dv64|g16|nsa32-16-64-16-1-2-512|T8192"
    assert autotune.length_bucket(1) == 1024 and autotune.length_bucket(1 << 20) == 1 << 17
    assert autotune.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def test_tunes_once_saves_atomically_and_reloads(cache_dir):
    calls = []

    def bench(cfg):
        calls.append(cfg)
        return float(cfg.block_m)  # smaller tile = "faster"

    key = autotune.shape_key("win", torch.float16, 64, 64, 4, NSA, 4096)
    space = lambda: candidates("win", 4, 64, 64, 2)
    got = autotune.pick(DEVICE, "win", key, space, bench)
    assert got.block_m == min(c.block_m for c in space())
    assert len(calls) == len(space())
    again = autotune.pick(DEVICE, "win", key, space, bench)
    assert again == got and len(calls) == len(space())  # cached: no re-tuning
    data = json.loads((cache_dir / "nvidia_test_gpu_80gb.json").read_text())
    assert data["header"]["device"] == DEVICE
    assert data["header"]["source_hash"]["win"] == autotune.source_hash("win")
    assert data["entries"][key] == got.to_dict()
    assert not list(cache_dir.glob("*.tmp"))
    fresh = autotune.TuneCache(DEVICE, cache_dir / "nvidia_test_gpu_80gb.json")
    assert fresh.get(key) == got


def test_corrupt_and_stale_files_are_ignored_with_a_warning(cache_dir):
    path = cache_dir / "nvidia_test_gpu_80gb.json"
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert autotune.TuneCache(DEVICE, path).entries == {}
    head = autotune.header(DEVICE)
    head["triton"] = "0.0.1"
    entry = DEFAULTS["cmp"].to_dict()
    path.write_text(json.dumps({"header": head, "entries": {"cmp|T1024": entry}}))
    with pytest.warns(RuntimeWarning, match="stale.*triton"):
        assert autotune.TuneCache(DEVICE, path).entries == {}


def test_entries_of_edited_kernels_are_dropped_alone(cache_dir):
    """An entry is valid for the kernel sources it tuned: other kinds' entries survive."""
    head = autotune.header(DEVICE)
    head["source_hash"]["cmp"] = "0" * 16
    entry = DEFAULTS["win"].to_dict()
    path = cache_dir / "nvidia_test_gpu_80gb.json"
    path.write_text(json.dumps({"header": head, "entries": {
        "win|T1024": entry, "cmp|T1024": entry, "unknown|T1024": entry}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = autotune.TuneCache(DEVICE, path)
    assert set(cache.entries) == {"win|T1024"}
    assert cache.get("cmp|T1024") is None and cache.nearest("cmp|T2048") is None


def test_source_hash_follows_only_the_kinds_own_kernels(tmp_path, monkeypatch):
    """Editing one kernel changes the hash of the kinds that launch it and no other; editing a
    template's helper changes the kinds whose kernels call it; a new helper nobody calls
    changes nothing."""
    import shutil
    templates = autotune.TEMPLATES

    def hashes(edit=None):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(templates, root, ignore=shutil.ignore_patterns("tuned"))
        if edit:
            path = root / edit[0]
            text = path.read_text()
            assert edit[1] in text
            path.write_text(text.replace(edit[1], edit[2] + edit[1], 1))
        monkeypatch.setattr(autotune, "TEMPLATES", root)
        autotune._template.cache_clear()
        autotune.source_hash.cache_clear()
        try:
            return {kind: autotune.source_hash(kind) for kind in autotune.KERNELS}
        finally:
            autotune._template.cache_clear()
            autotune.source_hash.cache_clear()

    base = hashes()
    kernel = hashes(("nsa_bwd.py", "def nsa_slc_bwd_dkdv_kernel(", "# edited\n"))
    helper = hashes(("nsa_bwd.py", "def _row_stats(", "# edited\n"))
    unused = hashes(("nsa_bwd.py", "@triton.jit\ndef _probs_and_dscores(",
                     "@triton.jit\ndef _unused(x):\n    return x\n\n\n"))
    common = hashes(("nsa_common.py", "def online_softmax_step(", "# edited\n"))
    # a pruning rule that only the selected dK/dV's candidates feel (none at 8 warps)
    fits = nsa_configs._fits
    monkeypatch.setattr(nsa_configs, "_fits", lambda kind, cfg, *shape: fits(
        kind, cfg, *shape) and not (kind == "slc_dkdv" and cfg.num_warps == 8))
    rule = hashes()
    # slc_dq may fuse dQ into the dK/dV kernel, so it follows that kernel too
    assert {k for k in base if kernel[k] != base[k]} == {"slc_dkdv", "slc_dq"}
    assert {k for k in base if helper[k] != base[k]} == {k for k in base if "_d" in k}
    assert unused == base
    # the forward's online softmax: the kinds whose kernels call it, not the backward's
    assert {k for k in base if common[k] != base[k]} == {"cmp", "slc", "win"}
    assert {k for k in base if rule[k] != base[k]} == {"slc_dkdv"}


def test_no_tuning_while_compiling_or_disabled(cache_dir, monkeypatch):
    monkeypatch.setenv("NSA_COMPILE_AUTOTUNE", "0")
    bench = lambda cfg: pytest.fail("must not tune")
    key = autotune.shape_key("cmp", torch.float16, 64, 64, 4, NSA, 4096)
    assert autotune.pick(DEVICE, "cmp", key, lambda: [], bench) == DEFAULTS["cmp"]
    monkeypatch.setenv("NSA_COMPILE_AUTOTUNE", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autotune.pick(DEVICE, "cmp", key, lambda: [], bench) == DEFAULTS["cmp"]


def test_nearest_bucket_and_shipped_defaults(cache_dir, monkeypatch):
    monkeypatch.setenv("NSA_COMPILE_AUTOTUNE", "0")
    shipped = autotune.shipped_cache(DEVICE)
    tuned = KernelConfig(128, 32, 8, 3)
    shipped.put(autotune.shape_key("win", torch.float16, 64, 64, 4, NSA, 16384), tuned)
    near = autotune.shape_key("win", torch.float16, 64, 64, 4, NSA, 30000)
    assert autotune.pick(DEVICE, "win", near, lambda: [], None) == tuned


def test_untuned_gpu_borrows_the_shipped_entries_of_its_compute_capability(cache_dir,
                                                                           monkeypatch):
    """An H200 with no shipped file of its own runs the H100's picks (same capability) when it
    may not tune, not DEFAULTS; a GPU of another capability, or a sibling file of another
    torch, lends nothing, and the GPU's own entries (any length) come first."""
    monkeypatch.setenv("NSA_COMPILE_AUTOTUNE", "0")
    sibling, other = "NVIDIA Sibling GPU", "NVIDIA Older GPU"
    caps = {DEVICE: (9, 0), sibling: (9, 0), other: (8, 0)}
    monkeypatch.setattr(autotune, "capability_of", lambda name: caps.get(name))
    key = autotune.shape_key("win", torch.bfloat16, 128, 128, 4, NSA, 65536)
    near = autotune.shape_key("win", torch.bfloat16, 128, 128, 4, NSA, 8192)
    lent, own = KernelConfig(128, 128, 8, 3), KernelConfig(128, 32, 8, 1)
    autotune.SHIPPED.mkdir()

    def ship(name, **head):
        (autotune.SHIPPED / f"{autotune.device_slug(name)}.json").write_text(json.dumps({
            "header": {**autotune.header(name), **head},
            "entries": {near: lent.to_dict()}}))

    ship(sibling)
    pick = lambda device: autotune.pick(device, "win", key, lambda: [], None)
    assert pick(DEVICE) == lent  # the sibling's nearest bucket
    assert pick(other) == DEFAULTS["win"]
    autotune.shipped_cache(DEVICE).put(near, own)
    assert pick(DEVICE) == own
    monkeypatch.setattr(autotune, "_shipped", {})
    monkeypatch.setattr(autotune, "_siblings", {})
    ship(sibling, torch="0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stale sibling is passed over, not warned about
        assert pick(DEVICE) == DEFAULTS["win"]
    assert autotune.header(DEVICE)["capability"] == [9, 0]


def test_cache_hit_launches_no_kernel(cache_dir, monkeypatch):
    """Regression: the tuner's scratch runs (lse, block indices) must happen only on a miss."""
    triton_fwd = pytest.importorskip("nsa_compile.kernels.nsa.triton_fwd")
    q = torch.randn(1, 4, 256, 16)
    k = torch.randn(1, 2, 256, 16)
    p = NSAParams.from_config(NSAConfig(), 0.25)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: DEVICE)
    cache = autotune.user_cache(DEVICE)
    for kind in ("cmp", "sel", "slc", "win"):
        cache.put(autotune.shape_key(kind, q.dtype, 16, 16, 2, NSA, 256), DEFAULTS[kind])
    for name in ("run_cmp", "run_sel", "run_slc", "run_win"):
        monkeypatch.setattr(triton_fwd, name, lambda *a, **kw: pytest.fail("launched a kernel"))
    got = triton_fwd.tuned_configs(q, k, k, None, k[:, :, :15], k[:, :, :15], p)
    assert got == {kind: DEFAULTS[kind] for kind in ("cmp", "sel", "slc", "win")}


def test_shipped_caches_are_current_format_and_in_their_spaces():
    """Every shipped file loads in this format and its entries are configs of their kind's
    space, keyed like `shape_key` makes them (a shrunk space or a renamed kind shows here)."""
    files = sorted(autotune.SHIPPED.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        head = data["header"]
        assert head["format"] == autotune.FORMAT_VERSION
        cap = head["capability"]  # a GPU of this capability with no file borrows this one
        assert len(cap) == 2 and all(isinstance(x, int) for x in cap)
        assert set(head["source_hash"]) == set(autotune.KERNELS)
        stale = {k for k, h in autotune.source_hashes().items() if head["source_hash"][k] != h}
        assert not stale, (f"{path.name}: the entries of {sorted(stale)} are stale (their "
                           "kernels or rules changed): re-tune them on that GPU and merge "
                           "(`autotune.merge_into_shipped`)")
        assert path.name == autotune.device_slug(head["device"]) + ".json"
        for key, cfg in data["entries"].items():
            kind, dtype, dk, dv, g, _, _ = key.split("|")
            dk, dv, g = int(dk[2:]), int(dv[2:]), int(g[1:])
            elem = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            g_pad = 1 << (g - 1).bit_length()  # the tuner's padded group
            assert KernelConfig.from_dict(cfg) in candidates(kind, g_pad, dk, dv, elem), key


def test_merge_into_shipped_adds_current_entries_and_refuses_other_sources(cache_dir):
    """Entries tuned on a GPU box (whose torch may differ from this machine's) join the shipped
    file; shipped entries of other versions and a run's entries of changed kernels are
    dropped, a run with nothing current refused."""
    tuned, kept = KernelConfig(128, 64, 8, 2), KernelConfig(64, 64, 4, 1)
    gpu_head = {**autotune.header(DEVICE), "torch": "2.11.0+cu130"}
    new_key = autotune.shape_key("win", torch.bfloat16, 128, 128, 4, NSA, 65536)
    old_key = autotune.shape_key("cmp", torch.bfloat16, 128, 128, 4, NSA, 65536)
    stale_key = autotune.shape_key("sel", torch.bfloat16, 128, 128, 4, NSA, 65536)
    shipped_head = {**gpu_head, "source_hash": {**gpu_head["source_hash"], "sel": "0" * 16}}
    autotune.SHIPPED.mkdir()
    (autotune.SHIPPED / "nvidia_test_gpu_80gb.json").write_text(json.dumps({
        "header": shipped_head,
        "entries": {old_key: kept.to_dict(), stale_key: kept.to_dict()}}))
    run = cache_dir / "run.json"
    run.write_text(json.dumps({"header": gpu_head, "entries": {new_key: tuned.to_dict()}}))
    path = autotune.merge_into_shipped([run])
    data = json.loads(path.read_text())
    assert data["header"] == gpu_head
    assert data["entries"] == {new_key: tuned.to_dict(), old_key: kept.to_dict()}
    # a run whose win kernel changed since: its cmp entry joins, its win entry does not
    other = {**gpu_head, "source_hash": {**gpu_head["source_hash"], "win": "0" * 16}}
    retuned = KernelConfig(128, 128, 8, 3)
    run.write_text(json.dumps({"header": other, "entries": {new_key: kept.to_dict(),
                                                            old_key: retuned.to_dict()}}))
    data = json.loads(autotune.merge_into_shipped([run]).read_text())
    assert data["header"] == gpu_head
    assert data["entries"] == {new_key: tuned.to_dict(), old_key: retuned.to_dict()}
    run.write_text(json.dumps({"header": other, "entries": {new_key: tuned.to_dict()}}))
    with pytest.raises(ValueError, match="other kernel sources"):
        autotune.merge_into_shipped([run])
