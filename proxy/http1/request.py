"""The lean request the data plane hands its handler, and its body stream.

A request is what llhttp gave (method, target, version, raw header pairs) plus a body
stream only when it has a body; everything else (a header lookup, the peer address) is
computed when asked. The body is fed by the connection's protocol and read by one
consumer; over ``HIGH_WATER`` unread bytes the socket stops being read, so a client
sending faster than the upstream takes it is held back by TCP, not by memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.http1.protocol import ClientProtocol

RawHeaders = list[tuple[bytes, bytes]]

# Unread request body bytes above which the client socket is paused (as the upstream
# side's conn.HIGH_WATER: one socket read can land on top of it, no more).
HIGH_WATER = 64 * 1024


class Headers(Mapping[str, str]):
    """A case-insensitive, read-only view of the raw header pairs: a lookup scans the
    list (a request has a handful) instead of building a multidict per request. Values
    decode as UTF-8 with surrogateescape, so the client's bytes come back unchanged."""

    __slots__ = ("_raw",)

    def __init__(self, raw: RawHeaders) -> None:
        self._raw = raw

    def get_bytes(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower case), raw."""
        size = len(name)
        for key, value in self._raw:
            if len(key) == size and key.lower() == name:
                return value
        return None

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        value = self.get_bytes(name.lower().encode("latin-1"))
        return default if value is None else value.decode("utf-8", "surrogateescape")

    def getall(self, name: str, default: tuple[str, ...] = ()) -> list[str]:
        key = name.lower().encode("latin-1")
        found = [v.decode("utf-8", "surrogateescape") for k, v in self._raw if k.lower() == key]
        return found or list(default)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.decode("latin-1").lower() for k, _ in self._raw))

    def __len__(self) -> int:
        return len({k.lower() for k, _ in self._raw})


class RequestBody:
    """A request body as it arrives: one reader, chunks in arrival order.

    ``complete`` once the whole body is in (it may still be unread); an error set by
    the connection (``BodyTimeout``, the client going away) is raised to the reader
    after the bytes before it.
    """

    __slots__ = ("_proto", "_chunks", "_size", "_complete", "_error", "_waiter", "total_bytes")

    def __init__(self, proto: ClientProtocol) -> None:
        self._proto = proto
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.total_bytes = 0

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._size

    # -- fed by the protocol ---------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self.total_bytes += len(chunk)
        if self._waiter is not None:
            self._wake()
        if self._size > HIGH_WATER:
            self._proto.pause_body()

    def feed_eof(self) -> None:
        self._complete = True
        if self._waiter is not None:
            self._wake()

    def set_error(self, exc: BaseException) -> None:
        if not self._complete and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the handler ---------------------------------------------------------

    def read_nowait(self) -> bytes:
        """Every byte buffered now (the whole body once ``complete``)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._proto.resume_body()
        return data

    async def read(self) -> bytes:
        """The bytes received so far, waiting for some if none; b"" at the end."""
        while True:
            if self._chunks:
                return self.read_nowait()
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (the declared Content-Length): llhttp ends the body there."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read()
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)


class Request:
    """One client request: llhttp's view of the head, the body stream (None without a
    body), and the response methods of the connection it came on."""

    __slots__ = ("method", "target", "version", "raw_headers", "headers", "content_length",
                 "chunked", "keep_alive", "body", "body_exists", "proto", "client_ip")

    def __init__(self, proto: ClientProtocol, method: str, target: str, version: str,
                 raw_headers: RawHeaders, content_length: int | None, chunked: bool,
                 keep_alive: bool) -> None:
        self.proto = proto
        self.method = method
        self.target = target  # the raw request target: path and query (or absolute form)
        self.version = version  # "1.1" or "1.0"
        self.raw_headers = raw_headers
        self.headers = Headers(raw_headers)
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.body_exists = chunked or bool(content_length)
        self.body = RequestBody(proto) if self.body_exists else None
        self.client_ip = proto.client_ip

    # -- the response, written by the connection (``proto``: a streamed one goes through
    # its start_response / write / drain / end directly) -------------------------------

    def respond(self, status: int, headers: bytes, body: bytes, *, reason: str = "",
                close: bool = False) -> None:
        """A whole response in one write; ``headers`` are encoded lines (no framing)."""
        self.proto.respond(status, headers, body, reason=reason, close=close)

    def send_continue(self) -> None:
        self.proto.send_continue()

    def abort(self) -> None:
        self.proto.abort()

    @property
    def response_started(self) -> bool:
        return self.proto.started

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} HTTP/{self.version}>"
