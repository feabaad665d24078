"""``flipback status`` and the admin verbs against a real flipback: one-shot rates under
load, the shadow and its mismatch rate, a refused reload until the next good one, the
readiness wait, the kill verb's line; and the ROUTE and /events additions they read."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import commands
from proxy.cli.main import main
from proxy.config.parser import load_config
from proxy.server import App
from tests.conftest import Running
from tests.waiting import wait_until

SHADOWED = """
upstreams:
  v1: {{url: "{v1}", version: "1.0"}}
  v2: {{url: "{v2}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 20}}
    shadow:
      upstream: v3
      sample: 100
      compare: {{status: true, json_paths: [model], record: null}}
"""


def row(text: str, upstream: str) -> list[str]:
    """The cells of the table row of ``upstream`` (VERSION shown: it is set for v1)."""
    return next(ln for ln in text.splitlines() if upstream in ln.split()).split()


@contextlib.asynccontextmanager
async def load(fb: Running, every: float = 0.01) -> AsyncIterator[list[int]]:
    """Requests one after another every ``every`` seconds while the block runs."""
    statuses: list[int] = []

    async def send() -> None:
        while True:
            async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(every)  # not a wait: the load's pace

    task = asyncio.ensure_future(send())
    try:
        yield statuses
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_status_once_shows_rates_shadow_and_versions_under_load(model, flipback):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    fb = await flipback(SHADOWED, v1=v1.url, v2=v2.url, v3=v3.url)
    out = io.StringIO()
    async with load(fb) as statuses:
        assert await commands.status(fb.admin, None, watch=False, interval=0.5, out=out) == 0
    assert statuses and set(statuses) == {200}
    text = out.getvalue()
    header = text.splitlines()[0].split()
    assert header[3:6] == ["UPSTREAM", "VERSION", "ROLE"]
    stable, canary, shadow = row(text, "v1"), row(text, "v2"), row(text, "v3")
    assert stable[:6] == ["chat", "canary", "20%", "v1", "1.0", "stable"]
    assert canary[:2] == ["v2", "canary"] and shadow[:2] == ["v3", "shadow"]
    # one shot, yet a rate: two readings of the counters half a second apart
    assert float(stable[7]) > 0 and float(shadow[3]) > 0
    assert float(shadow[3]) == pytest.approx(float(stable[7]) + float(canary[3]), rel=0.5)
    note = next(ln for ln in text.splitlines() if ln.startswith("  shadow: "))
    assert note.startswith("  shadow: v3, 100% mirrored: mismatches status 0.0%, body 100.0% of ")
    assert note.endswith(" compared since start")


async def test_route_view_carries_the_shadow_and_versions(model, flipback):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    fb = await flipback(SHADOWED, v1=v1.url, v2=v2.url, v3=v3.url)
    async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
        assert resp.status == 200
    route: dict = {}

    async def compared() -> bool:  # the copy is compared once both sides ended
        nonlocal route
        route = await fb.get_json("/routes/chat")
        return bool(route["shadow"]["compared"])

    await wait_until(compared, interval=0.01, what="the shadow copy to be compared")
    shadow = route["shadow"]
    assert shadow["upstream"] == "v3" and shadow["sample"] == 100 and shadow["by"] == "request"
    assert shadow["copies"]["sent"] == 1 and shadow["compared"] == 1
    assert shadow["mismatches"] == {"status": 0, "body": 1}
    assert route["upstreams"]["v1"]["version"] == "1.0"
    assert route["upstreams"]["v2"]["version"] is None
    # every field the admin had before is still there, unchanged
    assert {"name", "state", "configured_weight", "effective_weight", "upstreams",
            "sticky_sessions", "last_event", "latch"} <= set(route)


async def test_status_shows_a_refused_reload_until_a_good_one(model, tmp_path: Path):
    v1 = await model("v1")
    good = f"""\
server: {{listen: "127.0.0.1:0"}}
admin: {{listen: "127.0.0.1:0"}}
state: {{file: {tmp_path / "state.json"}}}
upstreams:
  v1: {{url: "{v1.url}"}}
routes:
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
"""
    path = tmp_path / "flipback.yaml"
    path.write_text(good)
    app = App(load_config(str(path)), str(path))
    await app.start()
    admin = f"http://127.0.0.1:{app.admin_port}"
    try:
        async with aiohttp.ClientSession() as s:
            path.write_text(good.replace("stable: v1", "stable: nope"))
            async with s.post(admin + "/reload", json={}) as resp:
                assert resp.status == 400
            out = io.StringIO()
            assert await commands.status(admin, None, watch=False, interval=0.01, out=out) == 0
            text = out.getvalue()
            said = " ".join(text[text.index("config: reload refused "):].split())
            assert "the previous config still serves: " in said
            assert "routes[0].stable: unknown upstream 'nope'" in said
            assert f"{path}:9:" in text.replace("\n  ", "")  # a long path may be broken
            # the filter finds it however many route events came after
            async with s.get(admin + "/events", params={"kind": "reload_refused,reload",
                                                        "limit": "1"}) as resp:
                (event,) = (await resp.json())["events"]
            assert event["kind"] == "reload_refused"
            path.write_text(good.replace('match: {path_prefix: "/"}',
                                         'match: {path_prefix: "/x"}'))
            async with s.post(admin + "/reload", json={}) as resp:
                assert resp.status == 200
            out = io.StringIO()
            assert await commands.status(admin, None, watch=False, interval=0.01, out=out) == 0
            assert "config:" not in out.getvalue()
    finally:
        await app.aclose()


async def test_status_wait_until_ready_or_says_why(model, flipback, unused_tcp_port, capsys):
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await commands.status(dead, None, watch=False, wait=0.3) == 1
    assert 0.25 < loop.time() - t0 < 3
    err = capsys.readouterr().err
    assert err == (f"flipback status: not ready within 0.3s: cannot reach flipback admin at "
                   f"{dead}: connection refused\n")
    v1 = await model("v1")
    fb = await flipback("""
upstreams:
  v1: {{url: "{v1}"}}
routes:
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
""", v1=v1.url)
    out = io.StringIO()
    assert await commands.status(fb.admin, None, watch=False, wait=5, interval=0.01,
                                 out=out) == 0
    assert row(out.getvalue(), "v1")[:4] == ["plain", "stable", "-", "v1"]  # no canary: "-"


def test_status_wait_takes_a_duration(capsys):
    with pytest.raises(SystemExit) as info:
        main(["status", "--wait", "soon"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("flipback: argument --wait: expected a duration like "
                                       "'250ms', '10s', '1m' or '1h', got 'soon'\n")


async def test_kill_verb_says_the_route_answers_its_kill_switch(model, flipback, capsys):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback("""
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 50}}
""", v1=v1.url, v2=v2.url)
    assert await commands.run_verb(fb.admin, None, "kill", "chat", True) == 0
    line = capsys.readouterr().out
    assert line.startswith("chat: killed: answers its kill_switch response, calls no upstream")
    assert "weight" not in line
    async with fb.session.get(fb.url + "/x") as resp:
        assert resp.status == 503 and resp.headers["x-flipback-upstream"] == "kill_switch"
    assert await commands.run_verb(fb.admin, None, "kill", "chat", False) == 0
    assert capsys.readouterr().out.startswith("chat: canary, weight 50%")


def test_render_status_shadow_row_and_notes_versions_and_a_refused_reload():
    import datetime

    from proxy.cli.status_table import ROUTE_NOTES, render_status

    now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    route = {
        "name": "chat", "state": "canary", "configured_weight": 10.0, "effective_weight": 10.0,
        "upstreams": {"a": {"role": "stable", "requests": 10, "failures": 0, "p50_ms": 20.0,
                            "p99_ms": 30.0, "in_flight": 1, "version": "7"}},
        "last_event": None,
        "shadow": {"upstream": "s", "version": None, "healthy": None, "sample": 10.0,
                   "by": "request", "in_flight": 2,
                   "copies": {"sent": 400, "dropped": 3, "skipped_body": 0, "error": 1,
                              "timeout": 1},
                   "compared": 400, "mismatches": {"status": 2, "body": 10}},
    }
    reload = {"time": "2026-01-01T11:58:00.000Z", "kind": "reload_refused",
              "reason": "cfg.yaml:3: routes[0].stable: " + "x" * 150}
    lines = render_status([route], {("chat", "s"): 4.0}, 100, now=now,
                          reload=reload).splitlines()
    assert lines[0].split()[3:6] == ["UPSTREAM", "VERSION", "ROLE"]
    assert lines[2].split() == ["s", "shadow", "-", "4.0", "-", "-", "-", "2"]
    assert lines[3] == "  last: no events"
    assert lines[4] + lines[5][3:] == (
        "  shadow: s, 10% mirrored: mismatches status 0.5%, body 2.5% of 400 compared since "
        "start, 3 dropped, 2 failed")  # a note wraps, at most once
    assert lines[6].startswith("config: reload refused 2m00s ago, the previous config still "
                               "serves: cfg.yaml:3:")
    assert lines[7].startswith("  ") and max(map(len, lines)) <= 100
    assert len(ROUTE_NOTES) == 5  # last event, judge, guards, shadow, progressive
    # without versions the column goes; without compare the shadow says so
    route["upstreams"]["a"]["version"] = None
    route["shadow"] |= {"compared": None, "mismatches": None}
    text = render_status([route], None, 100, now=now,
                         reload={"kind": "reload", "time": "2026-01-01T11:59:00Z"})
    assert "VERSION" not in text and "config:" not in text
    assert "  shadow: s, 10% mirrored, 400 answered (not compared), 3 dropped, 2 failed" in text


def test_describe_a_killed_route_and_one_without_canary():
    from proxy.cli.commands import describe

    killed = {"name": "chat", "state": "killed", "effective_weight": 50.0,
              "configured_weight": 50.0,
              "upstreams": {"a": {"role": "stable"}, "b": {"role": "canary"}},
              "last_event": {"actor": "admin", "reason": "kill switch on"}}
    assert describe(killed) == ("chat: killed: answers its kill_switch response, calls no "
                                "upstream (admin: kill switch on)")
    plain = {"name": "predict", "state": "stable", "effective_weight": 0.0,
             "configured_weight": 0.0, "upstreams": {"small": {"role": "stable"}}}
    assert describe(plain) == "predict: stable"
