"""The admin client against a real local HTTP server playing the admin API (SPEC §8) with
canned ROUTE/EVENT JSON; the real admin app is tested in its own module."""

from __future__ import annotations

import asyncio
import copy
import datetime
import io
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.cli.admin_client import AdminClient, AdminError
from proxy.cli.commands import describe, run_verb, status
from proxy.cli.status_table import compute_rates, render_status

NOW = datetime.datetime(2025, 6, 1, 12, 0, 0, tzinfo=datetime.UTC)


def make_routes() -> list[dict[str, Any]]:
    return [
        {
            "name": "chat",
            "state": "canary",
            "configured_weight": 25.0,
            "effective_weight": 25.0,
            "upstreams": {
                "llama-b": {"role": "canary", "healthy": True, "requests": 40, "failures": 3,
                            "error_rate": 7.5, "p50_ms": 120.4, "p99_ms": 980.0, "in_flight": 2},
                "llama-a": {"role": "stable", "healthy": None, "requests": 120, "failures": 0,
                            "error_rate": 0.0, "p50_ms": 88.0, "p99_ms": 310.2, "in_flight": 5},
            },
            "sticky_sessions": 12,
            "last_event": {"time": "2025-06-01T11:59:30.000Z", "route": "chat", "kind": "step",
                           "actor": "auto", "reason": "healthy window: weight 25%",
                           "figures": {}},
        },
        {
            "name": "embed",
            "state": "rolled_back",
            "configured_weight": 10.0,
            "effective_weight": 0.0,
            "upstreams": {
                "embed-v1": {"role": "stable", "healthy": True, "requests": 0, "failures": 0,
                             "error_rate": 0.0, "p50_ms": None, "p99_ms": None, "in_flight": 0},
                "embed-v2": {"role": "canary", "healthy": False, "requests": 30, "failures": 9,
                             "error_rate": 30.0, "p50_ms": 5.25, "p99_ms": 40.0, "in_flight": 0},
            },
            "sticky_sessions": 0,
            "last_event": {"time": "2025-06-01T11:58:55.000Z", "route": "embed",
                           "kind": "rollback", "actor": "auto",
                           "reason": "error rate 30.0% > 5.0%", "figures": {"requests": 30}},
        },
    ]


@dataclass
class FakeAdmin:
    """State of the fake peer: what it received, and what it answers."""

    token: str = ""
    routes: list[dict[str, Any]] = field(default_factory=make_routes)
    seen: list[dict[str, Any]] = field(default_factory=list)
    scrapes: int = 0

    def find(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.routes if r["name"] == name), None)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> None:
            raw = await request.read()
            self.seen.append({
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "body": orjson.loads(raw) if raw else None,
                "auth": request.headers.get("Authorization"),
            })

        def ok(data: Any, status: int = 200) -> web.Response:
            return web.json_response(data, status=status, dumps=lambda d: orjson.dumps(d).decode())

        async def routes(request: web.Request) -> web.Response:
            await record(request)
            return ok({"routes": self.routes})

        async def route(request: web.Request) -> web.Response:
            await record(request)
            name = request.match_info["name"]
            if name == "broken":
                return web.Response(status=500, text="kaboom\n")
            if name == "slow":
                await asyncio.sleep(5)
            found = self.find(name)
            return ok(found) if found else ok({"error": f"unknown route {name!r}"}, 404)

        async def events(request: web.Request) -> web.Response:
            await record(request)
            return ok({"events": [r["last_event"] for r in self.routes]})

        async def readyz(request: web.Request) -> web.Response:
            await record(request)
            return ok({"status": "draining", "upstreams": {}, "redis": None}, 503)

        async def metrics(request: web.Request) -> web.Response:
            self.scrapes += 1
            n = 100 * self.scrapes
            text = (
                "# HELP flipback_requests_total Proxied requests\n"
                "# TYPE flipback_requests_total counter\n"
                f'flipback_requests_total{{route="chat",upstream="llama-a",role="stable",'
                f'outcome="2xx"}} {3 * n}\n'
                f'flipback_requests_total{{route="chat",upstream="llama-a",role="stable",'
                f'outcome="5xx"}} {n}\n'
                f'flipback_requests_total{{route="chat",upstream="llama-b",role="canary",'
                f'outcome="2xx"}} {n}\n'
            )
            return web.Response(text=text, content_type="text/plain")

        async def action(request: web.Request) -> web.Response:
            await record(request)
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                return ok({"error": "unauthorized: a valid bearer token is needed"}, 401)
            name, verb = request.match_info["name"], request.match_info["verb"]
            if name == "crash":
                return ok({"error": "state file not writable"}, 500)
            route = self.find(name)
            if route is None:
                return ok({"error": f"unknown route {name!r}"}, 404)
            body = self.seen[-1]["body"] or {}
            if verb == "weight" and not 0 <= body.get("weight", -1) <= 100:
                return ok({"error": "weight must be 0-100"}, 400)
            updated = copy.deepcopy(route)
            if verb == "rollback":
                updated["state"], updated["effective_weight"] = "rolled_back", 0.0
                updated["last_event"] = {"time": "2025-06-01T12:00:00Z", "route": name,
                                         "kind": "rollback", "actor": "admin",
                                         "reason": body.get("reason", "manual"), "figures": {}}
            if verb == "weight":
                updated["effective_weight"] = float(body["weight"])
            if verb == "kill":
                return ok({"ok": True})  # an admin that does not echo the ROUTE
            return ok(updated)

        app = web.Application()
        app.router.add_get("/routes", routes)
        app.router.add_get("/routes/{name}", route)
        app.router.add_get("/events", events)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/routes/{name}/{verb}", action)
        return app


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeAdmin, str]:
    admin = FakeAdmin(token="s3cret")
    server = await aiohttp_server(admin.app())
    return admin, str(server.make_url("")).rstrip("/")


@pytest.fixture
def dead_url(unused_tcp_port: int) -> str:
    return f"http://127.0.0.1:{unused_tcp_port}"


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# AdminClient


async def test_client_gets_routes_route_events_readyz(fake: tuple[FakeAdmin, str]) -> None:
    admin, url = fake
    async with AdminClient(url) as client:
        routes = await client.routes()
        chat = await client.route("chat")
        events = await client.events(limit=5, route="embed")
        ready = await client.readyz()
    assert [r["name"] for r in routes] == ["chat", "embed"]
    assert chat["upstreams"]["llama-b"]["role"] == "canary"
    assert events[1]["kind"] == "rollback"
    assert ready["status"] == "draining"  # a 503 readiness body is an answer
    assert [(s["method"], s["path"]) for s in admin.seen] == [
        ("GET", "/routes"), ("GET", "/routes/chat"), ("GET", "/events"), ("GET", "/readyz")]
    assert admin.seen[2]["query"] == {"limit": "5", "route": "embed"}
    assert all(s["auth"] is None for s in admin.seen)


async def test_client_posts_bodies_with_bearer_token(fake: tuple[FakeAdmin, str]) -> None:
    admin, url = fake
    async with AdminClient(url.removeprefix("http://"), "s3cret") as client:
        rolled = await client.rollback("chat", "bad answers")
        await client.rollback("chat")
        await client.promote("chat")
        await client.weight("chat", 25.0)
        await client.weight("chat", 12.5)
        await client.resume("chat")
        await client.kill("chat", True)
    assert rolled["state"] == "rolled_back"
    assert [(s["path"], s["body"]) for s in admin.seen] == [
        ("/routes/chat/rollback", {"reason": "bad answers"}),
        ("/routes/chat/rollback", {}),
        ("/routes/chat/promote", {}),
        ("/routes/chat/weight", {"weight": 25}),
        ("/routes/chat/weight", {"weight": 12.5}),
        ("/routes/chat/resume", {}),
        ("/routes/chat/kill", {"enabled": True}),
    ]
    assert {s["method"] for s in admin.seen} == {"POST"}
    assert {s["auth"] for s in admin.seen} == {"Bearer s3cret"}


async def test_client_quotes_route_names(fake: tuple[FakeAdmin, str]) -> None:
    admin, url = fake
    async with AdminClient(url) as client:
        with pytest.raises(AdminError) as err:
            await client.route("a/b c")
    assert err.value.status == 404 and err.value.message == "unknown route 'a/b c'"
    assert admin.seen[0]["path"] == "/routes/a/b c"  # one path segment, decoded by the server


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "unauthorized: set FLIPBACK_ADMIN_TOKEN"),
     ("wrong", "unauthorized: FLIPBACK_ADMIN_TOKEN was rejected")],
)
async def test_client_maps_401(fake: tuple[FakeAdmin, str], token: str | None,
                               message: str) -> None:
    _, url = fake
    async with AdminClient(url, token) as client:
        with pytest.raises(AdminError) as err:
            await client.promote("chat")
    assert (err.value.message, err.value.status, err.value.exit_code) == (message, 401, 2)


async def test_client_maps_json_and_text_errors(fake: tuple[FakeAdmin, str]) -> None:
    _, url = fake
    async with AdminClient(url, "s3cret") as client:
        with pytest.raises(AdminError) as bad:
            await client.weight("chat", 150)
        with pytest.raises(AdminError) as crash:
            await client.resume("crash")
        with pytest.raises(AdminError) as text:
            await client.route("broken")
    assert (bad.value.message, bad.value.exit_code) == ("weight must be 0-100", 2)
    assert (crash.value.message, crash.value.exit_code) == ("state file not writable", 1)
    assert text.value.message == "HTTP 500 Internal Server Error: kaboom"
    assert text.value.exit_code == 1


async def test_client_connection_refused(dead_url: str) -> None:
    async with AdminClient(dead_url) as client:
        with pytest.raises(AdminError) as err:
            await client.routes()
    assert str(err.value) == f"cannot reach flipback admin at {dead_url}: connection refused"
    assert err.value.status is None and err.value.exit_code == 1


async def test_client_timeout(fake: tuple[FakeAdmin, str]) -> None:
    _, url = fake
    async with AdminClient(url, timeout=0.2) as client:
        with pytest.raises(AdminError) as err:
            await client.route("slow")
    assert str(err.value) == f"cannot reach flipback admin at {url}: no answer within 0.2s"


async def test_client_request_counts_sum_per_route_and_upstream(
    fake: tuple[FakeAdmin, str],
) -> None:
    _, url = fake
    async with AdminClient(url) as client:
        counts = await client.request_counts()
    assert counts == {("chat", "llama-a"): 400.0, ("chat", "llama-b"): 100.0}


def test_compute_rates_counts_new_series_from_zero_and_skips_resets() -> None:
    before = {("r", "a"): 100.0, ("r", "b"): 50.0}
    after = {("r", "a"): 150.0, ("r", "b"): 10.0, ("r", "c"): 5.0}
    assert compute_rates(before, after, 2.0) == {("r", "a"): 25.0, ("r", "c"): 2.5}
    assert compute_rates(before, after, 0.0) == {}


# render_status


def test_render_status_shows_states_weights_and_last_events() -> None:
    text = render_status(make_routes(), None, 100, now=NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["ROUTE", "STATE", "WEIGHT", "UPSTREAM", "ROLE", "HEALTHY",
                                "REQ/S", "ERR%", "P50ms", "P99ms", "INFL"]
    assert lines[1].split() == ["chat", "canary", "25%", "llama-a", "stable", "-", "-", "0.0",
                                "88", "310", "5"]  # stable first
    assert lines[2].split() == ["llama-b", "canary", "yes", "-", "7.5", "120", "980", "2"]
    assert lines[3] == "  last: step by auto, 30s ago: healthy window: weight 25%"
    assert lines[4].split()[:4] == ["embed", "rolled_back", "0%", "(cfg"]
    assert "10%)" in lines[4]
    assert lines[5].split()[:3] == ["embed-v2", "canary", "no"]
    assert lines[5].split()[4:7] == ["30.0", "5.2", "40"]
    assert lines[6] == "  last: rollback by auto, 1m05s ago: error rate 30.0% > 5.0%"
    assert "\x1b" not in text and max(map(len, lines)) <= 100


def test_render_status_rates_colors_and_narrow_width() -> None:
    routes = make_routes()
    routes[0]["name"] = "a-very-long-route-name-that-does-not-fit"
    routes[1]["last_event"] = None
    rates = {(routes[0]["name"], "llama-b"): 12.34, (routes[0]["name"], "llama-a"): 250.0}
    text = render_status(routes, rates, 80, color=True, now=NOW)
    plain = text.replace("\x1b[32m", "").replace("\x1b[31m", "").replace("\x1b[0m", "")
    assert "\x1b[32mcanary\x1b[0m" in text and "\x1b[31mrolled_back\x1b[0m" in text
    assert max(map(len, plain.splitlines())) <= 80
    lines = plain.splitlines()  # names give way, every figure column stays
    assert lines[0].endswith("INFL") and lines[1].startswith("a-ve… canary")
    assert lines[2].split()[:2] == ["llama…", "canary"] and lines[2].endswith(" 2")
    assert " 12 " in plain and " 250 " in plain
    assert "  last: no events" in plain
    assert render_status([], None, 100) == "no routes\n"


def test_describe_route_in_one_line() -> None:
    route = make_routes()[1]
    route["last_event"]["actor"], route["last_event"]["reason"] = "admin", "bad answers"
    assert describe(route) == "embed: rolled_back, weight 0% (cfg 10%) (admin: bad answers)"


# status


async def test_status_once(fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = fake
    assert await status(url, None, watch=False) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROUTE") and "rolled_back" in out and "flipback status" not in out


async def test_status_unreachable(dead_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await status(dead_url, None, watch=True, interval=0.01) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"flipback status: cannot reach flipback admin at {dead_url}: connection refused\n")


async def test_status_watch_plain_frames_compute_rates(fake: tuple[FakeAdmin, str]) -> None:
    _, url = fake
    out = io.StringIO()
    assert await status(url, None, watch=True, interval=0.05, out=out, max_frames=2) == 0
    text = out.getvalue()
    assert "\x1b" not in text
    frames = text.split("\n\nflipback status")
    assert len(frames) == 2 and text.startswith(f"flipback status  {url}")

    def req_s(frame: str, upstream: str) -> str:
        tokens = next(ln for ln in frame.splitlines() if upstream in ln.split()).split()
        return tokens[tokens.index(upstream) + 3]

    for frame in frames:  # the first frame too: it waits for a second reading
        assert req_s(frame, "embed-v2") == "0.0"  # no counter: no traffic
        canary, stable = float(req_s(frame, "llama-b")), float(req_s(frame, "llama-a"))
        assert canary > 0 and stable == pytest.approx(4 * canary, rel=0.05)


async def test_status_watch_tty_redraws_in_place(
    fake: tuple[FakeAdmin, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    _, url = fake
    out = TTY()
    assert await status(url, None, watch=True, interval=0.01, out=out, max_frames=2) == 0
    text = out.getvalue()
    assert text.startswith("\x1b[2J\x1b[H") and text.count("\x1b[H") == 2
    assert text.count("\x1b[2J") == 1 and text.endswith("\x1b[J")
    assert "\x1b[31mrolled_back\x1b[0m" in text


# run_verb


async def test_run_verb_prints_new_state(fake: tuple[FakeAdmin, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    admin, url = fake
    assert await run_verb(url, "s3cret", "rollback", "chat", "bad answers") == 0
    out = capsys.readouterr().out
    assert out == "chat: rolled_back, weight 0% (cfg 25%) (admin: bad answers)\n"
    assert await run_verb(url, "s3cret", "weight", "chat", "50") == 0
    assert capsys.readouterr().out.startswith("chat: canary, weight 50% (cfg 25%)")
    assert await run_verb(url, "s3cret", "kill", "chat", "on") == 0  # answers {"ok": true}
    assert capsys.readouterr().out.startswith("chat: canary, weight 25%")
    assert admin.seen[-2]["body"] == {"enabled": True}
    assert admin.seen[-1]["path"] == "/routes/chat"


@pytest.mark.parametrize(
    ("token", "verb", "route", "arg", "code", "err"),
    [
        (None, "promote", "chat", None, 2,
         "flipback promote: unauthorized: set FLIPBACK_ADMIN_TOKEN"),
        ("s3cret", "resume", "nope", None, 2, "flipback resume: unknown route 'nope'"),
        ("s3cret", "weight", "chat", 150, 2, "flipback weight: weight must be 0-100"),
        ("s3cret", "weight", "chat", "lots", 2,
         "flipback weight: weight must be a number from 0 to 100, got 'lots'"),
        ("s3cret", "kill", "chat", "maybe", 2, "flipback kill: kill takes on or off, got 'maybe'"),
        ("s3cret", "pause", "chat", None, 2, "flipback pause: unknown verb 'pause'"),
        ("s3cret", "rollback", "crash", None, 1, "flipback rollback: state file not writable"),
    ],
)
async def test_run_verb_errors(fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str],
                               token: str | None, verb: str, route: str, arg: Any, code: int,
                               err: str) -> None:
    _, url = fake
    assert await run_verb(url, token, verb, route, arg) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(err)
    assert captured.err.count("\n") == 1


async def test_run_verb_unreachable(dead_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_verb(dead_url, None, "promote", "chat") == 1
    assert capsys.readouterr().err == (
        f"flipback promote: cannot reach flipback admin at {dead_url}: connection refused\n")
