"""Comparing a shadow response with the primary one (SPEC §6): pure functions, no I/O.

Both bodies are read by ``proxy.answer`` (JSON, or an SSE stream folded into one
document; see there), the reader the quality guards share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.answer import MISSING, decoded, document, lookup, same, split_path
from proxy.config.model import CompareConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class PathDiff:
    """One JSON path whose values differ."""

    path: str
    primary: Any  # MISSING when absent
    shadow: Any

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        missing = []
        for side, value in (("primary", self.primary), ("shadow", self.shadow)):
            if value is MISSING:
                missing.append(side)
                value = None
            out[side] = value
        if missing:
            out["missing"] = missing
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What a comparison found; ``paths_compared`` is False when a body was not complete
    within ``inspect_body`` (then only status and latency are judged)."""

    status_differs: bool
    paths: tuple[PathDiff, ...]
    paths_compared: bool

    @property
    def kinds(self) -> list[str]:
        """Mismatch kinds, as the ``flipback_shadow_mismatch_total`` labels."""
        return (["status"] if self.status_differs else []) + (["body"] if self.paths else [])


def compare(
    cfg: CompareConfig,
    *,
    primary_status: int,
    shadow_status: int,
    primary_body: bytes | None,
    shadow_body: bytes | None,
) -> Verdict:
    """Judge one exchange. A body is None when it was not kept whole (over the cap)."""
    differs = cfg.status and primary_status != shadow_status
    if not cfg.json_paths or primary_body is None or shadow_body is None:
        return _NOT_COMPARED[differs]
    primary_body, shadow_body = decoded(primary_body), decoded(shadow_body)
    if primary_body is None or shadow_body is None:  # compressed past reading: no verdict
        return _NOT_COMPARED[differs]
    p_doc, s_doc = document(primary_body), document(shadow_body)
    diffs = []
    for path in cfg.json_paths:
        parts = split_path(path)
        p, s = lookup(p_doc, parts), lookup(s_doc, parts)
        try:
            agree = same(p, s)
        except RecursionError:
            agree = False
        if not agree:
            diffs.append(PathDiff(path=path, primary=p, shadow=s))
    if not diffs:
        return _PATHS_AGREE[differs]
    return Verdict(status_differs=differs, paths=tuple(diffs), paths_compared=True)


# The common verdicts, built once (a frozen dataclass costs a microsecond to build).
_NOT_COMPARED = {d: Verdict(status_differs=d, paths=(), paths_compared=False)
                 for d in (False, True)}
_PATHS_AGREE = {d: Verdict(status_differs=d, paths=(), paths_compared=True)
                for d in (False, True)}
