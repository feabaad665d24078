"""The live state of a running proxy: one immutable ``Snapshot`` swapped as a whole.

The request path reads ``runtime.snapshot`` once and keeps it, so a reload in the middle
of a request never moves that request (SPEC §7). Pools and rollouts are long-lived
objects that a new snapshot carries over by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy.config import ProxyConfig
from proxy.events import EventLog
from proxy.metrics import Metrics, RouteGauges
from proxy.rollout import Rollout
from proxy.routing import RouteTable
from proxy.statefile import StateWriter, load_state
from proxy.upstream import UpstreamPool

logger = logging.getLogger(__name__)

TICK = 0.1  # seconds between hung-canary checks and progressive steps


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: ProxyConfig
    table: RouteTable[Rollout]
    rollouts: dict[str, Rollout]
    pools: dict[str, UpstreamPool]

    def __repr__(self) -> str:
        return f"<Snapshot {len(self.rollouts)} routes, {len(self.pools)} upstreams>"


class Runtime:
    """Owns pools, rollouts, events, metrics and the state file for one proxy process."""

    def __init__(self, config: ProxyConfig, *, metrics: Metrics | None = None) -> None:
        self.events = EventLog()
        self.metrics = metrics or Metrics()
        self.started = time.time()
        self.draining = False
        self._writer = StateWriter(config.state.file, self.state_dict)
        self.snapshot = self._build(config, previous=None)
        self.metrics.set_config(config.sha256)
        self.metrics.set_sources(self._route_gauges, self._upstream_health)
        self._ticker: asyncio.Task[None] | None = None
        self._restore(load_state(config.state.file))
        self.events.subscribe(_log_event)

    # -- building -----------------------------------------------------------------------
    def _build(self, config: ProxyConfig, previous: Snapshot | None) -> Snapshot:
        pools = {name: UpstreamPool(cfg) for name, cfg in config.upstreams.items()}
        rollouts: dict[str, Rollout] = {}
        for route in config.routes:
            rollouts[route.name] = Rollout(
                route=route,
                pools=pools,
                events=self.events,
                metrics=self.metrics,
                on_change=self._writer.schedule,
            )
        table = RouteTable([(r.match, rollouts[r.name]) for r in config.routes])
        return Snapshot(config=config, table=table, rollouts=rollouts, pools=pools)

    def _restore(self, saved: dict[str, Any]) -> None:
        routes = saved.get("routes")
        if not isinstance(routes, dict):
            return
        for name, state in routes.items():
            rollout = self.snapshot.rollouts.get(name)
            if rollout is not None and isinstance(state, dict):
                rollout.restore(state)
                if rollout.latch is not None:
                    logger.warning("route %s restored rolled_back: %s", name,
                                   rollout.latch.get("detail"))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "routes": {name: r.state_dict() for name, r in self.snapshot.rollouts.items()},
        }

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._writer.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="rollout-tick")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for rollout in self.snapshot.rollouts.values():
                try:
                    rollout.tick()
                except Exception:  # one broken route must not stop the watch of the others
                    logger.exception("rollout tick failed for %s", rollout.name)

    async def aclose(self, timeout: float = 5.0) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self._writer.aclose()
        await asyncio.gather(*(p.aclose(timeout) for p in self.snapshot.pools.values()))

    async def flush_state(self) -> None:
        await self._writer.flush()

    # -- views ----------------------------------------------------------------------------
    def rollout(self, name: str) -> Rollout | None:
        return self.snapshot.rollouts.get(name)

    def _route_gauges(self) -> Iterator[RouteGauges]:
        for r in self.snapshot.rollouts.values():
            yield RouteGauges(route=r.name, state=r.state, canary_weight=r.effective_weight,
                              sticky_sessions=0)

    def _upstream_health(self) -> Iterator[tuple[str, bool | None]]:
        for name in self.snapshot.pools:
            yield name, None


def _log_event(event: Any) -> None:
    logger.warning("event %s route=%s actor=%s: %s", event.kind, event.route, event.actor,
                   event.reason)
