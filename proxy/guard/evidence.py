"""What the guards share: their trip reasons, the interface the rollout machine reads,
and ``BettingTest``, an anytime-valid test on the mean of a bounded stream.

``BettingTest`` tests H0: ``E[d_t | past] <= 0`` for every t, where each observation
``d_t`` is at least ``-low``. A gambler starting with 1 who stakes the fraction ``f`` of
the most a bounded loss allows, ``lambda = f/low``, on each ``d_t`` has wealth
``prod(1 + lambda*d_t)``: under H0 every factor has expectation ``<= 1``, so the wealth is
a nonnegative supermartingale, and so is the average over a fixed grid of ``f``
(``FRACTIONS``, equal weights: no need to guess the effect size). By Ville's inequality
it ever reaches ``1/alpha`` with probability at most ``alpha``, however often it is read
(Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting",
JRSS B 2024; Shafer & Vovk's testing by betting). Under an alternative with mean
``mu > 0`` the best component grows like ``n * mu**2 / (2 var)``. The guards use it for
"the canary's accuracy is below min_accuracy", "the canary is worse than stable on
paired ratings" and "the disagreement rate is above the allowed one", and, with the
sign turned, for the evidence that a canary is fine (the progressive gate).
"""

from __future__ import annotations

import math
from collections import deque
from enum import StrEnum
from typing import Protocol

from proxy.rollout.judge import Verdict
from proxy.units import Percent

CANARY = "canary"
DEFAULT_ALPHA = 0.01
# Fractions of the largest safe bet: from cautious (small, long-lived effects) to bold.
FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)


class GuardReason(StrEnum):
    """Why a guard tripped the route's rollback; values are ``flipback_rollbacks_total``
    reason labels (next to the judge's and the window's)."""

    OUTPUT_DRIFT = "output_drift"
    FEEDBACK = "feedback"
    DISAGREEMENT = "disagreement"


class Guard(Protocol):
    """What the rollout machine needs of a guard (the judge's shape)."""

    reason: GuardReason

    @property
    def failing(self) -> bool: ...

    def verdict(self) -> Verdict: ...

    def not_worse(self, tolerance: Percent | None = None) -> bool: ...


class BettingTest:
    """Anytime-valid test of H0: the observations' conditional mean is ``<= 0`` (see the
    module docstring). ``add`` is O(len(FRACTIONS)) and allocates nothing; ``reached``
    latches once the mixture crosses ``1/alpha`` (Ville: at most ``alpha`` under H0)."""

    __slots__ = ("n", "total", "reached", "_bets", "_logs", "_log_threshold", "_slack")

    def __init__(self, *, low: float, alpha: float,
                 fractions: tuple[float, ...] = FRACTIONS) -> None:
        if not low > 0:
            raise ValueError(f"low must be > 0, got {low!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.n = 0
        self.total = 0.0
        self.reached = False
        self._bets = tuple(f / low for f in fractions)
        self._logs = [0.0] * len(fractions)
        self._log_threshold = -math.log(alpha)
        self._slack = math.log(len(fractions))  # mean >= max / J

    def add(self, d: float) -> bool:
        """One observation; returns ``reached``. ``d`` below ``-low`` is clipped (it would
        bet more than the wealth)."""
        self.n += 1
        self.total += d
        if self.reached:
            return True
        logs, top = self._logs, -math.inf
        for j, bet in enumerate(self._bets):
            x = bet * d
            value = logs[j] = logs[j] + math.log1p(x if x > -0.999999 else -0.999999)
            if value > top:
                top = value
        if top >= self._log_threshold and (
                top >= self._log_threshold + self._slack
                or self.log_evalue() >= self._log_threshold):
            self.reached = True
        return self.reached

    def log_evalue(self) -> float:
        """Log of the mixture's wealth now."""
        logs = self._logs
        top = max(logs)
        return top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def __repr__(self) -> str:
        return (f"<BettingTest n={self.n} mean={self.mean:.4g} "
                f"e={evalue(self.log_evalue()):.3g}{' reached' if self.reached else ''}>")


class PairQueue:
    """Pairs a canary observation with a base one in arrival order (never by value, so
    under H0 a pair's difference has the mean of the two arms'): at most ``cap`` wait on
    one side; past it the oldest is dropped (counted in ``dropped``)."""

    __slots__ = ("dropped", "_canary", "_base")

    def __init__(self, cap: int = 4096) -> None:
        self.dropped = 0
        self._canary: deque[float] = deque(maxlen=cap)
        self._base: deque[float] = deque(maxlen=cap)

    def push(self, canary: bool, x: float) -> tuple[float, float] | None:
        """Queue ``x``; returns ``(canary_x, base_x)`` when it completes a pair."""
        mine, other = (self._canary, self._base) if canary else (self._base, self._canary)
        if other:
            y = other.popleft()
            return (x, y) if canary else (y, x)
        if len(mine) == mine.maxlen:
            self.dropped += 1
        mine.append(x)
        return None

    def waiting(self) -> tuple[int, int]:
        """Observations waiting for a partner: (canary, base)."""
        return len(self._canary), len(self._base)


def evalue(log_e: float) -> float:
    """An e-value for figures: rounded, and finite."""
    return round(math.exp(min(log_e, 700.0)), 3)


def pct(part: float, whole: float) -> float:
    return part * 100.0 / whole if whole > 0 else 0.0
