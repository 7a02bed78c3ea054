"""What the pass found: one `Site` per attention call or embedding lookup, gathered in a `Report`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

KINDS = ("sdpa", "manual", "embedding")
STATUSES = ("rewrite", "skip")


@dataclass(frozen=True)
class Site:
    """path: the owning module's qualified name (e.g. "model.layers.0.self_attn"); kind: one of
    "sdpa", "manual", "embedding"; status: "rewrite" or "skip"; reason: why, in a user's words."""

    path: str
    kind: str
    status: str
    reason: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Site.kind={self.kind!r} must be one of {KINDS}")
        if self.status not in STATUSES:
            raise ValueError(f"Site.status={self.status!r} must be one of {STATUSES}")


@dataclass
class Report:
    """The sites of one model; `print(report)` shows them as a table."""

    sites: List[Site] = field(default_factory=list)

    def rewritten(self) -> List[Site]:
        return [s for s in self.sites if s.status == "rewrite"]

    def skipped(self) -> List[Site]:
        return [s for s in self.sites if s.status == "skip"]

    def __str__(self) -> str:
        header = ("path", "kind", "status", "reason")
        rows = [header] + [(s.path or "<root>", s.kind, s.status, s.reason) for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for n, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[3]))
        lines.append(f"{len(self.rewritten())} to rewrite, {len(self.skipped())} skipped")
        return "\n".join(lines)
