"""Live state carried over a reload or a restart (SPEC §5, §7): a progressive step, an
admin kill override, and a state file whose fields do not have the types flipback writes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.server import App
from tests.conftest import make_config
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 10}}
    rollback: {{judge: threshold, min_requests: 1}}
    {extra}
"""


class Proxy:
    """One config file in ``tmp_path``; ``start`` runs a flipback App watching it."""

    def __init__(self, tmp_path: Path, v1: str, v2: str) -> None:
        self.tmp = tmp_path
        self.v1, self.v2 = v1, v2
        self.state = tmp_path / "state.json"
        self.session = aiohttp.ClientSession()
        self.apps: list[App] = []

    def write(self, extra: str = "") -> None:
        make_config(ROUTE, self.tmp, v1=self.v1, v2=self.v2, extra=extra)

    async def start(self, extra: str = "") -> App:
        cfg = make_config(ROUTE, self.tmp, v1=self.v1, v2=self.v2, extra=extra)
        app = App(cfg, str(self.tmp / "flipback.yaml"))
        await app.start()
        self.apps.append(app)
        return app

    async def stop(self, app: App) -> None:
        await app.aclose()
        self.apps.remove(app)

    async def reload(self, app: App, extra: str) -> None:
        self.write(extra)
        async with self.session.post(f"http://127.0.0.1:{app.admin_port}/reload",
                                     json={}) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["ok"], body

    async def route(self, app: App) -> dict[str, Any]:
        async with self.session.get(f"http://127.0.0.1:{app.admin_port}/routes/chat") as resp:
            return await resp.json()  # type: ignore[no-any-return]

    async def steps_taken(self, app: App) -> int:
        async with self.session.get(f"http://127.0.0.1:{app.admin_port}/events") as resp:
            events = (await resp.json())["events"]
        return sum(e["kind"] in ("step", "promote") for e in events)

    async def kill(self, app: App, enabled: bool) -> None:
        url = f"http://127.0.0.1:{app.admin_port}/routes/chat/kill"
        async with self.session.post(url, json={"enabled": enabled}) as resp:
            assert resp.status == 200, await resp.text()

    async def get(self, app: App) -> tuple[int, str]:
        async with self.session.get(f"http://127.0.0.1:{app.data_port}/x") as resp:
            await resp.read()
            return resp.status, resp.headers.get("x-flipback-upstream", "-")

    def save_state(self, app: App, **fields: Any) -> None:
        """A state file for route chat of ``app``'s canary, with ``fields``."""
        fingerprint = app.runtime.rollout("chat").fingerprint()
        data = {"version": 1, "routes": {"chat": {"fingerprint": fingerprint, **fields}}}
        self.state.write_bytes(orjson.dumps(data))

    async def aclose(self) -> None:
        for app in self.apps:
            await app.aclose()
        await self.session.close()


@pytest.fixture
async def proxy(model: Any, tmp_path: Path) -> AsyncIterator[Proxy]:
    v1, v2 = await model("v1"), await model("v2")
    p = Proxy(tmp_path, v1.url, v2.url)
    yield p
    await p.aclose()


STEPS = "progressive: {{steps: {steps}, interval: {interval}}}"
PLAN = STEPS.format(steps="[50, 60, 70, 80, 100]", interval="300ms")


async def _step_to_60(proxy: Proxy, app: App) -> float:
    """Traffic until the progressive rollout has stepped past 50%; its weight then."""
    weight = 0.0

    async def stepped() -> bool:
        nonlocal weight
        weight = (await proxy.route(app))["configured_weight"]
        if weight >= 60:
            return True
        for _ in range(5):  # the evidence a step needs
            await proxy.get(app)
        return False

    await wait_until(stepped, what="the rollout to step past 50%")
    return float(weight)


async def test_progressive_reload_with_new_steps_never_raises_the_weight(proxy: Proxy) -> None:
    app = await proxy.start(PLAN)
    weight = await _step_to_60(proxy, app)
    assert 60 <= weight <= 80
    steps_taken = await proxy.steps_taken(app)
    # The same steps at another pace: the rollout goes on from its step.
    slow = STEPS.format(steps="[50, 60, 70, 80, 100]", interval="10m")
    await proxy.reload(app, slow)
    assert (await proxy.route(app))["configured_weight"] == weight
    # A gentler plan: the highest step not above the weight it had, never step 1 (100%).
    await proxy.reload(app, STEPS.format(steps="[5, 55, 100]", interval="10m"))
    route = await proxy.route(app)
    assert (route["state"], route["configured_weight"]) == ("canary", 55)
    assert route["effective_weight"] == pytest.approx(55)
    await proxy.reload(app, STEPS.format(steps="[5, 100]", interval="10m"))
    route = await proxy.route(app)
    assert (route["state"], route["configured_weight"]) == ("canary", 5)
    # Not a wait: a few ticks pass, and no step comes (the new plan's interval started at
    # the reload).
    await asyncio.sleep(0.3)
    assert (await proxy.route(app))["configured_weight"] == 5
    assert await proxy.steps_taken(app) == steps_taken


async def test_progressive_restart_with_new_steps_never_raises_the_weight(
        proxy: Proxy) -> None:
    app = await proxy.start(PLAN)
    await _step_to_60(proxy, app)
    await proxy.stop(app)
    saved = orjson.loads(proxy.state.read_bytes())["routes"]["chat"]
    assert saved["steps"] == [50, 60, 70, 80, 100] and 1 <= saved["step"] <= 3
    app = await proxy.start(PLAN)  # the same plan: the same step
    assert (await proxy.route(app))["configured_weight"] == saved["steps"][saved["step"]]
    await proxy.stop(app)
    app = await proxy.start(STEPS.format(steps="[5, 55, 100]", interval="10m"))
    route = await proxy.route(app)
    assert (route["state"], route["configured_weight"]) == ("canary", 55)
    await proxy.stop(app)
    app = await proxy.start(STEPS.format(steps="[5, 100]", interval="10m"))
    route = await proxy.route(app)
    assert (route["state"], route["configured_weight"]) == ("canary", 5)


@pytest.mark.parametrize("fields", [
    {"step": 1},  # an older state file: no steps, so no way to tell they are the same
    {"step": -1, "steps": [5, 100]},  # steps[-1] would be 100%
    {"step": 7, "steps": [5, 100]},
])
async def test_progressive_restart_ignores_a_step_it_cannot_place(
        proxy: Proxy, fields: dict[str, Any]) -> None:
    plan = STEPS.format(steps="[5, 100]", interval="10m")
    app = await proxy.start(plan)
    await proxy.stop(app)
    proxy.save_state(app, **fields)
    app = await proxy.start(plan)
    route = await proxy.route(app)
    assert (route["state"], route["configured_weight"]) == ("canary", 5)


KILL_ON = "kill_switch: {enabled: true}"


async def test_kill_override_gives_way_to_a_kill_switch_config_change(proxy: Proxy) -> None:
    app = await proxy.start()
    await proxy.kill(app, True)
    await proxy.kill(app, False)
    # An unrelated reload and a restart keep the override: the config did not change.
    await proxy.reload(app, "retry_canary_on_stable: true")
    await proxy.kill(app, True)
    await proxy.reload(app, "")
    assert (await proxy.route(app))["state"] == "killed"
    await proxy.stop(app)
    app = await proxy.start()
    assert (await proxy.route(app))["state"] == "killed"
    # kill_switch.enabled changes in the config: the config is obeyed again.
    await proxy.kill(app, False)
    await proxy.reload(app, KILL_ON)
    assert (await proxy.route(app))["state"] == "killed"
    assert (await proxy.get(app))[0] == 503
    await proxy.reload(app, "")
    assert (await proxy.route(app))["state"] == "canary"
    # Across a restart too: an override made against enabled: false...
    await proxy.kill(app, False)
    await proxy.stop(app)
    # ...does not outlive a config that now says enabled: true.
    app = await proxy.start(KILL_ON)
    assert (await proxy.route(app))["state"] == "killed"
    assert (await proxy.get(app))[0] == 503
    # Nor does one from an older state file, which does not say what it was made against.
    await proxy.stop(app)
    proxy.save_state(app, kill_override=False)
    app = await proxy.start(KILL_ON)
    assert (await proxy.route(app))["state"] == "killed"


@pytest.mark.parametrize(("field", "value", "expect"), [
    ("latch", "oops", {"state": "canary", "effective_weight": 25}),
    ("latch", {"reason": "manual", "detail": 3, "actor": "admin", "time": 1.0},
     {"state": "canary", "effective_weight": 25}),
    ("manual_weight", "50", {"state": "canary", "effective_weight": 10}),
    ("manual_weight", True, {"state": "canary", "effective_weight": 10}),
    ("manual_weight", 500, {"state": "canary", "effective_weight": 10}),
    ("kill_override", "no", {"state": "canary", "effective_weight": 25}),
    ("step", "1", {"state": "canary", "effective_weight": 25}),
])
async def test_state_file_field_of_the_wrong_type_is_dropped_with_a_warning(
        proxy: Proxy, caplog: pytest.LogCaptureFixture, field: str, value: Any,
        expect: dict[str, Any]) -> None:
    app = await proxy.start()
    await proxy.stop(app)
    # Good fields around the bad one: they restore.
    good: dict[str, Any] = {"latch": None, "manual_weight": 25, "configured_weight": 10,
                            "kill_override": None, "kill_configured": False, "step": None}
    proxy.save_state(app, **{**good, field: value})
    with caplog.at_level(logging.WARNING):
        app = await proxy.start()
    route = await proxy.route(app)
    assert route["state"] == expect["state"]
    assert route["effective_weight"] == pytest.approx(expect["effective_weight"])
    assert await proxy.get(app) in ((200, "v1"), (200, "v2"))
    warnings = [r.getMessage() for r in caplog.records if "state file" in r.getMessage()]
    assert len(warnings) == 1 and "chat" in warnings[0] and field in warnings[0], warnings


async def test_state_file_route_that_is_not_an_object_is_skipped(
        proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    app = await proxy.start()
    await proxy.stop(app)
    proxy.state.write_bytes(orjson.dumps({"version": 1, "routes": {"chat": [1]}}))
    with caplog.at_level(logging.WARNING):
        app = await proxy.start()
    assert (await proxy.route(app))["state"] == "canary"
    warnings = [r.getMessage() for r in caplog.records if "state file" in r.getMessage()]
    assert len(warnings) == 1 and "chat" in warnings[0], warnings
