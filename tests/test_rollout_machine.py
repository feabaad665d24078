"""The rollout state machine driven directly: outcomes in, decisions out, a fake clock.
No sockets, no event loop: every trip rule, the latch, resume, progressive steps,
promote, reload carry-over, the state file and fleet messages."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from proxy.config.model import (
    CanaryConfig,
    KillSwitchConfig,
    MatchConfig,
    ProgressiveConfig,
    RollbackConfig,
    RouteConfig,
    StickyConfig,
    UpstreamConfig,
)
from proxy.events import EventLog
from proxy.metrics import Metrics
from proxy.rollout import carry, pick
from proxy.rollout.machine import Rollout, RolloutConflict
from proxy.rollout.sticky import BUCKETS, bucket, key_hash


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakePool:
    """A lane's pool is never called here: only its config is read (the fingerprint)."""

    cfg: UpstreamConfig

    async def send(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise AssertionError("the state machine never sends")


POOLS = {name: FakePool(UpstreamConfig(name=name, url=f"http://127.0.0.1:{port}"))
         for name, port in (("v1", 9001), ("v2", 9002), ("v3", 9003))}


def route(**changes: Any) -> RouteConfig:
    base = RouteConfig(
        name="chat", match=MatchConfig(), stable="v1",
        canary=CanaryConfig(upstream="v2", weight=20),
        rollback=RollbackConfig(judge="threshold", window=10, min_requests=10,
                                max_error_rate=5, max_p99=0.5, consecutive_failures=5,
                                verify=30),
    )
    return replace(base, **changes)


@dataclass
class Machine:
    r: Rollout
    clock: Clock
    events: EventLog
    metrics: Metrics
    changes: list[int] = field(default_factory=list)

    def send(self, lane_name: str, n: int, *, failed: bool = False, latency: float = 0.01,
             ) -> None:
        lane = self.r.lanes[lane_name]
        for _ in range(n):
            started = lane.begin()
            lane.end(started, role=lane.role, outcome=4 if failed else 0, failed=failed,
                     ttfb=latency, total=latency)

    def kinds(self) -> list[str]:
        return [e.kind for e in reversed(self.events.recent(100))]


def machine(cfg: RouteConfig | None = None, clock: Clock | None = None,
            events: EventLog | None = None, metrics: Metrics | None = None) -> Machine:
    clock = clock or Clock()
    events = events or EventLog()
    metrics = metrics or Metrics()
    changes: list[int] = []
    r = Rollout(route=cfg or route(), pools=POOLS, events=events, metrics=metrics,
                on_change=lambda: changes.append(1), clock=clock, wall=lambda: 1.7e9,
                rng=random.Random(7))
    return Machine(r, clock, events, metrics, changes)


# -- trip rules ------------------------------------------------------------------------------
def test_error_rate_trips_latches_and_unpins_at_once():
    m = machine(route(sticky=StickyConfig(header="x-session-id")))
    lane = pick.sticky(m.r, next(f"s{i}" for i in range(100)
                                 if bucket(key_hash(f"s{i}")) < 2000))
    assert lane is m.r.canary
    m.send("v1", 10)
    m.send("v2", 9)
    m.send("v2", 1, failed=True)  # 10% > 5%, min_requests reached
    assert m.r.state == "rolled_back" and m.r.effective_weight == 0
    assert m.r.latch is not None and m.r.latch.reason == "error_rate"
    assert m.r.latch.actor == "auto" and "error rate" in m.r.latch.detail
    assert m.kinds() == ["rollback"] and m.changes
    # the pinned canary session now goes to stable, and so does everything else
    assert pick.sticky(m.r, next(f"s{i}" for i in range(100)
                                 if bucket(key_hash(f"s{i}")) < 2000)) is m.r.stable
    assert all(m.r.pick() is m.r.stable for _ in range(200))


def test_nothing_trips_below_min_requests_and_a_fast_success_is_not_judged_inline():
    m = machine()
    m.send("v2", 5, failed=True)  # 5 in a row, but only 5 requests (min 10)
    assert m.r.state == "canary"
    m.send("v2", 4)
    m.r.tick()
    assert m.r.state == "canary"  # 9 requests
    m.send("v2", 1)
    assert m.r.state == "canary"  # a success cannot make it worse: judged at the tick
    m.r.tick()
    assert m.r.state == "rolled_back" and m.r.latch.reason == "error_rate"


def test_compare_to_stable_keeps_a_canary_failing_no_worse_than_stable():
    m = machine()
    m.send("v1", 10, failed=True)
    m.send("v2", 5, failed=True)
    m.send("v2", 5)
    m.r.tick()
    assert m.r.state == "canary"
    off = machine(route(rollback=replace(route().rollback, compare_to_stable=False,
                                         consecutive_failures=None)))
    off.send("v1", 10, failed=True)
    off.send("v2", 5)
    off.send("v2", 5, failed=True)
    assert off.r.state == "rolled_back" and off.r.latch.reason == "error_rate"


def test_latency_and_a_hung_canary_trip():
    m = machine()
    m.send("v1", 10)
    m.send("v2", 10, latency=0.9)
    assert m.r.latch is not None and m.r.latch.reason == "latency"
    hung = machine()
    lane = hung.r.canary
    for _ in range(10):
        lane.begin()  # never answered
    hung.clock.advance(0.7)
    hung.r.tick()
    assert hung.r.latch is not None and hung.r.latch.reason == "latency"
    assert "still in flight" in hung.r.latch.detail


def test_latency_ratio_needs_stable_evidence():
    cfg = route(rollback=replace(route().rollback, max_p99=None, max_p99_ratio=2.0))
    m = machine(cfg)
    m.send("v2", 10, latency=0.3)
    m.r.tick()
    assert m.r.state == "canary"  # no stable p99 to compare with
    m.send("v1", 10, latency=0.1)
    m.r.tick()
    assert m.r.latch.reason == "latency_ratio"


def test_verification_after_an_automatic_rollback():
    m = machine()
    m.send("v1", 10)
    m.send("v2", 10, failed=True)
    assert m.r.verify_at == m.clock.now + 30
    m.clock.advance(29)
    m.send("v1", 10)
    m.r.tick()
    assert m.r.latch.verify is None
    m.clock.advance(2)
    m.r.tick()
    assert m.r.latch.verify == "verified" and m.r.verify_at is None
    assert m.kinds()[-1] == "verified"
    bad = machine()
    bad.send("v2", 10, failed=True)
    bad.send("v1", 10, failed=True)
    bad.clock.advance(31)
    bad.send("v1", 10, failed=True)
    bad.r.tick()
    assert bad.r.latch.verify == "verify_failed"


# -- operator actions ---------------------------------------------------------------------
def test_manual_actions_latch_resume_and_conflicts():
    m = machine()
    m.r.set_weight(50)
    assert m.r.effective_weight == 50 and m.r.state == "canary"
    m.r.promote()
    assert m.r.state == "promoted" and m.r.pick() is m.r.canary
    m.r.rollback("bad answers")
    m.r.rollback("again")  # idempotent
    assert m.r.latch.detail == "bad answers" and m.kinds().count("rollback") == 1
    with pytest.raises(RolloutConflict) as info:
        m.r.set_weight(10)
    assert info.value.status == 409
    m.send("v1", 5)
    m.r.resume()
    assert m.r.state == "canary" and m.r.weight == 20 and m.r.manual_weight is None
    assert m.r.window_stats(m.r.stable).requests == 0  # a fresh start
    with pytest.raises(RolloutConflict) as info:
        m.r.set_weight(101)
    assert info.value.status == 400
    m.r.kill(True)
    assert m.r.state == "killed" and m.r.killed
    plain = machine(route(canary=None))
    with pytest.raises(RolloutConflict):
        plain.r.rollback(None)


def test_an_unready_canary_waits_and_cannot_be_promoted():
    m = machine()
    m.r.apply_health(lambda name: name != "v2", lambda name: True)
    assert m.r.state == "waiting" and m.r.effective_weight == 0
    assert m.kinds() == ["canary_unhealthy"]
    with pytest.raises(RolloutConflict):
        m.r.promote()
    m.r.apply_health(lambda name: True, lambda name: True)
    assert m.r.state == "canary" and m.r.effective_weight == 20


# -- progressive ----------------------------------------------------------------------------
def test_progressive_steps_only_on_a_healthy_window_after_each_interval():
    cfg = route(progressive=ProgressiveConfig(steps=(5, 50, 100), interval=60))
    m = machine(cfg)
    assert m.r.weight == 5 and m.r.step == 0
    m.clock.advance(61)
    m.r.tick()
    assert m.r.step == 0  # no evidence yet: never step blind
    m.send("v2", 10)
    m.r.tick()
    assert m.r.step == 1 and m.r.weight == 50 and m.kinds() == ["step"]
    m.r.tick()
    assert m.r.step == 1  # the interval starts again
    m.clock.advance(61)
    m.send("v2", 10)
    m.r.tick()
    assert m.r.state == "promoted" and m.kinds() == ["step", "promote"]


# -- carried state ------------------------------------------------------------------------
def test_reload_carries_the_same_rollout_and_starts_a_new_one_fresh():
    clock, events, metrics = Clock(), EventLog(), Metrics()
    old = machine(route(), clock, events, metrics)
    old.send("v1", 10)
    old.r.rollback("x")
    same = machine(route(rollback=replace(route().rollback, max_p99=0.8)), clock, events,
                   metrics)
    same.r.adopt(old.r)
    assert same.r.state == "rolled_back" and same.r.latch == old.r.latch
    assert same.r.window_stats(same.r.stable).requests == 10  # the window carried over
    # a request in flight on the old canary lane reports to the new rollout
    assert old.r.canary.judge == same.r.canary.judge
    moved = machine(route(canary=CanaryConfig(upstream="v3", weight=20)), clock, events,
                    metrics)
    moved.r.adopt(same.r)
    assert moved.r.state == "canary" and moved.r.latch is None
    assert same.r.canary.judge is None  # v2 is no longer anyone's canary


def test_reload_manual_weight_gives_way_to_a_new_configured_weight_and_plans_map_by_weight():
    clock, events, metrics = Clock(), EventLog(), Metrics()
    old = machine(route(), clock, events, metrics)
    old.r.set_weight(40)
    same = machine(route(), clock, events, metrics)
    same.r.adopt(old.r)
    assert same.r.weight == 40
    new = machine(route(canary=CanaryConfig(upstream="v2", weight=30)), clock, events, metrics)
    new.r.adopt(same.r)
    assert new.r.weight == 30 and new.r.manual_weight is None
    plan = machine(route(progressive=ProgressiveConfig(steps=(5, 50, 60, 100))), clock,
                   events, metrics)
    plan.r.adopt(new.r)
    st = carry.at_step(plan.r.live, plan.r.route, 2, clock.now)
    assert st.step == 2
    plan2 = machine(route(progressive=ProgressiveConfig(steps=(5, 100))), clock, events,
                    metrics)
    fake = machine(route(progressive=ProgressiveConfig(steps=(5, 50, 60, 100))), clock,
                   events, metrics)
    fake.r.apply_remote("step", {"step": 2, "weight": 60}, None, "peer")
    plan2.r.adopt(fake.r)
    assert plan2.r.weight == 5  # 60% under [5, 100] is not 100%: the step at most 60


def test_kill_override_gives_way_to_a_changed_kill_switch():
    clock, events, metrics = Clock(), EventLog(), Metrics()
    old = machine(route(), clock, events, metrics)
    old.r.kill(True)
    same = machine(route(), clock, events, metrics)
    same.r.adopt(old.r)
    assert same.r.killed
    changed = machine(route(kill_switch=KillSwitchConfig(enabled=True)), clock, events, metrics)
    changed.r.adopt(same.r)
    assert changed.r.kill_override is None and changed.r.killed  # the config's, now


def test_state_file_round_trip_and_what_gives_way():
    m = machine(route(progressive=ProgressiveConfig(steps=(5, 50, 100))))
    m.r.apply_remote("step", {"step": 1, "weight": 50}, None, "peer")
    m.r.rollback("bad")
    saved = m.r.persisted()
    assert saved["latch"]["detail"] == "bad" and saved["step"] == 1
    back = machine(route(progressive=ProgressiveConfig(steps=(5, 50, 100))))
    back.r.restore(saved)
    assert back.r.latch == m.r.latch and back.r.step == 1
    other = machine(route(canary=CanaryConfig(upstream="v3", weight=20)))
    other.r.restore(saved)
    assert other.r.latch is None  # another rollout's state


# -- the fleet ------------------------------------------------------------------------------
def test_fleet_messages_change_state_as_local_actions_do():
    m = machine(route(sticky=StickyConfig(header="x-session-id")))
    key = next(f"s{i}" for i in range(100) if bucket(key_hash(f"s{i}")) < 2000)
    assert pick.sticky(m.r, key) is m.r.canary
    latch = {"reason": "manual", "detail": "from B", "actor": "admin", "time": 1.0}
    m.r.apply_remote("rollback", {"latch": latch}, {"kind": "rollback", "actor": "admin",
                                                    "reason": "from B"}, "B")
    assert m.r.state == "rolled_back" and pick.sticky(m.r, key) is m.r.stable
    assert m.events.recent(1)[0].figures["via"] == "redis"
    m.r.apply_remote("weight", {"weight": 50}, None, "B")
    assert m.r.manual_weight is None  # does not fit a latched route: dropped
    m.r.apply_remote("resume", {}, None, "B")
    assert m.r.state == "canary" and len(m.r.pins) == 0
    m.r.catch_up(present=True, latch=latch, manual_weight=None, step=None, kill=None,
                 step_weight=None)
    assert m.r.latch is not None and m.r.latch.detail == "from B"
    m.r.catch_up(present=True, latch=None, manual_weight=30.0, step=None, kill=True,
                 step_weight=None)
    assert m.r.latch is None and m.r.weight == 30 and m.r.killed
    assert "resume" in m.kinds() and "kill" in m.kinds()


def test_the_bucket_rule_is_the_documented_one():
    m = machine(route(sticky=StickyConfig(header="x-session-id")))
    for i in range(200):
        key = f"k{i}"
        lane = pick.sticky(m.r, key)
        assert (lane is m.r.canary) == (bucket(key_hash(key)) < 20 * BUCKETS // 100)


# -- what events say ----------------------------------------------------------------------
def test_a_flip_says_what_stable_must_now_carry_and_events_name_versions():
    pools = {n: FakePool(replace(p.cfg, version=f"model-{n}")) for n, p in POOLS.items()}
    events = EventLog()
    r = Rollout(route=route(), pools=pools, events=events, metrics=Metrics(),
                on_change=lambda: None, clock=Clock(), rng=random.Random(1))
    r.rollback("bad answers")
    event = events.recent(1)[0]
    assert event.reason == "bad answers"  # the operator's words, as typed
    assert event.figures["load"] == {"upstream": "v1", "before_pct": 80.0, "now_pct": 100.0}
    assert event.figures["versions"] == {"stable": "model-v1", "canary": "model-v2"}
    r.resume()
    for _ in range(20):
        started = r.canary.begin()
        r.canary.end(started, role="canary", outcome=4, failed=True, ttfb=0.01, total=0.01)
    assert events.recent(1)[0].reason.endswith("; v1 now takes all traffic (it took 80%)")


def test_a_plan_that_cannot_collect_evidence_says_so_once():
    cfg = route(progressive=ProgressiveConfig(steps=(1, 50, 100), interval=60))
    m = machine(cfg)
    m.send("v2", 3)
    m.clock.advance(61)
    m.r.tick()
    assert m.kinds() == []  # one interval late: not yet worth a word
    m.clock.advance(60)
    m.send("v2", 3)
    m.r.tick()
    m.r.tick()
    assert m.kinds() == ["step_stalled"] and m.r.stalled_at == 0
    assert "needed" in m.events.recent(1)[0].reason
    m.send("v2", 10)
    m.r.tick()
    assert m.kinds() == ["step_stalled", "step"] and m.r.stalled_at is None


def test_a_canary_ready_at_start_is_not_said_to_be_back():
    m = machine()
    m.r.apply_health(lambda name: None, lambda name: True, quiet=True)  # not judged yet
    assert m.r.state == "waiting"
    m.r.apply_health(lambda name: True, lambda name: True)
    assert m.events.recent(1)[0].reason == "canary v2 is ready (health probes pass): weight 20%"
    m.r.apply_health(lambda name: name != "v2", lambda name: True)
    m.r.apply_health(lambda name: True, lambda name: True)
    assert m.events.recent(1)[0].reason.endswith("weight 20% again")
