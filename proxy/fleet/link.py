"""Fleet state in Redis (SPEC §3 ``state.redis``, §5): shared sticky pins, and latches and
manual overrides that every replica applies within a second.

``FleetLink`` owns the connection. An action taken on one replica (a trip, a rollback,
weight, promote, resume, kill, a progressive step) is written to the route's hash and
PUBLISHed in one MULTI/EXEC, so every replica sees the actions in the order Redis
applied them; each replica applies what it receives to its ``Rollout`` without
re-publishing. On connect and on every reconnect the link catches up: Redis's stored
state wins, except that a rollout Redis knows nothing of (a fresh or restarted Redis) is
seeded from this replica's own state, and actions taken while Redis was away are sent
first. Redis emptied while connected (FLUSHALL, eviction) is noticed at the next ping
and caught up the same way. Every replica that sees Redis come back empty writes
back the sticky pins it holds, in the background (``SharedPins.write_back``).

Redis being slow, down or restarted never fails or delays a request by more than the
pin lookup timeout (50 ms, and only for a session this replica has not cached): the link
goes down, logs once, shows ``flipback_redis_connected 0`` and ``/readyz``'s ``redis``,
and reconnects by itself with backoff. The ``redis`` package is imported only when
``state.redis`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import ProxyError
from proxy.events import Event
from proxy.fleet import state as fs
from proxy.fleet.pins import SharedPins
from proxy.fleet.writer import WRITE_TIMEOUT, Action, FleetWriter, PinWrite
from proxy.rollout.machine import Rollout
from proxy.tasks import TaskSet

logger = logging.getLogger(__name__)

REDIS_MISSING = ("state.redis is set but the Python package 'redis' is not installed: "
                 "pip install 'flipback[redis]'")
CONNECT_TIMEOUT = 1.0  # seconds, for a (re)connect, a subscribe and the catch-up
START_WAIT = 1.5  # start() waits this long for the first catch-up, then serves anyway
BACKOFF_MIN, BACKOFF_MAX = 0.2, 2.0
LISTEN_TICK = 0.1  # how often the listener notices a link marked down by a request
PING_EVERY = 1.0
MAX_CONNECTIONS = 64
# Pin lookups in a row that may time out before the link counts as down: one slow
# answer (a busy pool, a loop stall) is that request assigned locally, not an outage.
SLOW_LOOKUPS_DOWN = 3

# Seed a rollout Redis does not know yet (the marker field is absent) from local state;
# the route's kill switch only where Redis has none. 1 when it seeded, else 0.
_SEED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if ARGV[2] ~= '' then redis.call('HSETNX', KEYS[1], 'kill', ARGV[2]) end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _import_redis() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise ProxyError(REDIS_MISSING) from None
    return aioredis


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class FleetLink:
    """The connection to Redis for one process: up or down, never in a request's way."""

    def __init__(self, url: str, *, rollouts: Callable[[], Mapping[str, Rollout]],
                 replica: str | None = None) -> None:
        aioredis = _import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = fs.display_url(url)
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        # No retries inside the client: a failure is reported at once and the link decides.
        try:
            self._pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=None,
                socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=WRITE_TIMEOUT,
                retry=Retry(NoBackoff(), 0), protocol=2)
        except (TypeError, ValueError) as exc:  # a query option the client cannot read
            raise ProxyError(f"state.redis: {exc}") from None
        client = aioredis.Redis(connection_pool=self._pool)
        self._init_link(client, client.register_script(_SEED), rollouts,
                        FleetWriter(client, is_up=lambda: self.up, failed=self.failed))

    def _init_link(self, client: Any, seed: Any, rollouts: Callable[[], Mapping[str, Rollout]],
                   writer: FleetWriter) -> None:
        """The state every link keeps, whatever carries it: ``client`` answers ``hgetall``
        and ``getex`` (Redis, or the local hub of ``proxy.workers``), ``seed`` is the
        seed-if-absent script, ``writer`` sends actions and pin writes."""
        self.client = client
        self._seed = seed
        self._rollouts = rollouts
        self.up = False
        self.errors: dict[str, int] = {"lookup": 0, "pin_write": 0, "publish": 0, "connection": 0}
        self._told_down = False
        self._slow_lookups = 0  # lookups in a row that timed out
        self._routes: dict[str, SharedPins] = {}
        self._writer = writer
        self._resync = asyncio.Event()
        self._started = asyncio.Event()
        self._tasks = TaskSet("fleet")

    # -- views ---------------------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        """``/readyz``'s ``redis`` field (the URL carries no credentials)."""
        return {"connected": self.up, "url": self.url}

    def gauges(self) -> tuple[bool, dict[str, int]]:
        return self.up, {**self.errors, "pin_dropped": self._writer.dropped_pins}

    # -- wiring ----------------------------------------------------------------------------
    def attach(self, rollouts: Mapping[str, Rollout]) -> None:
        """Hook a (new) snapshot's rollouts to the fleet: actions are announced, sticky
        routes get shared pins. A route whose rollout is unchanged keeps its epochs."""
        routes: dict[str, SharedPins] = {}
        for name, rollout in rollouts.items():
            fp = rollout.fingerprint()
            prev = self._routes.get(name)
            sticky = rollout.route.sticky
            shared = SharedPins(self, route=name, fingerprint=fp, pins=rollout.pins,
                                ttl=sticky.ttl if sticky else 0.0,
                                max_sessions=sticky.max_sessions if sticky else 0)
            if prev is not None and prev.fingerprint == fp:
                if prev.pins is rollout.pins:
                    shared = prev
                else:
                    shared.cepoch, shared.sepoch = prev.cepoch, prev.sepoch
                    shared.set_epochs(prev.cepoch, prev.sepoch)
                    shared.seed = prev.seed
            routes[name] = shared
            rollout.link_fleet(self.announce, shared)
        self._routes = routes

    def resync(self) -> None:
        """Catch up with Redis again soon (after a reload: new rollouts may be known there)."""
        self._resync.set()

    # -- the request path (never awaits Redis, never raises) ------------------------------
    def failed(self, op: str, exc: BaseException) -> None:
        """A Redis call failed or timed out: count it and go down (the listener then
        reconnects). Logged once per outage."""
        self.errors[op] = self.errors.get(op, 0) + 1
        if self.up or not self._told_down:
            logger.warning("redis %s unavailable (%s: %s): pins, latches and overrides stay "
                           "local until it is back", self.url, op, _describe(exc))
            self._told_down = True
        self.up = False

    def lookup_failed(self, exc: BaseException) -> None:
        """A pin lookup failed: a timeout counts, and takes the link down only as the
        ``SLOW_LOOKUPS_DOWN``-th in a row; any other error takes it down at once."""
        if isinstance(exc, TimeoutError):
            self._slow_lookups += 1
            if self._slow_lookups < SLOW_LOOKUPS_DOWN:
                self.errors["lookup"] += 1
                return
        self._slow_lookups = 0
        self.failed("lookup", exc)

    def lookup_answered(self) -> None:
        self._slow_lookups = 0

    def queue_pin(self, key: str, write: PinWrite) -> None:
        self._writer.queue_pin(key, write)

    async def write_pins(self, batch: list[tuple[str, PinWrite]]) -> None:
        await self._writer.write_pins(batch)

    def announce(self, rollout: Rollout, op: str, data: dict[str, Any],
                 event: Event | None) -> None:
        """An action taken on this replica: new epochs where it needs them, then written
        and published in the background (kept until Redis is back when it is down).
        Called from the request path (a trip): never raises."""
        try:
            self._announce(rollout, op, data, event)
        except Exception:
            logger.exception("cannot announce %s on %s to the fleet", op, rollout.name)

    def _announce(self, rollout: Rollout, op: str, data: dict[str, Any],
                  event: Event | None) -> None:
        fp = rollout.fingerprint()
        shared = self._routes.get(rollout.name)
        # New epochs for a rollback (canary pins) or a resume (all pins); other actions
        # carry none ("" leaves an epoch as it is), so they cannot undo a newer resume.
        cepoch = sepoch = ""
        if op == "rollback":
            cepoch = fs.new_epoch()
        elif op == "resume":
            cepoch, sepoch = fs.new_epoch(), fs.new_epoch()
        if shared is not None and shared.fingerprint == fp and (cepoch or sepoch):
            shared.set_epochs(cepoch or shared.cepoch, sepoch or shared.sepoch)
        canary = rollout.route.canary
        sets, dels = fs.op_fields(fp, op, data, configured_weight=canary.weight if canary else None,
                                  kill_configured=rollout.route.kill_switch.enabled,
                                  cepoch=cepoch, sepoch=sepoch)
        ev = None if event is None else {"kind": event.kind, "actor": event.actor,
                                         "reason": event.reason, "figures": event.figures}
        message = fs.Message(origin=self.replica, route=rollout.name, fp=fp, op=op, data=data,
                             event=ev, cepoch=cepoch, sepoch=sepoch)
        self._writer.queue_action(Action(rollout.name, fp, sets, dels, message.encode()))

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and catch up in the background; wait up to ``START_WAIT`` for the first
        attempt, so a replica that can reach Redis starts with the fleet's latches."""
        self._tasks.spawn(self._run(), name="fleet-link")
        self._tasks.spawn(self._writer.run(), name="fleet-writer")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self._started.wait()

    async def flush(self, timeout: float = 1.0) -> bool:
        """Wait until queued actions and pin writes reached Redis (True) or ``timeout``."""
        return await self._writer.flush(timeout)

    async def aclose(self) -> None:
        if self.up:
            await self.flush(0.5)
        await self._tasks.aclose(0)
        with contextlib.suppress(Exception):
            await self._pool.disconnect()

    # -- background: connection, catch-up, listening ---------------------------------------
    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            pubsub = None
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self.client.ping()
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(fs.CHANNEL)
                    self._resync.clear()
                    lost = await self._sync()
                self._set_up()
                self._write_back(lost)
                self._started.set()
                delay = BACKOFF_MIN
                await self._listen(pubsub)
            except Exception as exc:  # noqa: BLE001 - any failure: down, then retry
                if self.up or not self._told_down:
                    self.failed("connection", exc)
                self.up = False
            finally:
                self._started.set()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            # Stale pooled connections would fail one by one after a Redis restart.
            with contextlib.suppress(Exception):
                await self._pool.disconnect()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _set_up(self) -> None:
        if self._told_down:
            logger.warning("redis %s reachable again: fleet state shared again", self.url)
        else:
            logger.info("redis %s connected: pins, latches and overrides are shared", self.url)
        self._told_down = False
        self.up = True
        self._writer.resume()

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + PING_EVERY
        quarter: dict[str, float] = {}
        while self.up:
            if self._resync.is_set():
                self._resync.clear()
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    self._write_back(await self._sync())
            message = await pubsub.get_message(ignore_subscribe_messages=True,
                                               timeout=LISTEN_TICK)
            if message is not None and message.get("type") == "message":
                self._receive(message["data"])
            now = loop.time()
            if now >= next_ping:
                next_ping = now + PING_EVERY
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self._ping()
                for name, shared in self._routes.items():
                    if now - quarter.setdefault(name, now) >= shared.quarter_ttl:
                        quarter[name] = now
                        shared.rotate()

    async def _ping(self) -> None:
        """The ping reads each rollout's marker and seed token too: a hash gone with the
        connection up (FLUSHALL, eviction), or seeded again by a replica that noticed
        first, is Redis come back empty: catch up, and so write the pins back."""
        routes = list(self._routes.values())
        if not routes:
            await self.client.ping()
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for shared in routes:
                pipe.hmget(fs.route_key(shared.route), *fs.marker_fields(shared.fingerprint))
            found = await pipe.execute()
        for shared, (marker, seed) in zip(routes, found, strict=True):
            if marker is None or (seed or b"").decode() != shared.seed:
                self._resync.set()

    def _receive(self, raw: bytes) -> None:
        message = fs.Message.decode(raw)
        if message is None:
            logger.warning("ignoring a message on %s that is not flipback's", fs.CHANNEL)
            return
        rollout = self._rollouts().get(message.route)
        if rollout is None or (message.op != "kill" and message.fp != rollout.fingerprint()):
            return  # a route or rollout this replica does not serve (a config change rolls)
        shared = self._routes.get(message.route)
        if (shared is not None and shared.fingerprint == message.fp
                and (message.cepoch or message.sepoch)):  # ours too: Redis's order wins
            shared.set_epochs(message.cepoch or shared.cepoch, message.sepoch or shared.sepoch)
        if message.origin == self.replica:
            return
        try:
            rollout.apply_remote(message.op, message.data, message.event, message.origin)
        except Exception:  # one odd message must not stop the listener
            logger.exception("cannot apply %s on %s from %s", message.op, message.route,
                             message.origin)

    async def _sync(self) -> list[SharedPins]:
        """Catch up: seed rollouts Redis does not know, send actions taken while away,
        then take Redis's stored state as the truth. Returns the routes whose pins Redis
        lost and this replica holds: the ones it seeded, and the ones whose seed token
        changed since it last looked (another replica seeded them first); one whose
        write-back was cut short stays due. A rolled back route's pins are left out:
        they matter again only after a resume, which drops them."""
        rollouts = dict(self._rollouts())
        seeded: set[tuple[str, str]] = set()
        for name, rollout in rollouts.items():
            fp = rollout.fingerprint()
            shared = self._routes.get(name)
            cepoch, sepoch = (shared.cepoch, shared.sepoch) if shared else ("", "")
            canary = rollout.route.canary
            fields = fs.state_fields(
                fp, latch=rollout.latch.as_dict() if rollout.latch else None,
                manual_weight=rollout.manual_weight,
                configured_weight=canary.weight if canary else None, step=rollout.step,
                step_weight=rollout.step_weight, cepoch=cepoch, sepoch=sepoch,
                seed=fs.new_epoch())
            override = rollout.kill_override
            kill = b"" if override is None else fs.kill_field(
                override, rollout.route.kill_switch.enabled)
            args: list[Any] = [fs.marker_fields(fp)[0], kill]
            for key, value in fields.items():
                args += [key, value]
            if await self._seed(keys=[fs.route_key(name)], args=args):
                seeded.add((name, fp))
                if shared is not None and shared.fingerprint == fp:
                    shared.seed = fields[fs.marker_fields(fp)[1]].decode()
                    shared.refill_due = True
        await self._writer.replay(seeded)
        for name, rollout in rollouts.items():
            fp = rollout.fingerprint()
            if (name, fp) in seeded:
                continue
            canary = rollout.route.canary
            state = fs.decode_state(await self.client.hgetall(fs.route_key(name)), fp,
                                    canary.weight if canary else None,
                                    kill_configured=rollout.route.kill_switch.enabled)
            shared = self._routes.get(name)
            if state.present and shared is not None and shared.fingerprint == fp:
                shared.set_epochs(state.cepoch, state.sepoch)
                if shared.seed not in (None, state.seed):
                    shared.refill_due = True
                shared.seed = state.seed
            rollout.catch_up(present=state.present, latch=state.latch,
                             manual_weight=state.manual_weight, step=state.step,
                             kill=state.kill, step_weight=state.step_weight)
        due = [s for s in self._routes.values() if s.refill_due]
        for shared in due:
            owner = rollouts.get(shared.route)
            if not shared.pins or owner is None or owner.latch is not None:
                shared.refill_due = False
        return [s for s in due if s.refill_due]

    def _write_back(self, lost: list[SharedPins]) -> None:
        for shared in lost:
            self._tasks.spawn(shared.write_back(), name=f"fleet-write-back-{shared.route}")

    def __repr__(self) -> str:
        return (f"<FleetLink {self.url} {'up' if self.up else 'down'}, "
                f"{len(self._writer.outbox)} actions and {len(self._writer.pins)} pins queued>")
