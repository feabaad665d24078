"""A route's live state as immutable values: what the rollout machine holds and swaps
whole, persists to the state file, shares with the fleet, and carries over a reload.

Pure data: no I/O, no clock reads (times are passed in).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

VERDICTS = ("verified", "verify_failed")


@dataclass(frozen=True, slots=True)
class Latch:
    """Why a route is ``rolled_back``: set by a trip or an operator, cleared only by a
    resume or a new rollout. ``time`` is wall-clock (it is shown and persisted)."""

    reason: str  # the trip rule (error_rate, latency, ...) or "manual"
    detail: str
    actor: str  # auto, admin
    time: float
    verify: str | None = None  # the post-rollback verdict, once made

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``/routes``, the state file and fleet messages."""
        out: dict[str, Any] = {"reason": self.reason, "detail": self.detail,
                               "actor": self.actor, "time": self.time}
        if self.verify is not None:
            out["verify"] = self.verify
        return out

    @classmethod
    def of(cls, raw: object) -> Latch | None:
        """A latch from its JSON shape (a state file, Redis, another replica); fields of
        the wrong type take neutral values rather than failing."""
        if isinstance(raw, Latch):
            return raw
        if not isinstance(raw, dict):
            return None
        when = raw.get("time")
        verify = raw.get("verify")
        return cls(
            reason=str(raw.get("reason", "manual")),
            detail=str(raw.get("detail", "")),
            actor=str(raw.get("actor", "auto")),
            time=float(when) if isinstance(when, int | float) else 0.0,
            verify=verify if verify in VERDICTS else None,
        )


@dataclass(frozen=True, slots=True)
class LiveState:
    """Everything about a route's rollout that changes while it runs, and nothing else
    (the config, the windows and the pins are not here)."""

    manual_weight: float | None = None  # an operator's weight (or promote's 100)
    latch: Latch | None = None
    kill_override: bool | None = None  # an operator's kill switch, over the config's
    step: int | None = None  # index into progressive.steps; None without a plan
    step_since: float = 0.0  # monotonic time the step was taken
    verify_at: float | None = None  # monotonic end of the post-rollback verify window


class Effect(enum.Flag):
    """What a state change does beyond the state, applied by the machine with it."""

    NONE = 0
    UNPIN_CANARY = enum.auto()  # a rollback: the canary's sessions go to stable
    RESET = enum.auto()  # a resume: no pins, fresh windows (a new start)
