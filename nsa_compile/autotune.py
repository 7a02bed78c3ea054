"""The per-GPU autotune cache of kernel block sizes (SPEC §5).

One JSON file per GPU model, keyed by the device *name* (an H100 and an H200 share a compute
capability but not their best tiles). Entries are keyed by kernel, dtype, head dims, GQA group,
NSA block parameters and a power-of-two length bucket. The header records the torch and Triton
versions (a file from other versions is stale and ignored with a warning, as is a corrupt one)
and the kernel source hash of each kind (`source_hash(kind)`): editing one kernel drops only the
entries that tuned it.
Writes are atomic (temp file + rename). Lookup order: the user's cache, then the defaults shipped
in `templates/tuned/`; on a miss, live tuning where allowed, else the nearest tuned length bucket,
then the shipped defaults of another GPU of the same compute capability (`capability` in the
header: an H200 untuned runs the H100's picks, not `DEFAULTS`), then `DEFAULTS`. Live tuning
happens only in eager code, never while torch.compile traces or a CUDA graph is being captured.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Tuple

import torch

from .templates import nsa_configs
from .templates.nsa_configs import DEFAULTS, KERNELS, KernelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
TEMPLATES = Path(__file__).parent / "templates"
SHIPPED = TEMPLATES / "tuned"
MIN_BUCKET, MAX_BUCKET = 1024, 1 << 17


class _Template(NamedTuple):
    """What a kind's hash reads of one template module: its top-level functions (source with
    decorators, names they use), the template modules it imports names from, and the source
    of its other top-level statements (constants such as LOG2E; not the docstring)."""

    functions: Dict[str, Tuple[str, FrozenSet[str]]]
    imports: Dict[str, str]
    rest: str


@functools.lru_cache(maxsize=None)
def _template(module: str) -> _Template:
    text = (TEMPLATES / f"{module}.py").read_text()
    lines = text.splitlines()
    functions, imports, rest = {}, {}, []
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            names = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
            functions[node.name] = ("\n".join(lines[first - 1:node.end_lineno]), names)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            imports.update((alias.asname or alias.name, node.module) for alias in node.names)
        elif not isinstance(node, (ast.Import, ast.ImportFrom)) and not _is_docstring(node):
            rest.append("\n".join(lines[node.lineno - 1:node.end_lineno]))
    return _Template(functions, imports, "\n".join(rest))


def _is_docstring(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


# The shapes whose pruned candidate lists stand for a kind's pruning rules in its hash.
RULE_GROUPS, RULE_DIMS, RULE_ELEMS = (1, 2, 4, 8, 16), (16, 48, 64, 96, 128, 192, 256), (2, 4)


def _rules(kind: str) -> str:
    """What the pruning rules decide for a kind: its candidate lists over a grid of GQA
    groups, head dims (powers of two and not) and input sizes. A rule edit that leaves the
    kind's candidates alone keeps its entries; one that changes only shapes off the grid
    goes unseen."""
    return repr([nsa_configs.candidates(kind, g, dk, dv, elem) for g in RULE_GROUPS
                 for dk in RULE_DIMS for dv in RULE_DIMS for elem in RULE_ELEMS])


@functools.lru_cache(maxsize=None)
def source_hash(kind: str) -> str:
    """Hash of what a kind's tuned block sizes depend on: its kernels (`KERNELS`), the template
    functions they call (directly or through each other, across the template modules they
    import from, nsa_common's included), those modules' other top-level statements, the
    kind's config space and its pruned candidates (`_rules`). A change makes that kind's
    entries stale, and only those."""
    module, kernels = KERNELS[kind]
    used, todo = {(module, k) for k in kernels}, [(module, k) for k in kernels]
    while todo:
        mod, name = todo.pop()
        template = _template(mod)
        for ref in template.functions[name][1]:
            where = mod if ref in template.functions else template.imports.get(ref)
            if where and ref in _template(where).functions and (where, ref) not in used:
                used.add((where, ref))
                todo.append((where, ref))
    h = hashlib.sha256()
    for mod in sorted({mod for mod, _ in used}):
        h.update(_template(mod).rest.encode())
    for mod, name in sorted(used):
        h.update(_template(mod).functions[name][0].encode())
    h.update(repr(sorted(nsa_configs.SPACES[kind].items())).encode())
    h.update(_rules(kind).encode())
    return h.hexdigest()[:16]


def kind_of(key: str) -> str:
    return key.split("|", 1)[0]


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def cache_dir() -> Path:
    return Path(os.environ.get("NSA_COMPILE_CACHE_DIR",
                               Path.home() / ".cache" / "nsa_compile"))


def length_bucket(T: int) -> int:
    return min(MAX_BUCKET, max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(T, 1))))))


def shape_key(kernel: str, dtype: torch.dtype, dk: int, dv: int, group: int, nsa: Iterable[int],
              T: int) -> str:
    """e.g. "cmp|bfloat16|dk128|dv128|g16|nsa32-16-64-16-1-2-512|T65536"."""
    return (f"{kernel}|{str(dtype).replace('torch.', '')}|dk{dk}|dv{dv}|g{group}|"
            f"nsa{'-'.join(str(int(x)) for x in nsa)}|T{length_bucket(T)}")


# Header fields a cache file must share with its reader (the source hashes are per kind).
VERSIONS = ("format", "device", "torch", "triton")


def source_hashes() -> Dict[str, str]:
    return {kind: source_hash(kind) for kind in sorted(KERNELS)}


@functools.lru_cache(maxsize=None)
def capability_of(device_name: str) -> Optional[Tuple[int, int]]:
    """Compute capability of the visible CUDA device called `device_name`; None if there is
    none."""
    if not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        if torch.cuda.get_device_name(index) == device_name:
            return tuple(torch.cuda.get_device_capability(index))
    return None


def header(device_name: str) -> Dict[str, str]:
    """`capability` (not in VERSIONS: files without it still load) lets a GPU with no shipped
    file of its own borrow this one's entries."""
    import triton
    capability = capability_of(device_name)
    return {"format": FORMAT_VERSION, "device": device_name,
            "capability": None if capability is None else list(capability),
            "torch": torch.__version__, "triton": triton.__version__,
            "source_hash": source_hashes()}


def current_entries(head: Dict, entries: Dict[str, Dict]) -> Dict[str, Dict]:
    """The entries whose kind's source hash in `head` matches this checkout's kernels."""
    sources = head.get("source_hash")
    sources = sources if isinstance(sources, dict) else {}
    current = {kind for kind, h in source_hashes().items() if sources.get(kind) == h}
    return {k: e for k, e in entries.items() if kind_of(k) in current}


def _shipped_path(device_name: str) -> Path:
    return SHIPPED / f"{device_slug(device_name)}.json"


class TuneCache:
    """Entries of one GPU model, loaded from `path`; `save()` writes atomically."""

    def __init__(self, device_name: str, path: Path):
        self.device_name, self.path = device_name, path
        self.entries: Dict[str, Dict[str, int]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            head, entries = data["header"], data["entries"]
            for cfg in entries.values():
                KernelConfig.from_dict(cfg)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"nsa_compile: ignoring corrupt autotune cache {self.path} ({exc}); "
                          "it will be rewritten", RuntimeWarning, stacklevel=3)
            return
        expected = header(self.device_name)
        stale = [k for k in VERSIONS if head.get(k) != expected[k]]
        if stale:
            warnings.warn(f"nsa_compile: ignoring stale autotune cache {self.path} "
                          f"({', '.join(stale)} changed); it will be rewritten",
                          RuntimeWarning, stacklevel=3)
            return
        self.entries = current_entries(head, entries)
        if len(self.entries) < len(entries):
            log.info("%s: %d of %d entries tuned older kernel sources; they will be re-tuned",
                     self.path, len(entries) - len(self.entries), len(entries))

    def get(self, key: str) -> Optional[KernelConfig]:
        cfg = self.entries.get(key)
        return None if cfg is None else KernelConfig.from_dict(cfg)

    def nearest(self, key: str) -> Optional[KernelConfig]:
        """The entry with the same key but the closest length bucket."""
        stem, t = key.rsplit("|T", 1)
        best = None
        for other, cfg in self.entries.items():
            o_stem, o_t = other.rsplit("|T", 1)
            if o_stem == stem:
                dist = abs(math.log2(int(o_t)) - math.log2(int(t)))
                if best is None or dist < best[0]:
                    best = (dist, cfg)
        return None if best is None else KernelConfig.from_dict(best[1])

    def put(self, key: str, cfg: KernelConfig) -> None:
        self.entries[key] = cfg.to_dict()

    def save(self) -> None:
        _write_json(self.path, {"header": header(self.device_name),
                                "entries": dict(sorted(self.entries.items()))})


def _write_json(path: Path, data: Dict) -> None:
    """Atomic: a temp file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_caches: Dict[str, TuneCache] = {}
_shipped: Dict[str, TuneCache] = {}
_siblings: Dict[str, List[TuneCache]] = {}


def user_cache(device_name: str) -> TuneCache:
    if device_name not in _caches:
        _caches[device_name] = TuneCache(device_name,
                                         cache_dir() / f"{device_slug(device_name)}.json")
    return _caches[device_name]


def shipped_cache(device_name: str) -> TuneCache:
    if device_name not in _shipped:
        _shipped[device_name] = TuneCache(device_name, _shipped_path(device_name))
    return _shipped[device_name]


def sibling_caches(device_name: str) -> List[TuneCache]:
    """The shipped caches of other GPU models of `device_name`'s compute capability, in file
    name order: the fallback for a GPU that has no tuned entry of its own."""
    capability = capability_of(device_name)
    if capability is None:
        return []
    if device_name in _siblings:
        return _siblings[device_name]
    out = _siblings[device_name] = []
    own = header(device_name)
    for path in sorted(SHIPPED.glob("*.json")):
        if path == _shipped_path(device_name):
            continue
        try:
            head = json.loads(path.read_text())["header"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a borrowed fallback is skipped silently, not warned about
        if head.get("capability") == list(capability) and all(
                head.get(k) == own[k] for k in VERSIONS if k != "device"):
            out.append(shipped_cache(str(head["device"])))
    return out


def _borrowed(device_name: str, key: str) -> Optional[KernelConfig]:
    """A sibling GPU's shipped entry for `key` (its nearest length bucket if need be)."""
    for sibling in sibling_caches(device_name):
        cfg = sibling.get(key) or sibling.nearest(key)
        if cfg is not None:
            _note_borrowed(device_name, sibling.device_name)
            return cfg
    return None


@functools.lru_cache(maxsize=None)
def _note_borrowed(device_name: str, sibling: str) -> None:
    log.info("no tuned block sizes for %s: using those shipped for %s (same compute "
             "capability) until this GPU is tuned", device_name, sibling)


def merge_into_shipped(paths: Iterable[Path]) -> Path:
    """Adds the entries of tuned cache files (fetched from a GPU run with NSA_COMPILE_CACHE_DIR
    set) to their GPU's shipped file in `templates/tuned/` — the developer's step after
    re-tuning a changed kernel. The files must agree on device, torch and Triton; their entries
    of kinds whose kernel sources have changed since (a later commit re-tuned those) are
    dropped with a warning, and a file left with none is refused. Shipped entries from other
    versions, or of kinds whose sources changed, are dropped. Returns the shipped file's path."""
    loaded = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    if not loaded:
        raise ValueError("merge_into_shipped: no cache files given")
    head = {**loaded[0][1]["header"], "source_hash": source_hashes()}
    new: Dict[str, Dict] = {}
    for path, data in loaded:  # the others' format is checked against the first's below
        current = current_entries(data["header"], data["entries"])
        if not current or head.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: tuned other kernel sources (or cache format) than this "
                             "checkout's; re-tune with this checkout")
        if any(data["header"].get(k) != head.get(k) for k in VERSIONS):
            raise ValueError(f"{path}: device/torch/Triton differ from {loaded[0][0]}")
        stale = sorted({kind_of(key) for key in data["entries"]}
                       - {kind_of(key) for key in current})
        if stale:
            log.warning("%s: dropping the entries of %s (tuned other kernel sources)", path,
                        ", ".join(stale))
        new.update(current)
    ship = _shipped_path(head["device"])
    entries = {}
    if ship.exists():
        old = json.loads(ship.read_text())
        if all(old["header"].get(k) == head[k] for k in VERSIONS):
            entries = current_entries(old["header"], old["entries"])
    entries.update(new)
    _write_json(ship, {"header": head,
                       "entries": dict(sorted(entries.items()))})
    _shipped.pop(head["device"], None)
    return ship


def tuning_allowed() -> bool:
    """Live tuning: not while tracing, not under CUDA graph capture, not if disabled by
    NSA_COMPILE_AUTOTUNE=0."""
    if os.environ.get("NSA_COMPILE_AUTOTUNE", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def pick(device_name: str, kernel: str, key: str, candidates: Callable[[], list],
         bench: Callable[[KernelConfig], float]) -> KernelConfig:
    """The block sizes for `key`: cached, shipped, tuned now (when allowed), or else the
    nearest length, a sibling GPU's shipped entry, the default."""
    cache, shipped = user_cache(device_name), shipped_cache(device_name)
    cfg = cache.get(key) or shipped.get(key)
    if cfg is not None:
        return cfg
    if tuning_allowed():
        cfg = tune(candidates(), bench)
        if cfg is not None:
            cache.put(key, cfg)
            try:
                cache.save()
            except OSError as exc:
                warnings.warn(f"nsa_compile: could not write the autotune cache {cache.path}: "
                              f"{exc}", RuntimeWarning, stacklevel=2)
            return cfg
    return (cache.nearest(key) or shipped.nearest(key) or _borrowed(device_name, key)
            or DEFAULTS[kernel])


def tune(candidates: list, bench: Callable[[KernelConfig], float]) -> Optional[KernelConfig]:
    """Times each candidate with `bench` (ms); configs that fail to compile or run are skipped."""
    best = None
    for cfg in candidates:
        try:
            ms = bench(cfg)
        except Exception as exc:  # out of resources, compile errors: skip the config
            log.debug("config %s failed: %s", cfg, exc)
            continue
        log.debug("config %s: %.3f ms", cfg, ms)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best is None:
        warnings.warn(f"nsa_compile: none of {len(candidates)} kernel configs ran; using the "
                      "default block sizes", RuntimeWarning, stacklevel=3)
        return None
    return best[1]
