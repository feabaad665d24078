"""The arithmetic behind the sequential judge (``judge``): plain float operations on counts.

* ``Odds``: a mixture of likelihood ratios on which arm events come from. For an odds
  ratio ``theta`` (canary rate / stable rate) and a canary share ``w``, an event comes
  from the canary with probability ``q = w*theta / (w*theta + 1 - w)``. After ``k``
  canary and ``m`` stable events, component j's log likelihood ratio against
  ``theta = 1`` is ``k*a_j + m*b_j`` with ``a_j = log(q_j/w) > 0`` and
  ``b_j = log((1-q_j)/(1-w)) < 0``, so the mixture is a log-sum-exp of lines in (k, m).
* ``upper_bound``/``lower_bound``: Robbins' Beta(1/2, 1/2)-binomial confidence sequence
  for one arm's rate, valid at every n at once.
* ``StableQuantiles``: stable's running p75 and p95 from a log-spaced histogram, O(1)
  amortized per sample, reported as bucket upper edges.
"""

from __future__ import annotations

import math

# The odds ratios the mixture bets on, equal weights: 1.1x up to ~47x, 1.6x apart.
ODDS: tuple[float, ...] = tuple(1.1 * 1.6**j for j in range(9))

_BISECTIONS = 40

# Histogram of latencies: 16 buckets per doubling (4.4% wide) from 0.1 ms to ~28 min.
_LOW = 1e-4
_PER_DOUBLING = 16
_INV = _PER_DOUBLING / math.log(2.0)
_LOG_LOW = math.log(_LOW)
_NB = 24 * _PER_DOUBLING
# Upper edge of each bucket (the last one holds everything above and has no edge).
EDGES: tuple[float, ...] = tuple(
    _LOW * 2.0 ** ((b + 1) / _PER_DOUBLING) for b in range(_NB - 1)
) + (math.inf,)


class Odds:
    """The mixture's coefficients for one canary share: ``base`` (log prior weights plus
    any evidence folded in at an earlier share), ``a`` and ``b`` per component."""

    __slots__ = ("share", "a", "b")

    def __init__(self, share: float, odds: tuple[float, ...] = ODDS) -> None:
        if not 0.0 < share < 1.0:
            raise ValueError(f"the canary share must be in (0, 1), got {share!r}")
        self.share = share
        a: list[float] = []
        b: list[float] = []
        for theta in odds:
            q = share * theta / (share * theta + 1.0 - share)
            a.append(math.log(q / share))
            b.append(math.log((1.0 - q) / (1.0 - share)))
        self.a = tuple(a)
        self.b = tuple(b)


def prior(odds: tuple[float, ...] = ODDS) -> list[float]:
    """Equal log prior weights, the starting ``base`` of one test."""
    return [-math.log(len(odds))] * len(odds)


def log_evalue(base: list[float], mix: Odds, k: int, m: int) -> float:
    """Log of the mixture after ``k`` canary and ``m`` stable events at ``mix``'s share."""
    terms = [c + k * x + m * y for c, x, y in zip(base, mix.a, mix.b, strict=True)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def canary_events_needed(base: list[float], mix: Odds, m: int, log_threshold: float) -> float:
    """A lower bound on the canary events ``k`` at which ``log_evalue`` can reach
    ``log_threshold`` with ``m`` stable events: a log-sum-exp of J terms is at most the
    largest term plus log J, and each term is a line in k. More stable events only raise
    it, so a bound computed earlier stays a lower bound."""
    slack = log_threshold - math.log(len(base))
    return min((slack - c - m * y) / x for c, x, y in zip(base, mix.a, mix.b, strict=True))


def _log_ratio(k: int, n: int, r: float, const: float) -> float:
    """Log of Robbins' mixture martingale for rate ``r`` after k events in n trials."""
    return const - k * math.log(r) - (n - k) * math.log1p(-r)


def _const(k: int, n: int) -> float:
    return (math.lgamma(k + 0.5) + math.lgamma(n - k + 0.5) - math.lgamma(n + 1.0)
            - math.log(math.pi))


def upper_bound(k: int, n: int, log_threshold: float) -> float:
    """The largest rate not rejected after ``k`` events in ``n`` trials (1.0 for n = 0)."""
    if n == 0 or k >= n:
        return 1.0
    const = _const(k, n)
    lo, hi = k / n, 1.0  # lo inside the sequence (the mixture is <= 1 there), hi outside
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _log_ratio(k, n, mid, const) < log_threshold:
            lo = mid
        else:
            hi = mid
    return hi


def lower_bound(k: int, n: int, log_threshold: float) -> float:
    """The smallest rate not rejected after ``k`` events in ``n`` trials (0.0 for k = 0)."""
    if n == 0 or k == 0:
        return 0.0
    const = _const(k, n)
    lo, hi = 0.0, k / n  # lo outside, hi inside
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _log_ratio(k, n, mid, const) < log_threshold:
            hi = mid
        else:
            lo = mid
    return lo


class StableQuantiles:
    """Stable's latency p75 and p95 so far, as upper bucket edges (``inf`` until
    ``min_samples`` samples): thresholds from stable's past only, which is what keeps
    the latency tests' events fair to both arms. (For a lognormal shift, exceedances of
    p75 and p90 carry the most evidence per canary request; p95 also covers the tail.)"""

    __slots__ = ("n", "p75", "p95", "_counts", "_min", "_i75", "_c75", "_i95", "_c95")

    def __init__(self, min_samples: int) -> None:
        self.n = 0
        self.p75 = math.inf
        self.p95 = math.inf
        self._counts = [0] * _NB
        self._min = min_samples
        # Per quantile: its bucket and the number of samples in that bucket and below.
        self._i75 = self._i95 = -1
        self._c75 = self._c95 = 0

    def add(self, latency: float) -> None:
        b = int((math.log(latency) - _LOG_LOW) * _INV) if latency > _LOW else 0
        if b >= _NB:
            b = _NB - 1
        counts = self._counts
        counts[b] += 1
        n = self.n = self.n + 1
        # Nearest rank: the lowest bucket with at least q*n samples at or below it.
        i, cum, target = self._i75, self._c75, 0.75 * n
        if b <= i:
            cum += 1
        while cum < target:
            i += 1
            cum += counts[i]
        while cum - counts[i] >= target:
            cum -= counts[i]
            i -= 1
        self._i75, self._c75 = i, cum
        i, cum, target = self._i95, self._c95, 0.95 * n
        if b <= i:
            cum += 1
        while cum < target:
            i += 1
            cum += counts[i]
        while cum - counts[i] >= target:
            cum -= counts[i]
            i -= 1
        self._i95, self._c95 = i, cum
        if n >= self._min:
            self.p75 = EDGES[self._i75]
            self.p95 = EDGES[i]
