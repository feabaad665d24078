"""Decide whether a canary must be flipped back to stable (SPEC §5, Trip).

``evaluate`` is pure and cheap: it runs inline each time a canary request ends, so a
bad canary is caught within a second. It only reads two window readings and the
route's policy; acting on a trip (weight 0, latch, unpin, events) is ``rollout``'s job.

Rules, in the order checked (the first that holds names the trip):

* Nothing trips unless ``policy.enabled`` and the canary window holds at least
  ``min_requests`` requests (SPEC: the minimum applies to every rule, the failure
  streak included, so a handful of early errors on a quiet route never latches it).
* ``consecutive_failures``: that many canary failures in a row (a value < 1 is off).
* ``error_rate``: canary error rate > ``max_error_rate``. With ``compare_to_stable``
  the canary must also be worse than stable: stable is within the threshold (or has
  fewer than min(``min_requests``, 5) requests, too few to judge, so the canary alone
  decides), or, when stable is over the threshold too, the canary's rate exceeds
  stable's by more than the threshold. Both failing alike means the fault is
  elsewhere and flipping helps nobody; stable at or above the canary's rate never trips.
* ``latency``: canary p99 > ``max_p99``. Beside the sequential judge (``policy.judge``)
  it is a guard rail, read as the p99 of at least three requests
  (``WindowStats.p99_of_three``): one slow request in a window of twenty is not evidence,
  and it false-tripped 7.7% of healthy canaries in loadtests/judgement.py.
* ``latency_ratio``: canary p99 / stable p99 > ``max_p99_ratio``, only when stable has
  at least ``min_requests`` requests and a p99 to compare with.

A threshold set to None never trips.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.config.model import RollbackConfig
from proxy.rollout.windows import WindowStats
from proxy.units import format_duration


class TripReason(StrEnum):
    """Why a route flipped back; values are the ``reason`` metric label."""

    ERROR_RATE = "error_rate"
    LATENCY = "latency"
    LATENCY_RATIO = "latency_ratio"
    CONSECUTIVE_FAILURES = "consecutive_failures"
    MANUAL = "manual"
    # The sequential judge's tests (proxy.rollout.judge.JudgeReason); its latency test
    # trips as LATENCY: either way the canary is too slow.
    FAILURE_RATE = "failure_rate"
    CLIENT_ERROR_RATE = "client_error_rate"
    # The quality guards (proxy.guard.evidence.GuardReason).
    OUTPUT_DRIFT = "output_drift"
    FEEDBACK = "feedback"
    DISAGREEMENT = "disagreement"


@dataclass(frozen=True, slots=True, kw_only=True)
class Trip:
    """A decision to flip back: the reason, one human line, and JSON-able figures
    (``canary``, ``stable`` and ``thresholds``) for the latch, events and admin API."""

    reason: TripReason
    detail: str
    figures: dict[str, object]


def figures_of(stats: WindowStats) -> dict[str, object]:
    """A window reading as JSON-able figures, latencies in milliseconds."""
    return {
        "requests": stats.requests,
        "failures": stats.failures,
        "error_rate": round(stats.error_rate, 3),
        "p50_ms": _ms(stats.p50),
        "p99_ms": _ms(stats.p99),
        "in_flight": stats.in_flight,
    }


def evaluate(policy: RollbackConfig, canary: WindowStats, stable: WindowStats) -> Trip | None:
    """Return the ``Trip`` the canary's window calls for, or None to carry on."""
    if not policy.enabled or canary.requests < policy.min_requests:
        return None
    n = canary.requests
    limit = policy.consecutive_failures
    if limit is not None and limit > 0 and canary.consecutive_failures >= limit:
        return _trip(
            TripReason.CONSECUTIVE_FAILURES,
            f"canary failed {canary.consecutive_failures} requests in a row "
            f"(limit {limit}) over {n} requests",
            policy,
            canary,
            stable,
        )
    max_rate = policy.max_error_rate
    if (
        max_rate is not None
        and canary.error_rate > max_rate
        and (
            not policy.compare_to_stable
            or _worse_than_stable(max_rate, policy.min_requests, canary, stable)
        )
    ):
        return _trip(
            TripReason.ERROR_RATE,
            f"canary error rate {canary.error_rate:.1f}% > {max_rate:g}% over {n} requests "
            f"(stable {stable.error_rate:.1f}%)",
            policy,
            canary,
            stable,
        )
    max_p99 = policy.max_p99
    p99 = canary.p99_of_three if policy.judge == "sequential" else canary.p99
    if max_p99 is not None and p99 is not None and p99 > max_p99:
        hung = f", {canary.slow_in_flight} still in flight" if canary.slow_in_flight else ""
        return _trip(
            TripReason.LATENCY,
            f"canary p99 {_human(p99)} > {_human(max_p99)} over {n} requests{hung} "
            f"(stable p99 {_human(stable.p99)})",
            policy,
            canary,
            stable,
        )
    ratio = policy.max_p99_ratio
    stable_p99 = stable.p99
    if (
        ratio is not None
        and p99 is not None
        and stable_p99
        and stable.requests >= policy.min_requests
        and p99 / stable_p99 > ratio
    ):
        return _trip(
            TripReason.LATENCY_RATIO,
            f"canary p99 {_human(p99)} is {p99 / stable_p99:.1f}x stable p99 "
            f"{_human(stable_p99)} > {ratio:g}x over {n} requests",
            policy,
            canary,
            stable,
        )
    return None


STABLE_EVIDENCE = 5


def _worse_than_stable(
    max_rate: float, min_requests: int, canary: WindowStats, stable: WindowStats
) -> bool:
    """Is the canary's error rate to blame, rather than something both share?"""
    # Stable is judged once it has a few requests (at most min_requests): at a high canary
    # weight stable sees little traffic, and a handful of stable failures is evidence.
    if stable.requests < min(min_requests, STABLE_EVIDENCE) or stable.error_rate <= max_rate:
        return True
    return canary.error_rate - stable.error_rate > max_rate


def _trip(
    reason: TripReason,
    detail: str,
    policy: RollbackConfig,
    canary: WindowStats,
    stable: WindowStats,
) -> Trip:
    return Trip(
        reason=reason,
        detail=detail,
        figures={
            "canary": _full_figures(canary),
            "stable": _full_figures(stable),
            "thresholds": {
                "window_s": policy.window,
                "min_requests": policy.min_requests,
                "max_error_rate": policy.max_error_rate,
                "max_p99_ms": _ms(policy.max_p99),
                "max_p99_ratio": policy.max_p99_ratio,
                "consecutive_failures": policy.consecutive_failures,
                "compare_to_stable": policy.compare_to_stable,
                "latency": policy.latency,
                "judge": policy.judge,
            },
        },
    )


def _full_figures(stats: WindowStats) -> dict[str, object]:
    figures = figures_of(stats)
    figures["consecutive_failures"] = stats.consecutive_failures
    figures["slow_in_flight"] = stats.slow_in_flight
    return figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _human(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def verify_stable(policy: RollbackConfig, stable: WindowStats) -> tuple[bool, str]:
    """Post-rollback verdict on stable's window: within the error-rate and p99 thresholds
    (the canary was the fault), or not (stable is bad too). No stable traffic to judge
    fails the verification: nobody should read "verified" into silence."""
    if stable.requests == 0:
        return False, "no stable traffic in the window to verify against"
    problems: list[str] = []
    if policy.max_error_rate is not None and stable.error_rate > policy.max_error_rate:
        problems.append(f"stable error rate {stable.error_rate:.1f}% > "
                        f"{policy.max_error_rate:g}%")
    if policy.max_p99 is not None and stable.p99 is not None and stable.p99 > policy.max_p99:
        problems.append(f"stable p99 {stable.p99 * 1000:.0f}ms > {policy.max_p99 * 1000:.0f}ms")
    if problems:
        return False, "; ".join(problems) + f" over {stable.requests} requests: look elsewhere"
    p99 = f"{stable.p99 * 1000:.0f}ms" if stable.p99 is not None else "-"
    return True, (f"stable within thresholds after the rollback: error rate "
                  f"{stable.error_rate:.1f}%, p99 {p99} over {stable.requests} requests")
