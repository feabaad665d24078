"""Sliding windows of request outcomes, cheap enough to sit on every proxied request.

A window is a ring of ``slots`` time slots, each ``window / slots`` wide, holding a
count, a failure count, a latency histogram and the number of requests that started in
it and are still in flight. Running totals are kept up to date as requests end and as
slots expire, so ``stats()`` never re-sums the ring, and the per-request path only does
arithmetic on preallocated lists: no allocation that grows with traffic, no sorting.

Latency buckets have "nice" upper bounds (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5 times a
power of ten, 1 ms to 120 s). Quantiles are reported as the upper bound of the bucket
holding the nearest-rank sample, so they err high by at most one bucket (< 34%), and a
threshold that is itself a bound (``500ms``, ``1s``, ``250ms``...) is judged exactly:
``p99 > 0.5`` holds if and only if more than ``n // 100`` of ``n`` requests took longer.

The clock is injected (``loop.time`` in production, a fake in tests) and must be
monotonic and non-negative.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from operator import sub

from proxy.units import Seconds, format_duration

Clock = Callable[[], float]

_MANTISSAS = ("1", "1.25", "1.5", "2", "2.5", "3", "4", "5", "6", "7.5")
# Parsed from decimal text so a bound equals the float a config value like "750ms" parses to.
BOUNDS: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-3, 2) for m in _MANTISSAS) + (
    100.0,
    120.0,
)
BUCKETS = len(BOUNDS) + 1  # the last bucket holds everything over 120 s
_ZEROS = (0,) * BUCKETS


def quantiles(totals: list[int], count: int) -> tuple[Seconds | None, Seconds | None]:
    """p50 and p99 of ``count`` samples held in ``totals`` (a count per ``BOUNDS`` bucket):
    the upper bound of the bucket holding the nearest-rank sample, as ``stats`` reads them;
    None when empty. For histograms on these buckets kept elsewhere (``proxy.llm.window``)."""
    if not count:
        return None, None
    ranks = list(accumulate(totals))
    # Nearest rank, in integers: ceil(n/2) and ceil(0.99 n).
    p50 = BOUNDS[min(bisect_left(ranks, -(-count // 2)), BUCKETS - 2)]
    p99 = BOUNDS[min(bisect_left(ranks, -(-99 * count // 100)), BUCKETS - 2)]
    return p50, p99


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowStats:
    """One reading of a window. ``error_rate`` is percent (0-100) of ``requests``;
    quantiles are seconds (bucket upper bounds), None when there are no requests.
    ``requests`` includes ``slow_in_flight`` when the reading asked for them."""

    requests: int
    failures: int
    error_rate: float
    p50: Seconds | None
    p99: Seconds | None
    in_flight: int
    consecutive_failures: int
    slow_in_flight: int = 0
    # The p99, but never set by fewer than three requests: the third slowest while the
    # window holds under 300 (a p99 of 20 requests is their maximum, and one slow request
    # among them is no evidence). The sequential judge's max_p99 guard rail reads it.
    p99_of_three: Seconds | None = None


class SlidingWindow:
    """Completed requests over the last ``window`` seconds, plus requests in flight.

    The window moves in steps of ``window / slots``: a slot's figures leave the totals
    once the whole slot is older than the ring, so the effective span is between
    ``window - window/slots`` and ``window``. More slots give a finer step (and a finer
    slow-in-flight resolution, see ``stats``) at the cost of a little memory.
    """

    __slots__ = (
        "_clock",
        "_window",
        "_slots",
        "_width",
        "_inv",
        "_head",
        "_pos",
        "_count",
        "_failures",
        "_totals",
        "_slot_count",
        "_slot_failures",
        "_slot_buckets",
        "_slot_in_flight",
        "_old_in_flight",
        "_in_flight",
        "_consecutive",
    )

    def __init__(self, window: Seconds, clock: Clock, slots: int = 20) -> None:
        if window <= 0 or slots < 1:
            raise ValueError(f"window must be > 0 and slots >= 1, got {window!r}, {slots!r}")
        self._clock = clock
        self._window = window
        self._slots = slots
        self._width = window / slots
        self._inv = slots / window
        self._head = int(clock() * self._inv)  # absolute index of the newest slot
        self._pos = self._head % slots  # its place in the ring
        self._count = 0
        self._failures = 0
        self._totals = [0] * BUCKETS
        self._slot_count = [0] * slots
        self._slot_failures = [0] * slots
        self._slot_buckets = [[0] * BUCKETS for _ in range(slots)]
        self._slot_in_flight = [0] * slots
        self._old_in_flight = 0  # in flight, started in a slot that has left the ring
        self._in_flight = 0
        self._consecutive = 0

    @property
    def window(self) -> Seconds:
        return self._window

    def begin(self) -> float:
        """A request starts. Returns its start time, to hand back to ``end``."""
        now = self._clock()
        idx = int(now * self._inv)
        if idx > self._head:
            self._advance(idx)
        self._slot_in_flight[self._pos] += 1
        self._in_flight += 1
        return now

    def end(self, started: float, latency: Seconds, failed: bool) -> None:
        """The request begun at ``started`` finished: count it in the current slot.

        ``latency`` is whichever measure the route judges (ttfb or total). Every
        ``begin`` must be matched by exactly one ``end``.
        """
        idx = int(self._clock() * self._inv)
        if idx > self._head:
            self._advance(idx)
        start = int(started * self._inv)
        if self._head - start < self._slots:
            self._slot_in_flight[start % self._slots] -= 1
        else:
            self._old_in_flight -= 1
        self._in_flight -= 1
        pos = self._pos
        bucket = bisect_left(BOUNDS, latency)
        self._slot_buckets[pos][bucket] += 1
        self._totals[bucket] += 1
        self._slot_count[pos] += 1
        self._count += 1
        if failed:
            self._slot_failures[pos] += 1
            self._failures += 1
            self._consecutive += 1
        else:
            self._consecutive = 0

    def forget(self, started: float) -> None:
        """The request begun at ``started`` ended with nothing to judge (the client went
        away): drop its in-flight mark without counting it as a request."""
        idx = int(self._clock() * self._inv)
        if idx > self._head:
            self._advance(idx)
        start = int(started * self._inv)
        if self._head - start < self._slots:
            self._slot_in_flight[start % self._slots] -= 1
        else:
            self._old_in_flight -= 1
        self._in_flight -= 1

    def stats(self, slow_after: Seconds | None = None) -> WindowStats:
        """Read the window.

        With ``slow_after``, requests in flight for longer than that count as completed
        slow requests: added to ``requests`` and to the histogram at the lowest bucket
        above their known age, so a hung upstream shows in p99 before any of them ends.
        In-flight starts are known to slot resolution, so a request is counted once
        its whole start slot is over ``slow_after`` old: between ``slow_after`` and
        ``slow_after + window/slots`` after it started. Never earlier, so a request
        that is merely long-ish is never counted as slow. A request in flight since
        before the ring began is known only to be older than the ring, and sits there.
        """
        now = self._clock()
        idx = int(now * self._inv)
        if idx > self._head:
            self._advance(idx)
        requests = self._count
        totals = self._totals
        slow = 0
        if slow_after is not None and self._in_flight:
            totals, slow = self._with_slow(now, slow_after)
            requests += slow
        if requests:
            ranks = list(accumulate(totals))
            # Nearest rank, in integers: ceil(n/2) and ceil(0.99 n).
            p50: float | None = BOUNDS[min(bisect_left(ranks, -(-requests // 2)), BUCKETS - 2)]
            rank99 = -(-99 * requests // 100)
            p99: float | None = BOUNDS[min(bisect_left(ranks, rank99), BUCKETS - 2)]
            p99_of_three = (BOUNDS[min(bisect_left(ranks, min(rank99, requests - 2)),
                                       BUCKETS - 2)] if requests >= 3 else None)
            error_rate = self._failures * 100.0 / requests
        else:
            p50 = p99 = p99_of_three = None
            error_rate = 0.0
        return WindowStats(
            requests=requests,
            failures=self._failures,
            error_rate=error_rate,
            p50=p50,
            p99=p99,
            in_flight=self._in_flight,
            consecutive_failures=self._consecutive,
            slow_in_flight=slow,
            p99_of_three=p99_of_three,
        )

    def reset(self) -> None:
        """Forget completed requests and the failure streak (a new rollout starts clean).

        Requests in flight are real and will still call ``end``, so they stay tracked.
        """
        for pos in range(self._slots):
            self._slot_buckets[pos][:] = _ZEROS
            self._slot_count[pos] = 0
            self._slot_failures[pos] = 0
        self._totals[:] = _ZEROS
        self._count = 0
        self._failures = 0
        self._consecutive = 0

    def __repr__(self) -> str:
        s = self.stats()
        p99 = "-" if s.p99 is None else f"{s.p99:g}s"
        return (
            f"<SlidingWindow {format_duration(self._window)}: {s.requests} req, "
            f"{s.failures} fail, p99 {p99}, {s.in_flight} in flight>"
        )

    def _advance(self, idx: int) -> None:
        """Move the head to slot ``idx``, expiring the slots it passes over."""
        slots = self._slots
        if idx - self._head >= slots:
            self._old_in_flight += sum(self._slot_in_flight)
            self._slot_in_flight[:] = (0,) * slots
            self._reset_completed()
        else:
            for j in range(self._head + 1, idx + 1):
                pos = j % slots
                if self._slot_in_flight[pos]:
                    self._old_in_flight += self._slot_in_flight[pos]
                    self._slot_in_flight[pos] = 0
                if self._slot_count[pos]:
                    buckets = self._slot_buckets[pos]
                    self._totals[:] = map(sub, self._totals, buckets)
                    buckets[:] = _ZEROS
                    self._count -= self._slot_count[pos]
                    self._failures -= self._slot_failures[pos]
                    self._slot_count[pos] = 0
                    self._slot_failures[pos] = 0
        self._head = idx
        self._pos = idx % slots

    def _reset_completed(self) -> None:
        """Drop every completed request but keep the failure streak (whole ring expired)."""
        consecutive = self._consecutive
        self.reset()
        self._consecutive = consecutive

    def _with_slow(self, now: float, slow_after: Seconds) -> tuple[list[int], int]:
        """Totals plus the slow in-flight requests, each slot's at its age's bucket."""
        width = self._width
        # Slot j ends at (j+1)*width; all of its requests are slow once that is
        # slow_after ago, i.e. for j <= last.
        last = int((now - slow_after) * self._inv) - 1
        oldest = self._head - self._slots + 1
        totals = self._totals.copy()
        slow = 0
        if self._old_in_flight and oldest - 1 <= last:
            age = now - oldest * width
            totals[bisect_right(BOUNDS, age)] += self._old_in_flight
            slow = self._old_in_flight
        in_flight = self._slot_in_flight
        for j in range(oldest, min(last, self._head) + 1):
            n = in_flight[j % self._slots]
            if n:
                totals[bisect_right(BOUNDS, now - (j + 1) * width)] += n
                slow += n
        return totals, slow
