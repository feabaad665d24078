"""One upstream as seen from one route: the window and metric cells a request to it touches.

A ``Lane`` is what the request path holds between picking an upstream and recording the
outcome: ``begin`` before the send, ``end`` (or ``cancel``) after, with no lookups between.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.metrics import InFlight, Metrics, Series
from proxy.upstream.pool import UpstreamPool
from proxy.windows import SlidingWindow


class Lane:
    """One upstream as seen from one route: what a request to it must touch on the way."""

    __slots__ = ("upstream", "role", "pool", "window", "in_flight", "_series", "_metrics",
                 "_route", "_after_end", "_use_ttfb")

    def __init__(
        self,
        *,
        route: str,
        upstream: str,
        role: str,
        pool: UpstreamPool,
        window: SlidingWindow | None,
        metrics: Metrics,
        use_ttfb: bool,
    ) -> None:
        self.upstream = upstream
        self.role = role
        self.pool = pool
        self.window = window
        self.in_flight: InFlight = metrics.in_flight(route, upstream)
        self._metrics = metrics
        self._route = route
        self._series: dict[str, Series] = {role: metrics.series(route, upstream, role)}
        # Set on a watched canary: called with (failed, latency) as each request ends.
        self._after_end: Callable[[bool, float], None] | None = None
        self._use_ttfb = use_ttfb

    def series(self, role: str) -> Series:
        found = self._series.get(role)
        if found is None:
            found = self._series[role] = self._metrics.series(self._route, self.upstream, role)
        return found

    def begin(self) -> float:
        """A request to this upstream starts; returns the token to pass to ``end``."""
        self.in_flight.value += 1
        if self.window is not None:
            return self.window.begin()
        return 0.0

    def end(
        self,
        started: float,
        *,
        role: str,
        outcome: int,
        failed: bool,
        ttfb: float | None,
        total: float,
    ) -> None:
        """The request ended (or failed): metrics, window, then the trip check."""
        self.in_flight.value -= 1
        self.series(role).observe(outcome, ttfb, total)
        window = self.window
        if window is not None:
            latency = ttfb if (self._use_ttfb and ttfb is not None) else total
            window.end(started, latency, failed)
            if self._after_end is not None:
                self._after_end(failed, latency)

    def cancel(self, started: float) -> None:
        """The client went away: the request ends without judging the upstream."""
        self.in_flight.value -= 1
        if self.window is not None:
            self.window.forget(started)
