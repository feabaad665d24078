"""How live state outlives its ``Rollout``: over a hot reload, a restart (the state file)
and the fleet (another replica's action, Redis's stored state).

Pure functions from one ``LiveState`` to the next, with the ``Effect`` the machine must
apply alongside; the machine is the only one that applies them. A rollout's identity is
its *fingerprint* (which model version the canary is): state made against another
fingerprint is a different rollout's and never carries over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from proxy.config.model import RouteConfig
from proxy.rollout.state import Effect, Latch, LiveState

# (kind, actor, reason): an event to report for a change that came from the fleet.
Note = tuple[str, str, str]


def initial(route: RouteConfig, now: float) -> LiveState:
    """A new rollout: the configured weight, at the first progressive step if any."""
    planned = route.progressive is not None and route.canary is not None
    return LiveState(step=0 if planned else None, step_since=now)


def resumed(state: LiveState, now: float) -> LiveState:
    """Resume: no latch, no manual weight, the first step again (the kill switch, an
    independent control, stays). Goes with ``Effect.RESET``."""
    return replace(state, latch=None, verify_at=None, manual_weight=None,
                   step=0 if state.step is not None else None,
                   step_since=now if state.step is not None else state.step_since)


def at_step(state: LiveState, route: RouteConfig, step: int, since: float) -> LiveState:
    """``state`` at progressive ``step`` (clamped to the plan), taken at ``since``."""
    assert route.progressive is not None
    last = len(route.progressive.steps) - 1
    return replace(state, step=max(0, min(step, last)), step_since=since)


def step_at_most(steps: Sequence[float], weight: float) -> int:
    """The highest step whose weight is not above ``weight`` (the first if none): where a
    rollout goes on under another plan, so a changed plan never raises the weight."""
    return max((i for i, w in enumerate(steps) if w <= weight), default=0)


def fleet_step(route: RouteConfig, step: int, weight: float | None) -> int:
    """This replica's step for one another replica took: by the step's weight when the
    fleet says it (plans differ while a config change rolls through the fleet: the bare
    index of [50, 60, ...] is 100% under [5, 100]), else by its index."""
    assert route.progressive is not None
    steps = route.progressive.steps
    if weight is None or (0 <= step < len(steps) and steps[step] == weight):
        return step
    return step_at_most(steps, weight)


# -- hot reload ---------------------------------------------------------------------------
def adopted(old: LiveState, old_route: RouteConfig, old_fp: str, new: LiveState,
            route: RouteConfig, fp: str, now: float) -> LiveState:
    """The state a reloaded route starts from. The latch, manual weight and step carry
    over only for the same rollout (same fingerprint); a manual weight gives way to a new
    configured canary section, and an admin kill override to a changed
    ``kill_switch.enabled``. A changed plan resumes at the highest step not above the old
    one's weight, its interval starting now."""
    if old_route.kill_switch.enabled == route.kill_switch.enabled:
        new = replace(new, kill_override=old.kill_override)
    if old_fp != fp:
        return new
    new = replace(new, latch=old.latch, verify_at=old.verify_at)
    if old_route.canary == route.canary:
        new = replace(new, manual_weight=old.manual_weight)
    if new.step is not None and old.step is not None:
        assert old_route.progressive is not None and route.progressive is not None
        old_steps, steps = old_route.progressive.steps, route.progressive.steps
        if old_steps == steps:
            new = at_step(new, route, old.step, old.step_since)
        else:
            new = at_step(new, route, step_at_most(steps, old_steps[old.step]), now)
    return new


# -- restart (state file) -------------------------------------------------------------------
def persisted(state: LiveState, route: RouteConfig, fp: str) -> dict[str, Any]:
    """What ``restored`` needs after a restart, with what each value was made against:
    the configured weight of ``manual_weight``, the plan of ``step``, the configured
    kill switch of ``kill_override``."""
    prog = route.progressive
    return {
        "fingerprint": fp,
        "latch": state.latch.as_dict() if state.latch is not None else None,
        "manual_weight": state.manual_weight,
        "configured_weight": route.canary.weight if route.canary else None,
        "kill_override": state.kill_override,
        "kill_configured": route.kill_switch.enabled,
        "step": state.step,
        "steps": list(prog.steps) if prog is not None and state.step is not None else None,
    }


def restored(state: LiveState, route: RouteConfig, fp: str, saved: dict[str, Any],
             now: float) -> tuple[LiveState, list[str]]:
    """Apply persisted state (its fields already type-checked by the state file reader)
    and say what was not restored, and why. As over a reload, a canary that changed is a
    new rollout, and a kill override or step made against another config gives way
    (older files did not say which config: their kill holds, an "off" gives way, and
    their step restarts at the first)."""
    warnings: list[str] = []
    override = saved.get("kill_override")
    if override is not None:
        made_against = saved.get("kill_configured")
        if made_against == route.kill_switch.enabled or (made_against is None and override):
            state = replace(state, kill_override=override)
        elif override != route.kill_switch.enabled:
            warnings.append(f"admin kill switch {'on' if override else 'off'} not restored: "
                            "made against another kill_switch.enabled")
    if saved.get("fingerprint") != fp or route.canary is None:
        return state, warnings
    state = replace(state, latch=Latch.of(saved.get("latch")))
    if saved.get("configured_weight") == route.canary.weight:
        state = replace(state, manual_weight=saved.get("manual_weight"))
    step, old_steps = saved.get("step"), saved.get("steps")
    if state.step is not None and route.progressive is not None and step:
        if old_steps is None:
            warnings.append(f"progressive step {step} not restored: the state file does not "
                            "say of which steps")
        elif step >= len(old_steps):
            warnings.append(f"progressive step {step} not restored: out of range")
        else:
            steps = route.progressive.steps
            state = at_step(state, route, step if old_steps == list(steps)
                            else step_at_most(steps, old_steps[step]), now)
    return state, warnings


# -- the fleet ----------------------------------------------------------------------------
def remote(state: LiveState, route: RouteConfig, op: str, data: dict[str, Any],
           now: float) -> tuple[LiveState, Effect] | None:
    """An action another replica took: the same change as the local action. None when it
    no longer fits here (a weight for a route latched meanwhile) or is not understood."""
    if op == "kill":
        return replace(state, kill_override=bool(data.get("enabled"))), Effect.NONE
    if route.canary is None:
        return None
    if op in ("rollback", "verify"):
        latch = Latch.of(data.get("latch"))
        if latch is None or (op == "rollback") != (state.latch is None):
            return None
        effect = Effect.UNPIN_CANARY if op == "rollback" else Effect.NONE
        return replace(state, latch=latch), effect
    if op == "resume":
        return resumed(state, now), Effect.RESET
    if op in ("weight", "promote"):
        weight = data.get("weight")
        if state.latch is not None or not isinstance(weight, int | float):
            return None
        return replace(state, manual_weight=float(weight)), Effect.NONE
    if op == "step":
        step, weight = data.get("step"), data.get("weight")
        if (state.latch is not None or state.step is None or not isinstance(step, int)
                or route.progressive is None):
            return None
        step = fleet_step(route, step, weight if isinstance(weight, int | float) else None)
        if step <= state.step:
            return None
        return at_step(state, route, step, now), Effect.NONE
    return None


def caught_up(state: LiveState, route: RouteConfig, *, present: bool, latch: Latch | None,
              manual_weight: float | None, step: int | None, kill: bool | None,
              step_weight: float | None, now: float) -> tuple[LiveState, Effect, list[Note]]:
    """Catch up with the state stored in Redis (at start, after a reconnect or a
    reload): the fleet's truth, newer than this replica's state file. With ``present``
    false Redis knows nothing of this rollout and only ``kill`` counts."""
    notes: list[Note] = []
    effect = Effect.NONE
    if kill is not None and kill != state.kill_override:
        state = replace(state, kill_override=kill)
        notes.append(("kill", "admin", f"kill switch {'on' if kill else 'off'} in the fleet"))
    if not present or route.canary is None:
        return state, effect, notes
    was = state.latch
    if latch is not None and was is None:
        effect |= Effect.UNPIN_CANARY
        notes.append(("rollback", latch.actor, f"rolled back in the fleet: {latch.detail}"))
    elif latch is None and was is not None:
        state = resumed(state, now)
        effect |= Effect.RESET
        notes.append(("resume", "admin", "resumed in the fleet"))
    state = replace(state, latch=latch)
    if manual_weight != state.manual_weight:
        state = replace(state, manual_weight=manual_weight)
        if manual_weight is not None and latch is None:
            notes.append(("weight", "admin", f"weight {manual_weight:g}% in the fleet"))
    if step is not None and state.step is not None and route.progressive is not None:
        step = fleet_step(route, step, step_weight)
        if step != state.step:
            state = at_step(state, route, step, now)
    return state, effect, notes
