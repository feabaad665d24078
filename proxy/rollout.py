"""Per-route rollout state machine (SPEC §5): who gets the next request, and when to flip.

A ``Rollout`` owns one route's live state: configured and manual weights, the rollback
latch, the kill switch override, the progressive step, and one ``Lane`` per upstream
(window + metric cells). Decisions are synchronous and do no I/O, so a trip lands on the
very next request; persistence is a callback the runtime turns into a background write.
With ``state.redis`` the fleet link hooks in: each action is handed to ``announce``, the
other replicas' actions come back through ``apply_remote``, and sticky routes consult the
shared pins (``session_pick.pick_cached``/``pick_shared``) instead of ``pick_for``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from proxy import rollback
from proxy.config.model import RouteConfig
from proxy.events import Event, EventLog
from proxy.lanes import Lane
from proxy.metrics import Metrics
from proxy.pins import PinTable
from proxy.session_pick import SharedPins
from proxy.shadow.mirror import ShadowMirror
from proxy.upstream.pool import UpstreamPool
from proxy.windows import SlidingWindow, WindowStats

Clock = Callable[[], float]


# (rollout, op, data, event): an action taken here, for the other replicas to apply.
Announce = Callable[["Rollout", str, dict[str, Any], Event | None], None]


class RolloutConflict(Exception):
    """An admin action that does not fit the route's state (maps to HTTP 409/400)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class Rollout:
    """State machine of one route. Created by the runtime; survives reloads of the route."""

    def __init__(
        self,
        *,
        route: RouteConfig,
        pools: dict[str, UpstreamPool],
        events: EventLog,
        metrics: Metrics,
        on_change: Callable[[], None],
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.route = route
        self.name = route.name
        self._events = events
        self._metrics = metrics
        self._on_change = on_change
        self._clock = clock
        self._random = (rng or random.Random()).random
        policy = route.rollback
        watched = route.canary is not None and policy.enabled
        use_ttfb = policy.latency == "ttfb"
        # 100 ms slots: a hung request counts as slow within ~0.1 s of passing max_p99.
        slots = min(max(20, math.ceil(policy.window / 0.1)), 3000)

        # Every lane keeps a window (the admin API shows its figures); only a watched
        # canary is judged against it.
        def lane(upstream: str, role: str) -> Lane:
            win = SlidingWindow(policy.window, clock, slots=slots)
            return Lane(route=route.name, upstream=upstream, role=role, pool=pools[upstream],
                        window=win, metrics=metrics, use_ttfb=use_ttfb)

        self.stable = lane(route.stable, "stable")
        self.canary = lane(route.canary.upstream, "canary") if route.canary else None
        self.fallback = lane(route.fallback, "fallback") if route.fallback else None
        if self.canary is not None and watched:
            self.canary._after_end = self._after_canary_end
        self.lanes = {ln.upstream: ln for ln in (self.stable, self.canary, self.fallback) if ln}
        self.shadow = (ShadowMirror(route=route.name, cfg=route.shadow,
                                    pool=pools[route.shadow.upstream], metrics=metrics)
                       if route.shadow else None)
        # Live state (persisted by the runtime through ``state_dict``).
        self.manual_weight: float | None = None
        self.latch: dict[str, Any] | None = None
        self.kill_override: bool | None = None
        self.step: int | None = 0 if route.progressive and route.canary else None
        sticky = route.sticky
        # A json_field session key needs the body before the stable/canary pick.
        self.wants_body_first = bool(sticky is not None and sticky.json_field
                                     and route.canary is not None)
        self.pins = (PinTable(ttl=sticky.ttl, max_sessions=sticky.max_sessions, clock=clock)
                     if sticky is not None and route.canary is not None else None)
        # Fleet state (``state.redis``): set by the fleet link, None without Redis.
        self.shared: SharedPins | None = None
        self.announce: Announce | None = None
        self._step_since = clock()
        self.verify_at: float | None = None  # when the post-rollback verify window ends
        max_p99 = route.rollback.max_p99
        self._slow_after = max_p99 if max_p99 is not None else 0.0
        # Health (SPEC §5): a canary with probes takes traffic only once healthy; a
        # stable that probes unhealthy hands its share to the fallback.
        self.canary_ready = True
        self.stable_down = False
        # Written only by ``refresh``; read on the request path (``pick``, session_pick):
        # the lane that takes what the canary does not (stable, or its fallback while
        # stable is down), and the canary's share of traffic, 0..1.
        self.base_lane = self.stable
        self.canary_share = 0.0
        self.refresh()

    # -- the request path -------------------------------------------------------------
    def pick(self) -> Lane:
        """Stable or canary for the next request: canary with probability weight/100."""
        p = self.canary_share
        if p and (p >= 1.0 or self._random() < p):
            return self.canary  # type: ignore[return-value]
        return self.base_lane

    @property
    def sticky_sessions(self) -> int:
        return len(self.pins) if self.pins is not None else 0

    @property
    def killed(self) -> bool:
        if self.kill_override is not None:
            return self.kill_override
        return self.route.kill_switch.enabled

    # -- derived state ----------------------------------------------------------------
    @property
    def configured_weight(self) -> float:
        canary = self.route.canary
        if canary is None:
            return 0.0
        if self.step is not None and self.route.progressive is not None:
            return self.route.progressive.steps[self.step]
        return canary.weight

    @property
    def weight(self) -> float:
        """The weight the operator or the rollout asks for, before latch and health."""
        if self.manual_weight is not None:
            return self.manual_weight
        return self.configured_weight

    @property
    def effective_weight(self) -> float:
        return self.canary_share * 100.0

    @property
    def state(self) -> str:
        if self.killed:
            return "killed"
        if self.latch is not None:
            return "rolled_back"
        if self.canary is None or self.weight <= 0:
            return "stable"
        if not self.canary_ready:
            return "waiting"
        if self.weight >= 100:
            return "promoted"
        return "canary"

    def refresh(self) -> None:
        """Recompute the canary share and the base lane from the state (no side effects)."""
        if self.canary is None or self.latch is not None or not self.canary_ready:
            self.canary_share = 0.0
        else:
            self.canary_share = min(max(self.weight, 0.0), 100.0) / 100.0
        self.base_lane = self.fallback if (self.stable_down and self.fallback) else self.stable

    def apply_health(self, healthy: Callable[[str], bool | None],
                     probed: Callable[[str], bool], *, quiet: bool = False) -> None:
        """Take the probes' verdicts; a canary turning unready or ready again is an event
        (``quiet`` at start-up and after a reload, where nothing changed yet)."""
        was_ready = self.canary_ready
        if self.canary is not None:
            name = self.canary.upstream
            self.canary_ready = not probed(name) or healthy(name) is True
        self.stable_down = probed(self.stable.upstream) and healthy(self.stable.upstream) is False
        self.refresh()
        if quiet or was_ready == self.canary_ready or self.canary is None:
            return
        kind = "canary_healthy" if self.canary_ready else "canary_unhealthy"
        reason = (f"canary {self.canary.upstream} passes its health probes: weight "
                  f"{self.weight:g}% again" if self.canary_ready else
                  f"canary {self.canary.upstream} fails its health probes: no traffic "
                  "until it recovers")
        self.emit(kind=kind, actor="auto", reason=reason, figures={})

    def emit(self, kind: str, actor: str, reason: str, figures: dict[str, Any]) -> Event:
        """An event of this route (``/events``, and the webhook through the runtime)."""
        return self._events.emit(route=self.name, kind=kind, actor=actor, reason=reason,
                                 figures=figures)

    def changed(self) -> None:
        """The state changed: recompute, and have the runtime persist it."""
        self.refresh()
        self._on_change()

    def go_to_step(self, step: int, since: float | None = None) -> None:
        """Put a progressive rollout at ``step`` (clamped to its steps), taken at ``since``."""
        assert self.route.progressive is not None
        self.step = max(0, min(step, len(self.route.progressive.steps) - 1))
        self._step_since = self._clock() if since is None else since

    def step_since(self) -> float:
        return self._step_since

    @property
    def step_weight(self) -> float | None:
        """The weight of the current progressive step (None without a plan)."""
        prog = self.route.progressive
        return prog.steps[self.step] if prog is not None and self.step is not None else None

    # -- automatic decisions ----------------------------------------------------------
    def _after_canary_end(self, failed: bool, latency: float) -> None:
        """Judge at once when the request could have made the canary worse (a failure,
        or slower than max_p99); a fast success cannot raise the error rate or the p99,
        so what it changes (reaching min_requests, the ratio) waits for the 100 ms tick.
        This keeps a promoted blue-green route from paying two window reads per request."""
        if self.latch is None and self.canary_share and (failed or latency > self._slow_after):
            self.evaluate()

    def evaluate(self) -> rollback.Trip | None:
        """Judge the canary's window now; trips (and latches) the route if it is bad."""
        if self.canary is None or self.latch is not None or not self.route.rollback.enabled:
            return None
        policy = self.route.rollback
        assert self.canary.window is not None and self.stable.window is not None
        slow_after = policy.max_p99
        canary = self.canary.window.stats(slow_after)
        stable = self.stable.window.stats(slow_after)
        trip = rollback.evaluate(policy, canary, stable)
        if trip is not None:
            self._trip(trip)
        return trip

    def _trip(self, trip: rollback.Trip) -> None:
        if self.pins is not None:
            self.pins.unpin_canary()
        self.latch = {
            "reason": trip.reason.value,
            "detail": trip.detail,
            "actor": "auto",
            "time": time.time(),
        }
        if self.route.rollback.verify:
            self.verify_at = self._clock() + self.route.rollback.verify
        self.changed()
        self._metrics.rollbacks_total.labels(route=self.name, reason=trip.reason.value).inc()
        figures = dict(trip.figures)
        figures["trip"] = trip.reason.value
        event = self.emit(kind="rollback", actor="auto",
                          reason=trip.detail, figures=figures)
        self._announce("rollback", {"latch": self.latch}, event)

    def tick(self) -> None:
        """Called about every 100 ms: catches hung canaries, takes progressive steps and
        ends post-rollback verification."""
        if self.verify_at is not None and self._clock() >= self.verify_at:
            self._verify()
        if self.canary is None or self.latch is not None or self.killed:
            return
        if self.canary_share:
            self.evaluate()
        if (self.latch is None and self.step is not None and self.manual_weight is None
                and self.canary_ready):
            self._maybe_step()

    def _verify(self) -> None:
        """After an automatic rollback: is stable within the thresholds (the canary was
        the fault) or bad too (look elsewhere)?"""
        self.verify_at = None
        if self.latch is None:
            return  # resumed before the verdict: nothing left to verify
        assert self.stable.window is not None
        stats = self.stable.window.stats(self.route.rollback.max_p99)
        ok, detail = rollback.verify_stable(self.route.rollback, stats)
        result, kind = ("verified", "verified") if ok else ("failed", "verify_failed")
        self.latch["verify"] = kind
        self._on_change()
        self._announce("verify", {"latch": self.latch}, None)
        self._metrics.verifications_total.labels(route=self.name, result=result).inc()
        self.emit(kind=kind, actor="auto", reason=detail,
                  figures={"stable": rollback.figures_of(stats)})

    def _maybe_step(self) -> None:
        prog = self.route.progressive
        assert prog is not None and self.step is not None and self.canary is not None
        if self.step >= len(prog.steps) - 1:
            return
        now = self._clock()
        if now - self._step_since < prog.interval:
            return
        assert self.canary.window is not None
        stats = self.canary.window.stats(self.route.rollback.max_p99)
        if stats.requests < self.route.rollback.min_requests:
            return  # not enough evidence yet: wait, do not step blind
        self.step += 1
        self._step_since = now
        weight = prog.steps[self.step]
        self.changed()
        kind = "promote" if weight >= 100 else "step"
        event = self.emit(kind=kind, actor="auto",
                          reason=f"healthy window: weight {weight:g}%",
                          figures=rollback.figures_of(stats))
        self._announce("step", {"step": self.step, "weight": weight}, event)

    # -- operator actions (admin API) -------------------------------------------------
    def rollback(self, reason: str | None, actor: str = "admin") -> None:
        """Manual rollback: idempotent; effective on the very next request."""
        self._need_canary()
        if self.latch is not None:
            return
        text = reason or "manual rollback"
        if self.pins is not None:
            self.pins.unpin_canary()
        self.latch = {"reason": "manual", "detail": text, "actor": actor, "time": time.time()}
        self.changed()
        self._metrics.rollbacks_total.labels(route=self.name, reason="manual").inc()
        event = self.emit(kind="rollback", actor=actor, reason=text,
                          figures=self.figures())
        self._announce("rollback", {"latch": self.latch}, event)

    def promote(self, actor: str = "admin") -> None:
        self._need_canary()
        self._need_unlatched()
        if not self.canary_ready:
            assert self.canary is not None
            raise RolloutConflict(f"canary {self.canary.upstream} is not ready (its health "
                                  "probes fail): refusing to promote it")
        self.manual_weight = 100.0
        self.changed()
        event = self.emit(kind="promote", actor=actor,
                          reason="promoted to 100%", figures=self.figures())
        self._announce("promote", {"weight": 100.0}, event)

    def set_weight(self, weight: float, actor: str = "admin") -> None:
        self._need_canary()
        self._need_unlatched()
        if not 0.0 <= weight <= 100.0:
            raise RolloutConflict("weight must be between 0 and 100", status=400)
        self.manual_weight = weight
        self.changed()
        event = self.emit(kind="weight", actor=actor,
                          reason=f"weight set to {weight:g}%", figures=self.figures())
        self._announce("weight", {"weight": weight}, event)

    def resume(self, actor: str = "admin") -> None:
        """Clear the latch and manual overrides: back to the configured weight."""
        self.reset()
        self.changed()
        event = self.emit(kind="resume", actor=actor,
                          reason=f"resumed at {self.weight:g}%", figures={})
        self._announce("resume", {"step": self.step}, event)

    def reset(self) -> None:
        """Resume's state change: no latch or overrides, no pins, fresh windows, step 0."""
        self.latch = None
        self.verify_at = None
        self.manual_weight = None
        if self.pins is not None:
            self.pins.clear()  # a fresh start: new sessions split by the weight again
        if self.step is not None:
            self.step = 0
            self._step_since = self._clock()
        for lane in (self.stable, self.canary):
            if lane is not None and lane.window is not None:
                lane.window.reset()

    def kill(self, enabled: bool, actor: str = "admin") -> None:
        self.kill_override = enabled
        self.changed()
        event = self.emit(kind="kill", actor=actor,
                          reason="kill switch on" if enabled else "kill switch off",
                          figures={})
        self._announce("kill", {"enabled": enabled}, event)

    def _need_canary(self) -> None:
        if self.canary is None:
            raise RolloutConflict(f"route {self.name!r} has no canary", status=400)

    def _need_unlatched(self) -> None:
        if self.latch is not None:
            raise RolloutConflict(f"route {self.name!r} is rolled_back: resume it first")

    def _announce(self, op: str, data: dict[str, Any], event: Event | None) -> None:
        if self.announce is not None:
            self.announce(self, op, data, event)

    # -- views and persistence ----------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lane in (self.stable, self.canary):
            if lane is not None and lane.window is not None:
                out[lane.role] = rollback.figures_of(lane.window.stats(self.route.rollback.max_p99))
        return out

    def window_stats(self, lane: Lane) -> WindowStats | None:
        if lane.window is None:
            return None
        return lane.window.stats(self.route.rollback.max_p99)

    def fingerprint(self) -> str:
        """Identity of the rollout: which model version is the canary. Changing the canary
        upstream (or its URL) starts a new rollout, which clears the latch and the pins;
        changing only the weight does not (pinned sessions stay where they are)."""
        if self.route.canary is None or self.canary is None:
            return ""
        return f"{self.route.canary.upstream}|{self.canary.pool.cfg.url}"

    def __repr__(self) -> str:
        return (f"<Rollout {self.name} {self.state} weight={self.weight:g} "
                f"effective={self.effective_weight:g}>")
