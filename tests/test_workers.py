"""``flipback run --workers 2``: real processes on one SO_REUSEPORT listener, one admin.

Requests go over fresh connections (``force_close``) so the kernel spreads them over
the workers; a test that needs one worker only uses one keep-alive connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import config_text
from tests.fakes import Behaviour
from tests.test_fleet import needs_redis, redis_server
from tests.test_notify import receiver
from tests.waiting import wait_until

__all__ = ["receiver", "redis_server"]  # fixtures

CONFIG = """
server: {{listen: "127.0.0.1:{port}", drain_timeout: 5s}}
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
{extra}
routes:
  - name: chat
    match: {{path_prefix: /}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    sticky: {{header: x-session-id}}
    rollback: {{min_requests: 5, consecutive_failures: 3, judge: threshold}}
    retry_canary_on_stable: false
    {route_extra}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flipback:
    """A ``flipback run --workers 2`` process and clients for it."""

    def __init__(self, proc: Any, port: int, admin: int, cfg: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin = f"http://127.0.0.1:{admin}"
        self.cfg = cfg

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """One request on a fresh connection: (status, upstream)."""
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.get(self.url + path, headers=headers or {}) as r:
            await r.read()
            return r.status, r.headers.get("x-flipback-upstream", "")

    async def admin_json(self, path: str, method: str = "GET", body: Any = None) -> Any:
        async with aiohttp.ClientSession() as s, s.request(
                method, self.admin + path, json=body,
                headers={"Content-Type": "application/json"}) as r:
            return await r.json()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with aiohttp.ClientSession() as s, s.get(self.admin + "/metrics") as r:
            text = await r.text()
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for fam in text_string_to_metric_families(text) for x in fam.samples}

    async def workers_states(self) -> list[str]:
        route = await self.admin_json("/routes/chat")
        return [w["state"] for w in route["workers"]]

    def children(self) -> list[int]:
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        with open(path) as f:
            return [int(p) for p in f.read().split()]


async def _ready(admin: str, serving: int = 2) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(admin + "/readyz") as r:
            return r.status == 200 and (await r.json())["workers"]["serving"] == serving
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def start(model: Any, tmp_path: Path) -> AsyncIterator[Any]:
    procs: list[Any] = []

    async def run(weight: float = 50, v2_behaviour: Behaviour | None = None,
                  extra: str = "", route_extra: str = "", token: str = "") -> Any:
        v1, v2 = await model("v1"), await model("v2")
        if v2_behaviour is not None:
            v2.behaviour = v2_behaviour
        port, admin = _free_port(), _free_port()
        cfg = tmp_path / "fb.yaml"
        cfg.write_text(config_text(CONFIG, tmp_path, port=port, admin=admin, v1=v1.url,
                                   v2=v2.url, weight=weight, extra=extra,
                                   route_extra=route_extra))
        env = {**os.environ, "FLIPBACK_LOG_LEVEL": "WARNING"}
        env.pop("FLIPBACK_ADMIN_TOKEN", None)
        if token:
            env["FLIPBACK_ADMIN_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2",
            stdout=asyncio.subprocess.DEVNULL, env=env)
        procs.append(proc)
        fb = Flipback(proc, port, admin, cfg)
        await wait_until(lambda: _ready(fb.admin), timeout=30, interval=0.05,
                         what="two workers serving")
        return fb, v1, v2

    yield run
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()  # the workers drain with it (a kill would orphan them)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_workers_share_the_listener_and_one_admin_sums_them(start: Any) -> None:
    fb, v1, v2 = await start(weight=50)
    results = [await fb.get(f"/v1/chat/{i}") for i in range(60)]
    assert all(status == 200 for status, _ in results)
    m = await fb.metrics()
    per_worker = [m[("flipback_worker_requests_total", (("worker", str(i)),))] for i in (0, 1)]
    assert all(n > 0 for n in per_worker), per_worker  # the kernel spread them
    served = sum(v for (name, _), v in m.items() if name == "flipback_requests_total")
    assert served == sum(per_worker) == 60 == v1.count + v2.count
    route = await fb.admin_json("/routes/chat")
    assert sum(u["requests"] for u in route["upstreams"].values()) == 60
    assert len(route["workers"]) == 2


async def test_a_trip_in_one_worker_flips_every_worker_within_100ms(start: Any) -> None:
    fb, v1, v2 = await start(weight=50, v2_behaviour=Behaviour(status=500))
    loop = asyncio.get_running_loop()
    # One keep-alive connection: every request lands on one worker, the only one that
    # sees the canary fail; the other can only learn of the trip from its sibling.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for i in range(40):
            async with s.get(fb.url + f"/x/{i}") as r:
                await r.read()
            if "rolled_back" in await fb.workers_states():
                break
    first = loop.time()
    states = await fb.workers_states()
    while states != ["rolled_back", "rolled_back"]:
        assert loop.time() - first < 0.1, states
        states = await fb.workers_states()
    events = (await fb.admin_json("/events?kind=rollback"))["events"]
    assert len(events) == 1 and events[0]["actor"] == "auto"  # one trip, not one per worker
    assert [await fb.get("/after") for _ in range(10)] == [(200, "v1")] * 10


async def test_a_progressive_step_in_one_worker_steps_every_worker_within_100ms(
        start: Any) -> None:
    fb, _, _ = await start(weight=10,
                           route_extra="progressive: {steps: [10, 50, 100], interval: 1s}")
    assert await _weights_are(fb, [10.0, 10.0])
    loop = asyncio.get_running_loop()
    stepped = None
    # One keep-alive connection: one worker gathers the evidence and steps; the other,
    # with no traffic, can only follow its sibling.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        deadline = loop.time() + 15
        while loop.time() < deadline:
            async with s.get(fb.url + "/step") as r:
                await r.read()
            weights = [w["effective_weight"] for w in
                       (await fb.admin_json("/routes/chat"))["workers"]]
            if stepped is None and 50.0 in weights:
                stepped = loop.time()
            if stepped is not None:
                if weights == [50.0, 50.0]:
                    break
                assert loop.time() - stepped < 0.1, weights
    assert stepped is not None, "no worker stepped"
    events = (await fb.admin_json("/events?kind=step"))["events"]
    assert len(events) == 1 and events[0]["actor"] == "auto"


async def test_admin_actions_and_reloads_apply_to_every_worker(start: Any) -> None:
    fb, _, _ = await start(weight=50)
    env = {**os.environ, "FLIPBACK_ADMIN_URL": fb.admin}
    env.pop("FLIPBACK_ADMIN_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "rollback", "chat", "--reason", "by hand",
        stdout=asyncio.subprocess.DEVNULL, env=env)
    assert await proc.wait() == 0
    await wait_until(lambda: _states_are(fb, ["rolled_back"] * 2), timeout=2)
    await fb.admin_json("/routes/chat/resume", "POST", {})
    await wait_until(lambda: _states_are(fb, ["canary"] * 2), timeout=2)

    fb.cfg.write_text(fb.cfg.read_text().replace("weight: 50", "weight: 20"))
    await wait_until(lambda: _weights_are(fb, [20.0, 20.0]), timeout=5)
    before = fb.cfg.read_text()
    fb.cfg.write_text(before.replace("stable: v1", "stable: nope"))
    refused = await fb.admin_json("/reload", "POST", {})
    assert refused["ok"] is False
    await asyncio.sleep(1.5)  # the watcher's poll sees the same bad file: still refused once
    m = await fb.metrics()
    assert m[("flipback_config_reloads_total", (("result", "refused"),))] == 1
    assert m[("flipback_config_reloads_total", (("result", "ok"),))] == 1
    events = (await fb.admin_json("/events?kind=reload,reload_refused"))["events"]
    assert [e["kind"] for e in events] == ["reload_refused", "reload"]
    assert await _weights_are(fb, [20.0, 20.0])
    assert all(status == 200 for status, _ in [await fb.get("/ok") for _ in range(6)])
    # Feedback goes to the worker whose guard knows the id; no worker knows this one.
    async with aiohttp.ClientSession() as s, s.post(
            fb.admin + "/feedback", json={"request_id": "nobody", "correct": True}) as r:
        assert (r.status, (await r.json())["outcome"]) == (404, "unknown")


async def test_with_an_admin_token_the_parent_checks_it_and_passes_it_on(start: Any) -> None:
    fb, _, _ = await start(weight=50, token="s3cret")
    url = fb.admin + "/routes/chat/rollback"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={}) as r:
            assert r.status == 401
        async with s.post(url, json={}, headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
    await wait_until(lambda: _states_are(fb, ["rolled_back"] * 2), timeout=2)


async def _states_are(fb: Flipback, states: list[str]) -> bool:
    return await fb.workers_states() == states


async def _weights_are(fb: Flipback, weights: list[float]) -> bool:
    route = await fb.admin_json("/routes/chat")
    return [w["effective_weight"] for w in route["workers"]] == weights


async def test_a_sticky_session_stays_on_its_version_whichever_worker_serves_it(
        start: Any) -> None:
    fb, _, _ = await start(weight=50)
    sessions = [f"s{i}" for i in range(40)]
    first: dict[str, str] = {}
    for key in sessions:
        status, upstream = await fb.get("/chat", {"x-session-id": key})
        assert status == 200
        first[key] = upstream
    assert set(first.values()) == {"v1", "v2"}
    # New sessions would now all go to the canary; pinned ones must not move, on
    # either worker (a worker that never saw a session asks the parent for its pin).
    await fb.admin_json("/routes/chat/weight", "POST", {"weight": 100})
    await wait_until(lambda: _weights_are(fb, [100.0, 100.0]), timeout=2)
    for _ in range(3):
        for key in sessions:
            status, upstream = await fb.get("/chat", {"x-session-id": key})
            assert (status, upstream) == (200, first[key]), key
    status, upstream = await fb.get("/chat", {"x-session-id": "a-new-one"})
    assert upstream == "v2"


async def test_a_dead_worker_is_restarted_and_sigterm_drains_every_worker(
        start: Any) -> None:
    fb, v1, _ = await start(weight=50, extra="state: {file: null}")  # the parent's alone
    await fb.admin_json("/routes/chat/rollback", "POST", {"reason": "before the crash"})
    await wait_until(lambda: _states_are(fb, ["rolled_back"] * 2), timeout=2)
    victim = fb.children()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: _restarted(fb), timeout=15, what="a worker restarted")
    await wait_until(lambda: _ready(fb.admin), timeout=15)
    assert victim not in fb.children() and len(fb.children()) == 2
    assert await _states_are(fb, ["rolled_back"] * 2)  # the new one caught up
    v1.behaviour = Behaviour(delay=0.5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        slow = [asyncio.ensure_future(s.get(fb.url + f"/slow/{i}")) for i in range(8)]
        await wait_until(lambda: v1.in_handler == 8, timeout=5)
        fb.proc.send_signal(signal.SIGTERM)
        for future in slow:  # in flight on both workers: each finishes during the drain
            resp = await future
            assert resp.status == 200
            resp.release()
    assert await asyncio.wait_for(fb.proc.wait(), 15) == 0


async def _restarted(fb: Flipback) -> bool:
    m = await fb.metrics()
    return sum(v for (name, _), v in m.items() if name == "flipback_worker_restarts_total") == 1


async def test_each_event_is_notified_once_whatever_the_number_of_workers(
        start: Any, receiver: Any) -> None:
    hook = await receiver()
    fb, _, _ = await start(weight=50, extra=f'notify: {{webhook: "{hook.url}", '
                                            'kinds: [rollback, reload, reload_refused]}')
    await fb.admin_json("/routes/chat/rollback", "POST", {"reason": "by hand"})
    await wait_until(lambda: _states_are(fb, ["rolled_back"] * 2), timeout=2)
    fb.cfg.write_text(fb.cfg.read_text().replace("weight: 50", "weight: 20"))
    assert (await fb.admin_json("/reload", "POST", {}))["ok"] is True
    fb.cfg.write_text(fb.cfg.read_text().replace("stable: v1", "stable: nope"))
    assert (await fb.admin_json("/reload", "POST", {}))["ok"] is False
    await hook.wait(3)
    # Not a wait: time for a duplicate from the other worker to arrive, were it sent.
    await asyncio.sleep(0.5)
    assert sorted(hook.kinds) == ["reload", "reload_refused", "rollback"]


@needs_redis
async def test_with_state_redis_the_workers_share_state_through_redis(
        start: Any, redis_server: Any, tmp_path: Path) -> None:
    fb, _, _ = await start(
        weight=50, v2_behaviour=Behaviour(status=500),
        extra=f'state: {{file: "{tmp_path / "state.json"}", redis: "{redis_server.url}"}}')
    ready = await fb.admin_json("/readyz")
    assert ready["redis"]["connected"] is True
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for i in range(40):  # one connection: one worker sees the canary fail
            async with s.get(fb.url + f"/x/{i}") as r:
                await r.read()
            if "rolled_back" in await fb.workers_states():
                break
    await wait_until(lambda: _states_are(fb, ["rolled_back"] * 2), timeout=1)


async def test_workers_drain_and_exit_when_the_parent_is_gone(start: Any) -> None:
    fb, _, _ = await start(weight=50)
    workers = fb.children()
    assert len(workers) == 2
    channel = _channel_dir(workers[0])

    async def new_sessions() -> None:  # each one a pin lookup the parent cannot answer
        for i in range(100_000):
            with contextlib.suppress(aiohttp.ClientError):
                await fb.get("/chat", {"x-session-id": f"new-{i}"})

    traffic = asyncio.ensure_future(new_sessions())
    try:
        await fb.get("/chat", {"x-session-id": "first"})
        fb.proc.kill()
        await fb.proc.wait()
        await wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=10,
                         what="the orphaned workers to exit")
        assert not _exists(channel)  # nor is the parent's private directory left
    finally:
        traffic.cancel()


def _channel_dir(worker: int) -> str:
    """The parent's private directory, from a worker's ``--channel`` argument."""
    with open(f"/proc/{worker}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return os.path.dirname(argv[argv.index(b"--channel") + 1].decode())


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited orphan is reaped by init, so it disappears)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def test_a_data_port_in_use_fails_the_start_once_with_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "fb.yaml"
        cfg.write_text(config_text("""
server: {{listen: "127.0.0.1:{port}"}}
upstreams: {{v1: {{url: "http://127.0.0.1:9"}}}}
routes: [{{name: r, match: {{path_prefix: /}}, stable: v1}}]
""", tmp_path, port=port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(cfg), "--workers", "2",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "cannot listen" in err.decode()


async def test_workers_flag_refuses_nonsense() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--workers", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert "--workers" in err.decode()
