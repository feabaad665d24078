"""Today's threshold rules behind the judge interface (``rollback.judge: threshold``).

``ThresholdJudge`` keeps a sliding window per arm and asks ``rules.evaluate`` when the
rollout machine would: at once after a canary request that failed or took longer than
``max_p99``, and otherwise on the first observation of each ``tick`` (the machine's
100 ms timer). Its progressive gate is today's: at least ``min_requests`` canary requests
in the window. It exists so the simulation (``loadtests/judgement.py``) compares the two
judges on the same requests, and so the machine can hold either judge.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from proxy.config.model import RollbackConfig
from proxy.rollout import rules
from proxy.rollout.judge import CANARY, JudgeState, Verdict
from proxy.rollout.windows import SlidingWindow, WindowStats
from proxy.units import Percent, Seconds

TICK: Seconds = 0.1


def window_verdict(policy: RollbackConfig, canary: WindowStats,
                   stable: WindowStats) -> Verdict:
    """The threshold rules' state when nothing tripped: passing once the canary's window
    holds ``min_requests``, inconclusive before."""
    figures: dict[str, object] = {"judge": "threshold", "canary": rules.figures_of(canary),
                                  "stable": rules.figures_of(stable)}
    if canary.requests >= policy.min_requests:
        return Verdict(state=JudgeState.PASSING, reason=None, figures=figures, detail=(
            f"no threshold crossed over {canary.requests} canary requests in the "
            f"{policy.window:g}s window"))
    return Verdict(state=JudgeState.INCONCLUSIVE, reason=None, figures=figures, detail=(
        f"{canary.requests} canary requests in the {policy.window:g}s window, "
        f"{policy.min_requests} needed"))


class ThresholdJudge:
    """``rules.evaluate`` over two sliding windows, with the machine's cadence."""

    __slots__ = ("policy", "trip", "_canary", "_stable", "_clock", "_slow_after", "_next")

    def __init__(self, *, policy: RollbackConfig, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.trip: rules.Trip | None = None
        slots = min(max(20, math.ceil(policy.window / TICK)), 3000)  # as the machine
        self._canary = SlidingWindow(policy.window, clock, slots=slots)
        self._stable = SlidingWindow(policy.window, clock, slots=slots)
        self._clock = clock
        self._slow_after = policy.max_p99 if policy.max_p99 is not None else 0.0
        self._next = clock() + TICK

    @property
    def failing(self) -> bool:
        return self.trip is not None

    def observe(self, arm: str, failed: bool, client_error: bool, latency: float) -> None:
        """``client_error`` is ignored: the rules see only what ``failure_statuses`` say."""
        window = self._canary if arm == CANARY else self._stable
        window.end(window.begin(), latency, failed)
        now = self._clock()
        if now >= self._next:  # the machine's tick, which runs whatever else happens
            self._next = now + TICK
            self._evaluate()
        elif arm == CANARY and (failed or latency > self._slow_after):
            self._evaluate()

    def _evaluate(self) -> None:
        if self.trip is None:
            slow = self.policy.max_p99
            self.trip = rules.evaluate(self.policy, self._canary.stats(slow),
                                       self._stable.stats(slow))

    def not_worse(self, tolerance: Percent | None = None) -> bool:
        """Today's gate: enough canary requests in the window and no trip."""
        return self.trip is None and self._canary.stats().requests >= self.policy.min_requests

    def verdict(self) -> Verdict:
        canary = self._canary.stats(self.policy.max_p99)
        stable = self._stable.stats(self.policy.max_p99)
        if self.trip is not None:
            figures = {"judge": "threshold", "canary": rules.figures_of(canary),
                       "stable": rules.figures_of(stable), **self.trip.figures}
            return Verdict(state=JudgeState.FAILING, reason=self.trip.reason.value,
                           detail=self.trip.detail, figures=figures)
        return window_verdict(self.policy, canary, stable)

    def __repr__(self) -> str:
        state = f"failing ({self.trip.reason.value})" if self.trip is not None else "open"
        return f"<ThresholdJudge {state}: {self._canary!r}>"
