"""One client connection of the data plane: bytes in to llhttp, requests out to the handler
in order, response bytes back.

The structure follows uvicorn's httptools protocol (parser callbacks build the request;
pipelined requests wait their turn with reading paused), but one task serves all of a
connection's requests, woken by a future per request, and the response half is
``response.Responder``. The limits flipback adds at the edge:

- a header clock (slowloris guard): a head must be complete ``header_timeout`` after its
  first byte (after the connection opened, for the first request);
- a header block cap: ``max_header_bytes``, request line and headers (-> 431);
- a body clock: while a request body is incomplete and the proxy waits on the client,
  ``body_timeout`` without a byte fails the body with ``BodyTimeout`` (-> 408, close);
- a keep-alive clock: an idle connection closes after ``keepalive_timeout``.

llhttp is strict: CL with TE, a bad Content-Length, obs-fold, bare LF and the like are
refused with 400 before anything reaches the handler. One timer per connection serves
every clock, re-armed lazily: a request that arrives whole and is answered at once arms
none.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy.errors import BodyTimeout, ClientRequestError
from proxy.http1.request import RawHeaders, Request, RequestBody
from proxy.http1.response import Responder, raw_error
from proxy.units import format_size

if TYPE_CHECKING:
    from proxy.http1.listener import DataPlane

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[None]]
# What the handler raised (but cancellation and ConnectionError): it answers or cuts.
ErrorHandler = Callable[[Request, Exception], None]

_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}
_NEVER = float("inf")
LINGER = 2.0  # seconds a refused request's body is read and dropped before the close


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer ``status``."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ClientProtocol(Responder, asyncio.Protocol):
    """One client connection; answers its requests one at a time, in order (the
    response half, framing and writes, is ``Responder``)."""

    __slots__ = (
        "_plane", "_limits", "_parser", "client_ip", "_in_head", "_url", "_headers",
        "_head_raw", "_head_since", "_parsing", "_task", "_queue", "_idle_since", "_watch",
        "_body_rx", "_timer", "_timer_due", "_read_paused", "_body_paused", "_fed", "_wake",
        "_req_length", "_req_chunked",
    )

    def __init__(self, plane: DataPlane) -> None:
        super().__init__(plane.loop)
        self._plane = plane
        self._limits = plane.limits
        self._parser = HttpRequestParser(self)
        self.client_ip = "unknown"
        self._in_head = False
        self._url = b""
        self._headers: RawHeaders = []
        self._head_raw = 0  # size of an incomplete head (an upper bound; -1: begun this read)
        self._fed = 0  # size of the read being parsed
        self._req_length: int | None = None  # Content-Length of the head being parsed
        self._req_chunked = False
        self._head_since: float | None = None  # loop time the current head began
        self._parsing: Request | None = None  # its body is still being parsed
        self._task: asyncio.Task[None] | None = None  # serves this connection's requests
        self._wake: asyncio.Future[None] | None = None  # it waits for the next request
        # requests parsed behind the active one, or a raw error answer that ends the line
        self._queue: deque[Request | bytes] = deque()
        self._idle_since: float | None = None
        self._watch: RequestBody | None = None  # an incomplete body on the body clock
        self._body_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = _NEVER
        self._read_paused = False
        self._body_paused = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = t.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
        self._plane.connections.add(self)
        timeout = self._limits.header_timeout
        if timeout > 0:  # the first head's clock starts with the connection
            now = self._loop.time()
            self._head_since = now
            self._arm(now + timeout)

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return
        self._fed = len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            # The request was complete; what follows is another protocol, which is not
            # ours to speak: it is answered as plain HTTP and the connection closes.
            self._input_done = True
            last = self._queue[-1] if self._queue else self._active
            if isinstance(last, Request):
                last.keep_alive = False
            return
        except HttpParserError as exc:
            if not self._input_done:
                self._malformed(exc)
            return
        if self._in_head:
            if self._head_raw < 0:  # it began in this read, after other requests maybe
                self._head_raw = len(self._url) + sum(len(n) + len(v) + 4
                                                      for n, v in self._headers)
            else:  # it began in an earlier read: all of this one is head
                self._head_raw += len(data)
            limits = self._limits
            if self._head_raw > limits.max_header_bytes:
                self._reject(431, f"request headers over {format_size(limits.max_header_bytes)}",
                             "header_too_large")
                return
            if self._head_since is None and limits.header_timeout > 0:
                now = self._head_since = self._loop.time()
                self._arm(now + limits.header_timeout)
        parsing = self._parsing
        if parsing is not None and parsing.body is not None:
            body = parsing.body
            if self._watch is not body:
                self._watch_body(body)
            else:
                self._body_rx = self._loop.time()

    def eof_received(self) -> bool | None:
        return None  # the client is gone: close, and connection_lost cancels its handler

    def connection_lost(self, exc: Exception | None) -> None:
        self._input_done = True
        self._plane.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client disconnected"))
        self._drain_waiter = None
        gone = ConnectionResetError("client disconnected")
        for req in (self._active, self._parsing, *self._queue):
            if isinstance(req, Request) and req.body is not None:
                req.body.set_error(gone)
        self._queue.clear()
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the handler's upstream exchange is cancelled with it
        self._plane.connection_closed(self)

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_raw = -1  # began in the current read
        self._url = b""
        self._headers = []
        self._req_length = None
        self._req_chunked = False
        self._idle_since = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self._req_length = int(value)  # llhttp checked the digits and refused duplicates
        elif size == 17 and name.lower() == b"transfer-encoding":
            self._req_chunked = True  # llhttp refuses a request TE that does not end in chunked

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_since = None
        url = self._url
        headers = self._headers
        limit = self._limits.max_header_bytes
        if self._head_raw + self._fed > limit:  # the reads could hold more: measure
            size = len(url) + 16 + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > limit:
                raise _Reject(431, f"request headers over {format_size(limit)}",
                              "header_too_large")
        self._head_raw = 0
        parser = self._parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        req = Request(self, method, url.decode("utf-8", "surrogateescape"),
                      parser.get_http_version(), headers, self._req_length, self._req_chunked,
                      parser.should_keep_alive())
        self._parsing = req
        if self._active is None and not self._queue:
            self._start(req)
        else:
            self._queue.append(req)  # pipelined: answered after the ones before it
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        assert req is not None and req.body is not None
        req.body.feed(body)

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is None:
            return
        self._parsing = None
        if req.body is not None:
            req.body.feed_eof()
            if self._watch is req.body:
                self._watch = None
        if not req.keep_alive:
            self._input_done = True  # Connection: close, or HTTP/1.0: nothing follows

    # -- refusals ----------------------------------------------------------------------

    def _malformed(self, exc: HttpParserError) -> None:
        cause = exc.__context__
        if isinstance(cause, _Reject):
            self._reject(cause.status, str(cause), cause.reason)
            return
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.info("bad client request from %s: %s", self.client_ip, detail)
        parsing = self._parsing
        if parsing is not None and parsing.body is not None:
            # broken framing inside a body being answered: its reader gets the 400
            self._input_done = True
            parsing.body.set_error(ClientRequestError(
                400, f"malformed request body: {detail}", reason="bad_request"))
            return
        self._reject(400, f"malformed request: {detail}", "bad_request")

    def _reject(self, status: int, message: str, reason: str) -> None:
        """Answer ``status`` after the requests before it, then close; read no more."""
        self._input_done = True
        self._limits.count(reason)
        answer = raw_error(status, message)
        if self._active is None and not self._queue:
            self._write_last(answer)
        else:
            self._queue.append(answer)

    def _write_last(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            transport.close()  # flushes, then closes

    # -- serving requests --------------------------------------------------------------

    def _start(self, req: Request) -> None:
        """Make ``req`` the one being answered and wake the connection's serving task."""
        self._active = req
        self._reset_response()
        if self._task is None:
            # One task per connection, not per request: a task costs its creation and
            # asyncio's registry of all tasks; a future to wake it costs less. Not a
            # TaskSet task: the connection owns it and cancels it when the client goes.
            self._task = self._loop.create_task(self._serve())
        elif self._wake is not None:
            wake, self._wake = self._wake, None
            wake.set_result(None)

    async def _serve(self) -> None:
        """Answer requests one after another while the connection lives; cancelled (by
        connection_lost) when the client goes, which cancels the upstream exchange."""
        handler = self._plane.handler
        on_error = self._plane.on_error
        while True:
            req = self._active
            if req is None:
                self._wake = self._loop.create_future()
                await self._wake
                continue
            try:
                await handler(req)
            except ConnectionError:
                self.abort()
            except Exception as exc:  # noqa: BLE001 - the handler's error boundary
                try:
                    on_error(req, exc)
                except ConnectionError:
                    self.abort()
                except Exception:  # noqa: BLE001 - the boundary itself failed
                    logger.exception("unhandled error answering %s %s", req.method,
                                     req.target)
                    self.abort()
            self._finished(req)
            if self._closing:
                self._plane.request_done()
            transport = self.transport
            if transport is None or transport.is_closing():
                return

    def _finished(self, req: Request) -> None:
        self._active = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._done:  # the handler ended without a whole response: cut it
            self.abort()
            return
        if not self._keep:
            self._input_done = True
            body = req.body
            if body is not None and not body.complete and transport.can_write_eof():
                # The client may still be sending: a close with unread bytes resets the
                # connection, which can destroy the answer before it is read. Stop
                # writing, read on (discarding) until its EOF or LINGER (as nginx does).
                transport.write_eof()
                self._read_paused = False
                transport.resume_reading()
                self._loop.call_later(LINGER, transport.close)
            else:
                transport.close()
            return
        queue = self._queue
        if queue:
            item = queue.popleft()
            if isinstance(item, bytes):
                self._write_last(item)
                return
            self._start(item)
            self._update_reading()
        elif self._closing or self._input_done:
            transport.close()
        else:
            timeout = self._limits.keepalive_timeout
            if timeout > 0 and self._parsing is None and not self._in_head:
                now = self._idle_since = self._loop.time()
                self._arm(now + timeout)

    @property
    def busy(self) -> bool:
        """A request is being answered or waits its turn."""
        return self._active is not None or bool(self._queue)

    def shutdown(self) -> None:
        """Drain: an idle connection closes now, a busy one after its current answer."""
        self._closing = True
        transport = self.transport
        if not self.busy and transport is not None:
            self._input_done = True
            transport.close()

    # -- flow control and clocks -------------------------------------------------------

    def pause_body(self) -> None:
        if not self._body_paused:
            self._body_paused = True
            self._update_reading()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            self._update_reading()

    def _update_reading(self) -> None:
        pause = self._body_paused or bool(self._queue)
        transport = self.transport
        if pause != self._read_paused and transport is not None and not transport.is_closing():
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                self._read_paused = False
                transport.resume_reading()

    def _watch_body(self, body: RequestBody) -> None:
        self._watch = body
        now = self._body_rx = self._loop.time()
        timeout = self._limits.body_timeout
        if timeout > 0:
            self._arm(now + timeout)

    def _arm(self, due: float) -> None:
        """Make sure the timer fires by ``due``: an earlier one stays (it re-arms itself)."""
        if self._timer is None or due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(due, self._on_timer)
            self._timer_due = due

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = _NEVER
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        limits = self._limits
        now = self._loop.time()
        due = _NEVER
        if self._read_paused:  # the proxy holds the client back: its clocks stand still
            if self._head_since is not None:
                self._head_since = now
            self._body_rx = now
        if self._head_since is not None and limits.header_timeout > 0:
            at = self._head_since + limits.header_timeout
            if now >= at:
                limits.count("header_timeout")
                self._input_done = True
                transport.close()
                return
            due = at
        body = self._watch
        if body is not None and limits.body_timeout > 0:
            if body.complete:
                self._watch = None
            else:
                if body.buffered:  # unread bytes: the proxy is the slow side, not the client
                    self._body_rx = now
                at = self._body_rx + limits.body_timeout
                if now >= at:
                    self._watch = None
                    self._closing = True
                    body.set_error(BodyTimeout(f"no request body byte for "
                                               f"{limits.body_timeout:g}s"))
                else:
                    due = min(due, at)
        if self._idle_since is not None and limits.keepalive_timeout > 0:
            at = self._idle_since + limits.keepalive_timeout
            if now >= at:
                self._input_done = True
                transport.close()
                return
            due = min(due, at)
        if due < _NEVER:
            self._arm(due)

