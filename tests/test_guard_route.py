"""RouteGuards (issue 17): one route's configured guards fed as the request path, the
pair copies and POST /feedback will feed them; trips, the gate, reload carry, restart."""

from __future__ import annotations

import random

import orjson

from proxy.config.model import (
    CompareGuardConfig,
    FeedbackGuardConfig,
    GuardConfig,
    OutputGuardConfig,
)
from proxy.guard.feedback import FeedbackOutcome
from proxy.guard.route import RouteGuards
from proxy.rollout.judge import JudgeState

ALL = GuardConfig(output=OutputGuardConfig(json_path="predictions.0"),
                  feedback=FeedbackGuardConfig(json_path="predictions.0", min_accuracy=0.85),
                  compare=CompareGuardConfig(json_paths=("predictions.0",)))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(label: str) -> bytes:
    return orjson.dumps({"predictions": [label]})


def test_guard_route_builds_what_is_configured() -> None:
    guards = RouteGuards(GuardConfig(output=OutputGuardConfig(json_path="x")), share=0.1,
                         clock=Clock())
    assert [g.reason.value for g in guards.guards] == ["output_drift"]
    assert guards.store is None and guards.pair_kind("canary", 0.0) is None
    result, tripped = guards.rated(b'{"request_id": "a", "correct": true}', fingerprint="f")
    assert result.status == 404 and tripped is None
    both = RouteGuards(ALL, share=0.2, clock=Clock())
    assert [g.reason.value for g in both.guards] == ["output_drift", "feedback", "disagreement"]
    assert both.wants_answer("stable", 0.99)  # feedback reads every answer's value
    assert repr(both) == "<RouteGuards share=0.2: output_drift, feedback, disagreement>"


def test_guard_route_output_drift_trips_on_the_broken_classifier() -> None:
    rng = random.Random(1)
    guards = RouteGuards(GuardConfig(output=OutputGuardConfig(json_path="predictions.0")),
                         share=0.2, clock=Clock())
    tripped, canary = None, 0
    while tripped is None:
        arm = "canary" if rng.random() < 0.2 else "stable"
        canary += arm == "canary"
        draw = rng.random()
        body = None
        if guards.wants_answer(arm, draw):
            p = 0.9 if arm == "canary" else 0.5
            body = answer("malignant" if rng.random() < p else "benign")
        tripped = guards.answered(arm, body, draw=draw, request_id=None, fingerprint="f")
    assert tripped is guards.drift and guards.failing is tripped and canary <= 100
    verdict = tripped.verdict()
    assert verdict.state is JudgeState.FAILING and verdict.reason == "output_drift"
    assert not guards.gate()
    assert guards.answered("canary", answer("x"), draw=0.0, request_id=None,
                           fingerprint="f") is None  # tripped once


def test_guard_route_feedback_through_the_store() -> None:
    clock = Clock()
    guards = RouteGuards(ALL, share=0.2, clock=clock)
    rng = random.Random(2)
    tripped = None
    for i in range(400):
        arm = "canary" if rng.random() < 0.2 else "stable"
        truth = "malignant" if rng.random() < 0.5 else "benign"
        good = rng.random() < (0.34 if arm == "canary" else 0.98)
        said = truth if good else ("benign" if truth == "malignant" else "malignant")
        guards.answered(arm, answer(said), draw=1.0, request_id=f"r{i}", fingerprint="f")
        result, tripped = guards.rated(orjson.dumps({"request_id": f"r{i}", "label": truth}),
                                       fingerprint="f")
        assert result.outcome is FeedbackOutcome.RECORDED
        if tripped is not None:
            break
    assert tripped is guards.feedback and tripped.verdict().reason == "feedback"
    result, _ = guards.rated(b'{"request_id": "r0", "correct": true}', fingerprint="f")
    assert result.status == 409


def test_guard_route_pairs_and_noise() -> None:
    cfg = GuardConfig(compare=CompareGuardConfig(json_paths=("predictions.0",), sample=10,
                                                 noise_floor=True))
    guards = RouteGuards(cfg, share=0.2, clock=Clock())
    assert guards.pair_kind("canary", 0.05) == "canary"
    assert guards.pair_kind("canary", 0.5) is None
    assert guards.pair_kind("stable", 0.02) == "noise"  # 10% x 0.2/0.8 = 2.5% of stable's
    assert guards.pair_kind("stable", 0.03) is None
    tripped = None
    rng = random.Random(3)
    while tripped is None:
        kind = "canary" if rng.random() < 0.5 else "noise"
        differ = rng.random() < (0.6 if kind == "canary" else 0.1)
        tripped = guards.paired(kind, primary_status=200, copy_status=200,
                                primary_body=answer("a"),
                                copy_body=answer("b" if differ else "a"))
    assert tripped is guards.disagreement


def test_guard_route_gate_needs_every_guard() -> None:
    cfg = GuardConfig(compare=CompareGuardConfig(json_paths=("predictions.0",)),
                      feedback=FeedbackGuardConfig())
    guards = RouteGuards(cfg, share=0.2, clock=Clock())
    for _ in range(200):
        guards.paired("canary", primary_status=200, copy_status=200,
                      primary_body=answer("a"), copy_body=answer("a"))
    assert guards.disagreement is not None and guards.disagreement.not_worse()
    assert not guards.gate()  # feedback has no ratings yet
    assert set(guards.verdicts()) == {"feedback", "disagreement"}
    assert guards.verdicts()["disagreement"].state is JudgeState.PASSING


def test_guard_route_carry_restart_and_follow() -> None:
    clock = Clock()
    old = RouteGuards(ALL, share=0.2, clock=clock)
    old.answered("canary", answer("a"), draw=0.0, request_id="kept", fingerprint="f")
    new = RouteGuards(ALL, share=0.5, clock=clock)
    new.carry(old)
    assert new.drift is old.drift and new.feedback is old.feedback
    assert new.disagreement is old.disagreement and new.store is old.store
    assert new.drift is not None and new.drift.share == 0.5
    changed = RouteGuards(GuardConfig(output=OutputGuardConfig(json_path="other"),
                                      feedback=ALL.feedback), share=0.5, clock=clock)
    changed.carry(old)
    assert changed.drift is not old.drift and changed.store is old.store
    store = new.store
    new.restart()
    assert new.drift is not old.drift and new.store is store  # ids outlive the evidence
    new.follow(0.25)
    assert new.share == 0.25 and new.drift is not None and new.drift.share == 0.25
    result, _ = new.rated(b'{"request_id": "kept", "correct": true}', fingerprint="f")
    assert result.outcome is FeedbackOutcome.STALE  # answered before the restart
    new.answered("stable", answer("a"), draw=0.0, request_id="now", fingerprint="f")
    result, _ = new.rated(b'{"request_id": "now", "correct": true}', fingerprint="f2")
    assert result.outcome is FeedbackOutcome.STALE  # a new rollout since
    new.answered("stable", answer("a"), draw=0.0, request_id="ok", fingerprint="f")
    result, _ = new.rated(b'{"request_id": "ok", "correct": true}', fingerprint="f")
    assert result.outcome is FeedbackOutcome.RECORDED
