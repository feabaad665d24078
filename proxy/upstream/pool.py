"""The connection pool for one upstream: lean HTTP/1.1 keep-alive on asyncio protocols.

This replaces aiohttp's ClientSession on the hot path, where its client cost about half of
a proxied request's CPU. Constant bytes (request-line suffix, Host, configured headers) are
encoded once here; a request is one ``b"".join`` and one ``write``. Errors reach the caller
only as ``proxy.errors.UpstreamError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable

from proxy.config.model import UpstreamConfig
from proxy.errors import ConnectFailed, Saturated, StreamBroken, UpstreamError, UpstreamTimeout
from proxy.tasks import TaskSet
from proxy.upstream.conn import Connection, Sink, StaleConnection

__all__ = ["Sink", "UpstreamPool", "UpstreamResponse"]

# Keep-alive connections idle this long are closed (model servers often drop them at 60 s+,
# and a closed-while-sending connection costs a retry).
IDLE_TTL = 30.0
# Timeouts are checked by one pool-wide tick, not a timer per request: a uvloop timer costs
# ~2 us to arm and cancel, a fifth of a pooled request. The tick is a tenth of the shortest
# timeout, within these bounds, so a timeout fires at most 10% (or 1 s) late.
TICK_MIN, TICK_MAX = 0.005, 1.0

_DEFAULT_PORTS = {"http": 80, "https": 443}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _header_line(name: str, value: str) -> bytes:
    line = f"{name}: {value}"
    if any(c in line for c in "\r\n\0"):
        raise ValueError(f"invalid header {name!r}: control character")
    return line.encode("latin-1") + b"\r\n"


class UpstreamResponse:
    """Status and headers of an upstream response; the body is pulled with ``read``.

    ``headers`` are raw and in order, hop-by-hop headers included. ``content_length`` is
    the header's value (None when chunked or absent); HEAD/204/304 bodies are empty
    whatever it says. ``release`` must be called exactly when the caller is done.
    """

    __slots__ = ("status", "reason", "headers", "content_length", "will_close", "_conn")

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]],
                 content_length: int | None, will_close: bool, conn: Connection) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.will_close = will_close
        self._conn: Connection | None = conn

    async def read(self) -> bytes:
        """Return the body bytes received so far (waiting for some if none), b"" at the end.

        Raises UpstreamTimeout after ``idle_timeout`` without a byte, StreamBroken if the
        connection breaks first. Cancelling it aborts the upstream connection.
        """
        conn = self._conn
        if conn is None:
            return b""
        return await conn.read()

    def read_nowait(self) -> bytes | None:
        """What ``read`` would return without waiting: body bytes, b"" at the end, or
        None when it would wait (or raise). Saves a coroutine per chunk already here."""
        conn = self._conn
        if conn is None:
            return b""
        return conn.read_nowait()

    @property
    def body_ready(self) -> bool:
        """Body bytes (or the body's end) came with the headers: ``read`` will not wait."""
        conn = self._conn
        return conn is not None and conn.body_ready

    def release(self) -> None:
        """Done with the response: a complete one returns its connection to the pool, an
        unfinished one aborts it (the upstream sees the disconnect and stops)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.release()

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"


class UpstreamPool:
    """At most ``max_connections`` connections to one upstream, reused LIFO.

    Requests that find every connection busy wait FIFO; past ``max_pending`` waiters a
    request fails at once with Saturated. The constructor does no I/O; the event loop is
    taken at first use.
    """

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._host = cfg.host.strip("[]")  # the socket wants a bare IPv6 address
        self._port = cfg.port
        self._tls = cfg.scheme == "https"
        self._ssl: ssl.SSLContext | None = None
        self._connect_timeout = cfg.connect_timeout
        self._timeout = cfg.timeout
        self._idle_timeout = cfg.idle_timeout
        self._max_connections = max(1, cfg.max_connections)
        self._max_pending = cfg.max_pending
        host = f"[{self._host}]" if ":" in self._host else self._host
        if cfg.port != _DEFAULT_PORTS.get(cfg.scheme):
            host = f"{host}:{cfg.port}"
        self._host_line = _header_line("Host", host)
        self._base_path = cfg.base_path.rstrip("/").encode()
        self._extra = b"".join(_header_line(n, v) for n, v in cfg.headers)
        self._override = frozenset(n.lower().encode("latin-1") for n, _ in cfg.headers)
        self.timeout_msg = f"no response headers within {cfg.timeout:g}s"
        self._tick_every = min(max(min(cfg.timeout, cfg.idle_timeout) / 10, TICK_MIN), TICK_MAX)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[Connection] = []  # a stack: the most recently used is on top
        self._busy: set[Connection] = set()
        # (deadline, future): a future gets a connection, or None for a free slot
        self._waiters: deque[tuple[float, asyncio.Future[Connection | None]]] = deque()
        self._n_conns = 0  # busy + idle + connecting, including slots handed to waiters
        self._ticker: asyncio.TimerHandle | None = None
        self._closing = False
        self._drained: asyncio.Future[None] | None = None
        # Detached requests waiting for a connection. Only the path without an idle
        # connection spawns one (a connect or a wait for a slot costs far more).
        self._detaching = TaskSet(f"upstream-{self.name}-detached")

    @property
    def in_flight(self) -> int:
        """Requests holding a connection (sending, awaiting headers or streaming a body)."""
        return len(self._busy)

    @property
    def pending(self) -> int:
        """Requests waiting for a connection."""
        return len(self._waiters)

    @property
    def idle(self) -> int:
        """Open keep-alive connections with nothing to do."""
        return len(self._idle)

    @property
    def buffered(self) -> int:
        """Unread response body bytes held across busy connections (for tests and stats)."""
        return sum(conn.buffered for conn in self._busy)

    def __repr__(self) -> str:
        return (f"<UpstreamPool {self.name} [{self.in_flight} in flight, {self.pending} "
                f"pending, {self.idle} idle]>")

    async def send(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                   body: bytes | AsyncIterable[bytes] | None, *,
                   content_length: int | None = None) -> UpstreamResponse:
        """Send a request; return once the response status and headers are in.

        ``target`` is the client's path and query; ``headers`` must not hold Host,
        Content-Length, Transfer-Encoding or Connection. Raises ConnectFailed (nothing
        sent), Saturated (nothing sent), UpstreamTimeout or StreamBroken. An error from
        an iterable ``body`` comes out as StreamBroken with the original as ``__cause__``.
        Cancelling it aborts the upstream connection.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        replayable = body is None or isinstance(body, bytes)
        head = self._head(method, target, headers, body, content_length)
        is_head = method == "HEAD"
        fresh = False
        idle = self._idle
        while True:
            if idle and not fresh and not self._closing:  # the common case: no coroutine
                conn = idle.pop()
                self._busy.add(conn)
            else:
                conn = await self._acquire(loop, deadline, fresh)
            fut = conn.start(head, is_head, deadline)
            if body is not None and not isinstance(body, bytes):
                conn.start_body(body, content_length)
            if self._ticker is None:
                self._ticker = loop.call_later(self._tick_every, self._tick)
            try:
                return UpstreamResponse(*await fut, conn)
            except StaleConnection:
                if fresh or not replayable:
                    raise StreamBroken("upstream closed the keep-alive connection before the "
                                       "response headers") from None
                fresh = True  # the upstream dropped a pooled connection: retry once, anew
            except BaseException:
                conn.fail(StreamBroken("request abandoned"))
                raise

    def send_detached(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes | None, sink: Sink, extra: bytes = b"") -> None:
        """Send a request whose response goes to ``sink`` (see ``Sink``); never raises
        and never calls ``sink`` before returning. ``extra`` is more header lines, encoded.

        With an idle connection this is one ``write`` and nothing else: no task, no
        future, no timer (timeouts are the pool's tick). Otherwise a task waits for a
        connection first. A stale keep-alive connection is retried once, anew.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        window = sink.deadline - loop.time()
        if window < self._tick_every * 10 and self._tick_every > TICK_MIN:
            self._tick_every = max(window / 10, TICK_MIN)  # the timeout is checked in time
        head = self._head(method, target, headers, body, None, extra)
        is_head = method == "HEAD"
        idle = self._idle
        if idle and not self._closing:
            conn = idle.pop()
            self._busy.add(conn)
            self._start_detached(loop, conn, head, is_head, sink)
        else:
            self._spawn_detached(loop, head, is_head, sink, fresh=False)

    def resend_detached(self, head: bytes, is_head: bool, sink: Sink) -> None:
        """A detached request met a stale keep-alive connection: once more, anew."""
        assert self._loop is not None
        self._spawn_detached(self._loop, head, is_head, sink, fresh=True)

    def _start_detached(self, loop: asyncio.AbstractEventLoop, conn: Connection, head: bytes,
                        is_head: bool, sink: Sink) -> None:
        conn.start_detached(head, is_head, min(loop.time() + self._timeout, sink.deadline),
                            sink)
        if self._ticker is None:
            self._ticker = loop.call_later(self._tick_every, self._tick)

    def _spawn_detached(self, loop: asyncio.AbstractEventLoop, head: bytes, is_head: bool,
                        sink: Sink, *, fresh: bool) -> None:
        self._detaching.spawn(self._detached_via_wait(loop, head, is_head, sink, fresh))

    async def _detached_via_wait(self, loop: asyncio.AbstractEventLoop, head: bytes,
                                 is_head: bool, sink: Sink, fresh: bool) -> None:
        try:
            conn = await self._acquire(loop, min(loop.time() + self._timeout, sink.deadline),
                                       fresh)
        except UpstreamError as exc:
            sink.failed(exc)
            return
        except asyncio.CancelledError:
            sink.failed(ConnectFailed(f"upstream {self.name}: pool is closed"))
            raise
        if conn.closed:  # closed (and forgotten) before we ran: nothing was sent
            sink.failed(StreamBroken("keep-alive connection closed before the request"))
            return
        if self._closing:  # connected while the pool closed: its tick is gone too
            conn.close()
            sink.failed(ConnectFailed(f"upstream {self.name}: pool is closed"))
            return
        self._start_detached(loop, conn, head, is_head, sink)

    def _head(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
              body: bytes | AsyncIterable[bytes] | None, content_length: int | None,
              extra: bytes = b"") -> bytes:
        """The request line and headers (and a bytes body), encoded as one write."""
        parts = [method.encode(), b" ", self._base_path,
                 target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\n", self._host_line]
        override = self._override
        if override:
            for name, value in headers:
                if name.lower() not in override:
                    parts += (name, b": ", value, b"\r\n")
        else:
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
        parts.append(self._extra)
        if extra:
            parts.append(extra)
        if body is None:
            parts.append(b"\r\n")
        elif isinstance(body, bytes):
            if body or method in _BODY_METHODS:
                parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
                parts.append(body)
            else:
                parts.append(b"\r\n")
        elif content_length is None:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n\r\n" % content_length)
        return b"".join(parts)

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float,
                       fresh: bool) -> Connection:
        """A connection for one request, counted in ``in_flight``."""
        if self._closing:
            raise ConnectFailed(f"upstream {self.name}: pool is closed")
        idle = self._idle
        if fresh:
            while idle and self._n_conns >= self._max_connections:
                idle.pop(0).close()  # make room for a new connection: the oldest goes
        elif idle:
            conn = idle.pop()
            self._busy.add(conn)
            return conn
        if self._n_conns < self._max_connections:
            self._n_conns += 1
            return await self._connect(loop, deadline)
        if len(self._waiters) >= self._max_pending:
            raise Saturated(f"upstream {self.name}: {len(self._waiters)} requests already "
                            "wait for a connection")
        fut: asyncio.Future[Connection | None] = loop.create_future()
        entry = (deadline, fut)
        self._waiters.append(entry)
        if self._ticker is None:
            self._ticker = loop.call_later(self._tick_every, self._tick)
        try:
            got = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # handed a connection or a slot in the same tick we were cancelled
                got = fut.result()
                if got is None:  # the slot was counted for us: uncount it, pass it on
                    self._n_conns -= 1
                    self._slot_freed()
                else:
                    self.put_back(got)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise
        if got is None:  # a connection closed and left its slot to us
            return await self._connect(loop, deadline)
        if got.closed:  # the upstream closed it before we ran: queue again, nothing sent
            return await self._acquire(loop, deadline, fresh)
        return got

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        """Open a connection in a slot the caller already counted in ``_n_conns``."""
        conn = Connection(self, loop, self._idle_timeout)
        self._busy.add(conn)
        if self._closing:
            conn.fail(ConnectFailed("pool is closed"))
            raise ConnectFailed(f"upstream {self.name}: pool is closed")
        connect_by = loop.time() + self._connect_timeout
        try:
            async with asyncio.timeout_at(min(deadline, connect_by)):
                if self._tls:
                    if self._ssl is None:
                        self._ssl = ssl.create_default_context()
                    await loop.create_connection(lambda: conn, self._host, self._port,
                                                 ssl=self._ssl, server_hostname=self._host)
                else:
                    await loop.create_connection(lambda: conn, self._host, self._port)
        except TimeoutError as exc:
            conn.fail(exc)
            if deadline < connect_by:
                raise UpstreamTimeout(self.timeout_msg) from None
            raise ConnectFailed(f"upstream {self.name}: connect timed out after "
                                f"{self._connect_timeout:g}s") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS
            conn.fail(exc)
            raise ConnectFailed(f"upstream {self.name}: cannot connect to "
                                f"{self._host}:{self._port}: {exc}") from exc
        except BaseException as exc:
            conn.fail(exc)
            raise
        return conn

    # -- called by connections ---------------------------------------------------------

    def put_back(self, conn: Connection) -> None:
        """A connection finished a response cleanly: next waiter first, else idle."""
        if self._closing:
            conn.close()
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_result(conn)  # stays in _busy for its new owner
                return
        self._busy.discard(conn)
        assert self._loop is not None
        conn.idle_since = self._loop.time()
        self._idle.append(conn)

    def forget(self, conn: Connection) -> None:
        """A connection closed (either side): drop it and free its slot. Once per conn."""
        if conn in self._busy:
            self._busy.remove(conn)
        else:
            with contextlib.suppress(ValueError):  # already popped by the pool
                self._idle.remove(conn)
        self._n_conns -= 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        if self._closing:
            if not self._busy and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()[1]
            if not fut.done():
                self._n_conns += 1
                fut.set_result(None)
                return

    def _tick(self) -> None:
        """Expire late headers, body gaps and waits; close long-idle connections. Runs
        while the pool has any connection or waiter."""
        self._ticker = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if self._busy:
            for conn in list(self._busy):
                conn.check(now, self.timeout_msg)
        if self._waiters:
            for deadline, fut in list(self._waiters):
                if deadline <= now and not fut.done():
                    fut.set_exception(UpstreamTimeout(self.timeout_msg))
        idle = self._idle
        cutoff = now - IDLE_TTL
        while idle and idle[0].idle_since <= cutoff:
            idle.pop(0).close()
        if self._busy or self._waiters or idle:
            self._ticker = loop.call_later(self._tick_every, self._tick)

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop taking requests, close idle connections now, let in-flight responses finish
        for up to ``timeout`` seconds (None: no limit), then abort what is left."""
        self._closing = True
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_exception(ConnectFailed(f"upstream {self.name}: pool is closed"))
        while self._idle:
            self._idle.pop().close()
        if not self._busy:
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._drained)
        except TimeoutError:
            pass
        for conn in list(self._busy):
            conn.fail(StreamBroken(f"upstream {self.name}: pool closed"))
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
