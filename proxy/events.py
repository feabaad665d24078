"""The audit trail of state changes (SPEC §8 ``GET /events``): a bounded ring, newest last."""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config.model import NOTIFY_KINDS

EVENT_KINDS = frozenset(NOTIFY_KINDS)  # every event kind can be chosen for notify
ACTORS = frozenset({"auto", "admin", "config"})


def rfc3339_now() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    time: str
    route: str | None
    kind: str
    actor: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "route": self.route,
            "kind": self.kind,
            "actor": self.actor,
            "reason": self.reason,
            "figures": self.figures,
        }


Listener = Callable[[Event], None]


class EventLog:
    """Keeps the last ``capacity`` events and tells listeners (log, notify) of each."""

    def __init__(self, capacity: int = 1000) -> None:
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(
        self,
        *,
        route: str | None,
        kind: str,
        actor: str,
        reason: str,
        figures: dict[str, Any] | None = None,
    ) -> Event:
        assert kind in EVENT_KINDS and actor in ACTORS, (kind, actor)
        event = Event(
            time=rfc3339_now(),
            route=route,
            kind=kind,
            actor=actor,
            reason=reason,
            figures=figures or {},
        )
        self._ring.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def recent(self, limit: int, route: str | None = None) -> list[Event]:
        """Newest first."""
        out: list[Event] = []
        for event in reversed(self._ring):
            if route is None or event.route == route:
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    def last_for(self, route: str) -> Event | None:
        for event in reversed(self._ring):
            if event.route == route:
                return event
        return None

    def __len__(self) -> int:
        return len(self._ring)
