"""Latches and manual overrides on disk (SPEC ``state.file``), so they survive restarts.

Writes are atomic (temp file, fsync, rename) and run in a thread: a flip never waits on
the disk. Several changes in a burst are coalesced into one write of the latest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import orjson

from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)


def load_state(path: str | None) -> dict[str, Any]:
    """The saved state, or {} when there is none (or it is unreadable: logged, not fatal)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError) as exc:
        logger.error("state file %s unreadable, starting fresh: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_percent(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 100


def _is_latch(value: Any) -> bool:
    return (isinstance(value, dict)
            and all(isinstance(value.get(key), str) for key in ("reason", "detail", "actor"))
            and _is_number(value.get("time"))
            and isinstance(value.get("verify", ""), str))


# What ``rollout.carry.persisted`` writes for a route; any field may also be null.
_FIELDS: dict[str, Callable[[Any], bool]] = {
    "fingerprint": lambda v: isinstance(v, str),
    "latch": _is_latch,
    "manual_weight": _is_percent,
    "configured_weight": _is_percent,
    "kill_override": lambda v: isinstance(v, bool),
    "kill_configured": lambda v: isinstance(v, bool),
    "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "steps": lambda v: isinstance(v, list) and bool(v) and all(_is_percent(s) for s in v),
}


def route_state(route: str, saved: dict[str, Any]) -> dict[str, Any]:
    """The fields of one route's saved state that have the shape flipback writes. Any
    other is dropped with a warning, so a hand-edited or damaged file can neither stop
    start-up nor restore nonsense (``"kill_override": "no"`` is truthy)."""
    out: dict[str, Any] = {}
    for key, check in _FIELDS.items():
        value = saved.get(key)
        if value is None or check(value):
            out[key] = value
        else:
            logger.warning("state file: route %s: ignoring %s, not a valid value: %.80r",
                           route, key, value)
    return out


def write_state(path: str, data: dict[str, Any]) -> None:
    """Atomic replace: readers see the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StateWriter:
    """Coalescing background writer: ``schedule()`` is cheap and safe on the request path."""

    def __init__(self, path: str | None, collect: Callable[[], dict[str, Any]]) -> None:
        self._path = path
        self._collect = collect
        self._dirty = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = TaskSet("state-writer", limit=1)
        self._started = False

    def start(self) -> None:
        if self._path and not self._started:
            self._started = self._tasks.spawn(self._run(), name="state-writer")

    def schedule(self) -> None:
        if self._path:
            self._idle.clear()
            self._dirty.set()

    async def _run(self) -> None:
        assert self._path is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                data = self._collect()
                await asyncio.to_thread(write_state, self._path, data)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any bad write
                logger.error("cannot write state file %s: %s", self._path, exc)
            if not self._dirty.is_set():
                self._idle.set()

    async def flush(self) -> None:
        """Wait until everything scheduled so far is on disk."""
        if self._started:
            await self._idle.wait()

    async def aclose(self) -> None:
        if self._started:
            await asyncio.wait_for(self.flush(), timeout=5.0)
            await self._tasks.cancel()
