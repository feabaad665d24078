"""Active health probes (SPEC §5 Health): one loop per upstream with ``health.path``, shared
by every route that uses the upstream, never on the request path.

State per upstream: None until the first verdict, then True/False. The first good probe
makes an unknown upstream healthy (a fresh canary becomes ready without waiting
``healthy_after`` intervals); after that it takes ``unhealthy_after`` failed probes in a
row to turn unhealthy and ``healthy_after`` good ones to turn healthy again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy.config.model import HealthConfig
from proxy.errors import UpstreamError
from proxy.tasks import TaskSet
from proxy.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)

_PROBE_HEADERS = [(b"User-Agent", b"flipback-health"), (b"Accept", b"*/*")]

Listener = Callable[[str, bool], None]


class _Probe:
    """The probe loop of one upstream and its verdict."""

    def __init__(self, name: str, pool: UpstreamPool, cfg: HealthConfig,
                 on_change: Listener) -> None:
        self.name = name
        self.pool = pool
        self.cfg = cfg
        self.healthy: bool | None = None
        self._good = 0
        self._bad = 0
        self._on_change = on_change
        self._tasks = TaskSet(f"health-{name}", limit=1)
        self.probes = 0

    def start(self) -> None:
        self._tasks.spawn(self._run(), name=f"health-{self.name}")

    async def aclose(self) -> None:
        await self._tasks.cancel()

    async def _run(self) -> None:
        while True:
            ok = await self.probe()
            self._judge(ok)
            await asyncio.sleep(self.cfg.interval)

    async def probe(self) -> bool:
        """One GET of ``health.path``: healthy iff a 2xx arrives within ``timeout``."""
        assert self.cfg.path is not None
        self.probes += 1
        try:
            async with asyncio.timeout(self.cfg.timeout):
                resp = await self.pool.send("GET", self.cfg.path, list(_PROBE_HEADERS), None)
                try:
                    while await resp.read():
                        pass
                finally:
                    resp.release()
                return 200 <= resp.status < 300
        except (UpstreamError, TimeoutError):
            return False

    def _judge(self, ok: bool) -> None:
        if ok:
            self._good += 1
            self._bad = 0
            if self.healthy is None or (not self.healthy and
                                        self._good >= self.cfg.healthy_after):
                self._set(True)
        else:
            self._bad += 1
            self._good = 0
            if self.healthy is not False and self._bad >= self.cfg.unhealthy_after:
                self._set(False)

    def _set(self, healthy: bool) -> None:
        self.healthy = healthy
        logger.warning("upstream %s is %s", self.name, "healthy" if healthy else "UNHEALTHY")
        self._on_change(self.name, healthy)


class HealthChecker:
    """All probe loops of a process; tells ``on_change`` of every transition."""

    def __init__(self, on_change: Listener) -> None:
        self._probes: dict[str, _Probe] = {}
        self._on_change = on_change
        self._running = False

    def healthy(self, upstream: str) -> bool | None:
        """True/False for a probed upstream, None when not probed (or not judged yet)."""
        probe = self._probes.get(upstream)
        return probe.healthy if probe is not None else None

    def is_probed(self, upstream: str) -> bool:
        return upstream in self._probes

    def reconcile(self, pools: dict[str, UpstreamPool]) -> list[_Probe]:
        """Match the probe loops to the upstreams (at start and after a reload): a probe
        whose pool and settings did not change keeps running and keeps its verdict.
        Returns the probes that must be closed."""
        retired: list[_Probe] = []
        for name, probe in list(self._probes.items()):
            pool = pools.get(name)
            if pool is None or pool is not probe.pool or pool.cfg.health != probe.cfg:
                retired.append(self._probes.pop(name))
        for name, pool in pools.items():
            if pool.cfg.health.path is not None and name not in self._probes:
                probe = _Probe(name, pool, pool.cfg.health, self._on_change)
                self._probes[name] = probe
                if self._running:
                    probe.start()
        return retired

    def start(self) -> None:
        self._running = True
        for probe in self._probes.values():
            probe.start()

    async def aclose(self) -> None:
        self._running = False
        await asyncio.gather(*(p.aclose() for p in self._probes.values()))

    def __repr__(self) -> str:
        states = ", ".join(f"{n}={p.healthy}" for n, p in self._probes.items())
        return f"<HealthChecker {states}>"
