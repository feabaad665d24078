"""Session pins (SPEC §5 sticky): which side a conversation is on, kept for ``ttl`` since
last use and bounded by ``max_sessions``.

Sized for a million sessions per route: the table maps the session key's 64-bit hash to a
small int, so an entry costs what a dict slot and one int key cost (~100 bytes), not a
string and a timestamp. Expiry is generational instead of per entry: three generations,
rotated every ttl/2; a pin touched in an older generation moves to the newest. A pin
therefore lives between ``ttl`` and 1.5 x ``ttl`` after its last use, and when the table
is full the least recently used generation goes first (LRU by generation).

Unpinning a rolled-back canary must not walk a million entries on the event loop: canary
pins carry the canary *epoch* they were made in, and a rollback just bumps the epoch, so
every older canary pin reads as absent from then on.
"""

from __future__ import annotations

from collections.abc import Callable

STABLE = 0  # pin values: 0 stable, 1 + epoch % 200 canary (small ints are shared objects)
_EPOCHS = 200
GENERATIONS = 3

Clock = Callable[[], float]


class PinTable:
    """In-memory pins for one route. Not thread-safe; lives on the event loop."""

    __slots__ = ("_gens", "_ttl", "_max", "_clock", "_rotate_at", "_epoch", "_canary")

    def __init__(self, *, ttl: float, max_sessions: int, clock: Clock) -> None:
        self._gens: list[dict[int, int]] = [{} for _ in range(GENERATIONS)]
        self._ttl = ttl
        self._max = max_sessions
        self._clock = clock
        self._rotate_at = clock() + ttl / 2
        self._epoch = 0
        self._canary = 1

    def __len__(self) -> int:
        return sum(len(g) for g in self._gens)

    @property
    def canary_code(self) -> int:
        return self._canary

    def get(self, hashed: int) -> int | None:
        """STABLE, the current canary code, or None (unpinned, expired or stale canary)."""
        now = self._clock()
        if now >= self._rotate_at:
            self._rotate(now)
        gens = self._gens
        newest = gens[0]
        value = newest.get(hashed)
        if value is None:
            for older in gens[1:]:
                value = older.pop(hashed, None)
                if value is not None:
                    newest[hashed] = value
                    break
            else:
                return None
        if value != STABLE and value != self._canary:
            return None  # pinned to a canary that has since been rolled back or replaced
        return value

    def peek(self, hashed: int) -> int | None:
        """As ``get``, without counting as a use (no move to the newest generation)."""
        for g in self._gens:
            value = g.get(hashed)
            if value is not None:
                return value if value == STABLE or value == self._canary else None
        return None

    def snapshot(self) -> list[tuple[float, list[int]]]:
        """The pinned hashes, newest generation first, each with the seconds the table
        keeps that generation from now: what the fleet writes back to a Redis that lost
        its pins. Copies of the keys only (C speed); values are read with ``peek`` when
        written, so a pin dropped or rolled back meanwhile is not."""
        now = self._clock()
        if now >= self._rotate_at:
            self._rotate(now)
        period, last = self._ttl / 2, GENERATIONS - 1
        return [(self._rotate_at - now + (last - i) * period, list(g))
                for i, g in enumerate(self._gens)]

    def put(self, hashed: int, value: int) -> None:
        newest = self._gens[0]
        if hashed not in newest and len(self) >= self._max:
            self._evict()
        newest[hashed] = value

    def unpin_canary(self) -> None:
        """Every existing canary pin reads as absent from now on (O(1))."""
        self._epoch += 1
        self._canary = 1 + self._epoch % _EPOCHS

    def clear(self) -> None:
        for g in self._gens:
            g.clear()
        self.unpin_canary()

    def _rotate(self, now: float) -> None:
        """One rotation per ttl/2 that passed (a quiet route may skip several)."""
        period = self._ttl / 2
        passed = 1 + int((now - self._rotate_at) // period) if period > 0 else GENERATIONS
        for _ in range(min(passed, GENERATIONS)):
            self._gens.pop()
            self._gens.insert(0, {})
        self._rotate_at = now + period

    def _evict(self) -> None:
        """Drop the oldest non-empty generation (LRU at generation granularity)."""
        for g in reversed(self._gens):
            if g:
                if g is self._gens[0]:
                    g.pop(next(iter(g)))  # a single full generation: drop its oldest key
                else:
                    g.clear()
                return

    def __repr__(self) -> str:
        sizes = "/".join(str(len(g)) for g in self._gens)
        return f"<PinTable {len(self)} pins ({sizes}), canary epoch {self._epoch}>"
