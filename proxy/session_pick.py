"""Which side a sticky session goes to (SPEC §5): its pin, else its bucket.

Free functions over a ``Rollout``: the local pin table alone (``pick_for``), or with pins
shared through Redis (``pick_cached`` for the local part, ``pick_shared`` for the one
round trip a session this replica has not seen costs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from proxy.pins import STABLE
from proxy.sticky import BUCKETS, bucket, key_hash

if TYPE_CHECKING:
    from proxy.lanes import Lane
    from proxy.rollout import Rollout


class SharedPins(Protocol):
    """Pins kept fleet-wide (``state.redis``; implemented in ``fleet_pins``)."""

    @property
    def available(self) -> bool: ...

    async def lookup(self, hashed: int) -> bool | None: ...

    def store(self, hashed: int, canary: bool) -> None: ...

    def touch(self, hashed: int, canary: bool) -> None: ...


def pick_for(r: Rollout, key: str) -> Lane:
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


def pick_cached(r: Rollout, key: str) -> Lane | int:
    """Sticky pick with fleet-wide pins, local part: the lane when this replica has the
    session cached (or Redis is down: then the bucket decides, as on every replica);
    otherwise the session's hash, for ``pick_shared``."""
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


async def pick_shared(r: Rollout, hashed: int) -> Lane:
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
    assert r.pins is not None
    canary = bool(r.canary_share) and bucket(hashed) < r.canary_share * BUCKETS
    r.pins.put(hashed, r.pins.canary_code if canary else STABLE)
    if r.shared is not None:
        r.shared.store(hashed, canary)
    return r.canary if canary else r.base_lane  # type: ignore[return-value]
