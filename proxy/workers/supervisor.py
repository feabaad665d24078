"""The parent of ``run --workers N``: binds no data port of its own (it reserves the
listener's address so every worker binds the same port with SO_REUSEPORT), starts N
workers and restarts one that dies, validates each config once and sends it to every
worker, serves the one admin API, and drains all workers on SIGTERM.

Without ``state.redis`` it is also the single writer of route state and pins (``hub``).
Worker 0 is the primary: it alone writes the state file (it follows every action like
the others) and notifies config events (``notify``); a refused config reaches it only
for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.config.model import ProxyConfig
from proxy.config.preflight import admin_exposed, split_listen
from proxy.errors import ProxyError
from proxy.events import EventLog
from proxy.reload import ConfigWatcher
from proxy.runtime import ReloadResult, describe_diff, restart_notes
from proxy.tasks import TaskSet
from proxy.workers.channel import Frame
from proxy.workers.hub import Hub
from proxy.workers.worker import PRIVATE_DIR_PREFIX, encode_config

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for every worker to be up at start
RESTART_DELAY_MIN, RESTART_DELAY_MAX = 0.2, 10.0  # backoff for a worker that keeps dying
STABLE_AFTER = 10.0  # a worker up this long resets its backoff
KILL_GRACE = 5.0  # past drain_timeout, a worker still running is killed


@dataclass(frozen=True, slots=True)
class _Held:
    config: ProxyConfig


class WorkerProc:
    """One worker slot: its current process and what it reported."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_port = 0
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()  # its first process ended (before serving, at start)
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def reserve_listener(listen: str) -> tuple[socket.socket, str]:
    """Bind (not listen) the data address with SO_REUSEPORT: the port is this process's
    until the end, so port 0 becomes one port every worker binds, and a port in use fails
    here, once, with the single-process message."""
    host, port = split_listen(listen)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        raise ProxyError(f"cannot listen: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return sock, f"{shown}:{bound}"


class Supervisor:
    """Owns the workers, the hub, the config and the parent's admin listener."""

    def __init__(self, config: ProxyConfig, config_path: str | None, workers: int) -> None:
        self.snapshot = _Held(config)
        self.config_path = config_path
        self.workers = [WorkerProc(i) for i in range(workers)]
        self.events = EventLog()
        self.reloads = {"ok": 0, "refused": 0}
        self.draining = False
        self.hub = Hub(self._welcome, self._on_frame, self._on_gone)
        self.watcher = ConfigWatcher(config_path, self) if config_path else None
        self._dir = ""  # a private directory (mode 0700) for the channel's socket
        self._listener: socket.socket | None = None
        self.listen = config.server.listen
        self._keepers = TaskSet("workers")
        self._admin: web.AppRunner | None = None
        self.admin_port = 0
        self.data_port = 0

    @property
    def _channel(self) -> str:
        return os.path.join(self._dir, "channel.sock")

    @property
    def config(self) -> ProxyConfig:
        return self.snapshot.config

    # -- the channel -----------------------------------------------------------------------
    def _welcome(self, index: int) -> Frame:
        return {"t": "welcome", "config": encode_config(self.config), "listen": self.listen,
                "primary": index == 0}

    def _on_frame(self, index: int, frame: Frame) -> None:
        if frame.get("t") == "ready" and 0 <= index < len(self.workers):
            slot = self.workers[index]
            slot.admin_port = int(frame["admin_port"])
            slot.ready.set()
            logger.info("worker %d (pid %s) serving", index, frame.get("pid"))

    def _on_gone(self, index: int) -> None:
        if 0 <= index < len(self.workers):
            self.workers[index].ready.clear()

    def ready_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.ready.is_set() and self.hub.connected(w.index)]

    # -- config (the ConfigWatcher's target) -----------------------------------------------
    def apply(self, config: ProxyConfig) -> ReloadResult:
        """A config validated here, once: every worker gets it (a worker started later
        gets it in its welcome)."""
        old = self.config
        notes = restart_notes(old, config)
        diff = describe_diff(old, config)
        self.snapshot = _Held(config)
        self.hub.broadcast({"t": "reload", "config": encode_config(config),
                            "listen": self.listen})
        self.reloads["ok"] += 1
        reason = "; ".join([diff, *notes])
        self.events.emit(route=None, kind="reload", actor="config", reason=reason,
                         figures={"sha256": config.sha256, "notes": notes})
        return ReloadResult(ok=True, changed=diff != "no changes", reason=reason, errors=[])

    def refuse(self, errors: list[str]) -> ReloadResult:
        """An invalid config: refused here, once; the workers never see it."""
        self.reloads["refused"] += 1
        self.hub.send(0, {"t": "refused", "errors": errors})  # the primary notifies it
        reason = errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        self.events.emit(route=None, kind="reload_refused", actor="config", reason=reason,
                         figures={"errors": errors})
        return ReloadResult(ok=False, changed=False, reason=reason, errors=errors)

    async def reload_now(self) -> dict[str, Any]:
        if self.watcher is None:
            return {"ok": False, "changed": False, "reason": "no config file", "errors": []}
        return (await self.watcher.check(force=True)).as_json()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from proxy.workers.admin import start_admin

        refused = admin_exposed(self.config, os.environ)
        if refused is not None:
            raise ProxyError(f"admin.listen {refused}")
        self._listener, self.listen = reserve_listener(self.config.server.listen)
        self.data_port = self._listener.getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIX)
        try:
            await self.hub.start(self._channel)
            for slot in self.workers:
                self._keepers.spawn(self._keep(slot), name=f"worker-{slot.index}")
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    await asyncio.gather(*(self._first_start(w) for w in self.workers))
            except TimeoutError:
                raise ProxyError(f"workers not serving after {START_TIMEOUT:g}s") from None
            self._admin, self.admin_port = await start_admin(self)
        except BaseException:
            await self.drain()
            raise
        if self.watcher is not None:
            self.watcher.start()
        logger.info("flipback serving on %s with %d workers, admin on %s", self.listen,
                    len(self.workers), self.config.admin.listen)

    async def _first_start(self, slot: WorkerProc) -> None:
        """Wait for the worker's first process to serve; one that ends first fails the
        start (a bad listener, an import error: the same for every worker)."""
        ready = asyncio.ensure_future(slot.ready.wait())
        exited = asyncio.ensure_future(slot.exited.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not slot.ready.is_set():
            raise ProxyError(f"worker {slot.index} exited during startup (see its log above)")

    async def _keep(self, slot: WorkerProc) -> None:
        """Run one worker slot: start it, and start it again when it dies (backoff
        while it keeps dying), until the drain."""
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY_MIN
        while not self.draining:
            started = loop.time()
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.workers.worker", "--channel", self._channel,
                "--worker", str(slot.index))
            code = await slot.proc.wait()
            slot.ready.clear()
            slot.exited.set()
            if self.draining:
                return
            slot.restarts += 1
            if loop.time() - started > STABLE_AFTER:
                delay = RESTART_DELAY_MIN
            logger.error("worker %d (pid %d) exited with code %d: restarting in %.1fs",
                         slot.index, slot.proc.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def signal_workers(self, sig: signal.Signals) -> None:
        for slot in self.workers:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def drain(self) -> None:
        """Readiness 503, every worker drains (SIGTERM: each stops accepting and finishes
        its in-flight requests up to drain_timeout); one still running after that and
        ``KILL_GRACE`` is killed. Then the admin listener and the hub close."""
        self.draining = True
        if self.watcher is not None:
            await self.watcher.aclose()
        self.signal_workers(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(self.config.server.drain_timeout + KILL_GRACE):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            logger.warning("workers still running after the drain: killing them")
            self.signal_workers(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        await self._keepers.cancel()
        self.signal_workers(signal.SIGKILL)  # one (re)started as the drain began
        if self._admin is not None:
            await self._admin.cleanup()
        await self.hub.aclose()
        if self._listener is not None:
            self._listener.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


async def run_supervisor(config: ProxyConfig, config_path: str | None, workers: int) -> None:
    """``flipback run --workers N``: serve until SIGTERM or SIGINT, then drain every
    worker; a second signal kills the workers still draining."""
    sup = Supervisor(config, config_path, workers)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = TaskSet("sighup", limit=1)
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(sup.reload_now()))
    try:
        await sup.start()
        await stop.wait()
        logger.info("shutting down: draining %d workers for up to %gs", workers,
                    config.server.drain_timeout)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: sup.signal_workers(signal.SIGKILL))
        await sup.drain()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await reloads.aclose(1.0)
