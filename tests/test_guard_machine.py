"""The quality guards inside the rollout machine (fake clock, no sockets): an answer or a
rating in, a trip, a held step, the state shown, the evidence kept or started afresh."""

from __future__ import annotations

import random
from dataclasses import replace

import orjson

from proxy.config.model import (
    CanaryConfig,
    FeedbackGuardConfig,
    GuardConfig,
    OutputGuardConfig,
    ProgressiveConfig,
)
from tests.test_rollout_machine import Clock, machine, route

DRIFT = GuardConfig(output=OutputGuardConfig(json_path="predictions.0"))


def answer(label: str) -> bytes:
    return orjson.dumps({"predictions": [label]})


def test_output_drift_trips_a_canary_that_answers_one_class():
    m = machine(route(guard=DRIFT))
    rng = random.Random(3)
    for i in range(400):
        arm = "canary" if rng.random() < 0.2 else "stable"
        label = ("malignant" if rng.random() < 0.9 else "benign") if arm == "canary" else (
            "malignant" if i % 2 else "benign")
        draw = rng.random()
        body = answer(label) if m.r.guards.wants_answer(arm, draw) else None
        m.r.answered(arm, body, draw=draw, request_id=f"r{i}")
        if m.r.latch is not None:
            break
    assert m.r.latch is not None and m.r.latch.reason == "output_drift", m.r.guards
    event = m.events.recent(1)[0]
    assert event.kind == "rollback" and event.reason.startswith("output_drift: ")
    assert m.metrics.rollbacks_total.labels(route="chat", reason="output_drift")._value.get() == 1


def test_a_healthy_canary_is_not_flipped_and_shows_its_guard_state():
    m = machine(route(guard=DRIFT))
    rng = random.Random(5)
    for i in range(2000):
        arm = "canary" if rng.random() < 0.2 else "stable"
        draw = rng.random()
        body = answer(rng.choice(["a", "b", "c"])) if m.r.guards.wants_answer(arm, draw) else None
        m.r.answered(arm, body, draw=draw, request_id=f"r{i}")
    assert m.r.latch is None
    states = {name: v.state.value for name, v in m.r.guard_verdicts().items()}
    assert set(states) == {"output_drift"} and states["output_drift"] != "failing"


def test_feedback_on_accuracy_trips_and_answers_each_body_with_its_status():
    cfg = GuardConfig(feedback=FeedbackGuardConfig(min_accuracy=0.85))
    m = machine(route(guard=cfg))
    for i in range(200):
        arm = "canary" if i % 5 == 0 else "stable"
        m.r.answered(arm, None, draw=0.5, request_id=f"id{i}")
    assert m.r.rated(b'{"request_id": "nope", "correct": true}').status == 404
    assert m.r.rated(b'{"request_id": "id1"}').status == 400
    result = m.r.rated(b'{"request_id": "id1", "correct": true}')
    assert result.status == 202
    assert m.r.rated(b'{"request_id": "id1", "correct": true}').status == 409
    for i in range(0, 200, 5):  # the canary's answers: a third right
        m.r.rated(orjson.dumps({"request_id": f"id{i}", "correct": i % 15 == 0}))
        if m.r.latch is not None:
            break
    assert m.r.latch is not None and m.r.latch.reason == "feedback"


def test_an_inconclusive_guard_holds_a_progressive_step():
    clock = Clock()
    cfg = route(guard=DRIFT, progressive=ProgressiveConfig(steps=(20, 50, 100), interval=1.0))
    cfg = replace(cfg, rollback=replace(cfg.rollback, judge="threshold"))
    m = machine(cfg, clock)
    for _ in range(30):  # plenty for the threshold judge, far too few answers for drift
        m.send("v1", 8)
        m.send("v2", 2)
        clock.advance(0.1)
        m.r.tick()
    assert m.r.step == 0
    stalled = [e for e in m.events.recent(50) if e.kind == "step_stalled"]
    assert len(stalled) == 1 and "guards have not cleared" in stalled[0].reason


def test_guards_carry_over_a_reload_of_the_same_rollout_and_restart_on_a_new_one():
    clock = Clock()
    m = machine(route(guard=DRIFT), clock)
    drift = m.r.guards.drift
    same = machine(route(guard=DRIFT), clock, m.events, m.metrics)
    same.r.adopt(m.r)
    assert same.r.guards.drift is drift
    other = machine(route(guard=DRIFT, canary=CanaryConfig(upstream="v3", weight=20)), clock,
                    m.events, m.metrics)
    other.r.adopt(same.r)
    assert other.r.guards.drift is not drift
