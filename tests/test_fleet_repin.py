"""Sticky pins survive Redis losing its data (issue 14 item 8): replicas that see Redis
come back empty write back the pins they hold, so a replica that has not cached a
conversation finds it where it is instead of assigning it again by a changed weight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.fleet import pins as pins_module
from proxy.rollout.pins import STABLE, PinTable
from proxy.rollout.sticky import bucket, key_hash
from tests.conftest import Running
from tests.test_fleet import RedisServer, _ask, needs_redis, redis_server
from tests.waiting import wait_until

__all__ = ["redis_server"]  # the fixture, imported from test_fleet

CONFIG = """
state: {{file: "{state}", redis: "{redis}"}}
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 50}}
    sticky: {{header: x-session-id, ttl: 1h}}
    rollback: {{min_requests: 1000}}
"""
SESSIONS = [f"conv{i}" for i in range(300)]


def test_pin_table_snapshot_gives_each_generation_its_remaining_life() -> None:
    now = [0.0]
    table = PinTable(ttl=100.0, max_sessions=10, clock=lambda: now[0])
    table.put(1, STABLE)
    now[0] = 60.0
    assert table.get(99) is None  # rotates (every ttl/2): pin 1 is a generation older
    table.put(2, table.canary_code)
    gens = table.snapshot()
    # Rotated at 60 (next at 110): the newest generation goes at 210, the next at 160.
    assert [(round(left), keys) for left, keys in gens if keys] == [(150, [2]), (100, [1])]
    table.unpin_canary()
    assert (table.peek(1), table.peek(2)) == (STABLE, None)  # a rolled back canary pin


async def _pin_keys(fb: Running) -> int:
    return len(await fb.runtime.fleet.client.keys("flipback:pin:chat:*"))


async def _ask_all(fb: Running, keys: list[str]) -> dict[str, str]:
    """Each session's upstream, a few requests at a time: a burst of hundreds of lookups
    at once could outlast the lookup timeout and be assigned by bucket instead."""
    limit = asyncio.Semaphore(8)

    async def one(key: str) -> str:
        async with limit:
            return await _ask(fb, key)

    sides = await asyncio.gather(*(one(k) for k in keys))
    return dict(zip(keys, sides, strict=True))


async def _wait_pins(fb: Running, want: int) -> float:
    """Seconds until Redis holds ``want`` pins of the route (the write-back is done)."""

    async def written() -> bool:
        return fb.runtime.fleet.up and await _pin_keys(fb) >= want

    return await wait_until(written, what=f"Redis to hold {want} pins of route chat again")


@pytest.fixture
async def replica(redis_server: RedisServer, model: Any, flipback: Any, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Awaitable[Running]]:
    """``await replica("a")``: a replica with its own state file, all in front of the
    same v1/v2 and sharing one Redis. These tests are about pins Redis lost, not about
    slow lookups: a lookup gets 2 s, not 50 ms, which a busy, shared machine can miss (a
    session assigned by its bucket instead would then show as moved)."""
    monkeypatch.setattr(pins_module, "LOOKUP_TIMEOUT", 2.0)
    v1, v2 = await model("v1"), await model("v2")

    async def start(name: str) -> Running:
        fb: Running = await flipback(CONFIG, state=tmp_path / f"{name}.json",
                                     redis=redis_server.url, v1=v1.url, v2=v2.url)
        return fb

    return start


async def _lose_data(redis_server: RedisServer, loss: str) -> None:
    if loss == "restart":
        await redis_server.kill()
        await redis_server.start()  # no persistence: empty
    else:
        assert await redis_server.command(b"FLUSHALL") == b"+OK"


@needs_redis
@pytest.mark.parametrize("loss", ["restart", "flushall"])
async def test_fleet_pins_written_back_after_redis_lost_its_data_keep_sessions_put(
    redis_server: RedisServer, replica: Any, loss: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A and C pinned half the sessions each at 50%, then the weight went down to 10%.
    Redis loses everything; whichever replica seeds the route again, both write their
    pins back (the other learns it from the seed token). B, started afterwards and with
    nothing cached, sends every session where it was."""
    a, c = await replica("a"), await replica("c")
    half = len(SESSIONS) // 2
    before = {**await _ask_all(a, SESSIONS[:half]), **await _ask_all(c, SESSIONS[half:])}
    assert await a.runtime.fleet.flush() and await c.runtime.fleet.flush()
    status, _ = await a.post_admin("/routes/chat/weight", {"weight": 10})
    assert status == 200
    await wait_until(lambda: c.runtime.rollout("chat").weight == 10)
    # Pinned on v2 at 50%, on v1 by the bucket at 10%: these move if their pins are lost.
    at_risk = [k for k in SESSIONS if before[k] == "v2" and bucket(key_hash(k)) >= 1000]
    assert len(at_risk) >= 80
    caplog.set_level(logging.INFO, logger="proxy.fleet.pins")
    await _lose_data(redis_server, loss)
    took = await _wait_pins(a, len(SESSIONS))
    print(f"{loss}: A and C wrote their {len(SESSIONS)} pins back {took * 1000:.0f} ms later")
    b = await replica("b")  # caches nothing: every session is a lookup in Redis
    assert b.runtime.rollout("chat").weight == 10
    after = await _ask_all(b, SESSIONS)
    assert b.runtime.fleet.errors["lookup"] == 0  # every session was looked up in Redis
    moved = [k for k in SESSIONS if after[k] != before[k]]
    assert len(moved) == 0, f"{len(moved)} of {len(SESSIONS)} sessions moved"
    shared = a.runtime.rollout("chat").shared
    left = await a.runtime.fleet.client.pttl(shared._key(key_hash(SESSIONS[0])))
    assert 3600_000 * 0.99 < left <= 3600_000 * 1.25  # a TTL, as for any pin
    lines = [r.getMessage() for r in caplog.records if "came back empty" in r.getMessage()]
    assert sorted(lines) == [f"redis came back empty: wrote back {half} pins for route chat"] * 2
    fresh = await _ask_all(b, [f"new{i}" for i in range(100)])
    assert list(fresh.values()).count("v2") <= 25  # new conversations split at 10%


@needs_redis
async def test_fleet_pin_written_back_does_not_replace_one_written_meanwhile(
    redis_server: RedisServer, replica: Any
) -> None:
    """First writer wins: a replica that pinned a session in the emptied Redis before A
    wrote its pins back keeps it, and A follows it."""
    a = await replica("a")
    on_a = await _ask_all(a, SESSIONS[:50])
    key = next(k for k, side in on_a.items() if side == "v2")
    assert await a.runtime.fleet.flush()
    shared = a.runtime.rollout("chat").shared
    redis_key = shared._key(key_hash(key))
    rival = b"s" + shared.sepoch.encode()  # stable, in the same epochs
    async with a.runtime.fleet.client.pipeline(transaction=True) as pipe:
        pipe.flushall().set(redis_key, rival)  # atomic: A notices at its next ping
        await pipe.execute()
    await _wait_pins(a, 50)
    assert await a.runtime.fleet.client.get(redis_key) == rival
    assert await _ask(a, key) == "v1"


@needs_redis
async def test_fleet_pins_of_a_rolled_back_route_are_not_written_back(
    redis_server: RedisServer, replica: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """While rolled back every session goes to stable whatever its pin, and the resume
    drops all pins: writing them back would be load for nothing. The latch is seeded."""
    a = await replica("a")
    await _ask_all(a, SESSIONS[:50])
    await a.post_admin("/routes/chat/rollback", {"reason": "bad"})
    assert await a.runtime.fleet.flush()
    caplog.set_level(logging.INFO, logger="proxy.fleet.pins")
    await _lose_data(redis_server, "restart")
    await wait_until(lambda: a.runtime.fleet.up)
    await asyncio.sleep(0.1)  # not a wait: time for a wrong write-back to land, were it sent
    assert await _pin_keys(a) == 0
    assert "came back empty" not in caplog.text
    b = await replica("b")
    assert b.runtime.rollout("chat").state == "rolled_back"
