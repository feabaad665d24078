"""The shadow diff record (SPEC §6 ``compare.record``): JSON lines appended from a thread.

``append`` is cheap and never blocks the event loop: it queues the encoded line, and one
background task hands queued lines in batches to a thread that appends them. The file
never grows past ``record_max``: the first line that would pass it stops the recording
(``full``) until the record is reopened (a config reload or a restart). The queue is
bounded too; past it lines are dropped. Each line's fate is counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import orjson

from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)

# Lines waiting for the writer thread: enough for a burst, small enough not to matter.
MAX_PENDING_BYTES = 4 * 1024 * 1024

Count = Callable[[str, int], None]  # (result, n): written, full, dropped, error


def append_lines(path: str, lines: list[bytes], max_bytes: int) -> tuple[int, bool]:
    """Append whole lines while the file stays within ``max_bytes`` (runs in a thread).
    Returns how many were written and whether the file is now full."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "ab") as f:
        size = f.seek(0, os.SEEK_END)
        n = 0
        for line in lines:
            if size + len(line) > max_bytes:
                break
            size += len(line)
            n += 1
        if n:
            f.write(b"".join(lines[:n]))
    return n, n < len(lines)


class DiffRecord:
    """Appends mismatch entries to one file; created per shadowed route."""

    def __init__(self, path: str, max_bytes: int, count: Count) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.full = False
        self._count = count
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = False
        self._idle: asyncio.Event | None = None
        self._tasks = TaskSet("shadow-record")

    def append(self, entry: dict[str, Any]) -> None:
        """Queue one entry; called on the event loop, returns at once."""
        if self.full:
            self._count("full", 1)
            return
        line = orjson.dumps(entry, default=repr) + b"\n"
        if self._pending_bytes + len(line) > MAX_PENDING_BYTES:
            self._count("dropped", 1)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if not self._writing:
            self._writing = True
            if self._idle is None:
                self._idle = asyncio.Event()
            self._idle.clear()
            self._tasks.spawn(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending and not self.full:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
                try:
                    written, full = await asyncio.to_thread(
                        append_lines, self.path, batch, self.max_bytes
                    )
                except OSError as exc:
                    logger.error("cannot append to shadow record %s: %s", self.path, exc)
                    self._count("error", len(batch))
                    continue
                if written:
                    self._count("written", written)
                if full:
                    self.full = True
                    logger.warning("shadow record %s reached record_max (%d bytes): "
                                   "recording stops", self.path, self.max_bytes)
                    self._count("full", len(batch) - written)
            if self.full and self._pending:
                self._count("full", len(self._pending))
                self._pending, self._pending_bytes = [], 0
        finally:
            self._writing = False
            if self._idle is not None:
                self._idle.set()

    async def flush(self) -> None:
        """Wait until every entry queued so far is written (or counted as not)."""
        if self._writing and self._idle is not None:
            await self._idle.wait()

    async def aclose(self, timeout: float = 5.0) -> None:
        await self._tasks.aclose(timeout)

    def __repr__(self) -> str:
        state = "full" if self.full else f"{len(self._pending)} pending"
        return f"<DiffRecord {self.path} {state}>"
