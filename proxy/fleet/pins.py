"""Sticky pins shared through Redis, one ``SharedPins`` per route (SPEC §5 with
``state.redis``). The route's local ``PinTable`` stays the cache: a hot session costs no
round trip. A session this replica has not seen is looked up once, with a tight timeout;
a new pin is written in the background, and a pin in use is rewritten (value and expiry)
at most once per ``ttl/4``, so Redis keeps it for ``ttl`` to ``1.25 x ttl`` after its last
use on any replica and gets it back by itself after an outage. Within the same epochs
the first pin written wins (``writer``): a replica that assigned the session
otherwise adopts it. When Redis comes back without them (restarted without persistence,
flushed), every replica that held pins writes them back (``write_back``), before their
next use would: meanwhile a replica that has not cached a conversation would assign it
again by the current weight, and its pin, written first, would move it everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.fleet import state as fleet_state
from proxy.fleet.writer import PIN_BATCH, PinWrite
from proxy.rollout.pins import STABLE, PinTable

if TYPE_CHECKING:
    from proxy.fleet.link import FleetLink

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 0.05  # seconds; past this the session is assigned by its bucket


class SharedPins:
    """One route's pin epochs and, for a sticky route, the Redis side of its pins."""

    __slots__ = ("route", "fingerprint", "pins", "cepoch", "sepoch", "_link", "_prefix",
                 "_px", "_fresh", "_max", "_stable", "_canary", "seed", "refill_due",
                 "_refills")

    def __init__(self, link: FleetLink, *, route: str, fingerprint: str,
                 pins: PinTable | None, ttl: float, max_sessions: int) -> None:
        self.route = route
        self.fingerprint = fingerprint
        self.pins = pins
        self._link = link
        self._prefix = fleet_state.pin_prefix(route, fingerprint)
        self._px = max(1, int(ttl * 1250))  # ttl + ttl/4, in milliseconds
        self._fresh: set[int] = set()  # written or read (so refreshed) this quarter-ttl
        self._max = max_sessions
        self.cepoch = ""
        self.sepoch = ""
        self._stable = b"s"
        self._canary = b"c"
        self.seed: str | None = None  # the hash's seed token last seen (None: not yet)
        self.refill_due = False  # Redis lost the pins and they are not all written back
        self._refills = 0  # write-backs started: a newer one stops an older one

    @property
    def available(self) -> bool:
        return self._link.up

    def set_epochs(self, cepoch: str, sepoch: str) -> None:
        """Adopt the fleet's epochs; a changed one invalidates this replica's cached pins
        the same way (rolled back: canary pins; resumed: all pins)."""
        if self.pins is None:
            pass  # a route without pins still carries its epochs in Redis
        elif sepoch != self.sepoch:
            self.pins.clear()
            self._fresh.clear()
        elif cepoch != self.cepoch:
            self.pins.unpin_canary()
        self.cepoch, self.sepoch = cepoch, sepoch
        self._stable = b"s" + sepoch.encode()
        self._canary = b"c" + cepoch.encode()

    def _key(self, hashed: int) -> str:
        return f"{self._prefix}{hashed:016x}"

    async def lookup(self, hashed: int) -> bool | None:
        """The session's side in Redis: True canary, False stable, None when absent,
        stale (an older epoch), or Redis did not answer within ``LOOKUP_TIMEOUT``."""
        link = self._link
        if not link.up:
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                raw = await link.client.getex(self._key(hashed), px=self._px)
        except Exception as exc:  # noqa: BLE001 - any Redis failure: assign locally instead
            link.lookup_failed(exc)
            return None
        link.lookup_answered()
        if raw == self._stable:
            self._note_fresh(hashed)  # GETEX just extended it
            return False
        if raw == self._canary:
            self._note_fresh(hashed)
            return True
        return None

    def store(self, hashed: int, canary: bool) -> None:
        """A session was just assigned here: write its pin in the background."""
        if self._link.up:
            self._note_fresh(hashed)
            self._write(hashed, canary)

    def touch(self, hashed: int, canary: bool) -> None:
        """A cached session was used: rewrite its pin once per quarter-ttl."""
        if hashed not in self._fresh and self._link.up:
            self._note_fresh(hashed)
            self._write(hashed, canary)

    def _write(self, hashed: int, canary: bool) -> None:
        self._link.queue_pin(*self._pin(hashed, canary, self._px))

    def _pin(self, hashed: int, canary: bool, px: int) -> tuple[str, PinWrite]:
        ours, rival = (self._canary, self._stable) if canary else (self._stable, self._canary)
        return self._key(hashed), PinWrite(ours, rival, px, self, hashed)

    async def write_back(self) -> None:
        """Redis lost this route's pins: write the ones this replica holds, in the
        background. Bounded by the table (``max_sessions``), newest generation first,
        ``PIN_BATCH`` per pipelined round trip with a yield between, so a million pins
        neither stall the loop nor crowd out pin lookups. Each keeps what is left of its
        local life (at most the usual ``1.25 x ttl``); a pin another replica wrote first
        stays and is followed, as for a new pin; a canary pin from before a rollback reads
        as absent and is not written. Stops when the link goes down, the epochs change
        or a newer write-back starts (``refill_due`` stays set: the next catch-up goes
        again); a Redis failure takes the link down. Logs how many pins it wrote."""
        try:
            written = await self._write_back()
        except Exception as exc:  # noqa: BLE001 - still due: the reconnect goes again
            self._link.failed("pin_write", exc)
            return
        logger.info("redis came back empty: wrote back %d pins for route %s%s", written,
                    self.route, " (cut short)" if self.refill_due else "")

    async def _write_back(self) -> int:
        pins = self.pins
        if pins is None:
            return 0
        self._refills += 1
        mine, epochs, written = self._refills, (self.cepoch, self.sepoch), 0
        for left, hashes in pins.snapshot():
            px = min(self._px, int(left * 1000))
            if px < 1:
                continue
            for start in range(0, len(hashes), PIN_BATCH):
                if (not self._link.up or self._refills != mine
                        or (self.cepoch, self.sepoch) != epochs):
                    return written
                batch = [self._pin(hashed, code != STABLE, px)
                         for hashed in hashes[start:start + PIN_BATCH]
                         if (code := pins.peek(hashed)) is not None]
                if batch:
                    await self._link.write_pins(batch)
                    written += len(batch)
                await asyncio.sleep(0)
        self.refill_due = False
        return written

    def adopt(self, hashed: int, raw: bytes) -> None:
        """Another replica pinned this session first, in these epochs: follow its pin
        (a pin of epochs that changed since the write was queued is ignored)."""
        pins = self.pins
        if pins is None:
            return
        if raw == self._canary:
            pins.put(hashed, pins.canary_code)
        elif raw == self._stable:
            pins.put(hashed, STABLE)

    def _note_fresh(self, hashed: int) -> None:
        if len(self._fresh) >= self._max:
            self._fresh.clear()
        self._fresh.add(hashed)

    def rotate(self) -> None:
        """Called every ``ttl/4``: every pin in use gets rewritten once more."""
        self._fresh.clear()

    @property
    def quarter_ttl(self) -> float:
        return self._px / 5000

    def __repr__(self) -> str:
        return (f"<SharedPins {self.route} epochs c={self.cepoch or '-'} "
                f"s={self.sepoch or '-'}, {len(self._fresh)} fresh>")
