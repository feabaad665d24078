"""Response bytes: status lines, header blocks, the whole answers the proxy makes itself,
and ``Responder``, the response half of a client connection: framing (length, chunked,
or to the connection's end for HTTP/1.0), keep-alive, and writes with backpressure. A
head and a small body leave in one ``transport.write``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson

from proxy.units import format_size

if TYPE_CHECKING:
    from proxy.http1.request import Request

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"  # said only to HTTP/1.0 clients that asked
JSON = "application/json"

_NO_BODY = frozenset({204, 304})
_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in HTTPStatus}
_PHRASES = {int(s): s.phrase for s in HTTPStatus}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A whole response the proxy makes itself (errors, the kill switch's answer)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def status_line(status: int, reason: str = "") -> bytes:
    """``HTTP/1.1 <status> <reason>``; the standard phrase unless the upstream gave
    another (its own reason passes through, as it came)."""
    if not reason or reason == _PHRASES.get(status):
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace"))


def header_lines(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bytes:
    """``name: value`` lines; a CR, LF or NUL in either refuses the header (ValueError)
    rather than letting it split the response."""
    out = []
    for name, value in pairs:
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line or "\0" in line:
            raise ValueError(f"invalid response header {name!r}: control character")
        out.append(line.encode("latin-1") + b"\r\n")
    return b"".join(out)


def json_error(status: int, message: str, request_id: str,
               id_header: str = "x-request-id") -> Reply:
    """Errors the proxy makes itself (SPEC §4)."""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON),)
    if request_id:
        headers += ((id_header, request_id),)
    return Reply(status=status, headers=headers,
                 body=orjson.dumps({"error": message, "request_id": request_id}))


def raw_error(status: int, message: str) -> bytes:
    """A whole JSON error answer that closes the connection, for a request that never got
    far enough for the handler (malformed, header block too large)."""
    body = orjson.dumps({"error": message, "request_id": ""})
    return (status_line(status) + b"Content-Type: application/json\r\n" + CLOSE
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def header_431(limit: int) -> bytes:
    return raw_error(431, f"request headers over {format_size(limit)}")


class Responder:
    """The response state of a connection's active request and the writes; the protocol
    (``ClientProtocol``) sets ``transport``, ``_active`` and the flow flags."""

    __slots__ = ("transport", "_loop", "_active", "_closing", "_input_done", "_write_paused",
                 "_drain_waiter", "_pending", "_chunked", "_no_body", "_started", "_done",
                 "_keep")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop = loop
        self._active: Request | None = None  # being answered
        self._closing = False  # close once the active request is answered (drain)
        self._input_done = False  # read no more requests from this connection
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset_response()

    def _reset_response(self) -> None:
        self._pending = b""  # a head held back to leave with the first body bytes
        self._chunked = self._no_body = self._started = self._done = self._keep = False

    def _keep_alive(self, req: Request) -> bool:
        body = req.body
        return req.keep_alive and not self._closing and (body is None or body.complete)

    def respond(self, status: int, headers: bytes, body: bytes, *, reason: str = "",
                close: bool = False) -> None:
        """A whole response in one write. ``headers`` are encoded lines, without framing."""
        req = self._active
        assert req is not None and not self._started
        keep = not close and self._keep_alive(req)
        parts = [status_line(status, reason), headers]
        if status not in _NO_BODY:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(_connection(keep, req.version))
        if req.method != "HEAD" and status not in _NO_BODY:
            parts.append(body)
        self._started = self._done = True
        self._keep = keep
        self._write(b"".join(parts))

    def start_response(self, status: int, reason: str, headers: bytes,
                       content_length: int | None, *, defer: bool = False) -> None:
        """Send the head of a streamed response (``defer``: with the first body bytes).
        Without a length it is chunked (HTTP/1.1) or ends with the connection (1.0)."""
        req = self._active
        assert req is not None and not self._started
        keep = self._keep_alive(req)
        no_body = req.method == "HEAD" or status in _NO_BODY or status < 200
        if content_length is not None:
            framing = b"" if status in _NO_BODY else b"Content-Length: %d\r\n" % content_length
        elif no_body:
            framing = b""
        elif req.version == "1.1":
            framing = CHUNKED
            self._chunked = True
        else:
            framing = b""
            keep = False  # an HTTP/1.0 body without a length ends with the connection
        self._no_body = no_body
        self._keep = keep
        self._started = True
        head = b"".join((status_line(status, reason), headers, framing,
                         _connection(keep, req.version)))
        if defer:
            self._pending = head
        else:
            self._write(head)

    def write(self, chunk: bytes) -> bool:
        """One body chunk. True when the client's socket buffer is full: the caller must
        ``await drain()`` before writing more (backpressure to the upstream)."""
        if self._no_body or not chunk:
            return False
        if self._chunked:
            data = b"".join((self._pending, b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        elif self._pending:
            data = self._pending + chunk
        else:
            data = chunk
        self._pending = b""
        self._write(data)
        return self._write_paused

    async def drain(self) -> None:
        """Until the client's socket buffer has room again (ConnectionResetError if the
        client goes meanwhile)."""
        if self._write_paused:
            waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    def end(self) -> None:
        """The response is complete (the last chunk, if chunked)."""
        tail = LAST_CHUNK if self._chunked and not self._no_body else b""
        data = self._pending + tail if self._pending else tail
        self._pending = b""
        self._done = True
        if data:
            self._write(data)

    def send_continue(self) -> None:
        self._write(CONTINUE)

    def abort(self) -> None:
        """Cut the connection: a response that broke midway must not look complete."""
        self._input_done = True
        if self.transport is not None:
            self.transport.abort()

    @property
    def started(self) -> bool:
        return self._started

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        transport.write(data)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _connection(keep: bool, version: str) -> bytes:
    """The Connection header and the end of the head."""
    if not keep:
        return CLOSE + b"\r\n"
    return b"\r\n" if version == "1.1" else KEEP_ALIVE + b"\r\n"
