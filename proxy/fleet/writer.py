"""Writes to Redis for the fleet link, all in the background: announced actions (in
order, each one hash update plus PUBLISH in a MULTI/EXEC) and sticky pins (coalesced by
key, pipelined in batches). Actions wait while Redis is away and go out on reconnect;
pin writes are dropped (a pin in use is written again on its next use).

A pin write never replaces a pin of the same epochs: the first replica to pin a session
wins, and a replica that assigned it otherwise (it could not look the pin up in time, or
had not yet seen a weight change) is told the winner and follows it. Plain SETs would let
the last writer win and leave each replica serving the conversation its own way."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from proxy.fleet import state as fs

WRITE_TIMEOUT = 1.0  # seconds for one action or one batch of pins
PIN_BATCH = 500
MAX_PENDING_PINS = 20_000  # pin writes waiting; beyond this they are dropped (and counted)
MAX_OUTBOX = 1_000  # actions waiting for Redis to come back (the oldest go first)

# KEYS[1]: the pin; ARGV: our value, the other side's value in the same epochs, expiry (ms).
# A pin of these epochs stays (its expiry renewed) and is returned; none, or an older
# epoch's, is replaced and nil returned. One round trip, atomic.
SET_PIN = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or cur == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false
"""


class PinOwner(Protocol):
    """Who queued a pin write (a route's ``SharedPins``)."""

    def adopt(self, hashed: int, raw: bytes) -> None:
        """Another replica pinned the session first: follow its pin ``raw``."""


class PinWrite(NamedTuple):
    value: bytes
    rival: bytes  # the other side's value in the same epochs: a pin this write must keep
    px: int
    owner: PinOwner
    hashed: int


@dataclass(frozen=True, slots=True)
class Action:
    """One announced action: the route hash's changes and the message to publish."""

    route: str
    fp: str
    sets: dict[str, bytes]
    dels: list[str]
    message: bytes


class FleetWriter:
    """Owns the outbox and the pending pins; ``run`` drains them while the link is up.
    ``failed(op, exc)`` is the link's: it counts, logs once and takes the link down."""

    def __init__(self, client: Any, *, is_up: Callable[[], bool],
                 failed: Callable[[str, BaseException], None]) -> None:
        self._client = client
        self._is_up = is_up
        self._failed = failed
        self.outbox: deque[Action] = deque(maxlen=MAX_OUTBOX)
        self.pins: dict[str, PinWrite] = {}
        self._set_pin = client.register_script(SET_PIN)
        self.dropped_pins = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()  # one sender of actions at a time (run or replay)

    def queue_pin(self, key: str, write: PinWrite) -> None:
        if len(self.pins) >= MAX_PENDING_PINS and key not in self.pins:
            self.dropped_pins += 1
            return
        self.pins[key] = write
        self._poke()

    def queue_action(self, action: Action) -> None:
        self.outbox.append(action)
        self._poke()

    def _poke(self) -> None:
        self._idle.clear()
        self._wake.set()

    def resume(self) -> None:
        """The link is up again: send what waited."""
        self._wake.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued reached Redis (True), or ``timeout`` passed or the
        link went down (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        return self._is_up() and not self.outbox and not self.pins

    async def replay(self, skip: set[tuple[str, str]]) -> None:
        """On reconnect: send the actions taken while away, except for rollouts Redis was
        just seeded with (their state already says it). Raises on failure."""
        async with self._lock:
            while self.outbox:
                action = self.outbox[0]
                if (action.route, action.fp) not in skip:
                    await self.send(action)
                self.outbox.popleft()

    async def send(self, action: Action) -> None:
        key = fs.route_key(action.route)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=action.sets)
            if action.dels:
                pipe.hdel(key, *action.dels)
            pipe.publish(fs.CHANNEL, action.message)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await pipe.execute()

    async def run(self) -> None:
        """Actions first (in order), then pin writes in pipelined batches."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._is_up() and (self.outbox or self.pins):
                if self.outbox:
                    if not await self._send_next():
                        break
                    continue
                n = min(PIN_BATCH, len(self.pins))
                try:
                    await self.write_pins([self.pins.popitem() for _ in range(n)])
                except Exception as exc:  # noqa: BLE001 - pins come back with their next use
                    self._failed("pin_write", exc)
            if not self._is_up():
                self.pins.clear()
            if not self.outbox and not self.pins or not self._is_up():
                self._idle.set()

    async def write_pins(self, batch: list[tuple[str, PinWrite]]) -> None:
        """One pipelined round trip of ``SET_PIN``s; where another replica's pin was
        there first, its owner follows it. Raises on failure."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key, w in batch:  # queued in the pipeline (no I/O)
                await self._set_pin(keys=[key], args=[w.value, w.rival, w.px], client=pipe)
            async with asyncio.timeout(WRITE_TIMEOUT):  # loads the script if need be
                found = await pipe.execute()
        for (_, w), raw in zip(batch, found, strict=True):
            if raw is not None and raw != w.value:
                w.owner.adopt(w.hashed, raw)

    async def _send_next(self) -> bool:
        async with self._lock:
            if self.outbox:
                try:
                    await self.send(self.outbox[0])
                except Exception as exc:  # noqa: BLE001 - kept for the reconnect
                    self._failed("publish", exc)
                    return False
                self.outbox.popleft()
        return True
