"""TaskSet: the one place background tasks are created."""

from __future__ import annotations

import asyncio

from proxy.tasks import TaskSet


async def test_taskset_cancel_stops_a_loop_and_waits_for_its_cleanup():
    cleaned = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.Event().wait()  # a loop that never ends by itself
        finally:
            await asyncio.sleep(0)  # not a wait: cleanup that itself awaits
            cleaned.set()

    tasks = TaskSet("loop", limit=1)
    assert tasks.spawn(loop())
    assert not tasks.spawn(loop())  # full: refused, and the coroutine is closed
    await asyncio.sleep(0)  # not a wait: one loop step, so the task is inside its loop
    await tasks.cancel()
    assert cleaned.is_set() and len(tasks) == 0
    await tasks.cancel()  # nothing left: a no-op
