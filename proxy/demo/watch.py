"""``flipback demo``'s watcher: it follows flipback as an operator would (``GET /routes``,
``/events`` and ``/metrics`` every ``REFRESH``) and as its on-call channel does (the webhook
receiver), writes what it sees into the ``Scene`` and the acts, and wakes the script when
the canary is flipped back and when the rollback is verified."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

from proxy.cli.admin_client import AdminClient, AdminError, Key
from proxy.cli.status_table import compute_rates
from proxy.demo.probes import EventKey, Notification, event_key, read_metrics, wall_time
from proxy.demo.report import VERDICTS
from proxy.demo.screen import Screen
from proxy.demo.view import Entry, Scene
from proxy.units import Seconds


class Watcher:
    """Reads flipback into the scene. ``start`` once the scene exists; ``run`` polls until
    cancelled; ``on_notification`` is the webhook receiver's callback."""

    def __init__(self, screen: Screen, refresh: Seconds) -> None:
        self.screen = screen
        self.refresh = refresh
        self.scene: Scene | None = None
        self.flipped = asyncio.Event()  # the current act's rollback event was seen
        self.verdict = asyncio.Event()  # ... and its verified / verify_failed event
        self._seen: set[EventKey] = set()
        self._parked: dict[EventKey, list[Notification]] = {}  # event not in GET /events yet
        self._clock_offset = 0.0  # wall clock minus loop clock: reads event timestamps

    def start(self, scene: Scene) -> None:
        self.scene = scene
        self._clock_offset = time.time() - scene.t0

    def add(self, entry: Entry) -> None:
        """A timeline entry, in the order seen, which is causal (the resume verb before its
        event); sorting by time would not be: event stamps are wall-clock milliseconds."""
        if self.scene is not None:
            self.scene.timeline.append(entry)
            self.screen.entry(entry, self.scene.t0)

    async def run(self, admin: AdminClient, route: str) -> None:
        scene = self.scene
        assert scene is not None
        loop = asyncio.get_running_loop()
        history: deque[tuple[float, dict[Key, float]]] = deque()
        while True:
            try:
                routes = await admin.routes()
                events = await admin.events(limit=20)
            except AdminError as exc:
                scene.admin_error = str(exc)
            else:
                scene.routes = routes
                for event in reversed(events):
                    self.on_event(event)
                try:  # apart: a failed scrape must not hide a rollback in the events
                    scrape = await read_metrics(admin, route)
                except AdminError as exc:
                    scene.admin_error = str(exc)
                else:
                    now = loop.time()
                    history.append((now, scrape.counts))
                    while len(history) > 2 and now - history[1][0] >= 1.0:
                        history.popleft()  # rates over the last second or so
                    then, before = history[0]
                    scene.rates = compute_rates(before, scrape.counts, now - then) \
                        if now > then else None
                    scene.shadow = scrape.shadow
            await asyncio.sleep(self.refresh)

    async def last_reading(self, admin: AdminClient, route: str) -> None:
        """The shadow figures once the load has drained, for the summary."""
        with contextlib.suppress(AdminError):
            scrape = await read_metrics(admin, route)
            if self.scene is not None:
                self.scene.shadow = scrape.shadow

    def on_event(self, event: dict[str, Any]) -> None:
        """An event from ``GET /events`` (each one once, however often it is listed)."""
        key = event_key(event)
        if key in self._seen or self.scene is None:
            return
        self._seen.add(key)
        stamp, kind, actor, reason = key
        wall = wall_time(stamp)
        at = asyncio.get_running_loop().time() if wall is None else wall - self._clock_offset
        self.add(Entry(at, kind, actor, reason))
        act = self.scene.acts[-1] if self.scene.acts else None
        if actor == "auto" and act is not None and act.fault_at is not None:
            if kind == "rollback" and act.flip_at is None:
                act.flip_at, act.flip_reason, act.flip_key = at, reason, key
                self.flipped.set()
            elif kind in VERDICTS and act.flip_at is not None and not act.verdict:
                act.verdict, act.verdict_at, act.verdict_reason = kind, at, reason
                act.verdict_key = key
                self.verdict.set()
        for note in self._parked.pop(key, []):
            self._show(note)

    def on_notification(self, note: Notification) -> None:
        """A webhook POST arrived. It usually beats the next ``GET /events``: it waits for
        its event there, so that the timeline reads in causal order."""
        if note.key in self._seen:
            self._show(note)
        else:
            self._parked.setdefault(note.key, []).append(note)

    def flush(self) -> None:
        """Show notifications whose event no poll saw (delivered after the last one)."""
        parked, self._parked = self._parked, {}
        for notes in parked.values():
            for note in notes:
                self._show(note)

    def _show(self, note: Notification) -> None:
        after = "the flip" if note.kind == "rollback" else "the event"
        self.add(Entry(note.received_at - self._clock_offset, "webhook", "notify",
                       f"got {note.kind} in {note.delay * 1000:.0f} ms after {after}"))
