"""Decide whether a canary's LLM figures call for a rollback (issue 18).

The same shape as ``proxy.rollout.rules.evaluate``: pure, cheap, fed two window readings
(canary and stable ``LlmStats``) and the route's ``RollbackConfig``; acting on a trip is
the rollout machine's job. Rules, in the order checked (the first that holds names it):

* ``ttft``: canary TTFT p99 > ``max_ttft_p99``, once the canary has ``min_requests``
  first tokens in the window. Read the canary's window with
  ``stats(slow_after=policy.max_ttft_p99)``: answers still waiting for their first token
  past the limit then count as slow first tokens, so a canary that never sends one trips.
* ``ttft_ratio``: canary TTFT p99 / stable's > ``max_ttft_ratio``, once both have
  ``min_requests`` first tokens.
* ``tokens``: canary completion tokens per request / stable's > ``max_tokens_ratio``,
  once both have ``min_requests`` responses (runaway generation, a cost spike).
* ``finish_length``: percent of canary responses cut at max_tokens >
  ``max_finish_length_rate``, once the canary has ``min_requests`` responses.

A threshold set to None never trips, and nothing trips unless ``policy.enabled``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.config.model import RollbackConfig
from proxy.llm.window import LlmStats
from proxy.units import format_duration


class LlmTripReason(StrEnum):
    """Why the LLM figures flipped a route back; values are the ``reason`` metric label."""

    TTFT = "ttft"
    TTFT_RATIO = "ttft_ratio"
    TOKENS = "tokens"
    FINISH_LENGTH = "finish_length"


@dataclass(frozen=True, slots=True, kw_only=True)
class LlmTrip:
    """A decision to flip back, shaped as ``proxy.rollout.rules.Trip``: the reason, one
    human line, and JSON-able figures (``canary``, ``stable``, ``thresholds``)."""

    reason: LlmTripReason
    detail: str
    figures: dict[str, object]


def figures_of(stats: LlmStats) -> dict[str, object]:
    """An ``LlmStats`` as JSON-able figures (for ``/routes``, status and events)."""
    return {
        "responses": stats.responses,
        "ttft_count": stats.ttft_count,
        "ttft_p50_ms": _ms(stats.ttft_p50),
        "ttft_p99_ms": _ms(stats.ttft_p99),
        "tokens_per_request": _round(stats.tokens_per_request),
        "tokens_estimated": stats.estimated,
        "tokens_per_second": _round(stats.tokens_per_second),
        "finish_length_rate": round(stats.finish_length_rate, 3),
        "finish_errors": stats.finish_errors,
        "waiting": stats.waiting,
        "slow_waiting": stats.slow_waiting,
    }


def evaluate(policy: RollbackConfig, canary: LlmStats, stable: LlmStats) -> LlmTrip | None:
    """Return the ``LlmTrip`` the canary's LLM figures call for, or None to carry on."""
    if not policy.enabled:
        return None
    least = policy.min_requests
    p99, stable_p99 = canary.ttft_p99, stable.ttft_p99
    if canary.ttft_count >= least and p99 is not None:
        limit = policy.max_ttft_p99
        if limit is not None and p99 > limit:
            hung = (f", {canary.slow_waiting} still waiting for one"
                    if canary.slow_waiting else "")
            return _trip(LlmTripReason.TTFT,
                         f"canary TTFT p99 {_human(p99)} > {_human(limit)} over "
                         f"{canary.ttft_count} first tokens{hung} "
                         f"(stable p99 {_human(stable_p99)})", policy, canary, stable)
        ratio = policy.max_ttft_ratio
        if (ratio is not None and stable_p99 and stable.ttft_count >= least
                and p99 / stable_p99 > ratio):
            return _trip(LlmTripReason.TTFT_RATIO,
                         f"canary TTFT p99 {_human(p99)} is {p99 / stable_p99:.1f}x stable's "
                         f"{_human(stable_p99)} > {ratio:g}x over {canary.ttft_count} first "
                         "tokens", policy, canary, stable)
    if canary.responses < least:
        return None
    ratio = policy.max_tokens_ratio
    mine, theirs = canary.tokens_per_request, stable.tokens_per_request
    if (ratio is not None and mine is not None and theirs and stable.responses >= least
            and mine / theirs > ratio):
        return _trip(LlmTripReason.TOKENS,
                     f"canary answers {mine:.1f} completion tokens per request, "
                     f"{mine / theirs:.1f}x stable's {theirs:.1f} > {ratio:g}x over "
                     f"{canary.responses} responses{_estimated(canary, stable)}",
                     policy, canary, stable)
    limit = policy.max_finish_length_rate
    if limit is not None and canary.finish_length_rate > limit:
        return _trip(LlmTripReason.FINISH_LENGTH,
                     f"canary cut {canary.finish_length_rate:.1f}% of answers at max_tokens > "
                     f"{limit:g}% over {canary.responses} responses "
                     f"(stable {stable.finish_length_rate:.1f}%)", policy, canary, stable)
    return None


def _trip(reason: LlmTripReason, detail: str, policy: RollbackConfig, canary: LlmStats,
          stable: LlmStats) -> LlmTrip:
    return LlmTrip(reason=reason, detail=detail, figures={
        "canary": figures_of(canary),
        "stable": figures_of(stable),
        "thresholds": {
            "window_s": policy.window,
            "min_requests": policy.min_requests,
            "max_ttft_p99_ms": _ms(policy.max_ttft_p99),
            "max_ttft_ratio": policy.max_ttft_ratio,
            "max_tokens_ratio": policy.max_tokens_ratio,
            "max_finish_length_rate": policy.max_finish_length_rate,
        },
    })


def _estimated(canary: LlmStats, stable: LlmStats) -> str:
    if canary.estimated or stable.estimated:
        return " (some counts estimated from streamed chunks)"
    return ""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _human(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)
