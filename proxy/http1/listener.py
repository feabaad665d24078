"""The data-plane listener: the listening socket, the open connections and the drain
(SPEC §7: stop accepting, close idle keep-alives, let in-flight requests finish, cut the
rest at the deadline)."""

from __future__ import annotations

import asyncio

from proxy.http1.protocol import ClientProtocol, ErrorHandler, Handler


class Limits:
    """The ``server`` settings every connection reads; one mutable instance per server, so a
    reload reaches open connections too."""

    __slots__ = ("header_timeout", "body_timeout", "keepalive_timeout", "max_header_bytes",
                 "rejected")

    def __init__(self, header_timeout: float, body_timeout: float, max_header_bytes: int,
                 keepalive_timeout: float = 75.0) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_header_bytes = max_header_bytes
        self.rejected: dict[str, int] = {}  # reason -> count, read by the metrics collector

    def count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class DataPlane:
    """Makes a ``ClientProtocol`` per accepted connection; all share one ``Limits``."""

    def __init__(self, handler: Handler, on_error: ErrorHandler, limits: Limits) -> None:
        self.handler = handler
        self.on_error = on_error
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        self._idle: asyncio.Event | None = None  # set when no connection is busy (drain)

    def __call__(self) -> ClientProtocol:
        return ClientProtocol(self)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Start accepting; returns the bound port. ``reuse_port``: one port shared by the
        worker processes of ``run --workers``."""
        self._server = server = await self.loop.create_server(
            self, host or None, port, backlog=1024, reuse_address=True,
            reuse_port=reuse_port or None)
        for sock in server.sockets:
            return int(sock.getsockname()[1])
        return 0

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def pre_shutdown(self) -> None:
        """Idle connections close now; busy ones after their current answer."""
        for conn in list(self.connections):
            conn.shutdown()

    async def shutdown(self) -> None:
        """Wait until no connection has a request in flight (no time limit: the caller
        bounds it)."""
        while any(conn.busy for conn in self.connections):
            self._idle = asyncio.Event()
            await self._idle.wait()

    def connection_closed(self, conn: ClientProtocol) -> None:
        idle = self._idle
        if idle is not None and not idle.is_set():
            idle.set()

    def request_done(self) -> None:
        """A connection finished an answer: a waiting drain looks again."""
        idle = self._idle
        if idle is not None and not idle.is_set():
            idle.set()

    def cut(self) -> int:
        """Abort every connection now (the drain deadline passed); returns how many.
        connection_lost cancels each handler, which frees its upstream."""
        conns = list(self.connections)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        return len(conns)

    async def aclose(self) -> None:
        """Stop accepting and abort what is still open."""
        self.stop_accepting()
        self.cut()
        if self._server is not None:
            server, self._server = self._server, None
            await server.wait_closed()
