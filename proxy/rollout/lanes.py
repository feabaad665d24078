"""One upstream as seen from one route: the window and metric cells a request to it touches.

A ``Lane`` is what the request path holds between picking an upstream and recording the
outcome: ``begin`` before the send, ``end`` (or ``cancel``) after, with no lookups between.
It knows its upstream only through the ``Pool`` protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Protocol

from proxy.config.model import UpstreamConfig
from proxy.metrics import OUTCOME_4XX, InFlight, Metrics, Series
from proxy.rollout.windows import SlidingWindow

if TYPE_CHECKING:
    from proxy.llm.lane import LlmLane
    from proxy.upstream.pool import UpstreamResponse

# Called as each request on a watched lane ends, with (failed, client_error, latency,
# sampled): client_error is a 4xx that is not a failure; sampled is false for a request
# the override header sent here (not a random sample of the split).
Judge = Callable[[bool, bool, float, bool], None]


class Pool(Protocol):
    """What a lane needs of an upstream's connection pool (``proxy.upstream.pool``)."""

    @property
    def cfg(self) -> UpstreamConfig: ...

    async def send(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                   body: bytes | AsyncIterable[bytes] | None, *,
                   content_length: int | None = None) -> UpstreamResponse: ...


class Lane:
    """One upstream as seen from one route: what a request to it must touch on the way."""

    __slots__ = ("upstream", "role", "pool", "window", "in_flight", "judge", "version",
                 "llm", "_series", "_metrics", "_route", "_use_ttfb")

    def __init__(
        self,
        *,
        route: str,
        upstream: str,
        role: str,
        pool: Pool,
        window: SlidingWindow,
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
        self.judge: Judge | None = None  # set by the owning rollout through ``watch``
        self.version = pool.cfg.version  # the model version the upstream serves, if said
        # LLM telemetry (route ``llm.telemetry``): set by the owning rollout, else None.
        self.llm: LlmLane | None = None
        self._use_ttfb = use_ttfb

    def watch(self, judge: Judge | None) -> None:
        """Have ``judge`` called as each request ends (None: nobody judges this lane)."""
        self.judge = judge

    def series(self, role: str) -> Series:
        found = self._series.get(role)
        if found is None:
            found = self._series[role] = self._metrics.series(self._route, self.upstream, role)
        return found

    def begin(self) -> float:
        """A request to this upstream starts; returns the token to pass to ``end``."""
        self.in_flight.value += 1
        return self.window.begin()

    def end(
        self,
        started: float,
        judged: bool = True,
        *,
        role: str,
        outcome: int,
        failed: bool,
        ttfb: float | None,
        total: float,
    ) -> None:
        """The request ended (or failed): metrics, window, then the trip check. A replay
        of a request another lane failed (``judged`` false) is counted in the metrics but
        not in the window: it is not a random sample of this lane's traffic (a request
        the canary could not serve, charged to stable, made stable look worse)."""
        self.in_flight.value -= 1
        self.series(role).observe(outcome, ttfb, total)
        if not judged:
            self.window.forget(started)
            return
        latency = ttfb if (self._use_ttfb and ttfb is not None) else total
        self.window.end(started, latency, failed)
        if self.judge is not None:
            self.judge(failed, outcome == OUTCOME_4XX and not failed, latency,
                       role == self.role)

    def cancel(self, started: float) -> None:
        """The client went away: the request ends without judging the upstream."""
        self.in_flight.value -= 1
        self.window.forget(started)
