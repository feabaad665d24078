"""The output drift guard (issue 17, guard 1): categories, the e-process's power on the
issue's broken classifier and its false-flip rate on healthy canaries, checked by seeded
simulation; the states, figures and the answer reader it shares with the shadow."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from proxy.answer import MISSING, value_at
from proxy.guard.drift import ABSENT, OTHER, OutputDrift, category
from proxy.rollout.judge import JudgeState


def classifier(rng: random.Random, p_malignant: float) -> str:
    return "malignant" if rng.random() < p_malignant else "benign"


def run(seed: int, *, canary_p: float, stable_p: float = 0.5, weight: float = 0.2,
        requests: int = 2000, alpha: float = 0.01) -> int | None:
    """Canary answers seen when the guard flipped, or None when it never did."""
    rng = random.Random(seed)
    guard = OutputDrift(alpha=alpha)
    canary = 0
    for _ in range(requests):
        if rng.random() < weight:
            canary += 1
            guard.observe("canary", classifier(rng, canary_p))
        else:
            guard.observe("stable", classifier(rng, stable_p))
        if guard.failing:
            return canary
    return None


@pytest.mark.parametrize(("value", "expected"), [
    ("malignant", "malignant"), ("x" * 100, "x" * 64), (True, "true"), (False, "false"),
    (3, "3"), (3.0, "3"), (-2, "-2"), (10**9, "~1e+09"), (0.93, "~0.9"), (0.0042, "~0.004"),
    (None, "null"), (MISSING, ABSENT), ([0.1, 0.9], "[0.1,0.9]"),
    ({"b": 1, "a": 2}, '{"a":2,"b":1}'), (float("nan"), "nan"),
])
def test_guard_drift_category(value: object, expected: str) -> None:
    assert category(value) == expected


def test_guard_drift_flips_the_broken_classifier_within_100_canary_answers() -> None:
    # Issue 17: the canary answers one class for 90% of inputs, stable is balanced, 20%.
    flipped = [run(seed, canary_p=0.9) for seed in range(60)]
    assert all(n is not None and n <= 100 for n in flipped), flipped
    assert sorted(n for n in flipped if n is not None)[30] <= 45  # median: a few dozen


def test_guard_drift_leaves_a_healthy_canary_alone_over_2000_requests() -> None:
    flipped = [run(seed, canary_p=0.5) for seed in range(100)]
    assert flipped.count(None) == 100


def test_guard_drift_false_flip_rate_is_at_most_alpha() -> None:
    # At alpha 0.2 false flips are common enough to count: at most alpha (plus 3 sigma).
    runs, alpha = 200, 0.2
    flips = sum(run(1000 + s, canary_p=0.5, requests=1000, alpha=alpha) is not None
                for s in range(runs))
    assert flips <= runs * alpha + 3 * math.sqrt(runs * alpha * (1 - alpha)), flips


def test_guard_drift_is_not_fooled_by_a_changing_input_mix_or_a_lossy_canary() -> None:
    # Both arms see the same mix at each moment (a random split), even as it swings; the
    # canary's answers are read half as often (failures, cut streams): its share of
    # answers is not the weight, and the test does not need it to be.
    flips = 0
    for seed in range(40):
        rng = random.Random(seed)
        guard = OutputDrift(alpha=0.01)
        for i in range(3000):
            p = 0.15 if (i // 300) % 2 else 0.85
            if rng.random() < 0.2:
                if rng.random() < 0.5:
                    guard.observe("canary", classifier(rng, p))
            else:
                guard.observe("stable", classifier(rng, p))
        flips += guard.failing
    assert flips == 0


def test_guard_drift_banks_evidence_across_a_change_of_weight() -> None:
    rng = random.Random(7)
    healthy, broken = OutputDrift(share=0.05), OutputDrift(share=0.05)
    banked = []
    for share in (0.05, 0.25, 0.5):
        healthy.set_share(share)
        broken.set_share(share)
        for _ in range(300):
            arm = "canary" if rng.random() < share else "stable"
            healthy.observe(arm, classifier(rng, 0.5))
            broken.observe(arm, classifier(rng, 0.8 if arm == "canary" else 0.5))
        banked.append(broken.log_evalue())
    # What was learnt of the canary's answers at one weight carries into the next.
    assert not healthy.failing and broken.failing
    assert banked[0] < math.log(100) and banked[0] < banked[1] and max(banked) >= math.log(100)
    assert healthy.share == 0.5
    assert sum(healthy.canary) + sum(healthy.stable) == 900


def test_guard_drift_trips_on_a_class_stable_never_answers() -> None:
    guard = OutputDrift()
    rng = random.Random(3)
    n = 0
    while not guard.failing:
        n += 1
        guard.observe("stable", classifier(rng, 0.5))
        if n % 5 == 0:
            guard.observe("canary", "error: scaler missing")
    assert n // 5 <= 15


def test_guard_drift_reads_two_stable_answers_per_canary_answer() -> None:
    rng = random.Random(4)
    guard = OutputDrift(share=0.1)
    read = {"canary": 0, "stable": 0}
    for _ in range(100_000):
        arm = "canary" if rng.random() < 0.1 else "stable"
        read[arm] += guard.wants(arm, rng.random())
    assert 9_500 < read["canary"] < 10_500 and abs(read["stable"] - 2 * read["canary"]) < 900
    assert OutputDrift(share=0.5).wants("stable", 0.99)  # past 33%: every answer
    assert OutputDrift().wants("stable", 0.99) and not OutputDrift(share=1.0).wants("stable", 0)
    # Sampled that way, the broken classifier still flips within 100 canary answers.
    for seed in range(40):
        rng = random.Random(seed)
        guard, canary = OutputDrift(share=0.2), 0
        while not guard.failing:
            arm = "canary" if rng.random() < 0.2 else "stable"
            canary += arm == "canary"
            if guard.wants(arm, rng.random()):
                guard.observe(arm, classifier(rng, 0.9 if arm == "canary" else 0.5))
        assert canary <= 100


def test_guard_drift_keeps_top_k_categories_and_bounded_memory() -> None:
    guard = OutputDrift(top_k=4)
    for i in range(1000):
        guard.observe("stable" if i % 2 else "canary", f"text {i}")
    assert guard.names == ["text 0", "text 1", "text 2", "text 3", OTHER]
    assert guard.canary[4] + guard.stable[4] == 996
    assert len(guard._slot) <= 16
    assert not guard.failing  # free text: every answer distinct, all in (other)


def test_guard_drift_states_and_figures() -> None:
    guard = OutputDrift(json_path="predictions.0")
    verdict = guard.verdict()
    assert verdict.state is JudgeState.INCONCLUSIVE and verdict.reason is None
    rng = random.Random(11)
    for _ in range(25_000):
        arm = "canary" if rng.random() < 0.2 else "stable"
        guard.observe(arm, classifier(rng, 0.5))
    verdict = guard.verdict()
    assert verdict.state is JudgeState.PASSING, verdict.detail
    assert guard.not_worse() and not guard.not_worse(tolerance=0.5)
    assert verdict.figures["js_divergence"] < 0.001
    broken = OutputDrift(json_path="predictions.0")
    while not broken.failing:
        arm = "canary" if rng.random() < 0.2 else "stable"
        broken.observe(arm, classifier(rng, 0.9 if arm == "canary" else 0.5))
    verdict = broken.verdict()
    assert verdict.state is JudgeState.FAILING and verdict.reason == "output_drift"
    assert not broken.not_worse()
    figures = verdict.figures
    assert figures["e_value"] >= figures["trip_at"] == 100  # type: ignore[operator]
    assert figures["js_divergence"] > 0.03  # type: ignore[operator]
    assert set(figures["categories"]) == {"malignant", "benign"}  # type: ignore[arg-type]
    assert "canary answers at predictions.0 differ from stable's" in verdict.detail
    assert orjson.dumps(figures)  # JSON-able, for events
    assert repr(broken).startswith("<OutputDrift predictions.0 alpha=0.01 failing: ")


def test_guard_drift_reads_json_and_sse_answers() -> None:
    guard = OutputDrift(json_path="choices.0.finish_reason")
    guard.observe_body("stable", b'{"choices": [{"finish_reason": "stop"}]}')
    sse = (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
           b'data: {"choices": [{"index": 0, "finish_reason": "length"}]}\n\n'
           b"data: [DONE]\n\n")
    guard.observe_body("canary", sse)
    guard.observe_body("canary", None)  # not kept whole: absent
    assert guard.names == ["stop", "length", ABSENT]
    assert value_at(b'{"predictions": [1, 0]}', "predictions.-1") == 0


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_guard_drift_survives_a_share_of_0_or_100_percent(share: float) -> None:
    guard = OutputDrift(share=share)
    for arm in ("stable", "canary", "stable"):  # stragglers from before the change
        guard.observe(arm, "a")
    guard.set_share(1.0 - share)
    guard.observe("canary" if share else "stable", "b")
    assert math.isfinite(guard.log_evalue()) and not guard.failing


def test_guard_drift_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError):
        OutputDrift(alpha=1.0)
    with pytest.raises(ValueError):
        OutputDrift(top_k=0)
