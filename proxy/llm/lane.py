"""What one lane (route x upstream) holds for LLM telemetry, for the request path to use
without lookups: its ``LlmWindow``, its metric cells per role, and who to tell when the
window changes (the rollout machine, to judge the LLM rules at once).

The handler, on a route with ``llm.telemetry``::

    reader = lane.llm.reader(start=t_sent, content_type=..., content_encoding=...)
    ... for each body chunk, after writing it to the client: reader.feed(chunk, now())
    lane.llm.end(reader, now(), role=role, broken=..., judged=...)

The owning rollout calls ``watch(callback)``; the callback runs after every first token
and every response recorded in the window (judged requests only).
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
        """A reader for one response; with ``judged``, its first token goes to the window
        (and the watcher) the moment it arrives."""
        return ResponseReader(start=start, content_type=content_type,
                              content_encoding=content_encoding,
                              on_first_token=self._first_token if judged else None)

    def end(self, reader: ResponseReader, now: float, *, role: str, broken: bool = False,
            judged: bool = True) -> Reading | None:
        """The response ended (or broke): metrics under ``role``, then, when ``judged``
        (the same rule as ``Lane.end``: not a replay), the window and the watcher."""
        reading = reader.end(now, broken=broken)
        if reading is None:
            return None
        self.series(role).record(reading)
        if judged:
            self.window.record(reading)
            if self._watcher is not None:
                self._watcher()
        return reading

    def _first_token(self, ttft: Seconds) -> None:
        self.window.record_ttft(ttft)
        if self._watcher is not None:
            self._watcher()
