"""The parent's hub (``run --workers`` without ``state.redis``): the single writer of the
route state and the sticky pins, kept as Redis keeps them for the fleet link (one hash of
``proxy.fleet.state`` fields per route, pins with expiry and first-writer-wins), so the
workers' links run the fleet link's own logic with the parent in Redis's place.

Each action a worker announces is applied to its route's hash and relayed to every
worker, the announcer too, in the one order the hub saw them: that order is the truth,
as Redis's is between replicas. Frames of one worker are handled in the order sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.workers.channel import ChannelError, Frame, read_frame, write_frame

logger = logging.getLogger(__name__)

MAX_PINS = 4_000_000  # pins kept for all routes; past this the least recently used go
SWEEP = 64  # expired pins dropped per pin call, from the least recently used end

Clock = Callable[[], float]


class PinStore:
    """Pins by key (``proxy.fleet.state.pin_prefix`` + hash) with a per-key expiry.
    A dict kept in order of last use: reading or writing a pin moves it to the end, so
    the front is the least recently used, where expired pins are swept a few at a time."""

    def __init__(self, clock: Clock = time.monotonic, limit: int = MAX_PINS) -> None:
        self._pins: dict[str, tuple[str, float]] = {}
        self._clock = clock
        self._limit = limit

    def __len__(self) -> int:
        return len(self._pins)

    def _live(self, key: str, now: float) -> str | None:
        entry = self._pins.pop(key, None)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def getex(self, key: str, px: int) -> str | None:
        """GETEX key PX px: the pin, its expiry renewed; None when absent or expired."""
        now = self._clock()
        self._sweep(now)
        value = self._live(key, now)
        if value is not None:
            self._pins[key] = (value, now + px / 1000)
        return value

    def set_pin(self, key: str, value: str, rival: str, px: int) -> str | None:
        """``proxy.fleet.writer.SET_PIN``: a pin of these epochs (``value`` or ``rival``)
        stays, renewed, and is returned; otherwise ``value`` is stored and None returned."""
        now = self._clock()
        current = self._live(key, now)
        keep = current if current in (value, rival) else None
        if keep is None and len(self._pins) >= self._limit:
            self._pins.pop(next(iter(self._pins)))
        self._pins[key] = (keep or value, now + px / 1000)
        return keep

    def _sweep(self, now: float) -> None:
        pins = self._pins
        for _ in range(SWEEP):
            key = next(iter(pins), None)
            if key is None or pins[key][1] > now:
                return
            del pins[key]


class HubState:
    """Route hashes and pins: the calls of the Redis client the fleet link makes, on
    plain dicts. Values are ``str`` (the channel is JSON; fleet values are UTF-8)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.pins = PinStore(clock)

    def action(self, key: str, sets: dict[str, str], dels: list[str]) -> None:
        """An announced action's HSET and HDEL on its route's hash."""
        fields = self.hashes.setdefault(key, {})
        fields.update(sets)
        for name in dels:
            fields.pop(name, None)

    def seed(self, key: str, args: list[str]) -> int:
        """``proxy.fleet.link._SEED``: seed a rollout the hub does not know (its marker
        ``args[0]`` absent) from a worker's state; the kill field only where none is."""
        fields = self.hashes.setdefault(key, {})
        if args[0] in fields:
            return 0
        if args[1]:
            fields.setdefault("kill", args[1])
        for i in range(2, len(args) - 1, 2):
            fields[args[i]] = args[i + 1]
        return 1

    def hgetall(self, key: str) -> dict[str, str]:
        return dict(self.hashes.get(key, {}))

    def call(self, op: str, args: list[Any]) -> Any:
        if op == "hgetall":
            return self.hgetall(args[0])
        if op == "seed":
            return self.seed(args[0], args[1])
        if op == "getex":
            return self.pins.getex(args[0], int(args[1]))
        if op == "setpins":
            return [self.pins.set_pin(k, v, r, int(px)) for k, v, r, px in args[0]]
        raise ChannelError(f"unknown call {op!r}")


Welcome = Callable[[int], Frame]
OnFrame = Callable[[int, Frame], None]


class Hub:
    """The unix socket the workers connect to. ``welcome(worker)`` answers a worker's
    hello (its config); frames the hub does not handle itself (``ready``) go to
    ``on_frame``; ``on_gone(worker)`` hears a worker's channel close."""

    def __init__(self, welcome: Welcome, on_frame: OnFrame,
                 on_gone: Callable[[int], None]) -> None:
        self.state = HubState()
        self._welcome = welcome
        self._on_frame = on_frame
        self._on_gone = on_gone
        self._workers: dict[int, asyncio.StreamWriter] = {}
        self._server: asyncio.AbstractServer | None = None
        self.relayed = 0

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._workers.values()):
            writer.close()

    def connected(self, worker: int) -> bool:
        return worker in self._workers

    def send(self, worker: int, frame: Frame) -> bool:
        writer = self._workers.get(worker)
        if writer is None or writer.is_closing():
            return False
        write_frame(writer, frame)
        return True

    def broadcast(self, frame: Frame) -> None:
        for writer in list(self._workers.values()):
            if not writer.is_closing():
                write_frame(writer, frame)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = -1
        try:
            hello = await read_frame(reader)
            if hello is None or hello.get("t") != "hello":
                return
            worker = int(hello["worker"])
            old = self._workers.get(worker)
            if old is not None:
                old.close()
            self._workers[worker] = writer
            write_frame(writer, self._welcome(worker))
            while (frame := await read_frame(reader)) is not None:
                self._handle(worker, writer, frame)
        except (ChannelError, KeyError, TypeError, ValueError) as exc:
            logger.error("worker %d: bad frame on the channel, closing it: %s", worker, exc)
        finally:
            if self._workers.get(worker) is writer:
                del self._workers[worker]
                self._on_gone(worker)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _handle(self, worker: int, writer: asyncio.StreamWriter, frame: Frame) -> None:
        kind = frame.get("t")
        if kind == "act":
            self.state.action(frame["key"], frame["sets"], frame["dels"])
            self.relayed += 1
            self.broadcast({"t": "msg", "m": frame["msg"]})
        elif kind == "call":
            try:
                value = self.state.call(frame["op"], frame["a"])
            except (ChannelError, IndexError, KeyError, TypeError, ValueError) as exc:
                write_frame(writer, {"t": "ret", "id": frame["id"], "err": str(exc)})
                return
            write_frame(writer, {"t": "ret", "id": frame["id"], "v": value})
        else:
            self._on_frame(worker, frame)
