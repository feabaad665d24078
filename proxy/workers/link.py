"""A worker's end of the channel (``run --workers`` without ``state.redis``).

``WorkerChannel`` owns the connection to the parent: calls with replies, announced
actions, and what the parent pushes (relayed actions, a config to apply). ``WorkerLink``
is the fleet link (``proxy.fleet.link.FleetLink``) with the parent's hub in Redis's
place: the same attach, announce, receive and catch-up, the same ``SharedPins`` with
epochs and first-writer-wins pins, so a worker follows its siblings exactly as a
replica follows the fleet. Only the transport differs: ``HubClient`` answers the few
Redis calls the link makes, ``HubWriter`` sends what ``FleetWriter`` would write.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from proxy.fleet.link import _SEED, CONNECT_TIMEOUT, FleetLink
from proxy.fleet.writer import WRITE_TIMEOUT, Action, FleetWriter, PinWrite
from proxy.rollout.machine import Rollout
from proxy.tasks import TaskSet
from proxy.workers.channel import Frame, read_frame, write_frame

logger = logging.getLogger(__name__)


RETRY = 0.2  # seconds before catching up again after the hub failed to answer


class HubError(Exception):
    """The parent could not answer a call (or the channel is gone)."""


class WorkerChannel:
    """The connection to the parent. ``on_message`` takes each relayed action (the fleet
    message bytes), ``on_frame`` any other pushed frame (``reload``); ``closed`` is set
    when the parent is gone."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.on_message: Callable[[bytes], None] = lambda raw: None
        self.on_frame: Callable[[Frame], None] = lambda frame: None
        self.closed = asyncio.Event()
        self._tasks = TaskSet("worker-channel", limit=1)

    @classmethod
    async def connect(cls, path: str, worker: int, pid: int) -> tuple[WorkerChannel, Frame]:
        """Connect, say hello; returns the channel and the parent's welcome."""
        reader, writer = await asyncio.open_unix_connection(path)
        write_frame(writer, {"t": "hello", "worker": worker, "pid": pid})
        welcome = await read_frame(reader)
        if welcome is None or welcome.get("t") != "welcome":
            writer.close()
            raise HubError("the parent closed the channel before its welcome")
        return cls(reader, writer), welcome

    def start(self) -> None:
        self._tasks.spawn(self._read(), name="worker-channel")

    async def aclose(self) -> None:
        await self._tasks.cancel()
        self._writer.close()

    def send(self, frame: Frame) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            raise HubError("the channel to the parent is closed")
        write_frame(self._writer, frame)

    async def call(self, op: str, *args: Any, timeout: float = WRITE_TIMEOUT) -> Any:
        """One request to the hub and its answer (raises ``HubError`` or TimeoutError)."""
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self.send({"t": "call", "id": call_id, "op": op, "a": list(args)})
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._pending.pop(call_id, None)

    async def _read(self) -> None:
        try:
            while (frame := await read_frame(self._reader)) is not None:
                kind = frame.get("t")
                if kind == "ret":
                    future = self._pending.get(frame.get("id", 0))
                    if future is not None and not future.done():
                        if "err" in frame:
                            future.set_exception(HubError(str(frame["err"])))
                        else:
                            future.set_result(frame.get("v"))
                elif kind == "msg":
                    self.on_message(str(frame["m"]).encode())
                else:
                    self.on_frame(frame)
        except Exception:  # a broken channel: the parent is gone or confused; either way
            logger.exception("the channel to the parent failed")
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(HubError("the channel to the parent closed"))


class _HubScript:
    """``_SEED`` as a registered script: ``await script(keys=[k], args=[...])``."""

    def __init__(self, channel: WorkerChannel) -> None:
        self._channel = channel

    async def __call__(self, *, keys: list[str], args: list[Any]) -> int:
        values = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
        return int(await self._channel.call("seed", keys[0], values))


class HubClient:
    """The hub seen through the calls of the Redis client that ``FleetLink`` and
    ``SharedPins`` make (``hgetall``, ``getex``, ``register_script`` for the seed)."""

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    def register_script(self, script: str) -> _HubScript | None:
        return _HubScript(self.channel) if script == _SEED else None

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        found = await self.channel.call("hgetall", key)
        return {k.encode(): v.encode() for k, v in found.items()}

    async def getex(self, key: str, px: int) -> bytes | None:
        found = await self.channel.call("getex", key, px)
        return None if found is None else str(found).encode()


class HubWriter(FleetWriter):
    """``FleetWriter``'s queues and order, sending to the hub: an action is one frame
    (applied and relayed by the hub in the order it arrives), pins one call per batch."""

    def __init__(self, client: HubClient, *, is_up: Callable[[], bool],
                 failed: Callable[[str, BaseException], None]) -> None:
        super().__init__(client, is_up=is_up, failed=failed)
        self._channel = client.channel

    async def send(self, action: Action) -> None:
        self._channel.send({"t": "act", "key": f"flipback:route:{action.route}",
                            "sets": {k: v.decode() for k, v in action.sets.items()},
                            "dels": action.dels, "msg": action.message.decode()})

    async def write_pins(self, batch: list[tuple[str, PinWrite]]) -> None:
        found = await self._channel.call(
            "setpins", [[key, w.value.decode(), w.rival.decode(), w.px] for key, w in batch])
        for (_, w), raw in zip(batch, found, strict=True):
            if raw is not None and raw.encode() != w.value:
                w.owner.adopt(w.hashed, raw.encode())


class WorkerLink(FleetLink):
    """The fleet link over the channel: up while the parent answers. The parent dying
    ends the worker (see ``proxy.workers.worker``), so there is no reconnect."""

    def __init__(self, channel: WorkerChannel, *, worker: int,
                 rollouts: Callable[[], Mapping[str, Rollout]]) -> None:
        self.url = "parent"
        self.replica = f"worker-{worker}"
        self._channel = channel
        client = HubClient(channel)
        self._init_link(client, client.register_script(_SEED), rollouts,
                        HubWriter(client, is_up=lambda: self.up, failed=self.failed))
        channel.on_message = self._receive

    def failed(self, op: str, exc: BaseException) -> None:
        self.errors[op] = self.errors.get(op, 0) + 1
        if self.up or not self._told_down:
            logger.warning("the parent's hub did not answer (%s: %s): this worker's pins "
                           "and actions stay local", op, exc or type(exc).__name__)
            self._told_down = True
        self.up = False
        self._resync.set()  # catch up again: up once the hub answers

    def readiness(self) -> dict[str, Any]:
        return {"connected": self.up, "url": self.url}

    async def aclose(self) -> None:
        if self.up:
            await self.flush(0.5)
        await self._tasks.aclose(0)

    async def _run(self) -> None:
        """Catch up with the hub, then again whenever a reload or a failed call asks
        (``resync``); after a failure, again in ``RETRY`` seconds. Ends with the channel."""
        while not self._channel.closed.is_set():
            self._resync.clear()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT * 5):
                    await self._sync()
            except Exception as exc:  # noqa: BLE001 - a slow or gone parent: local for now
                self.failed("connection", exc)
            else:
                if not self.up:
                    self.up = True
                    self._told_down = False
                    self._writer.resume()
            finally:
                self._started.set()
            if self.up:
                await self._resync.wait()
            else:
                await asyncio.sleep(RETRY)
