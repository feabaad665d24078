"""The live state of a running proxy: one immutable ``Snapshot`` swapped as a whole.

The request path reads ``runtime.snapshot`` once and keeps it, so a reload in the middle
of a request never moves that request (SPEC §7). Pools and rollouts are long-lived
objects that a new snapshot carries over by name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config.model import (
    CompareConfig,
    NotifyConfig,
    ProxyConfig,
    RouteConfig,
    ShadowConfig,
)
from proxy.events import Event, EventLog
from proxy.fleet.link import FleetLink
from proxy.guard.feedback import parse_feedback
from proxy.llm.lane import LlmLane
from proxy.llm.window import LlmWindow
from proxy.metrics import Metrics, RouteGauges
from proxy.notify import Notifier
from proxy.rollout.machine import Rollout
from proxy.routing import RouteTable
from proxy.shadow.mirror import ShadowMirror
from proxy.statefile import StateWriter, load_state, route_state
from proxy.tasks import TaskSet
from proxy.upstream.health import HealthChecker
from proxy.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)

# Builds a fleet link from the live rollouts (``proxy.workers.link.WorkerLink``).
LinkFactory = Callable[[Callable[[], Mapping[str, Rollout]]], FleetLink]

# Events every worker of ``run --workers`` has alike (each applies the config and probes
# the upstreams itself): notified by the primary alone.
PRIMARY_NOTIFIES = frozenset({"reload", "reload_refused", "canary_unhealthy", "canary_healthy"})

TICK = 0.1  # seconds between hung-canary checks and progressive steps


def _no_pairs_yet(kind: str, primary: Any, copy: Any) -> None:
    """A pair mirror's sink until its rollout sets itself (in ``Rollout.__init__``)."""
RETIRE_GRACE = 2.0  # seconds a replaced pool keeps taking requests after a reload


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool
    reason: str
    errors: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "changed": self.changed, "reason": self.reason,
                "errors": self.errors}


def restart_notes(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """What a reload cannot change in a running process: one note per such field."""
    return [f"{field} changed: needs a restart (still {before})"
            for field, before, after in (
                ("server.listen", old.server.listen, new.server.listen),
                ("admin.listen", old.admin.listen, new.admin.listen),
                ("admin.token_env", old.admin.token_env, new.admin.token_env),
                ("state.file", old.state.file, new.state.file),
                ("state.redis", old.state.redis, new.state.redis),
            ) if before != after]


def describe_diff(old: ProxyConfig, new: ProxyConfig) -> str:
    """A short human diff: ``routes +a -b ~c; upstreams ~x``."""
    parts: list[str] = []
    for label, before, after in (
        ("upstreams", dict(old.upstreams), dict(new.upstreams)),
        ("routes", {r.name: r for r in old.routes}, {r.name: r for r in new.routes}),
    ):
        marks = [f"+{n}" for n in after if n not in before]
        marks += [f"-{n}" for n in before if n not in after]
        marks += [f"~{n}" for n in after if n in before and before[n] != after[n]]
        if marks:
            parts.append(f"{label} {' '.join(marks)}")
    if [r.name for r in old.routes if r.name in {x.name for x in new.routes}] != [
        r.name for r in new.routes if r.name in {x.name for x in old.routes}
    ]:
        parts.append("routes reordered")
    for section in ("server", "admin", "state", "log", "notify"):
        if getattr(old, section) != getattr(new, section):
            parts.append(f"{section} changed")
    return "; ".join(parts) or "no changes"


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: ProxyConfig
    table: RouteTable[Rollout]
    rollouts: dict[str, Rollout]
    pools: dict[str, UpstreamPool]
    # Some route has guard.feedback: the data listener answers POST /feedback itself.
    takes_feedback: bool = False

    def __repr__(self) -> str:
        return f"<Snapshot {len(self.rollouts)} routes, {len(self.pools)} upstreams>"


class Runtime:
    """Owns pools, rollouts, events, metrics and the state file for one proxy process."""

    def __init__(self, config: ProxyConfig, *, metrics: Metrics | None = None,
                 link: LinkFactory | None = None, primary: bool = True) -> None:
        """``link`` (a worker of ``run --workers``, no ``state.redis``): the link to the
        parent's hub, in FleetLink's place. Not ``primary`` (the other workers): the state
        file is read at start but written by the primary alone, and config events (every
        worker has them) are notified by the primary alone."""
        self.events = EventLog()
        self.metrics = metrics or Metrics()
        self.draining = False
        self._primary = primary
        self._writer = StateWriter(config.state.file if primary else None, self.state_dict)
        self._started = False
        self._ticks = TaskSet("rollout-tick", limit=1)
        self._background = TaskSet("runtime")
        self._on_apply: list[Callable[[ProxyConfig], None]] = []
        self.health = HealthChecker(self._health_changed)
        self.snapshot = self._build(config, previous=None)
        self._follow_health(self.snapshot)
        self.metrics.set_config(config.sha256)
        self.metrics.set_sources(self._route_gauges, self._upstream_health, self._upstream_info)
        self._restore(load_state(config.state.file))
        # Fleet state (state.redis): Redis's state, once reached, wins over the file's.
        self.fleet: FleetLink | None = None
        if config.state.redis:
            self.fleet = FleetLink(config.state.redis, rollouts=lambda: self.snapshot.rollouts)
            self.fleet.attach(self.snapshot.rollouts)
            self.metrics.set_redis_source(self.fleet.gauges)
        elif link is not None:
            self.fleet = link(lambda: self.snapshot.rollouts)
            self.fleet.attach(self.snapshot.rollouts)
        self.events.subscribe(_log_event)
        self.notifier: Notifier | None = None
        self.events.subscribe(self._notify)
        self._set_notify(config.notify)

    # -- building -----------------------------------------------------------------------
    def _build(self, config: ProxyConfig, previous: Snapshot | None) -> Snapshot:
        """A new snapshot; with ``previous``, unchanged upstreams keep their pools and
        every route carries its windows (and, for the same rollout, its latch) over."""
        old_pools = previous.pools if previous is not None else {}
        pools: dict[str, UpstreamPool] = {}
        for name, cfg in config.upstreams.items():
            old = old_pools.get(name)
            pools[name] = old if old is not None and old.cfg == cfg else UpstreamPool(cfg)
        rollouts: dict[str, Rollout] = {}
        for route in config.routes:
            old_rollout = previous.rollouts.get(route.name) if previous is not None else None
            rollout = Rollout(
                route=route,
                pools=pools,
                events=self.events,
                metrics=self.metrics,
                on_change=self._writer.schedule,
                shadow=self._mirror(route, pools, old_rollout),
                pairs=self._pairs(route, pools, old_rollout),
            )
            if old_rollout is not None:
                rollout.adopt(old_rollout)
            rollouts[route.name] = rollout
        table = RouteTable([(r.match, rollouts[r.name]) for r in config.routes])
        self.metrics.declare_routes(rollouts)
        feedback = any(r.guard is not None and r.guard.feedback is not None
                       for r in config.routes)
        return Snapshot(config=config, table=table, rollouts=rollouts, pools=pools,
                        takes_feedback=feedback)

    def _mirror(self, route: RouteConfig, pools: dict[str, UpstreamPool],
                old: Rollout | None) -> ShadowMirror | None:
        """The route's shadow mirror: the old one while its config and pool are the same
        (its copies in flight and its diff record carry on), else a new one."""
        cfg = route.shadow
        if cfg is None:
            return None
        pool = pools[cfg.upstream]
        if (old is not None and old.shadow is not None and old.route.shadow == cfg
                and old.shadow.pool is pool):
            mirror: ShadowMirror = old.shadow
        else:
            primaries = (route.stable, *((route.canary.upstream,) if route.canary else ()))
            mirror = ShadowMirror(route=route.name, cfg=cfg, pool=pool, metrics=self.metrics,
                                  primaries=primaries)
        # The copies' answers read as LLM output too (role "shadow"), as the primaries'.
        mirror.llm = (LlmLane(route=route.name, upstream=cfg.upstream, metrics=self.metrics,
                              window=LlmWindow(route.rollback.window, time.monotonic))
                      if route.llm.telemetry else None)
        return mirror

    def _pairs(self, route: RouteConfig, pools: dict[str, UpstreamPool],
               old: Rollout | None) -> ShadowMirror | None:
        """``guard.compare``'s paired copies to stable: shadow machinery with a sink (the
        rollout, which sets itself as the sink); kept over a reload like a shadow mirror."""
        guard = route.guard
        if guard is None or guard.compare is None or route.canary is None:
            return None
        pool = pools[route.stable]
        if (old is not None and old.pairs is not None and old.route.guard == guard
                and old.pairs.pool is pool):
            mirror: ShadowMirror = old.pairs
            return mirror
        c = guard.compare
        cfg = ShadowConfig(upstream=route.stable, sample=100.0, compare=CompareConfig(
            status=True, json_paths=c.json_paths, record=None))
        return ShadowMirror(route=route.name, cfg=cfg, pool=pool, metrics=self.metrics,
                            sink=_no_pairs_yet)

    def apply(self, config: ProxyConfig) -> ReloadResult:
        """Swap in a validated config between requests (SPEC §7). Requests already under
        way keep the snapshot (and pools) they started with."""
        previous = self.snapshot
        old = previous.config
        notes = restart_notes(old, config)
        diff = describe_diff(old, config)
        self.snapshot = self._build(config, previous)
        if self.fleet is not None:
            self.fleet.attach(self.snapshot.rollouts)
            self.fleet.resync()
        self._set_notify(config.notify)
        self._follow_health(self.snapshot)
        mirrors = {m for r in self.snapshot.rollouts.values() for m in r.mirrors}
        for old_rollout in previous.rollouts.values():
            for mirror in old_rollout.mirrors:
                if mirror not in mirrors:
                    self._background.spawn(mirror.aclose(),
                                           name=f"shadow-close-{old_rollout.name}")
        for name, pool in previous.pools.items():
            if self.snapshot.pools.get(name) is not pool:
                self._background.spawn(self._retire(pool), name=f"retire-{name}")
        self.metrics.set_config(config.sha256)
        self.metrics.config_reloads_total.labels(result="ok").inc()
        changed = diff != "no changes"
        reason = "; ".join([diff, *notes])
        self.events.emit(route=None, kind="reload", actor="config", reason=reason,
                         figures={"sha256": config.sha256, "notes": notes})
        self._writer.schedule()
        for listener in self._on_apply:
            listener(config)
        return ReloadResult(ok=True, changed=changed, reason=reason, errors=[])

    def refuse(self, errors: list[str]) -> ReloadResult:
        """An invalid config: the old one keeps serving; say why, once."""
        self.metrics.config_reloads_total.labels(result="refused").inc()
        reason = errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        self.events.emit(route=None, kind="reload_refused", actor="config", reason=reason,
                         figures={"errors": errors})
        return ReloadResult(ok=False, changed=False, reason=reason, errors=errors)

    def on_apply(self, listener: Callable[[ProxyConfig], None]) -> None:
        self._on_apply.append(listener)

    async def _retire(self, pool: UpstreamPool) -> None:
        # Requests that read the old snapshot just before the swap may not have called
        # send() yet: give them a moment, then let in-flight responses finish.
        await asyncio.sleep(RETIRE_GRACE)
        await pool.aclose(self.snapshot.config.server.drain_timeout)

    def _restore(self, saved: dict[str, Any]) -> None:
        """Take the state file's routes; like an unreadable file, a damaged entry is
        logged and skipped, never fatal."""
        routes = saved.get("routes")
        if routes is None:
            return
        if not isinstance(routes, dict):
            logger.warning("state file: ignoring routes, not an object")
            return
        for name, state in routes.items():
            rollout = self.snapshot.rollouts.get(name)
            if rollout is None:
                continue
            if not isinstance(state, dict):
                logger.warning("state file: route %s: ignoring its state, not an object", name)
                continue
            rollout.restore(route_state(name, state))
            if rollout.latch is not None:
                logger.warning("route %s restored rolled_back: %s", name,
                               rollout.latch.detail)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "routes": {name: r.persisted()
                       for name, r in self.snapshot.rollouts.items()},
        }

    # -- notifications -------------------------------------------------------------------
    def _set_notify(self, cfg: NotifyConfig | None) -> None:
        """Create, reconfigure or retire the notifier to match ``cfg`` (also on reload)."""
        if cfg is None or not cfg.webhook:
            old, self.notifier = self.notifier, None
            if old is not None:
                self._background.spawn(old.aclose(old.cfg.timeout), name="notify-close")
        elif self.notifier is not None:
            self.notifier.reconfigure(cfg)
        else:
            self.notifier = Notifier(cfg, self.metrics, secrets=self._secrets)
            if self._started:
                self.notifier.start()

    def _notify(self, event: Event) -> None:
        # A change received through Redis was notified by the replica that made it.
        if self.notifier is None or event.figures.get("via") == "redis":
            return
        if self._primary or event.kind not in PRIMARY_NOTIFIES:
            self.notifier.offer(event)

    def _secrets(self) -> Iterator[str]:
        """What a notification must never carry: the admin token, upstream header values."""
        config = self.snapshot.config
        token = os.environ.get(config.admin.token_env)
        if token:
            yield token
        for upstream in config.upstreams.values():
            for _, value in upstream.headers:
                yield value

    # -- lifecycle ----------------------------------------------------------------------
    def _follow_health(self, snap: Snapshot) -> None:
        """Probe loops for the snapshot's upstreams; every route takes the verdicts."""
        for probe in self.health.reconcile(snap.pools):
            self._background.spawn(probe.aclose(), name=f"health-close-{probe.name}")
        for rollout in snap.rollouts.values():
            rollout.apply_health(self.health.healthy, self.health.is_probed, quiet=True)

    def _health_changed(self, upstream: str, healthy: bool) -> None:
        for rollout in self.snapshot.rollouts.values():
            if upstream in rollout.lanes:
                rollout.apply_health(self.health.healthy, self.health.is_probed)

    async def start(self) -> None:
        if self.fleet is not None:
            await self.fleet.start()  # catch up with the fleet before serving (bounded)
        self._writer.start()
        if self.notifier is not None:
            self.notifier.start()
        self.health.start()
        self._ticks.spawn(self._tick(), name="rollout-tick")
        self._started = True

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for rollout in self.snapshot.rollouts.values():
                try:
                    rollout.tick()
                except Exception:  # one broken route must not stop the watch of the others
                    logger.exception("rollout tick failed for %s", rollout.name)

    async def aclose(self, timeout: float = 5.0) -> None:
        await self._ticks.cancel()
        if self.fleet is not None:
            await self.fleet.aclose()
        await self.health.aclose()
        if self.notifier is not None:
            await self.notifier.aclose(min(timeout, self.notifier.cfg.timeout))
        await self._writer.aclose()
        await self._background.aclose(0)
        await asyncio.gather(*(m.aclose() for r in self.snapshot.rollouts.values()
                               for m in r.mirrors))
        await asyncio.gather(*(p.aclose(timeout) for p in self.snapshot.pools.values()))

    async def flush_state(self) -> None:
        await self._writer.flush()

    # -- views ----------------------------------------------------------------------------
    def rollout(self, name: str) -> Rollout | None:
        return self.snapshot.rollouts.get(name)

    def feedback(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /feedback`` (data listener and admin API): the rating goes to the route
        whose guard remembers the answer with that request id; (status, JSON answer)."""
        parsed = parse_feedback(body)
        if isinstance(parsed, str):
            return 400, {"error": parsed}
        rid = parsed[0]
        for rollout in self.snapshot.rollouts.values():
            store = rollout.guards.store if rollout.guards is not None else None
            if store is not None and store.knows(rid):
                result = rollout.rated(body)
                answer: dict[str, Any] = {"request_id": rid, "route": rollout.name,
                                          "outcome": result.outcome.value}
                if result.message:
                    answer["error"] = result.message
                return result.status, answer
        return 404, {"request_id": rid, "outcome": "unknown",
                     "error": "no route awaits feedback for this request id (unknown, or "
                              "expired long ago)"}

    def _route_gauges(self) -> Iterator[RouteGauges]:
        for r in self.snapshot.rollouts.values():
            verdict = r.judge_verdict()
            yield RouteGauges(route=r.name, state=r.state, canary_weight=r.effective_weight,
                              sticky_sessions=r.sticky_sessions,
                              judge=r.judgement.kind if verdict is not None else None,
                              judge_state=verdict.state.value if verdict is not None else None,
                              guards=tuple((name, v.state.value)
                                           for name, v in r.guard_verdicts().items()))

    def _upstream_info(self) -> Iterator[tuple[str, str | None, int]]:
        for name, cfg in self.snapshot.config.upstreams.items():
            yield name, cfg.version, cfg.max_connections

    def _upstream_health(self) -> Iterator[tuple[str, bool | None]]:
        for name in self.snapshot.pools:
            yield name, self.health.healthy(name) if self.health.is_probed(name) else None


# Events an operator should look at; the rest (admin actions, steps, health back) are
# routine and log at INFO.
_WARN_KINDS = frozenset({"rollback", "verify_failed", "reload_refused", "kill",
                         "canary_unhealthy"})
# A reason comes from a client of the admin API: control characters are escaped so that
# it cannot forge log lines.
_ESCAPE = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}


def _log_event(event: Any) -> None:
    level = logging.WARNING if event.kind in _WARN_KINDS else logging.INFO
    logger.log(level, "event %s route=%s actor=%s: %s", event.kind, event.route, event.actor,
               str(event.reason).translate(_ESCAPE))
