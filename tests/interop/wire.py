"""What the interop tests look through: flipback running in-process (with a client
session and admin helpers) and a recording TCP tap that sees exactly what crossed the wire
between flipback and a model server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httptools

from proxy.server import App


class Flipback:
    """A running flipback App, a client session (no automatic decompression: the test
    sees bodies as they crossed the wire) and small admin helpers."""

    def __init__(self, app: App, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.data_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"

    async def get_json(self, path: str) -> Any:
        async with self.session.get(self.admin + path) as resp:
            return await resp.json()

    async def route(self, name: str = "r") -> Any:
        return await self.get_json(f"/routes/{name}")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (a series
        may carry more, e.g. the mismatch counter's ``primary``)."""
        total = 0.0
        for family in self.app.runtime.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


StartFlipback = Callable[[dict[str, Any]], Awaitable[Flipback]]


# -- a recording TCP tap --------------------------------------------------------------


@dataclass
class Message:
    """One HTTP/1.1 message parsed from tapped bytes: transfer coding removed, content
    coding (gzip) kept, headers raw and in order."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser: Any = None  # set for responses, to read the status

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.parser is not None:
            self.messages[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def parse_messages(data: bytes, *, request: bool) -> list[Message]:
    collector = _Collector()
    if request:
        httptools.HttpRequestParser(collector).feed_data(data)
    else:
        collector.parser = httptools.HttpResponseParser(collector)
        collector.parser.feed_data(data)
    return collector.messages


@dataclass
class TapConn:
    up: bytearray = field(default_factory=bytearray)  # flipback -> server
    down: bytearray = field(default_factory=bytearray)  # server -> flipback


class Tap:
    """A TCP relay in front of one model server that records every byte both ways, per
    connection. ``connections`` counts the connections flipback opened to it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[TapConn] = []
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def connections(self) -> int:
        return len(self.conns)

    async def start(self) -> Tap:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TapConn()
        self.conns.append(conn)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer, conn.up),
                             self._pipe(up_reader, writer, conn.down))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    record: bytearray) -> None:
        try:
            while data := await reader.read(65536):
                record += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def requests(self) -> list[Message]:
        return [m for c in self.conns for m in parse_messages(bytes(c.up), request=True)]

    def responses(self) -> list[Message]:
        return [m for c in self.conns for m in parse_messages(bytes(c.down), request=False)]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        with contextlib.suppress(Exception):
            if self._server is not None:
                await asyncio.wait_for(self._server.wait_closed(), 2)


