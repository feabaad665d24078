"""The one way tests wait for something to happen: poll the condition, never sleep a guess.

A sleep that is the point of a test stays a sleep, with a comment saying why it is not a
wait: time passing to show that something does *not* happen, a fake upstream's scripted
delay, a slow client's pace."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_until(predicate: Predicate, timeout: float = 10.0, interval: float = 0.02,
                     what: str | Callable[[], str] = "") -> float:
    """Return as soon as ``predicate()`` holds, with the seconds it took; ``predicate`` may
    be a plain or a coroutine function. ``timeout`` only bounds a failure (a slow, shared
    machine still passes): a test that claims a speed asserts the returned time, or its own
    clock, after the wait. Past ``timeout`` an AssertionError names ``what`` (a callable is
    asked then, so it can say what the state was instead)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return loop.time() - start
        if loop.time() >= deadline:
            raise AssertionError(f"waited {timeout:g} s in vain for {_describe(predicate, what)}")
        await asyncio.sleep(interval)


def _describe(predicate: Predicate, what: str | Callable[[], str]) -> str:
    if callable(what):
        return what()
    if what:
        return what
    try:  # a lambda: its line of source says what it waited for
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)
