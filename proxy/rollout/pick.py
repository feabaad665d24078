"""Which upstream takes a request (SPEC §5), in one place: the override header, else the
session's pin (local, or shared through Redis), else its bucket, else the weighted split.

``choose`` answers at once for nearly every request; only a session this replica has not
seen, with pins shared in Redis, needs a round trip: then it returns the coroutine that
makes it, for the caller to await.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from proxy.rollout.pins import STABLE
from proxy.rollout.sticky import BUCKETS, bucket, key_hash

if TYPE_CHECKING:
    from proxy.rollout.lanes import Lane
    from proxy.rollout.machine import Rollout

Choice = tuple["Lane", str]  # the lane, and the role its request is counted under


class SharedPins(Protocol):
    """Pins kept fleet-wide (``state.redis``; implemented in ``proxy.fleet.pins``)."""

    @property
    def available(self) -> bool: ...

    async def lookup(self, hashed: int) -> bool | None: ...

    def store(self, hashed: int, canary: bool) -> None: ...

    def touch(self, hashed: int, canary: bool) -> None: ...


def choose(r: Rollout, headers: Mapping[str, str],
           key: str | None) -> Choice | Coroutine[Any, Any, Choice]:
    """The lane for a request to route ``r`` whose session key is ``key``."""
    route = r.route
    if route.override_header is not None:
        named = headers.get(route.override_header)
        if named:
            lane = r.lanes.get(named)
            if lane is not None:
                return lane, "override"
            r.override_ignored()
    if key is not None and r.pins is not None:
        if r.shared is None:
            lane = sticky(r, key)
        else:
            found = sticky_cached(r, key)
            if isinstance(found, int):
                return _shared(r, found)
            lane = found
        return lane, lane.role
    lane = r.pick()
    return lane, lane.role


async def _shared(r: Rollout, hashed: int) -> Choice:
    lane = await sticky_shared(r, hashed)
    return lane, lane.role


def sticky(r: Rollout, key: str) -> Lane:
    """Sticky pick: a pinned session stays on its side; a new one is assigned by its
    hash bucket (canary iff bucket < weight x 100), the same on every replica."""
    pins = r.pins
    if pins is None or r.canary is None:
        return r.pick()
    hashed = key_hash(key)
    pinned = pins.get(hashed)
    if pinned is not None:
        if pinned == STABLE or not r.canary_share:
            return r.base_lane
        return r.canary
    return assign(r, hashed)


def sticky_cached(r: Rollout, key: str) -> Lane | int:
    """Sticky pick with fleet-wide pins, local part: the lane when this replica has the
    session cached (or Redis is down: then the bucket decides, as on every replica);
    otherwise the session's hash, for ``sticky_shared``."""
    pins, shared = r.pins, r.shared
    assert pins is not None and shared is not None
    hashed = key_hash(key)
    pinned = pins.get(hashed)
    if pinned is not None:
        shared.touch(hashed, pinned != STABLE)
        if pinned == STABLE or not r.canary_share:
            return r.base_lane
        return r.canary  # type: ignore[return-value]
    if not shared.available:
        return assign(r, hashed)
    return hashed


async def sticky_shared(r: Rollout, hashed: int) -> Lane:
    """Sticky pick for a session this replica has not cached: its pin in Redis (made
    by any replica), else the bucket rule; Redis failing or slow means the bucket."""
    pins, shared = r.pins, r.shared
    assert pins is not None and shared is not None
    found = await shared.lookup(hashed)
    if found is None:
        return assign(r, hashed)
    pins.put(hashed, pins.canary_code if found else STABLE)
    if found and r.canary_share:
        return r.canary  # type: ignore[return-value]
    return r.base_lane


def assign(r: Rollout, hashed: int) -> Lane:
    """A new session: by its bucket, pinned here (and in Redis when shared)."""
    assert r.pins is not None
    canary = bool(r.canary_share) and bucket(hashed) < r.canary_share * BUCKETS
    r.pins.put(hashed, r.pins.canary_code if canary else STABLE)
    if r.shared is not None:
        r.shared.store(hashed, canary)
    return r.canary if canary else r.base_lane  # type: ignore[return-value]
