"""What fleet state looks like in Redis (SPEC §3 ``state.redis``): key names, the fields
of a route's hash, the messages on the channel. Pure: no I/O, no client.

One hash per route, ``flipback:route:NAME``. The route-level kill switch is the field
``kill``; everything that belongs to one rollout is prefixed with a short hash of the
rollout's fingerprint (``FP8:latch``, ``FP8:weight``, ``FP8:step``, ``FP8:cepoch``,
``FP8:sepoch``, and the marker ``FP8:fp``), so a new rollout starts from a clean slate
while replicas still on the old config keep theirs. ``FP8:seed`` is a random token drawn
by the replica that seeded the hash: one that changed since a replica last read it says
Redis lost its data meanwhile (restarted without persistence, flushed), so the replica
writes its pins back.

Pins are plain strings, ``flipback:pin:NAME:FP8:HASH`` -> ``s<sepoch>`` or ``c<cepoch>``.
The epochs are random tokens: a rollback draws a new canary epoch (every canary pin in
Redis reads as absent from then on, on every replica, without touching them), a resume
draws both (stable pins go too: a fresh split).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

PREFIX = "flipback:"
CHANNEL = PREFIX + "events"
OPS = frozenset({"rollback", "resume", "weight", "promote", "kill", "step", "verify"})


def fp8(fingerprint: str) -> str:
    """Short, stable id of a rollout fingerprint (8 hex digits)."""
    return blake2b(fingerprint.encode(), digest_size=4).hexdigest()


def route_key(route: str) -> str:
    return f"{PREFIX}route:{route}"


def pin_prefix(route: str, fingerprint: str) -> str:
    return f"{PREFIX}pin:{route}:{fp8(fingerprint)}:"


def marker_fields(fingerprint: str) -> tuple[str, str]:
    """The hash fields that say Redis knows this rollout, and who seeded it last."""
    p = fp8(fingerprint)
    return f"{p}:fp", f"{p}:seed"


def new_epoch() -> str:
    return secrets.token_hex(4)


def display_url(url: str) -> str:
    """The URL without credentials, as ``/readyz`` shows it: ``redis://host:port/db``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return f"unix://{parts.path}?db={db}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    db = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    return f"{parts.scheme}://{host}:{port}/{db}"


@dataclass(slots=True)
class FleetState:
    """One route's stored state, decoded for one rollout (``None``: Redis has no opinion)."""

    present: bool = False  # the rollout's marker exists: Redis knows this rollout
    latch: dict[str, Any] | None = None
    manual_weight: float | None = None
    step: int | None = None
    step_weight: float | None = None  # the step's weight where it was taken (None: older)
    kill: bool | None = None
    cepoch: str = ""
    sepoch: str = ""
    seed: str = ""  # the seeding replica's token ("" from a version that wrote none)


def kill_field(enabled: bool, configured: bool) -> bytes:
    """The stored kill override and the configured ``kill_switch.enabled`` it was made
    against: ``b"1/0"`` is killed by an operator where the config says not killed."""
    return (b"1/" if enabled else b"0/") + (b"1" if configured else b"0")


def step_field(step: int, weight: float | None) -> bytes:
    """A progressive step and its weight on the replica that took it: ``b"1/60"``. Steps
    travel with their weight, so a replica whose plan differs (a config change rolling
    through the fleet) maps the weight onto its own steps, never the bare index."""
    return f"{step}/{weight:g}".encode() if weight is not None else str(step).encode()


def decode_step(raw: bytes) -> tuple[int | None, float | None]:
    """``step_field`` read back: (index, weight); an older bare index has no weight."""
    index, _, weight = raw.partition(b"/")
    if not index.isdigit():
        return None, None
    try:
        return int(index), float(weight) if weight else None
    except ValueError:
        return int(index), None


def decode_state(flat: dict[bytes, bytes], fingerprint: str,
                 configured_weight: float | None, *, kill_configured: bool) -> FleetState:
    """The hash (``HGETALL``) as this rollout sees it. A manual weight counts only when it
    was set against the same configured weight, a kill override only when made against
    the same configured kill switch (as with the state file; an older bare ``1`` still
    kills, an older bare ``0`` gives way to the config)."""
    p = fp8(fingerprint) + ":"
    got = {k.decode(): v for k, v in flat.items()}
    state = FleetState(present=got.get(p + "fp") is not None)
    if (kill := got.get("kill")) is not None:
        on, _, against = kill.partition(b"/")
        if against == (b"1" if kill_configured else b"0") or (not against and on == b"1"):
            state.kill = on == b"1"
    if (latch := got.get(p + "latch")) is not None:
        value = _loads(latch)
        state.latch = value if isinstance(value, dict) else None
    if (weight := got.get(p + "weight")) is not None:
        value = _loads(weight)
        if (isinstance(value, list) and len(value) == 2 and value[1] == configured_weight
                and isinstance(value[0], int | float)):
            state.manual_weight = float(value[0])
    if (step := got.get(p + "step")) is not None:
        state.step, state.step_weight = decode_step(step)
    state.cepoch = got.get(p + "cepoch", b"").decode()
    state.sepoch = got.get(p + "sepoch", b"").decode()
    state.seed = got.get(p + "seed", b"").decode()
    return state


def state_fields(fingerprint: str, *, latch: dict[str, Any] | None,
                 manual_weight: float | None, configured_weight: float | None,
                 step: int | None, step_weight: float | None, cepoch: str,
                 sepoch: str, seed: str) -> dict[str, bytes]:
    """Every rollout field of a route's hash, for seeding Redis from local state (the
    ``kill`` field is seeded apart, only where Redis has none)."""
    p = fp8(fingerprint) + ":"
    out = {p + "fp": fingerprint.encode(), p + "cepoch": cepoch.encode(),
           p + "sepoch": sepoch.encode(), p + "seed": seed.encode()}
    if latch is not None:
        out[p + "latch"] = orjson.dumps(latch)
    if manual_weight is not None:
        out[p + "weight"] = orjson.dumps([manual_weight, configured_weight])
    if step is not None:
        out[p + "step"] = step_field(step, step_weight)
    return out


def op_fields(fingerprint: str, op: str, data: dict[str, Any], *,
              configured_weight: float | None, kill_configured: bool, cepoch: str,
              sepoch: str) -> tuple[dict[str, bytes], list[str]]:
    """What an action changes in the route's hash: (fields to set, fields to delete).
    An empty epoch is one the action leaves as it is."""
    p = fp8(fingerprint) + ":"
    sets: dict[str, bytes] = {p + "fp": fingerprint.encode()}
    dels: list[str] = []
    if op == "kill":
        sets["kill"] = kill_field(bool(data.get("enabled")), kill_configured)
    elif op in ("rollback", "verify"):
        sets[p + "latch"] = orjson.dumps(data.get("latch"))
    elif op in ("weight", "promote"):
        sets[p + "weight"] = orjson.dumps([data.get("weight"), configured_weight])
    elif op == "step":
        weight = data.get("weight")
        sets[p + "step"] = step_field(int(data.get("step", 0)),
                                      weight if isinstance(weight, int | float) else None)
    elif op == "resume":
        dels += [p + "latch", p + "weight"]
        if data.get("step") is not None:
            sets[p + "step"] = step_field(int(data["step"]), None)
    # Only the ops that draw epochs write them: any other op from a replica that missed
    # a resume would otherwise put the old epochs (and their pins) back.
    if cepoch:
        sets[p + "cepoch"] = cepoch.encode()
    if sepoch:
        sets[p + "sepoch"] = sepoch.encode()
    return sets, dels


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One action announced on the channel."""

    origin: str
    route: str
    fp: str
    op: str
    data: dict[str, Any]
    event: dict[str, Any] | None
    cepoch: str
    sepoch: str

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "origin": self.origin, "route": self.route, "fp": self.fp,
                             "op": self.op, "data": self.data, "event": self.event,
                             "cepoch": self.cepoch, "sepoch": self.sepoch})

    @staticmethod
    def decode(raw: bytes | str) -> Message | None:
        """The message, or None when it is not one of ours (or from a newer version)."""
        value = _loads(raw.encode() if isinstance(raw, str) else raw)
        if not isinstance(value, dict) or value.get("v") != 1 or value.get("op") not in OPS:
            return None
        try:
            return Message(origin=str(value["origin"]), route=str(value["route"]),
                           fp=str(value["fp"]), op=value["op"], data=dict(value["data"]),
                           event=value["event"] if isinstance(value["event"], dict) else None,
                           cepoch=str(value["cepoch"]), sepoch=str(value["sepoch"]))
        except (KeyError, TypeError, ValueError):
            return None


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
