"""rollback.evaluate: every trip reason, its guards, and the figures a trip carries."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from proxy.config.model import RollbackConfig
from proxy.rollout.rules import Trip, TripReason, evaluate, figures_of
from proxy.rollout.windows import SlidingWindow, WindowStats

POLICY = RollbackConfig(judge="threshold")  # 10s, min 20, 5%, 500ms, ratio off, 5 in a row,
# compare on: the rules alone, as `rollback.judge: threshold` runs them


def stats(
    requests: int = 100,
    failures: int = 0,
    p99: float | None = 0.1,
    consecutive: int = 0,
    slow: int = 0,
) -> WindowStats:
    return WindowStats(
        requests=requests,
        failures=failures,
        error_rate=failures * 100.0 / requests if requests else 0.0,
        p50=None if p99 is None or not requests else p99 / 2,
        p99=p99 if requests else None,
        in_flight=slow,
        consecutive_failures=consecutive,
        slow_in_flight=slow,
    )


HEALTHY = stats()


def tripped(trip: Trip | None) -> TripReason | None:
    return None if trip is None else trip.reason


def test_evaluate_healthy_canary_does_not_trip() -> None:
    assert evaluate(POLICY, stats(failures=5, p99=0.5, consecutive=4), HEALTHY) is None


def test_evaluate_trips_on_consecutive_failures() -> None:
    trip = evaluate(POLICY, stats(failures=5, consecutive=5), HEALTHY)
    assert trip is not None and trip.reason is TripReason.CONSECUTIVE_FAILURES
    assert "5 requests in a row" in trip.detail


def test_evaluate_trips_on_error_rate_with_readable_detail() -> None:
    trip = evaluate(POLICY, stats(requests=40, failures=5), HEALTHY)
    assert trip is not None and trip.reason is TripReason.ERROR_RATE
    assert trip.detail == "canary error rate 12.5% > 5% over 40 requests (stable 0.0%)"


def test_evaluate_error_rate_at_threshold_does_not_trip() -> None:
    assert evaluate(POLICY, stats(requests=100, failures=5), HEALTHY) is None


def test_evaluate_trips_on_latency() -> None:
    trip = evaluate(POLICY, stats(p99=0.75), HEALTHY)
    assert trip is not None and trip.reason is TripReason.LATENCY
    assert trip.detail == "canary p99 750ms > 500ms over 100 requests (stable p99 100ms)"


def test_evaluate_latency_detail_mentions_hung_requests() -> None:
    trip = evaluate(POLICY, stats(p99=0.6, slow=3), HEALTHY)
    assert trip is not None and "3 still in flight" in trip.detail


def test_evaluate_trips_on_latency_ratio() -> None:
    policy = replace(POLICY, max_p99=None, max_p99_ratio=2.0)
    trip = evaluate(policy, stats(p99=0.3), stats(p99=0.1))
    assert trip is not None and trip.reason is TripReason.LATENCY_RATIO
    assert "3.0x stable p99 100ms > 2x" in trip.detail
    assert evaluate(policy, stats(p99=0.2), stats(p99=0.1)) is None


def test_evaluate_latency_ratio_needs_stable_data() -> None:
    policy = replace(POLICY, max_p99=None, max_p99_ratio=2.0)
    assert evaluate(policy, stats(p99=0.3), stats(requests=19, p99=0.1)) is None
    assert evaluate(policy, stats(p99=0.3), stats(requests=0)) is None
    assert tripped(evaluate(policy, stats(p99=0.3), stats(requests=20, p99=0.1))) is (
        TripReason.LATENCY_RATIO
    )


def test_evaluate_below_min_requests_never_trips() -> None:
    awful = stats(requests=19, failures=19, p99=60.0, consecutive=19)
    assert evaluate(POLICY, awful, HEALTHY) is None
    assert evaluate(POLICY, replace(awful, requests=20), HEALTHY) is not None


def test_evaluate_disabled_policy_never_trips() -> None:
    awful = stats(failures=100, p99=60.0, consecutive=100)
    assert evaluate(replace(POLICY, enabled=False), awful, HEALTHY) is None


def test_evaluate_thresholds_set_to_none_never_trip() -> None:
    off = replace(
        POLICY,
        max_error_rate=None,
        max_p99=None,
        max_p99_ratio=None,
        consecutive_failures=None,
    )
    assert evaluate(off, stats(failures=100, p99=60.0, consecutive=100), HEALTHY) is None


@pytest.mark.parametrize(
    ("off", "canary"),
    [
        (replace(POLICY, consecutive_failures=None), stats(consecutive=50)),
        (replace(POLICY, max_error_rate=None), stats(failures=50)),
        (replace(POLICY, max_p99=None), stats(p99=5.0)),
    ],
    ids=["consecutive_failures", "max_error_rate", "max_p99"],
)
def test_evaluate_each_threshold_set_to_none_is_off(
    off: RollbackConfig, canary: WindowStats
) -> None:
    assert evaluate(POLICY, canary, HEALTHY) is not None
    assert evaluate(off, canary, HEALTHY) is None


def test_evaluate_compare_to_stable_both_failing_does_not_trip() -> None:
    assert evaluate(POLICY, stats(failures=12), stats(failures=10)) is None
    assert evaluate(POLICY, stats(failures=12), stats(failures=30)) is None


def test_evaluate_compare_to_stable_canary_worse_trips() -> None:
    assert tripped(evaluate(POLICY, stats(failures=12), stats(failures=3))) is (
        TripReason.ERROR_RATE
    )
    # Stable over the threshold too, but the canary adds more than the threshold on top.
    assert tripped(evaluate(POLICY, stats(failures=40), stats(failures=10))) is (
        TripReason.ERROR_RATE
    )


def test_evaluate_compare_to_stable_with_too_few_stable_requests_lets_canary_decide() -> None:
    assert tripped(evaluate(POLICY, stats(failures=12), stats(requests=4, failures=4))) is (
        TripReason.ERROR_RATE
    )


def test_evaluate_without_compare_to_stable_trips_even_when_both_fail() -> None:
    policy = replace(POLICY, compare_to_stable=False)
    assert tripped(evaluate(policy, stats(failures=12), stats(failures=50))) is (
        TripReason.ERROR_RATE
    )


def test_evaluate_checks_reasons_in_order() -> None:
    policy = replace(POLICY, max_p99_ratio=2.0)
    canary = stats(failures=50, p99=5.0, consecutive=10)
    assert tripped(evaluate(policy, canary, HEALTHY)) is TripReason.CONSECUTIVE_FAILURES
    canary = replace(canary, consecutive_failures=0)
    assert tripped(evaluate(policy, canary, HEALTHY)) is TripReason.ERROR_RATE
    canary = stats(p99=5.0)
    assert tripped(evaluate(policy, canary, HEALTHY)) is TripReason.LATENCY
    assert tripped(evaluate(replace(policy, max_p99=None), canary, HEALTHY)) is (
        TripReason.LATENCY_RATIO
    )


def test_evaluate_trip_figures_are_json_with_both_windows_and_thresholds() -> None:
    trip = evaluate(POLICY, stats(requests=40, failures=5, consecutive=2), HEALTHY)
    assert trip is not None
    figures = json.loads(json.dumps(trip.figures))
    assert figures["canary"] == {
        "requests": 40,
        "failures": 5,
        "error_rate": 12.5,
        "p50_ms": 50.0,
        "p99_ms": 100.0,
        "in_flight": 0,
        "consecutive_failures": 2,
        "slow_in_flight": 0,
    }
    assert figures["stable"]["requests"] == 100
    assert figures["thresholds"]["max_error_rate"] == 5.0
    assert figures["thresholds"]["max_p99_ms"] == 500.0
    assert figures["thresholds"]["max_p99_ratio"] is None


def test_figures_of_window_stats() -> None:
    assert figures_of(stats(requests=0)) == {
        "requests": 0,
        "failures": 0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
        "in_flight": 0,
    }


def test_trip_reason_values_are_metric_labels() -> None:
    assert [r.value for r in TripReason] == [
        "error_rate",
        "latency",
        "latency_ratio",
        "consecutive_failures",
        "manual",
        "failure_rate",
        "client_error_rate",
        "output_drift",
        "feedback",
        "disagreement",
    ]
    assert TripReason("latency_ratio") is TripReason.LATENCY_RATIO


def test_evaluate_hung_canary_window_trips_on_latency() -> None:
    now = [1000.0]
    canary = SlidingWindow(10.0, lambda: now[0], slots=100)
    stable = SlidingWindow(10.0, lambda: now[0], slots=100)
    for _ in range(40):
        canary.end(canary.begin(), 0.05, False)
        stable.end(stable.begin(), 0.05, False)
    for _ in range(3):  # the canary stops answering
        canary.begin()
        now[0] += 0.05
    assert evaluate(POLICY, canary.stats(slow_after=0.5), stable.stats()) is None
    now[0] += 0.5
    trip = evaluate(POLICY, canary.stats(slow_after=0.5), stable.stats())
    assert trip is not None and trip.reason is TripReason.LATENCY
