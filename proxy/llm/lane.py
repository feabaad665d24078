"""What one lane (route x upstream) holds for LLM telemetry, for the request path to use
without lookups: its ``LlmWindow``, its metric cells per role, and who to tell when the
window changes (the rollout machine, to judge the LLM rules at once).

The handler, on a route with ``llm.telemetry``::

    reader = lane.llm.reader(start=t_sent, content_type=..., content_encoding=...)
    ... for each body chunk, after writing it to the client: reader.feed(chunk, now())
    lane.llm.end(reader, now(), role=role, broken=..., judged=...)
    (or lane.llm.cancel(reader) when the client went away)

The owning rollout calls ``watch(callback)``; the callback runs after every first token
and every response recorded in the window (judged requests only), and its tick reads
``window.stats(slow_after=max_ttft_p99)`` to catch a canary that sends no first token.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.llm.reader import Reading, ResponseReader
from proxy.llm.window import LlmWindow
from proxy.metrics import LlmSeries, Metrics
from proxy.units import Seconds

Watcher = Callable[[], None]


class LlmLane:
    """One lane's LLM window and metric cells (see the module doc)."""

    __slots__ = ("window", "_metrics", "_route", "_upstream", "_series", "_watcher")

    def __init__(self, *, route: str, upstream: str, window: LlmWindow,
                 metrics: Metrics) -> None:
        self.window = window
        self._metrics = metrics
        self._route = route
        self._upstream = upstream
        self._series: dict[str, LlmSeries] = {}
        self._watcher: Watcher | None = None

    def watch(self, watcher: Watcher | None) -> None:
        """Have ``watcher`` called whenever the window takes a figure (None: nobody)."""
        self._watcher = watcher

    def series(self, role: str) -> LlmSeries:
        found = self._series.get(role)
        if found is None:
            found = self._series[role] = self._metrics.llm_series(
                self._route, self._upstream, role)
        return found

    def reader(self, *, start: float, content_type: str | None,
               content_encoding: str | None = None, judged: bool = True) -> ResponseReader:
        """A reader for one response (its headers just arrived; ``start``: when the
        request was sent, on the window's clock). With ``judged``, the window marks it
        waiting for its first token, and takes that token (and tells the watcher) the
        moment it arrives. End it with ``end``, or ``cancel`` when the client left."""

        def first_token(ttft: Seconds) -> None:
            self.window.record_ttft(ttft, start)
            if self._watcher is not None:
                self._watcher()

        reader = ResponseReader(start=start, content_type=content_type,
                                content_encoding=content_encoding,
                                on_first_token=first_token if judged else None)
        if reader.awaits_first_token:
            self.window.begin(start)
        return reader

    def end(self, reader: ResponseReader, now: float, *, role: str, broken: bool = False,
            judged: bool = True) -> Reading | None:
        """The response ended (or broke): metrics under ``role``, then, when ``judged``
        (as given to ``reader``; the same rule as ``Lane.end``: not a replay), the window
        and the watcher."""
        if reader.awaits_first_token:
            self.window.settle(reader.start)
        reading = reader.end(now, broken=broken)
        if reading is None:
            return None
        self.series(role).record(reading)
        if judged:
            self.window.record(reading)
            if self._watcher is not None:
                self._watcher()
        return reading

    def cancel(self, reader: ResponseReader) -> None:
        """The client went away: nothing is recorded; a wait for a first token ends."""
        if reader.awaits_first_token:
            self.window.settle(reader.start)
