"""Fleet state in Redis (SPEC §3 ``state.redis``, §5): two in-process replicas share one
real redis-server on a free port; the test kills and restarts it mid-traffic."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ProxyError
from proxy.fleet import state as fs
from proxy.fleet.link import SLOW_LOOKUPS_DOWN
from proxy.rollout.sticky import bucket, key_hash
from proxy.server import App
from tests.conftest import Running, make_config
from tests.fakes import Behaviour
from tests.test_notify import receiver
from tests.waiting import wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
__all__ = ["receiver"]  # the fixture, imported for the webhook test

needs_redis = pytest.mark.skipif(
    not os.path.exists(REDIS_SERVER),
    reason="redis-server is not installed (.ci/run installs it with apt-get)",
)


# -- pure parts --------------------------------------------------------------------------
def test_fleet_display_url_drops_credentials_and_fills_defaults() -> None:
    assert fs.display_url("redis://:s3cret@10.0.0.5:6380/2") == "redis://10.0.0.5:6380/2"
    assert fs.display_url("rediss://user:pw@cache.internal") == "rediss://cache.internal:6379/0"
    assert fs.display_url("unix:///run/redis.sock?db=3&password=x") == "unix:///run/redis.sock?db=3"


def test_fleet_state_round_trip_keeps_rollouts_apart() -> None:
    latch = {"reason": "manual", "detail": "bad", "actor": "admin", "time": 1.0}
    fields = fs.state_fields("v2|http://a", latch=latch, manual_weight=40.0, configured_weight=5.0,
                             step=2, step_weight=70.0, cepoch="c1", sepoch="s1",
                             seed="t1")
    flat = {k.encode(): v for k, v in fields.items()}
    mine = fs.decode_state(flat, "v2|http://a", 5.0, kill_configured=False)
    assert (mine.present, mine.latch, mine.manual_weight, mine.step) == (True, latch, 40.0, 2)
    assert mine.step_weight == 70.0
    assert (mine.cepoch, mine.sepoch, mine.seed) == ("c1", "s1", "t1")
    other = fs.decode_state(flat, "v3|http://b", 5.0, kill_configured=False)  # a new rollout
    assert (other.present, other.latch, other.manual_weight) == (False, None, None)
    again = fs.decode_state(flat, "v2|http://a", 10.0, kill_configured=False)
    assert again.manual_weight is None  # set against another configured weight


@pytest.mark.parametrize(("stored", "configured", "kill"), [
    (fs.kill_field(True, False), False, True),
    (fs.kill_field(False, False), False, False),
    (fs.kill_field(False, False), True, None),  # made against another config: gives way
    (fs.kill_field(True, True), False, None),
    (b"1", True, True),  # an older bare value: a kill still holds...
    (b"0", True, None),  # ...an "off" gives way to the config
])
def test_fleet_kill_override_counts_against_the_config_it_was_made_for(
    stored: bytes, configured: bool, kill: bool | None
) -> None:
    state = fs.decode_state({b"kill": stored}, "v2|http://a", 5.0, kill_configured=configured)
    assert state.kill is kill


def test_fleet_message_decode_rejects_foreign_payloads() -> None:
    msg = fs.Message(origin="a", route="chat", fp="x", op="weight", data={"weight": 5},
                     event=None, cepoch="", sepoch="")
    assert fs.Message.decode(msg.encode()) == msg
    assert fs.Message.decode(b"hello") is None
    assert fs.Message.decode(b'{"v": 1, "op": "drop_tables"}') is None
    assert fs.Message.decode(b'{"v": 1, "op": "kill"}') is None


def test_fleet_without_redis_package_is_a_clear_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    cfg = make_config('state: {{file: null, redis: "redis://127.0.0.1:1/0"}}\n'
                      'upstreams: {{a: {{url: "http://127.0.0.1:9"}}}}\n'
                      'routes: [{{name: r, match: {{}}, stable: a}}]\n', tmp_path)
    with pytest.raises(ProxyError, match=r"pip install 'flipback\[redis\]'"):
        App(cfg)


# -- a real redis-server -------------------------------------------------------------------
class RedisServer:
    """redis-server on a free loopback port, no persistence; killed and restarted by PID."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--loglevel", "warning", "--enable-debug-command", "local",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await self.answering()

    async def answering(self) -> None:
        """Wait until the server answers a PING (started, or its pause is over)."""

        async def pong() -> bool:
            return await self.command(b"PING") == b"+PONG"

        await wait_until(pong, interval=0.01, what=f"redis-server on {self.port} to answer PING")

    async def pause(self, ms: int) -> None:
        """Stall every client for ``ms`` (a slow Redis): in effect once this returns."""
        assert await self.command(b"CLIENT PAUSE %d ALL" % ms) == b"+OK"

    async def command(self, line: bytes) -> bytes | None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return None
        try:
            writer.write(line + b"\r\n")
            await writer.drain()
            return (await reader.readline()).strip()
        finally:
            writer.close()

    async def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
            self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer(_free_port())
    await server.start()
    yield server
    await server.kill()


CONFIG = """
state: {{file: "{state}", redis: "{redis}"}}
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 30}}
    sticky: {{header: x-session-id, ttl: 1h}}
    rollback: {{min_requests: 3, consecutive_failures: 3, verify: null}}
"""


@pytest.fixture
async def fleet(redis_server: RedisServer, model: Any, flipback: Any, tmp_path: Path) -> Any:
    """Two replicas, A and B, in front of the same v1/v2 and sharing one Redis."""
    v1, v2 = await model("v1"), await model("v2")

    async def replica(name: str) -> Running:
        fb: Running = await flipback(CONFIG, state=tmp_path / f"state-{name}.json",
                                     redis=redis_server.url, v1=v1.url, v2=v2.url)
        return fb

    a, b = await replica("a"), await replica("b")
    assert a.runtime.fleet.up and b.runtime.fleet.up
    return a, b, v2, replica


async def _ask(fb: Running, session: str) -> str:
    async with fb.session.post(fb.url + "/v1/chat", data=b"{}",
                               headers={"x-session-id": session}) as r:
        await r.read()
        assert r.status == 200
        return r.headers["x-flipback-upstream"]


@needs_redis
async def test_fleet_session_pinned_on_one_replica_is_honoured_by_another(fleet: Any) -> None:
    a, b, _, _ = fleet
    keys = [f"s{i}" for i in range(60)]
    on_a = {k: await _ask(a, k) for k in keys}
    assert await a.runtime.fleet.flush()
    status, _ = await b.post_admin("/routes/chat/weight", {"weight": 90})
    assert status == 200
    await wait_until(lambda: a.runtime.rollout("chat").weight == 90)  # the weight reached A
    # B has cached none of these; at 90% the bucket would send most to v2, the pins win.
    moved_by_bucket = [k for k in keys if on_a[k] == "v1" and bucket(key_hash(k)) < 9000]
    assert len(moved_by_bucket) >= 10
    for k in keys:
        assert await _ask(b, k) == on_a[k]
    fresh = [await _ask(b, f"new{i}") for i in range(40)]
    assert fresh.count("v2") >= 28  # new conversations split by the new weight


@needs_redis
async def test_fleet_a_late_pin_write_does_not_overwrite_the_pin_another_replica_made(
    fleet: Any, redis_server: RedisServer
) -> None:
    """A pinned a session to the canary at 90%; B, whose lookup Redis was too slow to
    answer, assigned it to stable by its bucket at 30%. The pin written first stays, and
    B follows it from its next request on: the conversation does not flip between
    versions by which replica serves it."""
    a, b, _, _ = fleet
    key = next(k for k in (f"late{i}" for i in range(1000))
               if 3000 <= bucket(key_hash(k)) < 9000)
    await b.post_admin("/routes/chat/weight", {"weight": 90})
    await wait_until(lambda: a.runtime.rollout("chat").weight == 90)
    assert await _ask(a, key) == "v2"
    assert await a.runtime.fleet.flush()
    await a.post_admin("/routes/chat/weight", {"weight": 30})
    await wait_until(lambda: b.runtime.rollout("chat").weight == 30)
    await redis_server.pause(300)
    assert await _ask(b, key) == "v1"  # no answer within LOOKUP_TIMEOUT: the bucket decided
    await redis_server.answering()
    assert await b.runtime.fleet.flush()
    assert b.runtime.fleet.up
    assert await _ask(b, key) == "v2"  # B learned the pin A made first
    assert await _ask(a, key) == "v2"
    shared = a.runtime.rollout("chat").shared
    assert shared is not None
    raw = await a.runtime.fleet.client.get(shared._key(key_hash(key)))
    assert raw == b"c" + shared.cepoch.encode()


@needs_redis
async def test_fleet_a_pin_of_older_epochs_is_replaced(fleet: Any) -> None:
    """A pin left by a rolled-back rollout reads as absent; the new assignment replaces
    it in Redis (a write that kept it would cost the session a lookup every time)."""
    _, b, _, _ = fleet
    shared = b.runtime.rollout("chat").shared
    assert shared is not None
    key = "stale-epoch-session"
    redis_key = shared._key(key_hash(key))
    client = b.runtime.fleet.client
    await client.set(redis_key, b"c" + b"an-old-epoch", px=60_000)
    side = await _ask(b, key)
    assert await b.runtime.fleet.flush()
    want = (b"c" + shared.cepoch.encode()) if side == "v2" else (b"s" + shared.sepoch.encode())
    assert await client.get(redis_key) == want


@needs_redis
async def test_fleet_manual_rollback_reaches_the_other_replica_within_a_second(
    fleet: Any,
) -> None:
    a, b, _, _ = fleet
    canary_keys = [k for k in (f"c{i}" for i in range(200))
                   if bucket(key_hash(k)) < 3000][:5]
    for k in canary_keys:
        assert await _ask(b, k) == "v2"
    status, _ = await a.post_admin("/routes/chat/rollback", {"reason": "bad answers"})
    assert status == 200
    took = await wait_until(lambda: b.runtime.rollout("chat").state == "rolled_back")
    print(f"rollback on A applied on B after {took * 1000:.1f} ms")
    assert took < 1.0  # the claim: a fleet flips within a second
    for k in canary_keys:
        assert await _ask(b, k) == "v1"
    event = (await b.get_json("/events?route=chat&limit=1"))["events"][0]
    assert (event["kind"], event["actor"]) == ("rollback", "admin")
    assert "bad answers (from replica" in event["reason"]
    assert event["figures"]["via"] == "redis"
    # One rollback in the fleet, counted where it happened.
    assert 'flipback_rollbacks_total{reason="manual",route="chat"} 0.0' in (
        b.runtime.metrics.render().decode())
    assert 'flipback_rollbacks_total{reason="manual",route="chat"} 1.0' in (
        a.runtime.metrics.render().decode())
    # Resume on B: a fresh split everywhere (the canary-bucket sessions go back to v2).
    await b.post_admin("/routes/chat/resume")
    await wait_until(lambda: a.runtime.rollout("chat").state == "canary")
    for k in canary_keys:
        assert await _ask(a, k) == "v2"


@needs_redis
async def test_fleet_automatic_trip_reaches_the_other_replica(fleet: Any) -> None:
    a, b, v2, _ = fleet
    keys = [k for k in (f"t{i}" for i in range(300)) if bucket(key_hash(k)) < 3000][:6]
    v2.behaviour = Behaviour(mode="status", status=500)
    for k in keys:  # retried on stable: A's clients see v1 while A's canary trips
        assert await _ask(a, k) == "v1"
    assert a.runtime.rollout("chat").state == "rolled_back"
    await wait_until(lambda: b.runtime.rollout("chat").state == "rolled_back")
    latch = b.runtime.rollout("chat").latch
    assert latch.actor == "auto" and latch.reason == "consecutive_failures"
    assert v2.count == 3  # the trip's three; B never sent the bad canary a request


@needs_redis
async def test_fleet_only_the_replica_that_acted_sends_the_webhook(
    redis_server: RedisServer, model: Any, flipback: Any, receiver: Any, tmp_path: Path
) -> None:
    hook = await receiver()
    v1, v2 = await model("v1"), await model("v2")
    text = CONFIG.replace("upstreams:", f'notify: {{{{webhook: "{hook.url}"}}}}\nupstreams:')
    a, b = [await flipback(text, state=tmp_path / f"state-{n}.json", redis=redis_server.url,
                           v1=v1.url, v2=v2.url) for n in "ab"]
    await a.post_admin("/routes/chat/rollback", {"reason": "bad answers"})
    await wait_until(lambda: b.runtime.rollout("chat").state == "rolled_back")
    await b.post_admin("/routes/chat/kill", {"enabled": True})
    await wait_until(lambda: a.runtime.rollout("chat").state == "killed")
    hits = await hook.wait(2)
    # Not a wait: time for a wrong third (B's rollback, A's kill) to arrive, were it sent.
    await asyncio.sleep(0.2)
    assert [(h.event["kind"], h.event["actor"]) for h in hook.hits] == [
        ("rollback", "admin"), ("kill", "admin")]
    assert "from replica" not in hits[0].event["reason"]  # A's own event, not B's copy


@needs_redis
async def test_fleet_replica_started_later_picks_up_the_latch(fleet: Any) -> None:
    a, _, _, replica = fleet
    await a.post_admin("/routes/chat/rollback", {"reason": "while C was away"})
    assert await a.runtime.fleet.flush()
    c = await replica("c")  # a fresh state file: only Redis knows
    assert c.runtime.rollout("chat").state == "rolled_back"
    assert c.runtime.rollout("chat").latch.detail == "while C was away"


@needs_redis
async def test_fleet_replica_restarted_after_a_resume_sends_the_canary_traffic_again(
    fleet: Any,
) -> None:
    a, _, _, replica = fleet
    c = await replica("c")
    await a.post_admin("/routes/chat/rollback", {"reason": "bad"})
    await wait_until(lambda: c.runtime.rollout("chat").state == "rolled_back")
    await c.app.aclose()  # C's state file keeps the latch
    await a.post_admin("/routes/chat/resume")
    assert await a.runtime.fleet.flush()
    c = await replica("c")  # latched in its file, resumed in Redis: Redis wins
    chat = c.runtime.rollout("chat")
    assert chat.state == "canary" and chat.latch is None
    assert chat.effective_weight == 30
    picks = [await _ask(c, f"after{i}") for i in range(60)]
    assert picks.count("v2") >= 8  # new sessions split by the weight again


@needs_redis
async def test_fleet_an_action_from_a_replica_with_old_epochs_keeps_the_newer_ones(
    fleet: Any, redis_server: RedisServer
) -> None:
    a, b, _, _ = fleet
    await a.post_admin("/routes/chat/rollback", {"reason": "bad"})
    await wait_until(lambda: b.runtime.rollout("chat").state == "rolled_back")
    await a.post_admin("/routes/chat/resume")
    await wait_until(lambda: b.runtime.rollout("chat").state == "canary")
    on_a = a.runtime.rollout("chat").shared
    epochs = (on_a.cepoch, on_a.sepoch)
    assert all(epochs)
    b.runtime.rollout("chat").shared.set_epochs("old-c", "old-s")  # as if B missed the resume
    await b.post_admin("/routes/chat/weight", {"weight": 50})
    await wait_until(lambda: a.runtime.rollout("chat").weight == 50)
    assert (on_a.cepoch, on_a.sepoch) == epochs  # the weight message carried no epochs
    assert await b.runtime.fleet.flush()
    stored = fs.decode_state(await a.runtime.fleet.client.hgetall(fs.route_key("chat")),
                             a.runtime.rollout("chat").fingerprint(), 30.0,
                             kill_configured=False)
    assert (stored.cepoch, stored.sepoch) == epochs


@needs_redis
async def test_fleet_redis_killed_mid_traffic_fails_no_request_and_reconnects(
    fleet: Any, redis_server: RedisServer
) -> None:
    a, b, _, _ = fleet
    failures: list[str] = []
    stop = asyncio.Event()
    served = 0

    async def client(fb: Running, worker: int) -> None:
        nonlocal served
        i = 0
        while not stop.is_set():
            i += 1
            session = f"w{worker}-{i % 50}" if i % 3 else f"new-{worker}-{i}"
            try:
                async with fb.session.post(fb.url + "/v1/chat", data=b"{}",
                                           headers={"x-session-id": session}) as r:
                    await r.read()
                    if r.status != 200:
                        failures.append(f"{r.status}")
                    served += 1
            except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                failures.append(repr(exc))

    async def more_served(n: int) -> None:
        want = served + n
        await wait_until(lambda: served >= want, what=f"{want} requests served")

    workers = [asyncio.ensure_future(client(fb, n)) for n, fb in enumerate((a, b, a, b))]
    await more_served(40)
    await redis_server.kill()
    await wait_until(lambda: not a.runtime.fleet.up and not b.runtime.fleet.up)
    await more_served(40)  # traffic keeps flowing on local state
    ready = await a.get_json("/readyz")
    assert ready["status"] == "ready"
    assert ready["redis"] == {"connected": False, "url": redis_server.url}
    assert "flipback_redis_connected 0.0" in a.runtime.metrics.render().decode()
    # A rollback while Redis is away is applied locally, and sent once it is back.
    await a.post_admin("/routes/chat/rollback", {"reason": "during the outage"})
    await redis_server.start()  # same port, empty: no state survived
    took = await wait_until(lambda: a.runtime.fleet.up and b.runtime.fleet.up)
    print(f"reconnected {took * 1000:.0f} ms after redis came back")
    await wait_until(lambda: b.runtime.rollout("chat").state == "rolled_back")
    await more_served(40)  # and on shared state again
    stop.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert served > 100
    assert (await b.get_json("/readyz"))["redis"]["connected"] is True
    assert "flipback_redis_connected 1.0" in b.runtime.metrics.render().decode()


@needs_redis
async def test_fleet_slow_redis_costs_at_most_the_lookup_timeout(
    fleet: Any, redis_server: RedisServer
) -> None:
    a, _, _, _ = fleet
    await redis_server.pause(600)
    loop = asyncio.get_running_loop()
    link = a.runtime.fleet
    for i in range(SLOW_LOOKUPS_DOWN + 2):
        t0 = loop.time()
        await _ask(a, f"slow{i}")  # not cached on A: a lookup that cannot be answered
        assert loop.time() - t0 < 0.2  # LOOKUP_TIMEOUT is 50 ms
        # One slow answer is that request assigned locally, not an outage.
        assert link.up == (i < SLOW_LOOKUPS_DOWN - 1)
    assert link.errors["lookup"] == SLOW_LOOKUPS_DOWN  # down: the rest did not look up
    await wait_until(lambda: a.runtime.fleet.up)


@needs_redis
async def test_fleet_a_stored_kill_override_gives_way_to_a_changed_kill_switch_config(
    fleet: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator killed the route and let it live again (stored in Redis, made against
    ``kill_switch.enabled: false``); B's config then says enabled: true. The catch-up
    from Redis after the reload must not undo the config with the old override."""
    a, b, _, _ = fleet
    await a.post_admin("/routes/chat/kill", {"enabled": True})
    await a.post_admin("/routes/chat/kill", {"enabled": False})
    await wait_until(lambda: b.runtime.rollout("chat").kill_override is False)
    assert await a.runtime.fleet.flush()
    ups = b.runtime.snapshot.config.upstreams
    text = CONFIG.replace("    rollback:", "    kill_switch: {{enabled: true}}\n    rollback:")
    new = make_config(text, tmp_path, state=tmp_path / "state-b.json", redis=b.runtime.fleet.url,
                      v1=ups["v1"].url, v2=ups["v2"].url)
    link = b.runtime.fleet
    sync, synced = link._sync, asyncio.Event()

    async def sync_and_say() -> Any:  # the catch-up's HGETALL and its apply
        try:
            return await sync()
        finally:
            synced.set()

    monkeypatch.setattr(link, "_sync", sync_and_say)
    assert b.runtime.apply(new).ok  # asks the link to catch up
    await wait_until(synced.is_set, what="B's catch-up from Redis after the reload")
    assert b.runtime.rollout("chat").state == "killed"
    assert a.runtime.rollout("chat").state == "canary"  # A's config did not change


@needs_redis
async def test_fleet_a_step_reaches_a_replica_with_another_plan_by_its_weight(
    redis_server: RedisServer, model: Any, flipback: Any, tmp_path: Path
) -> None:
    """While a config change rolls through the fleet, A steps [50, 60, 70, 100] and B has
    the new plan [5, 100]. A's step to 60% must not put B at its index 1: 100%."""
    v1, v2 = await model("v1"), await model("v2")
    old_rollback = "    rollback: {{min_requests: 3, consecutive_failures: 3, verify: null}}"
    plan = CONFIG.replace(old_rollback, "    rollback: {{judge: threshold, min_requests: 1}}\n"
                          "    progressive: {{steps: {steps}, interval: {interval}}}")
    a = await flipback(plan, state=tmp_path / "a.json", redis=redis_server.url, v1=v1.url,
                       v2=v2.url, steps="[50, 60, 70, 100]", interval="300ms")
    b = await flipback(plan, state=tmp_path / "b.json", redis=redis_server.url, v1=v1.url,
                       v2=v2.url, steps="[5, 100]", interval="1h")
    asked = 0

    async def stepped() -> bool:  # traffic, the evidence a step needs, until A steps
        nonlocal asked
        if a.runtime.rollout("chat").step:
            return True
        asked += 1
        await _ask(a, f"step{asked}")
        return False

    await wait_until(stepped, interval=0.01, what="A to step")
    assert a.runtime.rollout("chat").weight == 60
    # A later action from A that B visibly applies: B has then handled the step before it.
    await a.post_admin("/routes/chat/kill", {"enabled": True})
    await wait_until(lambda: b.runtime.rollout("chat").kill_override is True)
    assert b.runtime.rollout("chat").weight == 5
    await a.post_admin("/routes/chat/kill", {"enabled": False})
    await wait_until(lambda: b.runtime.rollout("chat").kill_override is False)
    # A replica of the new plan that starts now catches up from Redis the same way.
    c = await flipback(plan, state=tmp_path / "c.json", redis=redis_server.url, v1=v1.url,
                       v2=v2.url, steps="[5, 100]", interval="1h")
    assert c.runtime.rollout("chat").weight == 5
    assert b.runtime.rollout("chat").state == "canary"


@needs_redis
async def test_fleet_kill_switch_and_a_new_rollout_per_replica(
    fleet: Any, model: Any, tmp_path: Path
) -> None:
    a, b, _, _ = fleet
    await a.post_admin("/routes/chat/kill", {"enabled": True})
    await wait_until(lambda: b.runtime.rollout("chat").state == "killed")
    await b.post_admin("/routes/chat/kill", {"enabled": False})
    await wait_until(lambda: a.runtime.rollout("chat").state == "canary")
    await a.post_admin("/routes/chat/rollback", {"reason": "v2 is bad"})
    await wait_until(lambda: b.runtime.rollout("chat").state == "rolled_back")
    # B moves on to a new canary (v3): a new rollout, unlatched, with its own fleet state;
    # A, still on v2, keeps its latch and ignores B's actions on the new rollout.
    v3 = await model("v3")
    ups = b.runtime.snapshot.config.upstreams
    text = CONFIG.replace("upstream: v2", "upstream: v3").replace(
        "routes:", '  v3: {{url: "{v3}"}}\nroutes:')
    new = make_config(text, tmp_path, state=tmp_path / "state-b.json", redis=b.runtime.fleet.url,
                      v1=ups["v1"].url, v2=ups["v2"].url, v3=v3.url)
    assert b.runtime.apply(new).ok
    await wait_until(lambda: b.runtime.rollout("chat").state == "canary")
    await b.post_admin("/routes/chat/weight", {"weight": 50})
    # Then a kill switch (the route's, whatever its rollout): once A has applied that,
    # it has seen the weight message before it, and ignored it.
    await b.post_admin("/routes/chat/kill", {"enabled": True})
    await wait_until(lambda: a.runtime.rollout("chat").kill_override is True)
    assert a.runtime.rollout("chat").latch is not None  # still latched on v2
    assert a.runtime.rollout("chat").manual_weight is None
