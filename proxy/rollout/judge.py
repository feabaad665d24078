"""The sequential judge: is the canary worse than stable, request by request? (issue 16)

Requests are split at random: each goes to the canary with probability ``share`` (w).
Take one kind of event (a failure, a 4xx that is not a failure, a latency above stable's
running p75 or p95). If the canary's rate of it is ``r_c`` and stable's ``r_s``, then,
given that an event happened, it came from the canary with probability
``p = w*r_c / (w*r_c + (1-w)*r_s)``: ``p <= w`` exactly when the canary is no worse.
This holds whatever the common rate does over time (a burst of bad requests from a
client lands on both arms in proportion), which is why only the events' arms are used
(Lindon & Malek, "Anytime-valid inference for multinomial count data", NeurIPS 2022;
Lindon, Sanden & Shirikian, KDD 2022, for the canary setting).

Against H0: ``p <= w`` each test keeps a mixture, over odds ratios ``theta`` > 1 (1.1x
to ~47x, equal weights), of the likelihood ratios of ``q(theta)`` to ``w``. For any
``q >= w`` one factor has expectation ``p*q/w + (1-p)*(1-q)/(1-w) <= 1`` when ``p <= w``,
so every component, and the mixture, is a nonnegative supermartingale under H0, and by
Ville's inequality it ever reaches ``1/alpha'`` with probability at most ``alpha'``,
however often it is looked at. Four tests (failure rate, client-error rate, latency over
stable's p75, over stable's p95) share ``alpha`` by a union bound, ``ALPHA_SHARES``: the
failure test trips at an e-value of ``1/(0.4 alpha)`` (250 at alpha 0.01), the others at
``1/(0.2 alpha)``. Only a canary event can raise an e-value, so it is computed only when
the canary's count reaches a cheap lower bound on what a trip needs.
Stable's quantiles come from stable's earlier requests only, so a latency event is
judged against a threshold that does not depend on the request itself; a canary slower
across the distribution exceeds both more often.

The three states. *failing*: a test tripped (it stays tripped). *passing*: the
confidence sequences (Robbins' Beta-binomial mixture, ``alpha/6`` each) show the canary
no worse than stable within the tolerance: its failure and 4xx rates at most
``tolerance`` percentage points above stable's, and its requests over ``(1 +
latency_tolerance)`` x stable's p75 no more frequent than stable's over its p75 (the
canary's p75 within that factor of stable's). *inconclusive*: neither yet.

Assumptions, for whoever wires it: the split is random per request at ``share`` (a
sticky session is one unit, not many: the 4xx test would blame the canary for one bad
client pinned to it); outcomes are judged in the order they end; the judge covers one
canary against one base lane since it was made (make a fresh one on resume, reload or a
new canary; ``set_share`` carries it across a change of weight). The state is a few
dozen counters and one histogram: ``observe`` is O(1) and allocates nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from proxy.rollout import judge_evidence as ev
from proxy.units import Percent

CANARY = "canary"
DEFAULT_ALPHA = 0.01
TESTS = 4  # failure rate, client-error rate, latency over stable p75, over stable p95
# Each test's share of alpha (a union bound): failures, the usual regression, get most.
ALPHA_SHARES = (0.4, 0.2, 0.2, 0.2)
_NEVER = 1 << 62


class JudgeState(StrEnum):
    """A judge's verdict; values are metric labels."""

    PASSING = "passing"
    FAILING = "failing"
    INCONCLUSIVE = "inconclusive"


class JudgeReason(StrEnum):
    """Which test tripped; values are metric labels."""

    FAILURE_RATE = "failure_rate"
    CLIENT_ERROR_RATE = "client_error_rate"
    LATENCY = "latency"


REASONS = (JudgeReason.FAILURE_RATE, JudgeReason.CLIENT_ERROR_RATE, JudgeReason.LATENCY,
           JudgeReason.LATENCY)
_TEST_NAMES = ("failure_rate", "client_error_rate", "latency_p75", "latency_p95")


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A judge's reading: the state, which test tripped (``reason``, only when failing),
    one human line, and JSON-able figures for events and the admin API."""

    state: JudgeState
    reason: str | None
    detail: str
    figures: dict[str, object]


class Judge(Protocol):
    """What the rollout machine needs of a judge (``SequentialJudge``, ``ThresholdJudge``)."""

    @property
    def failing(self) -> bool: ...

    def observe(self, arm: str, failed: bool, client_error: bool, latency: float) -> None: ...

    def verdict(self) -> Verdict: ...

    def not_worse(self, tolerance: Percent | None = None) -> bool: ...


class SequentialJudge:
    """Anytime-valid comparison of the canary with stable (see the module docstring).

    ``observe`` after every request that ends on either arm: ``arm`` is ``"canary"`` or
    anything else for the base lane; ``failed`` as the rollback policy counts failures
    (failure statuses and transport failures); ``client_error`` for a 4xx that is not a
    failure; ``latency`` in seconds (ttfb or total, as the route judges). ``failing``
    turns True on the observation that trips; ``verdict`` and ``not_worse`` are for the
    tick (they cost tens of microseconds).
    """

    __slots__ = ("alpha", "tolerance", "latency_tolerance", "canary_requests",
                 "stable_requests", "canary_slow", "tripped", "_mix", "_base", "_k", "_m",
                 "_k0", "_m0", "_need", "_log_trip", "_log_gate", "_quantiles", "_tau75",
                 "_tau95", "_tau_gate", "_warm_at")

    def __init__(self, *, share: float, alpha: float = DEFAULT_ALPHA,
                 tolerance: Percent = 2.0, latency_tolerance: float = 0.2,
                 min_stable: int = 20) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if tolerance < 0 or latency_tolerance < 0:
            raise ValueError("tolerances must be >= 0")
        self.alpha = alpha
        self.tolerance = tolerance
        self.latency_tolerance = latency_tolerance
        self.canary_requests = 0
        self.stable_requests = 0
        self.canary_slow = 0  # canary requests over (1 + latency_tolerance) x stable p75
        self.tripped: int | None = None  # index of the test that tripped
        self._mix = ev.Odds(share)
        self._base = [ev.prior() for _ in range(TESTS)]
        self._k = [0] * TESTS  # canary events per test
        self._m = [0] * TESTS  # stable events per test
        self._k0 = [0] * TESTS  # counts when the share last changed
        self._m0 = [0] * TESTS
        self._log_trip = [-math.log(alpha * part) for part in ALPHA_SHARES]
        self._log_gate = math.log(6 / alpha)
        self._need = [self._needed(i) for i in range(TESTS)]
        self._quantiles = ev.StableQuantiles(min_stable)
        self._tau75 = self._tau95 = self._tau_gate = math.inf
        self._warm_at: tuple[int, int] | None = None  # request counts when stable's p75 began

    @property
    def share(self) -> float:
        return self._mix.share

    @property
    def failing(self) -> bool:
        return self.tripped is not None

    def observe(self, arm: str, failed: bool, client_error: bool, latency: float) -> None:
        if arm == CANARY:
            self.canary_requests += 1
            k, need = self._k, self._need
            if failed:
                k[0] += 1
                if k[0] >= need[0]:
                    self._check(0)
            if client_error:
                k[1] += 1
                if k[1] >= need[1]:
                    self._check(1)
            if latency > self._tau75:
                k[2] += 1
                if k[2] >= need[2]:
                    self._check(2)
                if latency > self._tau_gate:
                    self.canary_slow += 1
                if latency > self._tau95:
                    k[3] += 1
                    if k[3] >= need[3]:
                        self._check(3)
            return
        self.stable_requests += 1
        m = self._m
        if failed:
            m[0] += 1
        if client_error:
            m[1] += 1
        if latency > self._tau75:  # against the threshold from before this request
            m[2] += 1
            if latency > self._tau95:
                m[3] += 1
        q = self._quantiles
        q.add(latency)
        if q.p75 != self._tau75:
            self._tau75 = q.p75
            self._tau_gate = q.p75 * (1.0 + self.latency_tolerance)
            if self._warm_at is None:
                self._warm_at = (self.canary_requests, self.stable_requests)
        self._tau95 = q.p95

    def set_share(self, share: float) -> None:
        """The canary's share of traffic changed: fold the evidence so far into each
        test's weights and judge later events at the new share (the odds ratios are the
        same at any share, so each component stays a supermartingale). Requests still in
        flight from before a *lower* share are judged at the new one, which favours the
        canary's guilt slightly; make a fresh judge instead if that matters."""
        mix = self._mix
        for i in range(TESTS):
            k, m = self._k[i] - self._k0[i], self._m[i] - self._m0[i]
            self._base[i] = [c + k * x + m * y
                             for c, x, y in zip(self._base[i], mix.a, mix.b, strict=True)]
            self._k0[i], self._m0[i] = self._k[i], self._m[i]
        self._mix = ev.Odds(share)
        for i in range(TESTS):
            if self.tripped is None:
                self._need[i] = self._needed(i)

    def log_evalues(self) -> list[float]:
        """Each test's log e-value now (test i trips at -log(alpha * ALPHA_SHARES[i]))."""
        return [ev.log_evalue(self._base[i], self._mix, self._k[i] - self._k0[i],
                              self._m[i] - self._m0[i]) for i in range(TESTS)]

    def not_worse(self, tolerance: Percent | None = None) -> bool:
        """Is there enough evidence that the canary is no worse than stable within the
        tolerance (``tolerance`` percentage points on the failure and 4xx rates, None for
        the judge's own; ``latency_tolerance`` on the p75)? The progressive gate."""
        if self.tripped is not None or self._warm_at is None:
            return False
        tol = (self.tolerance if tolerance is None else tolerance) / 100.0
        thr, nc, ns = self._log_gate, self.canary_requests, self.stable_requests
        for i in (0, 1):
            if ev.upper_bound(self._k[i], nc, thr) - ev.lower_bound(self._m[i], ns, thr) > tol:
                return False
        c0, s0 = self._warm_at
        return (ev.upper_bound(self.canary_slow, nc - c0, thr)
                <= ev.lower_bound(self._m[2], ns - s0, thr))

    def verdict(self) -> Verdict:
        if self.tripped is not None:
            state = JudgeState.FAILING
        elif self.not_worse():
            state = JudgeState.PASSING
        else:
            state = JudgeState.INCONCLUSIVE
        return self._describe(state, self.log_evalues())

    def _check(self, i: int) -> None:
        """Canary events of test ``i`` reached its lower bound: compute the e-value."""
        k, m = self._k[i] - self._k0[i], self._m[i] - self._m0[i]
        if ev.log_evalue(self._base[i], self._mix, k, m) >= self._log_trip[i]:
            if self.tripped is None:
                self.tripped = i
            self._need = [_NEVER] * TESTS  # judged: nothing more to compute
        else:
            self._need[i] = max(self._k[i] + 1, self._needed(i))

    def _needed(self, i: int) -> int:
        m = self._m[i] - self._m0[i]
        return self._k0[i] + max(0, math.ceil(
            ev.canary_events_needed(self._base[i], self._mix, m, self._log_trip[i])))

    def _describe(self, state: JudgeState, logs: list[float]) -> Verdict:
        nc, ns = self.canary_requests, self.stable_requests
        c0, s0 = self._warm_at or (nc, ns)
        k, m = self._k, self._m
        rates = [(_pct(k[0], nc), _pct(m[0], ns)), (_pct(k[1], nc), _pct(m[1], ns)),
                 (_pct(k[2], nc - c0), _pct(m[2], ns - s0)),
                 (_pct(k[3], nc - c0), _pct(m[3], ns - s0))]
        trip_at = [round(math.exp(x), 3) for x in self._log_trip]
        evalues = [_evalue(x) for x in logs]
        q = self._quantiles
        fail = f"failure rate {rates[0][0]:.2f}% vs {rates[0][1]:.2f}%"
        four = f"4xx {rates[1][0]:.2f}% vs {rates[1][1]:.2f}%"
        if state is JudgeState.FAILING:
            assert self.tripped is not None
            i = self.tripped
            reason: str | None = REASONS[i].value
            proof = f"e-value {evalues[i]:.3g} >= {trip_at[i]:g} (alpha {self.alpha:g})"
            if i == 0:
                detail = (f"canary failure rate {rates[0][0]:.2f}% vs stable {rates[0][1]:.2f}% "
                          f"({k[0]} of {nc} vs {m[0]} of {ns} requests): {proof}")
            elif i == 1:
                detail = (f"canary 4xx rate {rates[1][0]:.2f}% vs stable {rates[1][1]:.2f}% "
                          f"({k[1]} of {nc} vs {m[1]} of {ns} requests): {proof}")
            else:
                which, tau = ("p75", q.p75) if i == 2 else ("p95", q.p95)
                detail = (f"canary slower than stable: {rates[i][0]:.1f}% of canary requests "
                          f"over stable's {which} {_ms(tau)}ms vs {rates[i][1]:.1f}% of "
                          f"stable's: {proof}")
        elif state is JudgeState.PASSING:
            reason = None
            detail = (f"canary no worse than stable within {self.tolerance:g}pp and "
                      f"{1 + self.latency_tolerance:g}x stable's p75 over {nc} canary requests "
                      f"({fail}, {four})")
        else:
            reason = None
            top = max(range(TESTS), key=lambda j: logs[j])
            detail = (f"not enough evidence yet over {nc} canary and {ns} stable requests "
                      f"({fail}, {four}; largest e-value {evalues[top]:.3g} "
                      f"({_TEST_NAMES[top]}), trips at {trip_at[top]:g})")

        def arm(counts: list[int], n: int, timed: int) -> dict[str, object]:
            return {"requests": n, "failures": counts[0], "client_errors": counts[1],
                    "timed": timed, "over_stable_p75": counts[2], "over_stable_p95": counts[3]}

        figures: dict[str, object] = {
            "judge": "sequential", "alpha": self.alpha, "share": self.share,
            "canary": arm(k, nc, nc - c0), "stable": arm(m, ns, ns - s0),
            "stable_p75_ms": _ms(q.p75), "stable_p95_ms": _ms(q.p95),
            "e_values": dict(zip(_TEST_NAMES, evalues, strict=True)),
            "trip_at": dict(zip(_TEST_NAMES, trip_at, strict=True)),
        }
        return Verdict(state=state, reason=reason, detail=detail, figures=figures)

    def __repr__(self) -> str:
        state = "failing" if self.tripped is not None else "open"
        return (f"<SequentialJudge share={self.share:g} alpha={self.alpha:g} {state}: "
                f"{self.canary_requests} canary / {self.stable_requests} stable requests>")


def _pct(part: int, whole: int) -> float:
    return part * 100.0 / whole if whole > 0 else 0.0


def _evalue(log_e: float) -> float:
    return round(math.exp(min(log_e, 700.0)), 3)


def _ms(seconds: float) -> float | None:
    return None if math.isinf(seconds) else round(seconds * 1000.0, 3)
