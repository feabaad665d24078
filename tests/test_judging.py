"""The sequential judge inside the rollout machine (fake clock, no sockets): what it is
fed, when its evidence is kept or started afresh, its trips, its gate, its rails."""

from __future__ import annotations

from dataclasses import replace

from proxy.config.model import CanaryConfig, ProgressiveConfig, StickyConfig
from proxy.rollout.windows import SlidingWindow
from tests.test_rollout_machine import Clock, Machine, machine, route


def sequential(**changes: object):
    base = route()
    return replace(base, rollback=replace(base.rollback, judge="sequential",
                                          max_error_rate=None), **changes)


def outcomes(m: Machine, lane_name: str, n: int, *, failed: bool = False,
             client_error: bool = False, latency: float = 0.01, role: str | None = None) -> None:
    lane = m.r.lanes[lane_name]
    outcome = 4 if failed else 2 if client_error else 0
    for _ in range(n):
        started = lane.begin()
        lane.end(started, role=role or lane.role, outcome=outcome, failed=failed,
                 ttfb=latency, total=latency)


def test_failures_only_the_canary_has_trip_the_judge_before_min_requests():
    m = machine(sequential())
    outcomes(m, "v1", 40)
    outcomes(m, "v2", 4, failed=True)
    assert m.r.latch is None  # at a 20% share, 4 failures are not proof yet
    outcomes(m, "v2", 1, failed=True)  # 5 of 5: min_requests (10) holds the streak rule
    assert m.r.latch is not None and m.r.latch.reason == "failure_rate"
    event = m.events.recent(1)[0]
    assert event.kind == "rollback" and event.figures["judge"] == "sequential"
    assert event.figures["canary"]["failures"] == 5 and "e-value" in event.reason
    assert m.metrics.rollbacks_total.labels(route="chat", reason="failure_rate")._value.get() == 1


def test_4xx_only_on_the_canary_trip_but_not_on_a_sticky_route():
    m = machine(sequential())
    outcomes(m, "v1", 40)
    outcomes(m, "v2", 12, client_error=True)
    assert m.r.latch is not None and m.r.latch.reason == "client_error_rate"
    sticky = machine(sequential(sticky=StickyConfig(header="x-session")))
    outcomes(sticky, "v1", 40)
    outcomes(sticky, "v2", 12, client_error=True)
    assert sticky.r.latch is None  # a session is one unit: its 4xx are not the canary's


def test_requests_sent_by_the_override_header_are_not_judged():
    m = machine(sequential(override_header="x-upstream"))
    outcomes(m, "v1", 40)
    outcomes(m, "v2", 4, failed=True, role="override")  # below the streak limit
    assert m.r.latch is None and m.r.judgement.judge.canary_requests == 0


def test_a_rise_of_the_share_keeps_the_evidence_a_drop_or_new_base_starts_afresh():
    m = machine(sequential())
    outcomes(m, "v1", 30)
    outcomes(m, "v2", 5)
    judge = m.r.judgement.judge
    assert judge.share == 0.2 and judge.stable_requests == 30
    m.r.set_weight(40)
    assert m.r.judgement.judge is judge and judge.share == 0.4
    m.r.set_weight(10)
    assert m.r.judgement.judge is not judge and m.r.judgement.judge.share == 0.1
    judge = m.r.judgement.judge
    m.r.set_weight(100)  # no split left to judge: nothing is fed
    outcomes(m, "v2", 3, failed=True)
    assert judge.canary_requests == 0 and not m.r.judgement.active


def test_the_fallback_is_the_base_while_stable_is_down():
    m = machine(sequential(fallback="v3"))
    outcomes(m, "v1", 30)
    before = m.r.judgement.judge
    m.r.apply_health(lambda name: name != "v1", lambda name: True)
    assert m.r.base_lane is m.r.fallback and m.r.judgement.judge is not before
    outcomes(m, "v3", 7)
    outcomes(m, "v1", 5)  # stable's stragglers are not the base any more
    assert m.r.judgement.judge.stable_requests == 7


def test_resume_starts_afresh_and_a_reload_of_the_same_rollout_keeps_the_evidence():
    clock = Clock()
    m = machine(sequential(), clock)
    outcomes(m, "v1", 30)
    outcomes(m, "v2", 4)
    judge = m.r.judgement.judge
    same = machine(sequential(), clock, m.events, m.metrics)
    same.r.adopt(m.r)
    assert same.r.judgement.judge is judge
    other = machine(sequential(canary=CanaryConfig(upstream="v3", weight=20)), clock,
                    m.events, m.metrics)
    other.r.adopt(same.r)
    assert other.r.judgement.judge is not judge
    other.r.rollback("x")
    other.r.resume()
    assert other.r.judgement.judge.canary_requests == 0


def test_the_gate_holds_a_step_while_inconclusive_and_says_so_once():
    clock = Clock()
    m = machine(sequential(progressive=ProgressiveConfig(steps=(20, 50, 100), interval=1.0)),
                clock)
    for _ in range(30):
        outcomes(m, "v1", 8)
        outcomes(m, "v2", 2)
        clock.advance(0.1)
        m.r.tick()
    assert m.r.step == 0 and m.r.judge_verdict().state.value == "inconclusive"
    stalled = [e for e in m.events.recent(50) if e.kind == "step_stalled"]
    assert len(stalled) == 1 and "no proof yet" in stalled[0].reason
    assert "e_values" in stalled[0].figures


def test_one_slow_request_among_twenty_is_not_a_p99_trip_beside_the_judge_three_are():
    m = machine(sequential())
    outcomes(m, "v1", 100)
    outcomes(m, "v2", 19)
    outcomes(m, "v2", 1, latency=0.9)  # over max_p99 (0.5 s): today's rule would trip
    m.r.tick()
    assert m.r.latch is None
    outcomes(m, "v2", 2, latency=0.9)
    m.r.tick()
    assert m.r.latch is not None and m.r.latch.reason in ("latency", "failure_rate")


def test_the_third_slowest_reading_of_a_window():
    clock = Clock()
    window = SlidingWindow(10.0, clock, slots=100)
    for latency in [0.01] * 17 + [0.2, 0.3, 0.9]:
        window.end(window.begin(), latency, False)
    stats = window.stats()
    assert stats.p99 >= 0.9 and 0.2 <= stats.p99_of_three < 0.3  # p99 is the max of 20
