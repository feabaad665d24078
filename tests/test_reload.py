"""Hot reload and lifecycle end to end (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy import reload as reload_module
from proxy.config.parser import load_config
from proxy.server import App, serve
from tests.conftest import config_text, make_config
from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    rollback: {{min_requests: 5, window: {window}}}
"""


class Setup:
    def __init__(self, tmp_path: Path, v1: str, v2: str) -> None:
        self.tmp = tmp_path
        self.v1, self.v2 = v1, v2
        self.path = tmp_path / "flipback.yaml"

    def text(self, weight: float = 0, window: str = "10s", extra: str = "") -> str:
        return config_text(ROUTE, self.tmp, v1=self.v1, v2=self.v2, weight=weight,
                           window=window) + extra

    def write(self, text: str, path: Path | None = None) -> None:
        target = path or self.path
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)  # what editors do: write a temp file, rename over


@pytest.fixture
async def setup(model, tmp_path):
    v1, v2 = await model("v1"), await model("v2")
    return Setup(tmp_path, v1.url, v2.url)


@pytest.fixture
async def running(setup):
    apps: list[App] = []

    async def start(path: Path | None = None) -> App:
        p = str(path or setup.path)
        app = App(load_config(p), p)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.aclose()


async def _get(app: App, path: str = "/x") -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{app.data_port}{path}") as r:
        await r.read()
        return r.headers.get("x-flipback-upstream", str(r.status))


async def _events(app: App) -> list[dict]:
    return [e.as_json() for e in app.runtime.events.recent(50)]


def _refused(app: App) -> bool:
    return any(e.kind == "reload_refused" for e in app.runtime.events.recent(9))


async def test_file_change_is_applied_within_about_a_second(setup, running):
    setup.write(setup.text(weight=0))
    app = await running()
    assert await _get(app) == "v1"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    setup.write(setup.text(weight=100))
    await wait_until(lambda: app.runtime.rollout("chat").effective_weight == 100)
    assert loop.time() - t0 < 2.0
    assert await _get(app) == "v2"
    event = (await _events(app))[0]
    assert event["kind"] == "reload" and event["actor"] == "config"
    assert "routes ~chat" in event["reason"]
    assert 'result="ok"' in app.runtime.metrics.render().decode()


async def test_invalid_config_is_refused_then_valid_again_applies(setup, running):
    setup.write(setup.text(weight=0))
    app = await running()
    setup.write(setup.text(weight=0).replace("weight: 0", "weight: 500"))
    await wait_until(lambda: _refused(app), what="a reload_refused event")
    event = (await _events(app))[0]
    assert event["kind"] == "reload_refused"
    assert event["reason"].startswith(f"{setup.path}:")
    assert "routes[0].canary.weight" in event["reason"]
    assert event["figures"]["errors"]
    assert await _get(app) == "v1"  # old config still serving
    text = app.runtime.metrics.render().decode()
    assert 'flipback_config_reloads_total{result="refused"} 1.0' in text
    # Not a wait: polls of the same bad content for 1.5 s more must refuse nothing new.
    await asyncio.sleep(1.5)
    assert sum(e.kind == "reload_refused" for e in app.runtime.events.recent(50)) == 1
    setup.write(setup.text(weight=100))
    await wait_until(lambda: app.runtime.rollout("chat").effective_weight == 100)


def _stable_is_a_bad_date(text: str) -> str:
    return text.replace("stable: v1", "stable: 2024-13-45")


def _canary_is_a_bad_int(text: str) -> str:
    return text.replace("upstream: v2,", "upstream: !!int abc,")


def _upstreams_merge_themselves(text: str) -> str:
    return text.replace("upstreams:", "upstreams: &ups\n  <<: *ups", 1)


def _routes_nest_too_deeply(text: str) -> str:
    return text + "log: " + "[" * 3000 + "\n"


async def _refusals(app: App) -> int:
    return sum(e.kind == "reload_refused" for e in app.runtime.events.recent(50))


async def _assert_refused_and_still_serving(app: App, setup: Setup, message: str) -> None:
    await wait_until(lambda: _refused(app), what="a reload_refused event")
    event = (await _events(app))[0]
    assert event["kind"] == "reload_refused"
    assert event["reason"].startswith(f"{setup.path}:") and message in event["reason"]
    assert "\n" not in event["reason"]
    assert 'flipback_config_reloads_total{result="refused"} 1.0' in (
        app.runtime.metrics.render().decode())
    assert await _get(app) == "v1"  # the old config keeps serving
    admin = f"http://127.0.0.1:{app.admin_port}/reload"
    async with aiohttp.ClientSession() as s, s.post(admin, json={}) as resp:
        assert resp.status == 400 and resp.content_type == "application/json"
        body = await resp.json()
    assert not body["ok"] and not body["changed"]
    assert body["errors"][0].startswith(f"{setup.path}:") and message in body["errors"][0]
    assert await _get(app) == "v1"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_stable_is_a_bad_date, "routes[0].stable: cannot read '2024-13-45' as a YAML timestamp"),
        (_canary_is_a_bad_int, "routes[0].canary.upstream: cannot read 'abc' as a YAML int"),
        (_upstreams_merge_themselves, "upstreams.<<: merge key refers to its own mapping"),
        (_routes_nest_too_deeply, "(syntax): nested too deeply"),
    ],
)
async def test_config_the_yaml_reader_chokes_on_is_refused_once(
    setup, running, caplog, spoil, message
):
    setup.write(setup.text(weight=0))
    app = await running()
    with caplog.at_level(logging.INFO, logger="proxy.reload"):
        setup.write(spoil(setup.text(weight=0)))
        await wait_until(lambda: _refused(app), what="a reload_refused event")
        # Not a wait: polls of the same content for 1.5 s more must refuse nothing new.
        await asyncio.sleep(1.5)
        assert await _refusals(app) == 1
        await _assert_refused_and_still_serving(app, setup, message)
    logged = [r for r in caplog.records if r.name == "proxy.reload"]
    assert [r.levelno for r in logged] == [logging.ERROR] * 2  # the poll, then POST /reload
    assert "refused" in logged[0].getMessage() and message in logged[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback in the log


async def test_parser_failing_unexpectedly_is_a_refusal_not_a_crash(
    setup, running, caplog, monkeypatch
):
    setup.write(setup.text(weight=0))
    app = await running()

    def broken(text: str, source: str) -> None:
        raise RuntimeError("parser bug\nsecond line")

    monkeypatch.setattr(reload_module, "parse_config", broken)
    with caplog.at_level(logging.INFO, logger="proxy.reload"):
        setup.write(setup.text(weight=100))
        await wait_until(lambda: _refused(app), what="a reload_refused event")
        await asyncio.sleep(1.5)  # not a wait: as above, no new refusal may come
        assert await _refusals(app) == 1
        await _assert_refused_and_still_serving(
            app, setup, "cannot read this config: RuntimeError: parser bug")
    logged = [r for r in caplog.records if r.name == "proxy.reload"
              and r.levelno >= logging.INFO]
    assert [r.levelno for r in logged] == [logging.ERROR] * 2  # the poll, then POST /reload
    assert not [r for r in caplog.records if r.exc_info]  # no traceback every second
    assert app.runtime.rollout("chat").effective_weight == 0


async def test_snapshot_build_failing_is_a_refusal(setup, running, monkeypatch):
    setup.write(setup.text(weight=0))
    app = await running()
    before = app.runtime.snapshot

    def broken(config, previous):
        raise RuntimeError("cannot build")

    monkeypatch.setattr(app.runtime, "_build", broken)
    setup.write(setup.text(weight=100))
    await _assert_refused_and_still_serving(
        app, setup, "cannot apply this config: RuntimeError: cannot build")
    assert app.runtime.snapshot is before
    monkeypatch.undo()
    assert (await app.watcher.check(force=True)).ok
    assert app.runtime.rollout("chat").effective_weight == 100


async def test_kubernetes_configmap_symlink_swap(setup, running):
    # The kubelet's layout: flipback.yaml -> ..data/flipback.yaml, ..data -> ..TIMESTAMP/
    mount = setup.tmp / "mount"
    mount.mkdir()
    (mount / "..v1").mkdir()
    (mount / "..v1" / "flipback.yaml").write_text(setup.text(weight=0))
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/flipback.yaml", mount / "flipback.yaml")
    app = await running(mount / "flipback.yaml")
    assert await _get(app) == "v1"
    (mount / "..v2").mkdir()
    (mount / "..v2" / "flipback.yaml").write_text(setup.text(weight=100))
    os.symlink("..v2", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
    await wait_until(lambda: app.runtime.rollout("chat").effective_weight == 100)


async def test_post_reload_and_its_errors(setup, running):
    setup.write(setup.text(weight=0))
    app = await running()
    admin = f"http://127.0.0.1:{app.admin_port}/reload"
    async with aiohttp.ClientSession() as s:
        setup.write(setup.text(weight=100))
        async with s.post(admin, json={}) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["ok"] and body["changed"]
        assert app.runtime.rollout("chat").effective_weight == 100
        setup.write("routes: [")
        async with s.post(admin, json={}) as resp:
            body = await resp.json()
            assert resp.status == 400 and not body["ok"]
            assert body["errors"][0].startswith(f"{setup.path}:")


async def test_latch_window_and_pool_survive_unrelated_reload(setup, running):
    setup.write(setup.text(weight=50))
    app = await running()
    for _ in range(10):
        await _get(app)
    before = app.runtime.rollout("chat")
    counted = before.stable.window.stats().requests + before.canary.window.stats().requests
    assert counted == 10
    pool = app.runtime.snapshot.pools["v1"]
    before.rollback("bad answers")
    setup.write(setup.text(weight=50, extra='log: {access: false}\n'))  # no route change
    assert (await app.watcher.check(force=True)).ok
    after = app.runtime.rollout("chat")
    assert after is not before
    assert after.state == "rolled_back"
    assert after.stable.window.stats().requests + after.canary.window.stats().requests == 10
    assert app.runtime.snapshot.pools["v1"] is pool
    # A new weight is the same rollout; a new canary version is a new one (latch goes).
    setup.write(setup.text(weight=20))
    assert (await app.watcher.check(force=True)).ok
    assert app.runtime.rollout("chat").state == "rolled_back"
    setup.write(setup.text(weight=20).replace(setup.v2, setup.v2 + "/v2"))
    assert (await app.watcher.check(force=True)).ok
    assert app.runtime.rollout("chat").state == "canary"


async def test_changed_upstream_gets_new_pool_old_one_closed(setup, running, model, monkeypatch):
    from proxy import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "RETIRE_GRACE", 0.05)
    v3 = await model("v3")
    setup.write(setup.text(weight=0))
    app = await running()
    assert await _get(app) == "v1"
    old = app.runtime.snapshot.pools["v1"]
    setup.write(setup.text(weight=0).replace(setup.v1, v3.url))
    assert (await app.watcher.check(force=True)).ok
    assert app.runtime.snapshot.pools["v1"] is not old
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{app.data_port}/x") as r:
        assert (await r.json())["model"] == "v3"
    await wait_until(lambda: old.idle == 0 and old.in_flight == 0)


async def test_twenty_reloads_under_load_lose_nothing(setup, running):
    setup.write(setup.text(weight=50))
    app = await running()
    stop = asyncio.Event()
    results: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(f"http://127.0.0.1:{app.data_port}/x") as r:
                    await r.read()
                    results.append(r.status)
            except aiohttp.ClientError:
                results.append(0)

    async def more_answers(n: int) -> None:
        want = len(results) + n
        await wait_until(lambda: len(results) >= want, what=f"{want} answers")

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(client(session)) for _ in range(6)]
        for i in range(20):
            setup.write(setup.text(weight=10 + i * 4, window="10s" if i % 2 else "20s"))
            assert (await app.watcher.check(force=True)).ok
            await more_answers(3)  # some traffic under each of the twenty configs
        stop.set()
        await asyncio.gather(*tasks)
    assert len(results) > 50
    assert set(results) == {200}, sorted(set(results))


async def test_sighup_reloads(setup, monkeypatch):
    monkeypatch.setattr(reload_module, "POLL_INTERVAL", 60.0)  # only the signal can do it
    setup.write(setup.text(weight=0))
    started: asyncio.Future[App] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    cfg = load_config(str(setup.path))
    server = asyncio.ensure_future(serve(cfg, config_path=str(setup.path),
                                         shutdown_trigger=stop.wait,
                                         on_started=started.set_result))
    app = await started
    try:
        setup.write(setup.text(weight=100))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: app.runtime.rollout("chat").effective_weight == 100)

        stop.set()
        await asyncio.wait_for(server, 10)
    finally:
        stop.set()
        if not server.done():
            server.cancel()


async def test_drain_waits_for_slow_in_flight_request(model, tmp_path):
    v1 = await model("v1")
    v1.behaviour = Behaviour(delay=0.6)
    app = App(make_config("""
server: {{listen: "127.0.0.1:0", drain_timeout: 5s}}
upstreams:
  v1: {{url: "{v1}"}}
routes:
  - {{name: plain, match: {{path_prefix: /}}, stable: v1}}
""", tmp_path, v1=v1.url))
    await app.start()
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(f"http://127.0.0.1:{app.data_port}/slow"))
        await asyncio.wait_for(v1.started.wait(), 5)
        drain = asyncio.ensure_future(app.drain())
        await wait_until(lambda: app.runtime.draining)
        async with s.get(f"http://127.0.0.1:{app.admin_port}/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
        resp = await slow
        assert resp.status == 200 and (await resp.json())["model"] == "v1"
        resp.release()
        await asyncio.wait_for(drain, 5)
