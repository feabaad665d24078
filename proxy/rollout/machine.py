"""The rollout state machine of one route: who gets the next request, and when to flip.

A ``Rollout`` is the only writer of its route's live state (``LiveState``: weight
overrides, latch, kill override, progressive step) and of what goes with it (its lanes'
watch, its pins' epoch). Every change, local (a trip, a step, an admin action) or
carried (a reload, the state file, a fleet message, through the pure functions of
``carry``), goes through ``_set``, which applies the state and its ``Effect`` together,
recomputes what the request path reads, and has the runtime persist it.

Decisions are synchronous and do no I/O, so a trip lands on the very next request.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from proxy.config.model import RouteConfig
from proxy.events import ACTORS, EVENT_KINDS, Event, EventLog
from proxy.guard.evidence import Guard
from proxy.guard.feedback import FeedbackResult
from proxy.guard.route import RouteGuards
from proxy.llm import rules as llm_rules
from proxy.llm.lane import LlmLane
from proxy.llm.window import LlmWindow
from proxy.metrics import Metrics
from proxy.rollout import carry, rules
from proxy.rollout.judge import Verdict
from proxy.rollout.judging import SEQUENTIAL, RouteJudge
from proxy.rollout.lanes import Lane, Pool
from proxy.rollout.pins import PinTable
from proxy.rollout.state import Effect, Latch, LiveState
from proxy.rollout.windows import SlidingWindow, WindowStats

if TYPE_CHECKING:
    from proxy.rollout.pick import SharedPins
    from proxy.shadow.mirror import ShadowMirror, Side

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# (rollout, op, data, event): an action taken here, for the other replicas to apply.
Announce = Callable[["Rollout", str, dict[str, Any], Event | None], None]


class RolloutConflict(Exception):
    """An admin action that does not fit the route's state (maps to HTTP 409/400)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class Rollout:
    """State machine of one route. Built by the runtime for each config; a reload builds
    a new one that ``adopt``s the old one's state."""

    def __init__(
        self,
        *,
        route: RouteConfig,
        pools: Mapping[str, Pool],
        events: EventLog,
        metrics: Metrics,
        on_change: Callable[[], None],
        shadow: ShadowMirror | None = None,
        pairs: ShadowMirror | None = None,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.route = route
        self.name = route.name
        self.shadow = shadow  # the route's ShadowMirror, built by the composition root
        # guard.compare's paired copies to stable (a ShadowMirror with a sink), or None
        self.pairs = pairs
        if pairs is not None:
            pairs.sink = self.pair_done
        self._events = events
        self._metrics = metrics
        self._on_change = on_change
        self._clock = clock
        self._wall = wall
        self._random = (rng or random.Random()).random
        policy = route.rollback
        use_ttfb = policy.latency == "ttfb"
        # 100 ms slots: a hung request counts as slow within ~0.1 s of passing max_p99.
        slots = min(max(20, math.ceil(policy.window / 0.1)), 3000)

        # Every lane keeps a window (the admin API shows its figures); only a watched
        # canary is judged against it.
        def lane(upstream: str, role: str) -> Lane:
            made = Lane(route=route.name, upstream=upstream, role=role, pool=pools[upstream],
                        window=SlidingWindow(policy.window, clock, slots=slots),
                        metrics=metrics, use_ttfb=use_ttfb)
            if route.llm.telemetry:
                made.llm = LlmLane(route=route.name, upstream=upstream, metrics=metrics,
                                   window=LlmWindow(policy.window, clock, slots=slots))
            return made

        self.stable = lane(route.stable, "stable")
        self.canary = lane(route.canary.upstream, "canary") if route.canary else None
        self.fallback = lane(route.fallback, "fallback") if route.fallback else None
        # The canary is judged against whichever lane takes the rest (``judging``), and
        # on the quality of its answers by the route's guards (``guard:``), if any.
        self.judgement = RouteJudge(policy, sticky=route.sticky is not None)
        self.guards = (RouteGuards(route.guard, clock=clock,
                                   share=min(max(route.canary.weight / 100.0, 0.01), 0.99))
                       if route.guard is not None and route.canary is not None else None)
        # The LLM rules (max_ttft_p99, ...) are judged only where one is set.
        self._llm_rules = route.llm.telemetry and any(
            x is not None for x in (policy.max_ttft_p99, policy.max_ttft_ratio,
                                    policy.max_tokens_ratio, policy.max_finish_length_rate))
        if self.canary is not None and policy.enabled:
            self.canary.watch(self._after_canary_end)
            if self._llm_rules and self.canary.llm is not None:
                self.canary.llm.watch(self._after_llm)
            if policy.judge == SEQUENTIAL:
                self.stable.watch(self._after_stable_end)
                if self.fallback is not None:
                    self.fallback.watch(self._after_fallback_end)
        self.lanes = {ln.upstream: ln for ln in (self.stable, self.canary, self.fallback) if ln}
        # The model versions behind the roles, for every event of this route (if said).
        self._versions = {ln.role: ln.version for ln in self.lanes.values()
                          if ln.version is not None}
        self._fp = (f"{route.canary.upstream}|{pools[route.canary.upstream].cfg.url}"
                    if route.canary is not None else "")
        self._s = carry.initial(route, clock())
        sticky = route.sticky
        # A json_field session key needs the body before the stable/canary pick.
        self.wants_body_first = bool(sticky is not None and sticky.json_field
                                     and route.canary is not None)
        self.pins = (PinTable(ttl=sticky.ttl, max_sessions=sticky.max_sessions, clock=clock)
                     if sticky is not None and route.canary is not None else None)
        # Fleet state (``state.redis``): set by ``link_fleet``, None without Redis.
        self.shared: SharedPins | None = None
        self._announce_to: Announce | None = None
        max_p99 = route.rollback.max_p99
        self._slow_after = max_p99 if max_p99 is not None else 0.0
        # Health: a canary with probes takes traffic only once healthy; a stable that
        # probes unhealthy hands its share to the fallback.
        self.canary_ready = True
        self.stable_down = False
        self._said_unready = False  # a canary_unhealthy event went out (so: "again")
        # The progressive step the plan is stuck on for want of evidence (reported once).
        self.stalled_at: int | None = None
        # Written only by ``_refresh``; read on the request path (``pick``, the sticky
        # pick): the lane that takes what the canary does not (stable, or its fallback
        # while stable is down), and the canary's share of traffic, 0..1.
        self.base_lane = self.stable
        self.canary_share = 0.0
        self._refresh()

    # -- the request path -------------------------------------------------------------
    def pick(self) -> Lane:
        """Stable or canary for the next request: canary with probability weight/100."""
        p = self.canary_share
        if p and (p >= 1.0 or self._random() < p):
            return self.canary  # type: ignore[return-value]
        return self.base_lane

    # -- reading the state ----------------------------------------------------------------
    @property
    def live(self) -> LiveState:
        return self._s

    @property
    def mirrors(self) -> tuple[ShadowMirror, ...]:
        """The route's shadow mirror and guard pair mirror, those it has."""
        return tuple(m for m in (self.shadow, self.pairs) if m is not None)

    @property
    def latch(self) -> Latch | None:
        return self._s.latch

    @property
    def manual_weight(self) -> float | None:
        return self._s.manual_weight

    @property
    def kill_override(self) -> bool | None:
        return self._s.kill_override

    @property
    def step(self) -> int | None:
        return self._s.step

    @property
    def verify_at(self) -> float | None:
        return self._s.verify_at

    @property
    def sticky_sessions(self) -> int:
        return len(self.pins) if self.pins is not None else 0

    @property
    def killed(self) -> bool:
        override = self._s.kill_override
        return override if override is not None else self.route.kill_switch.enabled

    @property
    def configured_weight(self) -> float:
        canary = self.route.canary
        if canary is None:
            return 0.0
        step = self._s.step
        if step is not None and self.route.progressive is not None:
            return self.route.progressive.steps[step]
        return canary.weight

    @property
    def weight(self) -> float:
        """The weight the operator or the rollout asks for, before latch and health."""
        manual = self._s.manual_weight
        return manual if manual is not None else self.configured_weight

    @property
    def effective_weight(self) -> float:
        return self.canary_share * 100.0

    @property
    def step_weight(self) -> float | None:
        """The weight of the current progressive step (None without a plan)."""
        prog, step = self.route.progressive, self._s.step
        return prog.steps[step] if prog is not None and step is not None else None

    @property
    def state(self) -> str:
        if self.killed:
            return "killed"
        if self._s.latch is not None:
            return "rolled_back"
        if self.canary is None or self.weight <= 0:
            return "stable"
        if not self.canary_ready:
            return "waiting"
        if self.weight >= 100:
            return "promoted"
        return "canary"

    def fingerprint(self) -> str:
        """Identity of the rollout: which model version is the canary. Changing the canary
        upstream (or its URL) starts a new rollout, which clears the latch and the pins;
        changing only the weight does not (pinned sessions stay where they are)."""
        return self._fp

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lane in (self.stable, self.canary):
            if lane is not None:
                out[lane.role] = rules.figures_of(self.window_stats(lane))
        return out

    def window_stats(self, lane: Lane) -> WindowStats:
        return lane.window.stats(self.route.rollback.max_p99)

    def persisted(self) -> dict[str, Any]:
        """This route's entry in the state file."""
        return carry.persisted(self._s, self.route, self._fp)

    # -- the one writer -------------------------------------------------------------------
    def _set(self, new: LiveState, effect: Effect = Effect.NONE) -> None:
        """Swap in ``new`` with its effect; recompute what the request path reads; have
        the runtime persist it."""
        if effect & Effect.UNPIN_CANARY and self.pins is not None:
            self.pins.unpin_canary()
        if effect & Effect.RESET:
            self.judgement.restart()
            if self.guards is not None:
                self.guards.restart()
            if self.pins is not None:
                self.pins.clear()  # a fresh start: new sessions split by the weight again
            for lane in (self.stable, self.canary):
                if lane is not None:
                    lane.window.reset()
                    if lane.llm is not None:
                        lane.llm.window.reset()
        self._s = new
        self._refresh()
        self._on_change()

    def _refresh(self) -> None:
        """Recompute the canary share and the base lane from the state (no side effects)."""
        if self.canary is None or self._s.latch is not None or not self.canary_ready:
            self.canary_share = 0.0
        else:
            self.canary_share = min(max(self.weight, 0.0), 100.0) / 100.0
        self.base_lane = self.fallback if (self.stable_down and self.fallback) else self.stable
        self.judgement.follow(self.canary_share, self.base_lane)
        guards = self.guards
        if guards is not None and 0.0 < self.canary_share < 1.0 and (
                guards.share != self.canary_share):
            guards.follow(self.canary_share)

    def override_ignored(self) -> None:
        """An override header named no upstream of this route (counted, then ignored)."""
        self._metrics.override_ignored_total.labels(route=self.name).inc()

    def emit(self, kind: str, actor: str, reason: str, figures: dict[str, Any]) -> Event:
        """An event of this route (``/events``, and the webhook through the runtime)."""
        if self._versions:
            figures = {**figures, "versions": self._versions}
        return self._events.emit(route=self.name, kind=kind, actor=actor, reason=reason,
                                 figures=figures)

    # -- health ---------------------------------------------------------------------------
    def apply_health(self, healthy: Callable[[str], bool | None],
                     probed: Callable[[str], bool], *, quiet: bool = False) -> None:
        """Take the probes' verdicts; a canary turning unready or ready again is an event
        (``quiet`` at start-up and after a reload, where nothing changed yet)."""
        was_ready = self.canary_ready
        if self.canary is not None:
            name = self.canary.upstream
            self.canary_ready = not probed(name) or healthy(name) is True
        self.stable_down = probed(self.stable.upstream) and healthy(self.stable.upstream) is False
        self._refresh()
        if quiet or was_ready == self.canary_ready or self.canary is None:
            return
        kind = "canary_healthy" if self.canary_ready else "canary_unhealthy"
        name = self.canary.upstream
        if not self.canary_ready:
            reason = f"canary {name} fails its health probes: no traffic until it recovers"
        elif self._said_unready:
            reason = f"canary {name} passes its health probes: weight {self.weight:g}% again"
        else:  # first verdict after start: nothing was lost
            reason = f"canary {name} is ready (health probes pass): weight {self.weight:g}%"
        self._said_unready = not self.canary_ready
        self.emit(kind=kind, actor="auto", reason=reason, figures={})

    # -- automatic decisions ----------------------------------------------------------
    def _after_canary_end(self, failed: bool, client_error: bool, latency: float,
                          sampled: bool) -> None:
        """The sequential judge sees every sampled canary request (O(1)); the threshold
        rules run at once only when the request could have made the canary worse (a
        failure, or slower than max_p99): a fast success cannot raise the error rate or
        the p99, so what it changes (reaching min_requests, the ratio) waits for the
        100 ms tick. A promoted blue-green route pays no window read per request."""
        if self._s.latch is not None or not self.canary_share:
            return
        if sampled and self.judgement.canary(failed, client_error, latency):
            self._trip(self.judgement.trip())
        elif failed or latency > self._slow_after:
            self.evaluate()

    def _after_stable_end(self, failed: bool, client_error: bool, latency: float,
                          sampled: bool) -> None:
        if sampled and self.base_lane is self.stable:
            self.judgement.base(failed, client_error, latency)

    def _after_fallback_end(self, failed: bool, client_error: bool, latency: float,
                            sampled: bool) -> None:
        if sampled and self.base_lane is self.fallback:
            self.judgement.base(failed, client_error, latency)

    # -- the quality guards (``guard:``) -------------------------------------------------
    def answered(self, arm: str, body: bytes | None, *, draw: float, request_id: str) -> None:
        """An answer of the canary or the base lane reached its client whole (``body``
        when ``guards.wants_answer(arm, draw)`` asked for it): output drift and the
        feedback store read it."""
        guards = self.guards
        if guards is None:
            return
        tripped = guards.answered(arm, body, draw=draw, request_id=request_id,
                                  fingerprint=self._fp)
        if tripped is not None:
            self._guard_trip(tripped)

    def paired(self, kind: str, *, primary_status: int, copy_status: int,
               primary_body: bytes | None, copy_body: bytes | None) -> None:
        """A paired copy (``guard.compare``) came back next to its primary answer."""
        guards = self.guards
        if guards is not None:
            tripped = guards.paired(kind, primary_status=primary_status,
                                    copy_status=copy_status, primary_body=primary_body,
                                    copy_body=copy_body)
            if tripped is not None:
                self._guard_trip(tripped)

    def pair_done(self, kind: str, primary: Side, copy: Side) -> None:
        """``pairs``' sink: a paired copy and its primary answer are both done."""
        self.paired(kind, primary_status=primary.status, copy_status=copy.status,
                    primary_body=None if primary.truncated else primary.body,
                    copy_body=None if copy.truncated else copy.body)

    def rated(self, body: bytes) -> FeedbackResult:
        """A ``POST /feedback`` body for an answer of this route."""
        assert self.guards is not None
        result, tripped = self.guards.rated(body, fingerprint=self._fp)
        if tripped is not None:
            self._guard_trip(tripped)
        return result

    def _guard_trip(self, guard: Guard) -> None:
        if self._s.latch is None and self.canary_share:
            v = guard.verdict()
            self._trip(rules.Trip(reason=rules.TripReason(guard.reason.value),
                                  detail=f"{guard.reason.value}: {v.detail}",
                                  figures=dict(v.figures)))

    def guard_verdicts(self) -> dict[str, Verdict]:
        """Each configured guard's state, by reason label (tens of µs: the admin API)."""
        return self.guards.verdicts() if self.guards is not None else {}

    def judge_verdict(self) -> Verdict | None:
        """The judge's state (passing, failing, inconclusive) with its figures; None for a
        route with no canary or no rollback policy. Tens of µs: for the admin API."""
        if self.canary is None or not self.route.rollback.enabled:
            return None
        return self.judgement.verdict(self.window_stats(self.canary),
                                      self.window_stats(self.stable), self._s.latch)

    def evaluate(self) -> rules.Trip | None:
        """Judge the canary's window now; trips (and latches) the route if it is bad."""
        if self.canary is None or self._s.latch is not None or not self.route.rollback.enabled:
            return None
        canary = self.window_stats(self.canary)
        stable = self.window_stats(self.stable)
        trip = rules.evaluate(self.route.rollback, canary, stable)
        if trip is not None:
            self._trip(trip)
        return trip

    def _after_llm(self) -> None:
        """A canary first token or LLM answer entered its window: judge the LLM rules."""
        if self._s.latch is None and self.canary_share:
            self.evaluate_llm()

    def evaluate_llm(self) -> llm_rules.LlmTrip | None:
        """Judge the canary's LLM figures (time to first token, tokens, cut answers)."""
        if not self._llm_rules or self.canary is None or self._s.latch is not None:
            return None
        canary, base = self.canary.llm, self.base_lane.llm
        assert canary is not None and base is not None
        policy = self.route.rollback
        trip = llm_rules.evaluate(policy, canary.window.stats(slow_after=policy.max_ttft_p99),
                                  base.window.stats())
        if trip is not None:
            self._trip(trip)
        return trip

    def llm_figures(self, lane: Lane) -> dict[str, object] | None:
        """A lane's LLM figures over the window (None: the route has no telemetry)."""
        if lane.llm is None:
            return None
        return llm_rules.figures_of(lane.llm.window.stats(self.route.rollback.max_ttft_p99))

    def _trip(self, trip: rules.Trip | llm_rules.LlmTrip) -> None:
        latch = Latch(reason=trip.reason.value, detail=trip.detail, actor="auto",
                      time=self._wall())
        verify = self.route.rollback.verify
        verify_at = self._clock() + verify if verify else self._s.verify_at
        before = self.canary_share
        self._set(replace(self._s, latch=latch, verify_at=verify_at), Effect.UNPIN_CANARY)
        self._metrics.rollbacks_total.labels(route=self.name, reason=trip.reason.value).inc()
        figures = dict(trip.figures)
        figures["trip"] = trip.reason.value
        figures.update(self._load(before))
        event = self.emit(kind="rollback", actor="auto",
                          reason=trip.detail + self._load_note(before), figures=figures)
        self._announce("rollback", {"latch": latch.as_dict()}, event)

    def tick(self) -> None:
        """Called about every 100 ms: catches hung canaries, takes progressive steps and
        ends post-rollback verification."""
        s = self._s
        if s.verify_at is not None and self._clock() >= s.verify_at:
            self._verify()
        if self.canary is None or self._s.latch is not None or self.killed:
            return
        if self.canary_share:
            self.evaluate()
            if self._llm_rules:
                self.evaluate_llm()  # a first token that never comes ends no request
        s = self._s
        if (s.latch is None and s.step is not None and s.manual_weight is None
                and self.canary_ready):
            self._maybe_step()

    def _verify(self) -> None:
        """After an automatic rollback: is stable within the thresholds (the canary was
        the fault) or bad too (look elsewhere)?"""
        latch = self._s.latch
        if latch is None:  # resumed before the verdict: nothing left to verify
            self._s = replace(self._s, verify_at=None)
            return
        stats = self.window_stats(self.stable)
        ok, detail = rules.verify_stable(self.route.rollback, stats)
        result, kind = ("verified", "verified") if ok else ("failed", "verify_failed")
        latch = Latch(latch.reason, latch.detail, latch.actor, latch.time, verify=kind)
        self._set(replace(self._s, latch=latch, verify_at=None))
        self._announce("verify", {"latch": latch.as_dict()}, None)
        self._metrics.verifications_total.labels(route=self.name, result=result).inc()
        self.emit(kind=kind, actor="auto", reason=detail,
                  figures={"stable": rules.figures_of(stats)})

    def _maybe_step(self) -> None:
        prog, s = self.route.progressive, self._s
        assert prog is not None and s.step is not None and self.canary is not None
        if s.step >= len(prog.steps) - 1:
            return
        now = self._clock()
        if now - s.step_since < prog.interval:
            return
        stats = self.window_stats(self.canary)
        if not (self.judgement.gate(stats) and (self.guards is None or self.guards.gate())):
            # not enough evidence yet: wait, do not step blind
            if self.stalled_at != s.step and now - s.step_since >= 2 * prog.interval:
                self.stalled_at = s.step  # said once per step
                self.emit(kind="step_stalled", actor="auto", reason=(
                    f"progressive step {s.step + 1} of {len(prog.steps)} "
                    f"({prog.steps[s.step]:g}%) waits for evidence: {self._wanting(stats)}"),
                    figures=self._judge_figures(stats))
            return
        self.stalled_at = None
        sequential = self.judgement.kind == SEQUENTIAL
        figures = self._judge_figures(stats) if sequential else rules.figures_of(stats)
        self._set(carry.at_step(s, self.route, s.step + 1, now))
        weight = prog.steps[s.step + 1]
        kind = "promote" if weight >= 100 else "step"
        evidence = ("canary no worse than stable" if sequential else "healthy window")
        event = self.emit(kind=kind, actor="auto", reason=f"{evidence}: weight {weight:g}%",
                          figures=figures)
        self._announce("step", {"step": s.step + 1, "weight": weight}, event)

    def _wanting(self, stats: WindowStats) -> str:
        """What a held step waits for, and what would shorten the wait."""
        if self.judgement.gate(stats) and self.guards is not None:
            waiting = [f"{name}: {v.detail}" for name, v in self.guard_verdicts().items()
                       if v.state.value != "passing"]
            return "the guards have not cleared the canary: " + "; ".join(waiting)
        policy = self.route.rollback
        if self.judgement.kind != SEQUENTIAL:
            return (f"{stats.requests} canary requests in the {policy.window:g}s window, "
                    f"{policy.min_requests} needed (raise the step's weight or the window, or "
                    "lower min_requests)")
        verdict = self.judge_verdict()
        detail = verdict.detail if verdict is not None else "no verdict"
        return (f"the judge has no proof yet that the canary is no worse than stable within "
                f"{policy.tolerance:g}pp: {detail} (raise the step's weight, or "
                "rollback.tolerance)")

    def _judge_figures(self, stats: WindowStats) -> dict[str, Any]:
        verdict = self.judge_verdict()
        figures = dict(verdict.figures) if verdict is not None else {}
        figures.setdefault("canary", rules.figures_of(stats))
        return figures

    # -- operator actions (admin API) -------------------------------------------------
    def rollback(self, reason: str | None, actor: str = "admin") -> None:
        """Manual rollback: idempotent; effective on the very next request."""
        self._need_canary()
        if self._s.latch is not None:
            return
        text = reason or "manual rollback"
        latch = Latch(reason="manual", detail=text, actor=actor, time=self._wall())
        before = self.canary_share
        self._set(replace(self._s, latch=latch), Effect.UNPIN_CANARY)
        self._metrics.rollbacks_total.labels(route=self.name, reason="manual").inc()
        event = self.emit(kind="rollback", actor=actor, reason=text,
                          figures={**self.figures(), **self._load(before)})
        self._announce("rollback", {"latch": latch.as_dict()}, event)

    def promote(self, actor: str = "admin") -> None:
        self._need_canary()
        self._need_unlatched()
        if not self.canary_ready:
            assert self.canary is not None
            raise RolloutConflict(f"canary {self.canary.upstream} is not ready (its health "
                                  "probes fail): refusing to promote it")
        self._set(replace(self._s, manual_weight=100.0))
        event = self.emit(kind="promote", actor=actor, reason="promoted to 100%",
                          figures=self.figures())
        self._announce("promote", {"weight": 100.0}, event)

    def set_weight(self, weight: float, actor: str = "admin") -> None:
        self._need_canary()
        self._need_unlatched()
        if not 0.0 <= weight <= 100.0:
            raise RolloutConflict("weight must be between 0 and 100", status=400)
        self._set(replace(self._s, manual_weight=weight))
        event = self.emit(kind="weight", actor=actor, reason=f"weight set to {weight:g}%",
                          figures=self.figures())
        self._announce("weight", {"weight": weight}, event)

    def resume(self, actor: str = "admin") -> None:
        """Clear the latch and manual overrides: back to the configured weight."""
        self._set(carry.resumed(self._s, self._clock()), Effect.RESET)
        event = self.emit(kind="resume", actor=actor, reason=f"resumed at {self.weight:g}%",
                          figures={})
        self._announce("resume", {"step": self._s.step}, event)

    def kill(self, enabled: bool, actor: str = "admin") -> None:
        self._set(replace(self._s, kill_override=enabled))
        event = self.emit(kind="kill", actor=actor,
                          reason="kill switch on" if enabled else "kill switch off",
                          figures={})
        self._announce("kill", {"enabled": enabled}, event)

    def _load(self, canary_share: float) -> dict[str, Any]:
        """The share of traffic the base lane took before a flip and takes now."""
        return {"load": {"upstream": self.base_lane.upstream,
                         "before_pct": round((1 - canary_share) * 100, 3), "now_pct": 100.0}}

    def _load_note(self, canary_share: float) -> str:
        """What a flip puts on the base lane: it takes everything at once, so one sized
        for what it took before can be overloaded (see README: sizing for a flip)."""
        if canary_share <= 0:
            return ""
        return (f"; {self.base_lane.upstream} now takes all traffic (it took "
                f"{(1 - canary_share) * 100:g}%)")

    def _need_canary(self) -> None:
        if self.canary is None:
            raise RolloutConflict(f"route {self.name!r} has no canary", status=400)

    def _need_unlatched(self) -> None:
        if self._s.latch is not None:
            raise RolloutConflict(f"route {self.name!r} is rolled_back: resume it first")

    def _announce(self, op: str, data: dict[str, Any], event: Event | None) -> None:
        if self._announce_to is not None:
            self._announce_to(self, op, data, event)

    # -- carried state: reload, restart, fleet ----------------------------------------------
    def adopt(self, old: Rollout) -> None:
        """Carry ``old``'s state over a reload. Windows of the same lanes survive, and
        requests still in flight on the old lanes report to this rollout; the pins and the
        shadow's copies in flight carry on where their config did not change."""
        same_window = old.route.rollback.window == self.route.rollback.window
        for name, lane in self.lanes.items():
            prev = old.lanes.get(name)
            if prev is not None and prev.role == lane.role and same_window:
                lane.window = prev.window
                if prev.llm is not None and lane.llm is not None:
                    lane.llm.window = prev.llm.window
        old.retire(self)
        same = old.fingerprint() == self._fp
        if same and old.base_lane.role == self.base_lane.role:
            self.judgement.carry(old.judgement, self.base_lane)
        if same and self.guards is not None and old.guards is not None:
            self.guards.carry(old.guards)
        if same and old.pins is not None and self.pins is not None and (
                old.route.sticky == self.route.sticky):
            self.pins = old.pins
        self._s = carry.adopted(old.live, old.route, old.fingerprint(), self._s, self.route,
                                self._fp, self._clock())
        self._refresh()

    def retire(self, successor: Rollout) -> None:
        """Replaced by a reload: requests in flight on this rollout's lanes report to the
        successor's lane of the same upstream and role (or to nobody)."""
        for name, lane in self.lanes.items():
            nxt = successor.lanes.get(name)
            same = nxt is not None and nxt.role == lane.role
            lane.watch(nxt.judge if nxt is not None and same else None)
            if lane.llm is not None:
                llm = successor._after_llm if same and successor._llm_rules else None
                lane.llm.watch(llm if lane.role == "canary" else None)

    def restore(self, saved: dict[str, Any]) -> None:
        """Apply the state file's entry for this route (fields already type-checked)."""
        self._s, warnings = carry.restored(self._s, self.route, self._fp, saved, self._clock())
        for warning in warnings:
            logger.warning("route %s: %s", self.name, warning)
        self._refresh()

    def link_fleet(self, announce: Announce | None, shared: SharedPins | None) -> None:
        """With ``state.redis``: where actions are announced, and the shared pins."""
        self._announce_to = announce
        self.shared = shared if self.pins is not None else None

    def apply_remote(self, op: str, data: dict[str, Any], event: dict[str, Any] | None,
                     origin: str) -> None:
        """An action another replica took, received through Redis: the same change as the
        local action, without announcing it again or counting it (its replica did)."""
        done = carry.remote(self._s, self.route, op, data, self._clock())
        if done is None:
            return
        self._set(*done)
        if event is not None and op != "verify":  # a verdict is reported where it was made
            self._emit_shared(event.get("kind"), event.get("actor"),
                              f"{event.get('reason', '')} (from replica {origin})",
                              {**(event.get("figures") or {}), "replica": origin})

    def catch_up(self, *, present: bool, latch: dict[str, Any] | None,
                 manual_weight: float | None, step: int | None, kill: bool | None,
                 step_weight: float | None) -> None:
        """Take the state stored in Redis (see ``carry.caught_up``)."""
        new, effect, notes = carry.caught_up(
            self._s, self.route, present=present, latch=Latch.of(latch),
            manual_weight=manual_weight, step=step, kill=kill, step_weight=step_weight,
            now=self._clock())
        if new != self._s or effect:
            self._set(new, effect)
        for kind, actor, reason in notes:
            self._emit_shared(kind, actor, reason, {"replica": "redis"})

    def _emit_shared(self, kind: Any, actor: Any, reason: str,
                     figures: dict[str, Any]) -> None:
        """An event for a change that came through Redis (``via``: not notified again)."""
        if kind in EVENT_KINDS and actor in ACTORS:
            self.emit(kind, actor, reason, {**figures, "via": "redis"})

    def __repr__(self) -> str:
        return (f"<Rollout {self.name} {self.state} weight={self.weight:g} "
                f"effective={self.effective_weight:g}>")

