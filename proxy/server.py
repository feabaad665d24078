"""Composition root: build the runtime, the data-plane server and the admin app; serve
until a shutdown trigger; drain in order (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.admin import RELOAD, admin_token, create_admin_app
from proxy.config.model import ProxyConfig, ServerConfig
from proxy.config.preflight import admin_exposed, is_loopback, split_listen
from proxy.errors import ProxyError
from proxy.handler import Proxy
from proxy.http1.listener import DataPlane, Limits
from proxy.reload import ConfigWatcher
from proxy.runtime import Runtime
from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)


class App:
    """A running flipback: data plane and admin listener over one ``Runtime``. With
    ``config_path``, the file is watched and hot reloaded (SPEC §7)."""

    def __init__(self, config: ProxyConfig, config_path: str | None = None, *,
                 runtime: Runtime | None = None, reuse_port: bool = False) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
        self.reuse_port = reuse_port  # one listener shared by the workers of run --workers
        self.watcher = ConfigWatcher(config_path, self.runtime) if config_path else None
        self._runners: list[web.BaseRunner] = []
        self.data_port = 0
        self.admin_port = 0
        self._server: DataPlane | None = None

    async def start(self) -> None:
        cfg = self.config
        token = admin_token(cfg.admin.token_env)
        admin_host, admin_port = split_listen(cfg.admin.listen)
        loopback = is_loopback(admin_host)
        refused = admin_exposed(cfg, os.environ)
        if refused is not None:
            raise ProxyError(f"admin.listen {refused}")
        await self.runtime.start()
        limits = Limits(cfg.server.header_timeout, cfg.server.body_timeout,
                        cfg.server.max_header_bytes, cfg.server.keepalive_timeout)
        proxy = Proxy(self.runtime, limits)
        self.runtime.on_apply(self._applied)
        # Request bodies pass byte for byte, Content-Encoding and all: the upstream
        # decodes them, and max_body counts the bytes on the wire.
        self._server = server = DataPlane(proxy.handle, proxy.fail, limits)
        self.runtime.metrics.set_client_sources(lambda: len(server.connections),
                                                lambda: limits.rejected)
        admin_app = create_admin_app(self.runtime, token=token, loopback_only=loopback)
        if self.watcher is not None:
            watcher = self.watcher

            async def reload_now() -> dict[str, Any]:
                return (await watcher.check(force=True)).as_json()

            admin_app[RELOAD] = reload_now
        admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await admin_runner.setup()
        self._runners = [admin_runner]
        host, port = split_listen(cfg.server.listen)
        try:
            self.data_port = await server.listen(host, port, reuse_port=self.reuse_port)
            admin_site = web.TCPSite(admin_runner, admin_host, admin_port, reuse_address=True)
            await admin_site.start()
        except OSError as exc:
            await self.aclose()
            raise ProxyError(f"cannot listen: {exc.strerror or exc}") from None
        if self.watcher is not None:
            self.watcher.start()
        self.admin_port = _bound_port(admin_runner)
        logger.info("flipback serving on %s:%d, admin on %s:%d", host, self.data_port,
                    admin_host, self.admin_port)

    def _applied(self, config: ProxyConfig) -> None:
        server = self._server
        if server is not None:
            _set_limits(server, config.server)

    async def reload(self) -> None:
        """SIGHUP: reload the config file now."""
        if self.watcher is not None:
            await self.watcher.check(force=True)

    async def drain(self) -> None:
        """Readiness 503, stop accepting, finish in-flight up to drain_timeout, close."""
        self.runtime.draining = True
        timeout = self.config.server.drain_timeout
        server = self._server
        if server is not None:
            server.stop_accepting()
            server.pre_shutdown()  # close idle keep-alive connections now
            try:
                async with asyncio.timeout(timeout):
                    await server.shutdown()  # each connection: its handler finishes
            except TimeoutError:
                logger.warning("drain timeout: %d requests cut", server.cut())
                await self.aclose(upstream_grace=0.5)  # cut ones free their upstreams
                return
        await self.aclose()

    async def aclose(self, upstream_grace: float = 5.0) -> None:
        """Close listeners and connections, then the runtime; upstream exchanges still
        open (shadow copies) get ``upstream_grace`` seconds."""
        if self.watcher is not None:
            await self.watcher.aclose()
        if self._server is not None:
            await self._server.aclose()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners = []
        await self.runtime.aclose(upstream_grace)


def _set_limits(server: DataPlane, cfg: ServerConfig) -> None:
    limits = server.limits
    limits.header_timeout = cfg.header_timeout
    limits.body_timeout = cfg.body_timeout
    limits.max_header_bytes = cfg.max_header_bytes
    limits.keepalive_timeout = cfg.keepalive_timeout


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
    runtime: Runtime | None = None,
    reuse_port: bool = False,
) -> None:
    """Run until ``shutdown_trigger`` completes (default: SIGTERM or SIGINT), then drain.
    A second signal during the drain exits at once."""
    app = App(config, config_path, runtime=runtime, reuse_port=reuse_port)
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
