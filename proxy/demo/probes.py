"""``flipback demo``'s instruments besides the admin API's JSON: a webhook receiver that
stands in for the on-call channel flipback notifies, a reader of ``GET /metrics`` (request
counts per upstream and the shadow comparison's figures), and a peek into the shadow's diff
record."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli.admin_client import AdminClient, AdminError, Key, request_counts_in
from proxy.demo.models import LocalServer
from proxy.units import Seconds

HOOK_PATH = "/hooks/flipback"
EventKey = tuple[str, str, str, str]  # time, kind, actor, reason: one event, however read


def event_key(event: Mapping[str, Any]) -> EventKey:
    time_, kind, actor, reason = (str(event.get(k, "")) for k in ("time", "kind", "actor",
                                                                  "reason"))
    return time_, kind, actor, reason


def wall_time(stamp: str) -> float | None:
    """An event's RFC 3339 ``time`` as epoch seconds (millisecond precision), or None."""
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


# -- notifications ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Notification:
    """One webhook POST from flipback: which event, when it happened, when it arrived
    (both wall clock: the event's own ``time`` is all a receiver knows)."""

    key: EventKey
    event_at: float
    received_at: float

    @property
    def kind(self) -> str:
        return self.key[1]

    @property
    def delay(self) -> Seconds:
        return self.received_at - self.event_at


class WebhookReceiver(LocalServer):
    """A tiny HTTP server on 127.0.0.1 (port 0) that accepts flipback's notifications at
    ``HOOK_PATH``, keeps each in ``received`` and tells ``on_notification``; a retried
    delivery (an ``X-Flipback-Delivery`` seen before) is acknowledged and not kept again,
    as the README asks of receivers."""

    def __init__(self, on_notification: Callable[[Notification], None]) -> None:
        super().__init__()
        self.received: list[Notification] = []
        self._deliveries: set[str] = set()
        self._on = on_notification

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(HOOK_PATH, self._hook)

    async def _hook(self, request: web.Request) -> web.Response:
        received = time.time()
        try:
            event = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            return web.json_response({"error": "expected a JSON event"}, status=400)
        delivery = request.headers.get("x-flipback-delivery")
        if delivery is not None:
            if delivery in self._deliveries:
                return web.Response(status=204)  # a retry of one already kept
            self._deliveries.add(delivery)
        key = event_key(event)
        at = wall_time(key[0])
        note = Notification(key, received if at is None else at, received)
        self.received.append(note)
        self._on(note)
        return web.Response(status=204)


# -- GET /metrics ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ShadowFigures:
    """One route's shadow traffic, from flipback's counters: copies ``sent`` (answered),
    ``dropped`` (in-flight cap), ``failed`` (error, timeout); ``compared`` pairs (the count
    of ``flipback_shadow_latency_delta_seconds``, observed once per judged pair) and how many
    ``differed``: ``flipback_shadow_mismatched_requests_total`` over every primary (a pair
    differing in status and body counts once), or, from a flipback without it, the larger
    of ``flipback_shadow_mismatch_total``'s two kinds."""

    sent: int = 0
    dropped: int = 0
    failed: int = 0
    compared: int = 0
    differed: int = 0

    @property
    def agreement(self) -> float | None:
        """Percent of compared pairs that agreed (None before the first comparison)."""
        if not self.compared:
            return None
        return 100.0 * (self.compared - min(self.differed, self.compared)) / self.compared


@dataclass(frozen=True, slots=True)
class Scrape:
    counts: dict[Key, float] = field(default_factory=dict)  # requests per (route, upstream)
    shadow: ShadowFigures = ShadowFigures()


def parse_metrics(text: str, route: str) -> Scrape:
    """The figures the demo shows, from flipback's Prometheus text (ValueError if bad)."""
    families = list(text_string_to_metric_families(text))
    shadow: dict[str, float] = {}
    kinds: dict[str, float] = {}  # mismatches by kind, summed over primaries
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if labels.get("route") != route:
                continue
            if name == "flipback_shadow_total":
                outcome = labels.get("outcome", "")
                shadow[outcome] = shadow.get(outcome, 0.0) + value
            elif name == "flipback_shadow_mismatched_requests_total":  # by primary
                shadow["requests"] = shadow.get("requests", 0.0) + value
            elif name == "flipback_shadow_mismatch_total":  # by kind and primary
                kind = labels.get("kind", "")
                kinds[kind] = kinds.get(kind, 0.0) + value
            elif name == "flipback_shadow_latency_delta_seconds_count":
                shadow["compared"] = value
    figures = ShadowFigures(
        sent=int(shadow.get("sent", 0)),
        dropped=int(shadow.get("dropped", 0)),
        failed=int(shadow.get("error", 0) + shadow.get("timeout", 0)),
        compared=int(shadow.get("compared", 0)),
        differed=int(shadow["requests"] if "requests" in shadow
                     else max(kinds.values(), default=0.0)),
    )
    return Scrape(request_counts_in(families), figures)


async def read_metrics(admin: AdminClient, route: str) -> Scrape:
    """``parse_metrics`` of ``GET /metrics``; every failure is an ``AdminError``."""
    text = await admin.metrics()
    try:
        return parse_metrics(text, route)
    except ValueError as exc:
        raise AdminError(f"GET /metrics: unreadable: {exc}") from None


# -- the shadow's diff record ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DiffSample:
    """What the record file held at the end: its lines, and the first mismatch's values."""

    lines: int = 0
    path: str = ""
    primary: Any = None
    shadow: Any = None


def read_diffs(record: Path) -> DiffSample:
    """Count the record's lines and pick the first one that shows a body difference."""
    try:
        lines = record.read_bytes().splitlines()
    except OSError:
        return DiffSample()
    for line in lines:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        diffs = entry.get("paths") if isinstance(entry, dict) else None
        for diff in diffs if isinstance(diffs, list) else []:
            if isinstance(diff, dict) and diff.get("primary") != diff.get("shadow"):
                return DiffSample(len(lines), str(diff.get("path", "")), diff.get("primary"),
                                  diff.get("shadow"))
    return DiffSample(len(lines))
