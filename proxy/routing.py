"""First-match route table (SPEC §3 ``routes``). Immutable: a reload builds a new one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from proxy.config.model import MatchConfig

T = TypeVar("T")


def matches(match: MatchConfig, method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Does a request fit this ``match`` block? Header names are case-insensitive."""
    if not path.startswith(match.path_prefix):
        return False
    if match.methods and method not in match.methods:
        return False
    return all(headers.get(name) == value for name, value in match.headers)


class RouteTable(Generic[T]):
    """Routes in config order; ``match`` returns the first whose ``match`` block fits."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[MatchConfig, T]]) -> None:
        self._entries = tuple(entries)

    def match(self, method: str, path: str, headers: Mapping[str, str]) -> T | None:
        for match, target in self._entries:
            if (
                path.startswith(match.path_prefix)
                and (not match.methods or method in match.methods)
                and (not match.headers or matches(match, method, path, headers))
            ):
                return target
        return None

    def __repr__(self) -> str:
        return f"<RouteTable {len(self._entries)} routes>"
