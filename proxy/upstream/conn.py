"""One upstream HTTP/1.1 connection: an asyncio Protocol whose bytes go straight to llhttp.

``proxy.upstream.pool.UpstreamPool`` owns the connections and the timeouts before the response
headers; this module owns the bytes on one socket: the request body pump, response parsing,
body buffering with backpressure, and the body idle timeout. Every socket or parser
failure becomes a ``proxy.errors`` exception here, once.

A request is either awaited (``start``: a future for the headers, then ``read`` for the
body) or detached (``start_detached``: the response goes to a ``Sink``'s callbacks and
the connection returns to its pool by itself). Detached exchanges cost no task, no future
and no timer: shadow copies use them, so a copy's cost is little more than its syscalls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Protocol, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from proxy.errors import StreamBroken, UpstreamTimeout

# Above this many unread body bytes the socket stops being read (TCP backpressure to the
# upstream); one socket read (up to 256 KiB) can land on top of it, no more.
HIGH_WATER = 64 * 1024

# Connection states: no request, waiting for response headers, reading the body,
# response complete (not yet released).
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


class StaleConnection(StreamBroken):
    """A reused keep-alive connection ended before any response byte: the upstream
    closed it as we sent, so a replayable request may go again on a fresh connection."""


class _Junk(Exception):
    """Bytes the upstream had no business sending; raised inside parser callbacks to stop
    parsing, so they never reach a response."""


class Owner(Protocol):
    """What a connection needs from its pool."""

    def put_back(self, conn: Connection) -> None: ...
    def forget(self, conn: Connection) -> None: ...
    def resend_detached(self, head: bytes, is_head: bool, sink: Sink) -> None: ...


class Sink(Protocol):
    """Where a detached exchange reports; exactly one of ``done`` or ``failed`` ends it.

    ``deadline`` (loop time) bounds the whole exchange. The connection sets ``conn`` to
    itself when it takes the request (``conn.fail`` aborts it). The callbacks run on the
    event loop from the connection's protocol methods: they must not raise or block.
    """

    deadline: float
    conn: Connection | None

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def body(self, chunk: bytes) -> None: ...
    def done(self) -> None: ...
    def failed(self, exc: BaseException) -> None: ...


# What the response-headers future resolves to: status, reason, headers, the
# Content-Length (None if chunked or absent) and whether the connection will close.
Head = tuple[int, str, list[tuple[bytes, bytes]], int | None, bool]


class Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time (no pipelining)."""

    __slots__ = (
        "_owner", "_loop", "_idle_timeout", "_transport", "_parser", "_parser_stale",
        "_state", "_is_head", "_head_fut", "_reason", "_headers", "_buf", "_buf_size",
        "_body_waiter", "_error", "_eof_body", "_keep", "_read_paused", "_write_paused",
        "_drain_waiter", "_pump", "_forgotten", "_deadline", "_wait_since", "closed", "reused",
        "got_bytes", "idle_since", "_sink", "_replay",
    )

    def __init__(self, owner: Owner, loop: asyncio.AbstractEventLoop,
                 idle_timeout: float) -> None:
        self._owner = owner
        self._loop = loop
        self._idle_timeout = idle_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = HttpResponseParser(self)
        self._parser_stale = False
        self._state = _IDLE
        self._is_head = False
        self._head_fut: asyncio.Future[Head] | None = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._buf: list[bytes] = []
        self._buf_size = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof_body = False
        self._keep = True
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._forgotten = False
        self._deadline = 0.0  # for the response headers
        self._wait_since = 0.0  # when read() began to wait for body bytes
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.idle_since = 0.0
        self._sink: Sink | None = None  # a detached exchange under way
        self._replay = b""  # its request, resent once if a stale keep-alive drops it

    # -- driven by the pool ------------------------------------------------------------

    def start(self, head: bytes, is_head: bool,
              deadline: float) -> asyncio.Future[Head]:
        """Send ``head`` (request line, headers and any bytes body); the future resolves
        with the response once its headers are in, or fails with an UpstreamError."""
        self._begin(is_head, deadline)
        fut = self._head_fut = self._loop.create_future()
        if self.closed:  # handed over by the pool, then closed by the upstream
            fut.set_exception(StaleConnection("keep-alive connection closed"))
        else:
            assert self._transport is not None
            self._transport.write(head)
        return fut

    def start_detached(self, head: bytes, is_head: bool, deadline: float, sink: Sink) -> None:
        """Send ``head`` (a whole request) and hand the response to ``sink``; headers are
        due by ``deadline``, the whole response by ``sink.deadline``. The pool must not
        hand over a closed connection."""
        self._begin(is_head, deadline)
        self._sink = sink
        sink.conn = self
        self._replay = head if self.reused else b""
        assert self._transport is not None and not self.closed
        self._transport.write(head)

    def _begin(self, is_head: bool, deadline: float) -> None:
        if self._parser_stale:  # a HEAD response left llhttp expecting a body
            self._parser = HttpResponseParser(self)
            self._parser_stale = False
        self._state = _HEAD
        self._is_head = is_head
        self.got_bytes = False
        self._reason = b""
        self._headers = []
        self._error = None
        self._deadline = deadline

    def start_body(self, body: AsyncIterable[bytes], content_length: int | None) -> None:
        """Stream ``body`` in a task, so an early response (413) is seen while it flows."""
        # Not a TaskSet task: the pump is part of one exchange, not background work. This
        # connection holds it, release() checks it, _cleanup() cancels it, and _write_body
        # handles its own errors; a TaskSet would add a set entry and a done callback per
        # streamed request on the hot path and could not cancel this one task.
        self._pump = self._loop.create_task(self._write_body(body, content_length))

    def release(self) -> None:
        if (self._state == _DONE and self._keep and not self.closed
                and (self._pump is None or self._pump.done())):
            self._state = _IDLE
            self._head_fut = None
            self._pump = None
            self.reused = True
            if self._buf:
                self._buf = []
                self._buf_size = 0
            if self._read_paused:
                self._read_paused = False
                assert self._transport is not None
                self._transport.resume_reading()
            self._owner.put_back(self)
        elif self._state == _DONE:
            self.close()
        else:
            self.fail(StreamBroken("response abandoned before its end"))

    def close(self) -> None:
        """Close gracefully (idle, or after a complete response that must not be reused)."""
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        self._cleanup()

    def fail(self, exc: BaseException) -> None:
        """Hand ``exc`` to whoever waits on this connection and abort it at once."""
        state = self._state
        sink = self._sink
        if sink is not None:
            self._sink = None
            self._abort()
            if state == _DONE:  # junk after a complete response: the response stands
                sink.done()
            else:
                sink.failed(exc)
            return
        if state == _HEAD:
            fut = self._head_fut
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        elif state == _BODY:
            if self._error is None:
                self._error = exc
            self._wake_reader()
        self._abort()

    def _abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
        self._cleanup()

    def _finish_detached(self) -> None:
        """The detached response is complete: the connection goes back, then the sink."""
        sink = self._sink
        assert sink is not None
        self._sink = None
        self._replay = b""
        self.release()
        sink.done()

    def _cleanup(self) -> None:
        self._keep = False
        pump = self._pump
        if pump is not None and not pump.done():
            pump.cancel()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._forgotten:
            self._forgotten = True
            self._owner.forget(self)

    # -- body, read through UpstreamResponse ------------------------------------------------

    async def read(self) -> bytes:
        if self._buf:
            return self._take()
        if self._state == _DONE:
            return b""
        if self._error is not None:
            raise self._error
        loop = self._loop
        waiter = self._body_waiter = loop.create_future()
        self._wait_since = loop.time()
        try:
            await waiter
        except BaseException:  # cancelled: the client went away, so must the upstream
            self._body_waiter = None
            self.fail(StreamBroken("response read cancelled"))
            raise
        if self._buf:
            return self._take()
        if self._state == _DONE:
            return b""
        assert self._error is not None
        raise self._error

    def read_nowait(self) -> bytes | None:
        if self._buf:
            return self._take()
        if self._state == _DONE:
            return b""
        return None

    def _take(self) -> bytes:
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        self._buf = []
        self._buf_size = 0
        if self._read_paused and not self.closed:
            self._read_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return data

    def check(self, now: float, timeout_msg: str) -> None:
        """The pool's tick: fail this connection if its headers or body bytes are late."""
        sink = self._sink
        if sink is not None:
            if now >= (self._deadline if self._state == _HEAD else sink.deadline):
                self.fail(UpstreamTimeout("response not complete by its deadline"
                                          if self._state == _BODY else timeout_msg))
            return
        if self._state == _HEAD:
            if now >= self._deadline:
                self.fail(UpstreamTimeout(timeout_msg))
        elif self._body_waiter is not None and now - self._wait_since >= self._idle_timeout:
            self.fail(UpstreamTimeout(f"no response body data for {self._idle_timeout:g}s"))

    def _wake_reader(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    @property
    def body_ready(self) -> bool:
        """Unread body bytes are here, or the response is complete."""
        return bool(self._buf) or self._state == _DONE

    @property
    def buffered(self) -> int:
        """Unread response body bytes held for this connection."""
        return self._buf_size

    # -- request body ------------------------------------------------------------------

    async def _write_body(self, body: AsyncIterable[bytes], content_length: int | None) -> None:
        transport = self._transport
        assert transport is not None
        sent = 0
        try:
            async for chunk in body:
                if self.closed:
                    return
                if not chunk:
                    continue
                if content_length is None:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    sent += len(chunk)
                    if sent > content_length:
                        raise StreamBroken(f"request body longer than its {content_length} bytes")
                    transport.write(chunk)
                if self._write_paused:
                    waiter = self._drain_waiter = self._loop.create_future()
                    await waiter
            if self.closed:
                return
            if content_length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != content_length:
                raise StreamBroken(f"request body ended at {sent} of {content_length} bytes")
        except asyncio.CancelledError:
            raise
        except StreamBroken as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001 - the caller's iterator; cause kept
            broken = StreamBroken(f"request body failed: {exc!r}")
            broken.__cause__ = exc
            self.fail(broken)

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.closed:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _HEAD or state == _BODY:  # noqa: SIM109 - ints: faster than a tuple
            self.got_bytes = True
            try:
                self._parser.feed_data(data)
            except HttpParserUpgrade:
                self.fail(StreamBroken("upstream switched protocols unexpectedly"))
            except HttpParserError as exc:
                if isinstance(exc.__context__, _Junk):
                    self.fail(StreamBroken("upstream sent bytes after the response"))
                else:
                    self.fail(StreamBroken(f"malformed upstream response: {exc}"))
                return
            if self._sink is not None and self._state == _DONE:
                self._finish_detached()
        else:  # nothing was asked (idle) or the response is complete: not HTTP we can use
            self.fail(StreamBroken("upstream sent bytes after the response"))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost reports what it means

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:  # we closed it and already told everyone
            self._cleanup()
            return
        self.closed = True
        state = self._state
        sink = self._sink
        if sink is not None:
            self._sink = None
            self._cleanup()
            if state == _HEAD:
                if self.reused and not self.got_bytes and self._replay:
                    self._owner.resend_detached(self._replay, self._is_head, sink)
                else:
                    sink.failed(StreamBroken("upstream closed the connection before the "
                                             "response headers"))
            elif state == _BODY and not (self._eof_body and exc is None):
                sink.failed(StreamBroken("upstream closed the connection mid-body"))
            else:
                sink.done()
            return
        if state == _HEAD:
            fut = self._head_fut
            if fut is not None and not fut.done():
                why = f": {exc}" if exc else ""
                if self.reused and not self.got_bytes:
                    fut.set_exception(StaleConnection(f"keep-alive connection closed{why}"))
                else:
                    fut.set_exception(StreamBroken(
                        f"upstream closed the connection before the response headers{why}"))
        elif state == _BODY:
            if self._eof_body and exc is None:
                self._state = _DONE  # a body delimited by the end of the connection
            elif self._error is None:
                self._error = StreamBroken(
                    f"upstream closed the connection mid-body{f': {exc}' if exc else ''}")
            self._wake_reader()
        self._cleanup()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            raise _Junk

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: not the answer
            self._reason = b""
            self._headers = []
            return
        headers = self._headers
        length: int | None = None
        chunked = False
        for name, value in headers:
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                length = int(value)
            elif size == 17 and name.lower() == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        keep = parser.should_keep_alive()
        if self._is_head:
            self._state = _DONE
            self._parser_stale = True
        else:
            self._state = _BODY
            # llhttp's keep-alive answer already says no to a body delimited by EOF
            self._eof_body = length is None and not chunked and status != 204 and status != 304
        self._keep = keep
        sink = self._sink
        if sink is not None:
            sink.head(status, headers)
            return
        fut = self._head_fut
        assert fut is not None
        if not fut.done():
            fut.set_result((status, self._reason.decode("latin-1"), headers,
                            None if chunked else length, not keep))

    def on_body(self, body: bytes) -> None:
        if self._state != _BODY:
            raise _Junk
        sink = self._sink
        if sink is not None:
            sink.body(body)
            return
        self._buf.append(body)
        self._buf_size += len(body)
        if self._body_waiter is not None:
            self._wake_reader()
        if self._buf_size > HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._state == _BODY:
            self._state = _DONE
            if self._body_waiter is not None:
                self._wake_reader()
        # _HEAD: an interim 1xx ended; _DONE: the end of a HEAD response
