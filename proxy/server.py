"""Composition root: build the runtime, the data-plane server and the admin app; serve
until a shutdown trigger; drain in order (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.admin import RELOAD, admin_token, create_admin_app, is_loopback
from proxy.config import ProxyConfig
from proxy.errors import ProxyError
from proxy.handler import Proxy
from proxy.reload import ConfigWatcher
from proxy.runtime import Runtime
from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _TimedRequestHandler(RequestHandler):
    """aiohttp's protocol plus a header timer (slowloris guard): from the first byte of a
    request (or the connection's start) the client has ``header_timeout`` to finish its
    headers, else the connection is closed. aiohttp itself has no such timer."""

    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hdr_timer: asyncio.TimerHandle | None = None
        self._parsed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._hdr_timer is None and self.header_timeout > 0:
            self._hdr_timer = self._loop.call_later(self.header_timeout, self._expire)

    def _expire(self) -> None:
        self._hdr_timer = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._request_count == self._parsed and self._current_request is None:
            self._arm()  # first bytes of a new request: the clock starts
        super().data_received(data)
        if self._request_count != self._parsed:
            self._parsed = self._request_count
            if self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp logs a full traceback for every malformed client request; one line is
        what an operator wants (the client already got its 400)."""
        exc = kw.get("exc_info")
        detail = str(exc).splitlines()[0] if isinstance(exc, BaseException) else ""
        peer = args[1] if len(args) > 1 else "?"
        logger.info("bad client request from %s: %s", peer, detail.strip())

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._hdr_timer is not None:
            self._hdr_timer.cancel()
            self._hdr_timer = None
        super().connection_lost(exc)


class _DataPlaneServer(web.Server):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handler_cls: type[_TimedRequestHandler] = type(
            "RequestHandler", (_TimedRequestHandler,), {"header_timeout": header_timeout})

    def set_header_timeout(self, seconds: float) -> None:
        self._handler_cls.header_timeout = seconds

    def __call__(self) -> RequestHandler:
        handler: RequestHandler = self._handler_cls(self, loop=self._loop, **self._kwargs)
        return handler


class App:
    """A running flipback: data plane and admin listener over one ``Runtime``. With
    ``config_path``, the file is watched and hot reloaded (SPEC §7)."""

    def __init__(self, config: ProxyConfig, config_path: str | None = None) -> None:
        self.config = config
        self.runtime = Runtime(config)
        self.watcher = ConfigWatcher(config_path, self.runtime) if config_path else None
        self._runners: list[web.BaseRunner] = []
        self.data_port = 0
        self.admin_port = 0
        self._server: _DataPlaneServer | None = None
        self._data_site: web.TCPSite | None = None

    async def start(self) -> None:
        cfg = self.config
        token = admin_token(cfg.admin.token_env)
        admin_host, admin_port = split_listen(cfg.admin.listen)
        loopback = is_loopback(admin_host)
        if not token and not loopback:
            raise ProxyError(
                f"admin.listen {cfg.admin.listen} is not loopback and ${cfg.admin.token_env} "
                "is not set: refusing to expose admin actions without a token"
            )
        await self.runtime.start()
        proxy = Proxy(self.runtime)
        self.runtime.on_apply(self._applied)
        self._server = _DataPlaneServer(
            proxy.handle,
            header_timeout=cfg.server.header_timeout,
            handler_cancellation=True,
            access_log=None,
            max_field_size=16384,
        )
        data_runner = web.ServerRunner(self._server, handle_signals=False)
        await data_runner.setup()
        admin_app = create_admin_app(self.runtime, token=token, loopback_only=loopback)
        if self.watcher is not None:
            watcher = self.watcher

            async def reload_now() -> dict[str, Any]:
                return (await watcher.check(force=True)).as_json()

            admin_app[RELOAD] = reload_now
        admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await admin_runner.setup()
        self._runners = [data_runner, admin_runner]
        host, port = split_listen(cfg.server.listen)
        try:
            self._data_site = web.TCPSite(data_runner, host, port, backlog=1024,
                                          reuse_address=True)
            await self._data_site.start()
            admin_site = web.TCPSite(admin_runner, admin_host, admin_port, reuse_address=True)
            await admin_site.start()
        except OSError as exc:
            await self.aclose()
            raise ProxyError(f"cannot listen: {exc.strerror or exc}") from None
        if self.watcher is not None:
            self.watcher.start()
        self.data_port = _bound_port(data_runner)
        self.admin_port = _bound_port(admin_runner)
        logger.info("flipback serving on %s:%d, admin on %s:%d", host, self.data_port,
                    admin_host, self.admin_port)

    def _applied(self, config: ProxyConfig) -> None:
        if self._server is not None:
            self._server.set_header_timeout(config.server.header_timeout)

    async def reload(self) -> None:
        """SIGHUP: reload the config file now."""
        if self.watcher is not None:
            await self.watcher.check(force=True)

    async def drain(self) -> None:
        """Readiness 503, stop accepting, finish in-flight up to drain_timeout, close."""
        self.runtime.draining = True
        timeout = self.config.server.drain_timeout
        if self._data_site is not None:
            await self._data_site.stop()
        if self._server is not None:
            self._server.pre_shutdown()  # close idle keep-alive connections now
            try:
                await asyncio.wait_for(self._server.shutdown(timeout), timeout + 1)
            except TimeoutError:
                logger.warning("drain timeout: %d requests cut", len(self._server.connections))
        await self.aclose()

    async def aclose(self) -> None:
        if self.watcher is not None:
            await self.watcher.aclose()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners = []
        await self.runtime.aclose()


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


async def serve(
    config: ProxyConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    on_started: Callable[[App], None] | None = None,
    config_path: str | None = None,
) -> None:
    """Run until ``shutdown_trigger`` completes (default: SIGTERM or SIGINT), then drain.
    A second signal during the drain exits at once."""
    app = App(config, config_path)
    await app.start()
    if on_started is not None:
        on_started(app)
    loop = asyncio.get_running_loop()
    reloads = TaskSet("sighup", limit=1)
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(app.reload()))
    stop = asyncio.Event()
    if shutdown_trigger is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        shutdown_trigger = stop.wait
    try:
        await shutdown_trigger()
        logger.info("shutting down: draining for up to %gs", config.server.drain_timeout)
        drain = asyncio.ensure_future(app.drain())
        forced = asyncio.Event()
        if stop.is_set():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, forced.set)
        force_wait = asyncio.ensure_future(forced.wait())
        done, _ = await asyncio.wait({drain, force_wait}, return_when=asyncio.FIRST_COMPLETED)
        force_wait.cancel()
        if drain not in done:
            logger.warning("second signal: exiting without waiting for in-flight requests")
            drain.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await reloads.aclose(1.0)
