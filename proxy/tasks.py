"""The one place background tasks are created: strong references, names, bounded, closable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class TaskSet:
    """Fire-and-forget done right: a task here cannot be garbage-collected mid-flight,
    an exception is logged instead of lost, and ``aclose`` waits for or cancels the rest."""

    def __init__(self, name: str, limit: int | None = None) -> None:
        self._name = name
        self._limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> bool:
        """Start ``coro``; returns False (and closes it) when the set is full."""
        if self._limit is not None and len(self._tasks) >= self._limit:
            coro.close()
            return False
        task = asyncio.get_running_loop().create_task(coro, name=name or self._name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("background task %s failed: %r", task.get_name(), exc, exc_info=exc)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for running tasks, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    async def cancel(self) -> None:
        """Cancel every running task now and wait until each has finished: how a component
        stops its own loop (a probe, a watcher, a worker) in its ``aclose``."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def __repr__(self) -> str:
        return f"<TaskSet {self._name}: {len(self._tasks)} running>"
