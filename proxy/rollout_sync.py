"""Keeping a ``Rollout`` in step with what outlives it: the state file (restarts), the
previous snapshot (hot reload) and the other replicas (``state.redis``).

Free functions over a rollout, apart from the request path: they run at start-up, on a
reload, or when a fleet message arrives, and change the rollout exactly as a local action
would, without announcing it again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from proxy.events import ACTORS, EVENT_KINDS
from proxy.rollout import Rollout

logger = logging.getLogger(__name__)


def apply_remote(r: Rollout, op: str, data: dict[str, Any], event: dict[str, Any] | None,
                 origin: str) -> None:
    """An action another replica took, received through Redis: the same change as the
    local action, without announcing it again or counting it (its replica did). One
    that no longer fits here (a weight for a route latched meanwhile) is dropped."""
    if op == "kill":
        r.kill_override = bool(data.get("enabled"))
    elif r.canary is None:
        return
    elif op in ("rollback", "verify"):
        latch = data.get("latch")
        if not isinstance(latch, dict) or (op == "rollback") != (r.latch is None):
            return
        if op == "rollback" and r.pins is not None:
            r.pins.unpin_canary()
        r.latch = dict(latch)
    elif op == "resume":
        r.reset()
    elif op in ("weight", "promote"):
        weight = data.get("weight")
        if r.latch is not None or not isinstance(weight, int | float):
            return
        r.manual_weight = float(weight)
    elif op == "step":
        step, weight = data.get("step"), data.get("weight")
        if (r.latch is not None or r.step is None or not isinstance(step, int)
                or r.route.progressive is None):
            return
        step = fleet_step(r, step, weight if isinstance(weight, int | float) else None)
        if step <= r.step:
            return
        r.go_to_step(step)
    else:
        return
    r.changed()
    if event is not None and op != "verify":  # a verdict is reported where it was made
        _emit_shared(r, event.get("kind"), event.get("actor"),
                          f"{event.get('reason', '')} (from replica {origin})",
                          {**(event.get("figures") or {}), "replica": origin})


def apply_fleet_state(r: Rollout, *, present: bool, latch: dict[str, Any] | None,
                      manual_weight: float | None, step: int | None,
                      kill: bool | None, step_weight: float | None) -> None:
    """Catch up with the state stored in Redis (at start, after a reconnect or a
    reload): it is the fleet's truth, newer than this replica's state file. With
    ``present`` false Redis knows nothing of this rollout and only ``kill`` counts."""
    notes: list[tuple[str, str, str]] = []
    changed = False
    if kill is not None and kill != r.kill_override:
        r.kill_override = kill
        changed = True
        notes.append(("kill", "admin", f"kill switch {'on' if kill else 'off'} in the fleet"))
    if present and r.canary is not None:
        was = r.latch
        if latch is not None and was is None:
            if r.pins is not None:
                r.pins.unpin_canary()
            notes.append(("rollback", str(latch.get("actor", "auto")),
                          f"rolled back in the fleet: {latch.get('detail', '')}"))
        elif latch is None and was is not None:
            r.reset()  # clears r.latch: compare with what it was
            notes.append(("resume", "admin", "resumed in the fleet"))
        changed = changed or latch != was
        r.latch = dict(latch) if latch is not None else None
        if manual_weight != r.manual_weight:
            r.manual_weight = manual_weight
            changed = True
            if manual_weight is not None and latch is None:
                notes.append(("weight", "admin", f"weight {manual_weight:g}% in the fleet"))
        if step is not None and r.step is not None and r.route.progressive is not None:
            step = fleet_step(r, step, step_weight)
            if step != r.step:
                r.go_to_step(step)
                changed = True
    if changed:
        r.changed()
    for kind, actor, reason in notes:
        _emit_shared(r, kind, actor, reason, {"replica": "redis"})


def _emit_shared(r: Rollout, kind: Any, actor: Any, reason: str, figures: dict[str, Any]) -> None:
    """An event for a change that came through Redis (``via``: not notified again)."""
    if kind in EVENT_KINDS and actor in ACTORS:
        r.emit(kind, actor, reason, {**figures, "via": "redis"})


def state_dict(r: Rollout) -> dict[str, Any]:
    """What ``restore`` needs after a restart, with what each value was made against:
    the progressive plan of ``step``, the configured kill switch of ``kill_override``."""
    prog = r.route.progressive
    return {
        "fingerprint": r.fingerprint(),
        "latch": r.latch,
        "manual_weight": r.manual_weight,
        "configured_weight": (r.route.canary.weight if r.route.canary else None),
        "kill_override": r.kill_override,
        "kill_configured": r.route.kill_switch.enabled,
        "step": r.step,
        "steps": list(prog.steps) if prog is not None and r.step is not None else None,
    }


def _step_at_most(steps: Sequence[float], weight: float) -> int:
    """The highest step whose weight is not above ``weight`` (the first if none): where a
    rollout goes on under another plan, so a changed plan never raises the weight."""
    return max((i for i, w in enumerate(steps) if w <= weight), default=0)


def fleet_step(r: Rollout, step: int, weight: float | None) -> int:
    """This replica's step for one another replica took: by the step's weight when the
    fleet says it (plans differ while a config change rolls through the fleet: the bare
    index of [50, 60, ...] is 100% under [5, 100]), else by its index."""
    assert r.route.progressive is not None
    steps = r.route.progressive.steps
    if weight is None or (0 <= step < len(steps) and steps[step] == weight):
        return step
    return _step_at_most(steps, weight)


def adopt(r: Rollout, old: Rollout) -> None:
    """Carry live state over a reload. Windows of the same lanes always survive (and
    requests still in flight on the old lanes report to this rollout); the latch,
    manual weight and progressive step survive when the rollout is the same one,
    i.e. the canary section did not change (a changed canary is a new rollout). An
    admin kill override gives way to a change of the configured kill switch, as a
    manual weight does to a new configured weight."""
    same_window = old.route.rollback.window == r.route.rollback.window
    for name, prev in old.lanes.items():
        lane = r.lanes.get(name)
        if lane is None or lane.role != prev.role:
            prev._after_end = None
            continue
        if same_window and prev.window is not None:
            lane.window = prev.window
        prev._after_end = lane._after_end
    if old.route.kill_switch.enabled == r.route.kill_switch.enabled:
        r.kill_override = old.kill_override
    if (old.shadow is not None and r.shadow is not None and old.route.shadow == r.route.shadow
            and old.shadow.pool is r.shadow.pool):
        r.shadow = old.shadow  # same mirror: its copies in flight and its record carry on
    if old.fingerprint() == r.fingerprint():
        if old.pins is not None and r.pins is not None and (
                old.route.sticky == r.route.sticky):
            r.pins = old.pins
        r.latch = old.latch
        r.verify_at = old.verify_at
        if old.route.canary == r.route.canary:  # a new configured weight wins
            r.manual_weight = old.manual_weight
        if r.step is not None and old.step is not None:
            assert old.route.progressive is not None and r.route.progressive is not None
            old_steps, steps = old.route.progressive.steps, r.route.progressive.steps
            if old_steps == steps:
                r.go_to_step(old.step, since=old.step_since())
            else:  # a new plan: its interval starts now
                r.go_to_step(_step_at_most(steps, old_steps[old.step]))
    r.refresh()


def restore(r: Rollout, saved: dict[str, Any]) -> None:
    """Apply persisted state, its fields already type-checked (``statefile.route_state``).
    As over a reload, a canary that changed since then is a new rollout, and a kill
    override or step made against another config gives way (older files did not say
    which config: their kill holds, an "off" gives way, and their step restarts at the
    first)."""
    override = saved.get("kill_override")
    if override is not None:
        made_against = saved.get("kill_configured")
        # An older file does not say what it was made against: its kill still holds.
        if made_against == r.route.kill_switch.enabled or (made_against is None and override):
            r.kill_override = override
        elif override != r.route.kill_switch.enabled:
            logger.warning("route %s: admin kill switch %s not restored: made against another "
                           "kill_switch.enabled", r.name, "on" if override else "off")
    if saved.get("fingerprint") == r.fingerprint() and r.canary is not None:
        r.latch = saved.get("latch")
        configured = r.route.canary.weight if r.route.canary else None
        if saved.get("configured_weight") == configured:
            r.manual_weight = saved.get("manual_weight")
        step, old_steps = saved.get("step"), saved.get("steps")
        if r.step is not None and r.route.progressive is not None and step:
            if old_steps is None:
                logger.warning("route %s: progressive step %d not restored: the state file "
                               "does not say of which steps", r.name, step)
            elif step >= len(old_steps):
                logger.warning("route %s: progressive step %d not restored: out of range",
                               r.name, step)
            else:
                steps = r.route.progressive.steps
                r.go_to_step(step if old_steps == list(steps)
                             else _step_at_most(steps, old_steps[step]))
    r.refresh()
