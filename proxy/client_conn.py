"""The client side of the data plane: aiohttp's server protocol plus the limits it lacks.

aiohttp parses requests and runs handlers; it has no timer for slow headers, none for a
request body that stops flowing, and no cap on the header block as a whole. Each is a
way to hold a connection (and memory) open for free, so each lives here, per connection,
with at most one timer armed at a time and no work per request on the fast path (a
request whose headers and body arrive together touches none of it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.errors import BodyTimeout
from proxy.units import format_size

logger = logging.getLogger(__name__)


class Limits:
    """The ``server`` settings every connection reads; one mutable instance per server, so a
    reload reaches open connections too."""

    __slots__ = ("header_timeout", "body_timeout", "max_header_bytes", "rejected")

    def __init__(self, header_timeout: float, body_timeout: float,
                 max_header_bytes: int) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes
        self.rejected: dict[str, int] = {}  # reason -> count, read by the metrics collector

    def count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def header_431(limit: int) -> bytes:
    """The whole 431 answer, written raw: the request never got far enough for a handler."""
    body = orjson.dumps({"error": f"request headers over {format_size(limit)}",
                         "request_id": ""})
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class ClientConnection(RequestHandler):
    """One client connection. Adds to aiohttp's protocol:

    - a header timer (slowloris guard): from the first byte of a request (or the
      connection's start) the client has ``header_timeout`` to finish its headers;
    - a header block cap: past ``max_header_bytes`` before the headers end, a raw 431 and
      close; a block that completed inside one larger read is flagged (``head_over``) for
      the handler to measure exactly;
    - a body timer: while a request body is incomplete and the proxy waits on the client
      (nothing buffered unread), ``body_timeout`` without a byte fails the body with
      ``BodyTimeout``: its reader answers 408 and the connection closes.
    """

    limits = Limits(10.0, 60.0, 64 * 1024)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hdr_timer: asyncio.TimerHandle | None = None
        self._parsed = 0
        self._head_bytes = 0
        self.head_over = False
        self._body: StreamReader | None = None  # an incomplete request body being watched
        self._body_rx = 0.0  # loop time of its last byte
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        timeout = self.limits.header_timeout
        if self._hdr_timer is None and timeout > 0:
            self._hdr_timer = self._loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        self._hdr_timer = None
        if self.transport is not None:
            self.limits.count("header_timeout")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None and body.is_eof():
            body = self._body = None
        if body is None:  # between requests: these are header bytes
            if self._request_count == self._parsed and self._current_request is None:
                self._arm()  # first bytes of a new request: the clock starts
            self._head_bytes += len(data)
        else:
            self._body_rx = self._loop.time()
        super().data_received(data)
        if self._request_count != self._parsed:
            self._parsed = self._request_count
            if self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None
            if self._head_bytes > self.limits.max_header_bytes:
                self.head_over = True  # the read held more than headers: measure exactly
            self._head_bytes = 0
            if self._messages:
                payload = self._messages[-1][1]
                if not payload.is_eof() and isinstance(payload, StreamReader):
                    self._watch_body(payload)
        elif body is None and self._head_bytes > self.limits.max_header_bytes:
            self._reject_head()

    def _reject_head(self) -> None:
        self.limits.count("header_too_large")
        if self._current_request is not None or self._messages:
            self.close()  # behind a request in progress: end after it, read no more
            return
        transport = self.transport
        if transport is not None:
            transport.write(header_431(self.limits.max_header_bytes))
        self.force_close()  # flushes the write, then closes

    def _watch_body(self, payload: StreamReader) -> None:
        self._body = payload
        self._body_rx = self._loop.time()
        timeout = self.limits.body_timeout
        if self._body_timer is None and timeout > 0:
            self._body_timer = self._loop.call_at(self._body_rx + timeout, self._check_body)

    def _check_body(self) -> None:
        self._body_timer = None
        payload = self._body
        if payload is None or payload.is_eof() or self.transport is None:
            return
        loop = self._loop
        timeout = self.limits.body_timeout
        now = loop.time()
        # Unread bytes in the buffer mean the proxy is the slow side (its upstream is
        # slow to take the body): the client is not idle, so the clock restarts.
        if getattr(payload, "_size", 0) > 0:
            self._body_rx = now
        due = self._body_rx + timeout
        if now < due:
            self._body_timer = loop.call_at(due, self._check_body)
            return
        self._body = None
        self._lingering_time = 0.0  # aiohttp must not wait for the rest after the 408
        payload.set_exception(BodyTimeout(f"no request body byte for {timeout:g}s"))

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp logs a full traceback for every malformed client request; one line is
        what an operator wants (the client already got its 400)."""
        exc = kw.get("exc_info")
        detail = str(exc).splitlines()[0] if isinstance(exc, BaseException) else ""
        peer = args[1] if len(args) > 1 else "?"
        logger.info("bad client request from %s: %s", peer, detail.strip())

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._hdr_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._hdr_timer = self._body_timer = None
        self._body = None
        super().connection_lost(exc)


class DataPlaneServer(web.Server):
    """aiohttp's low-level server making ``ClientConnection``s that share one ``Limits``."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._conn_cls: type[ClientConnection] = type(
            "ClientConnection", (ClientConnection,), {"limits": limits})

    def set_keepalive_timeout(self, seconds: float) -> None:
        """For connections opened from now on (aiohttp reads it once per connection)."""
        self._kwargs["keepalive_timeout"] = seconds

    def __call__(self) -> RequestHandler:
        handler: RequestHandler = self._conn_cls(self, loop=self._loop, **self._kwargs)
        return handler

    def cut(self) -> int:
        """Abort every connection now (the drain deadline passed); returns how many."""
        conns = list(self.connections)
        for conn in conns:
            transport = conn.transport
            if transport is not None:
                transport.abort()  # connection_lost cancels the handler: upstreams free
        return len(conns)
