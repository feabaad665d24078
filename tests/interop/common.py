"""The checks every interop server goes through, written once: each ``test_<server>.py``
describes its server as a ``Case`` (requests in that server's own protocol, its readiness
path, how its answers differ between two versions) and calls these."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.interop.servers import ServerProcess, free_port
from tests.interop.wire import StartFlipback, Tap

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
              b"te", b"trailer", b"transfer-encoding", b"upgrade"}
MIB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


@dataclass
class Req:
    path: str
    body: bytes
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))

    @staticmethod
    def json(path: str, doc: Any) -> Req:
        return Req(path, json.dumps(doc).encode())


@dataclass
class Case:
    """One model server kind: three instances (stable; canary, a different version; spare,
    a copy of stable that the kill test may kill) and requests in its protocol."""

    stable: ServerProcess
    canary: ServerProcess
    spare: ServerProcess
    json_req: Req
    sse_req: Req | None
    shadow_agree: Req  # both versions answer alike
    shadow_differ: Req  # the two versions answer differently
    json_paths: list[str]
    big_req: Callable[[int], Req]  # a valid request whose body is exactly that many bytes
    ready_path: str


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    def all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == key]


async def send(session: aiohttp.ClientSession, base: str, req: Req,
               headers: dict[str, str] | None = None) -> Answer:
    # aiohttp warns on big bytes bodies; a BytesIO is sent the same (Content-Length).
    data = io.BytesIO(req.body) if len(req.body) > MIB else req.body
    async with session.request(req.method, base + req.path, data=data,
                               headers={**req.headers, **(headers or {})}) as resp:
        body = await resp.read()
        return Answer(resp.status, list(resp.raw_headers), body)


def upstreams(**urls: str) -> dict[str, Any]:
    return {name: {"url": url} for name, url in urls.items()}


def plain_route(stable_url: str, **route: Any) -> dict[str, Any]:
    """A config with one route, ``r``, matching every path, stable on ``stable_url``."""
    return {"upstreams": upstreams(stable=stable_url),
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "stable": "stable",
                        **route}]}


async def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll an async-or-sync predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def assert_same_as_upstream(client: Answer, tap: Tap, sent: Req, index: int = -1) -> None:
    """What the client got is what the server sent, byte for byte: status, every end-to-end
    header, body (transfer coding aside); and the server got what the client sent."""
    up = tap.responses()[index]
    assert up.complete, "the server's response did not end on the tapped connection"
    assert client.status == up.status
    assert client.body == bytes(up.body), (
        f"body differs: client {len(client.body)} bytes, server sent {len(up.body)}")
    client_headers = [(k.lower(), v) for k, v in client.headers]
    for name, value in up.headers:
        if name.lower() in HOP_BY_HOP or name.lower() == b"content-length":
            continue
        assert (name.lower(), value) in client_headers, f"header {name!r}: {value!r} lost"
    assert client.header("x-flipback-upstream") is not None
    got = tap.requests()[index]
    assert bytes(got.body) == sent.body, "the server did not get the client's body as sent"
    request_id = got.header("x-request-id")
    assert request_id is not None and UUID4.match(request_id), request_id
    assert request_id in client.all("x-request-id")


# -- the checks ---------------------------------------------------------------------


async def json_byte_for_byte(flipback: StartFlipback, tap: Callable[..., Any],
                             case: Case) -> Answer:
    t = await tap(case.stable.port)
    fb = await flipback(plain_route(t.url))
    answer = await send(fb.session, fb.url, case.json_req)
    assert answer.status == 200, answer.body[:500]
    assert_same_as_upstream(answer, t, case.json_req)
    assert answer.header("x-flipback-upstream") == "stable"
    return answer


async def sse_byte_for_byte(flipback: StartFlipback, tap: Callable[..., Any],
                            case: Case) -> tuple[Answer, int]:
    """Returns the answer and how many separate reads the client's body took."""
    assert case.sse_req is not None
    t = await tap(case.stable.port)
    fb = await flipback(plain_route(t.url))
    req = case.sse_req
    pieces = 0
    body = bytearray()
    async with fb.session.request(req.method, fb.url + req.path, data=req.body,
                                  headers=req.headers) as resp:
        async for chunk in resp.content.iter_any():
            pieces += 1
            body += chunk
        answer = Answer(resp.status, list(resp.raw_headers), bytes(body))
    assert answer.status == 200, answer.body[:500]
    assert (answer.header("content-type") or "").startswith("text/event-stream")
    assert_same_as_upstream(answer, t, req)
    return answer, pieces


async def health_on_readiness_path(flipback: StartFlipback, case: Case) -> None:
    """Probes on the server's own readiness path: both versions healthy; and a canary
    whose server is not there is never ready and never takes a request."""
    health = {"path": case.ready_path, "interval": "200ms", "timeout": "2s"}
    cfg = {"upstreams": {"stable": {"url": case.stable.url, "health": health},
                         "canary": {"url": case.canary.url, "health": health}},
           "routes": [{"name": "r", "match": {"path_prefix": "/"}, "stable": "stable",
                       "canary": {"upstream": "canary", "weight": 50}}]}
    fb = await flipback(cfg)

    async def both_healthy() -> bool:
        ups = (await fb.route())["upstreams"]
        return bool(ups["stable"]["healthy"] is True and ups["canary"]["healthy"] is True)

    await wait_for("both upstreams healthy", both_healthy)
    ready = await fb.get_json("/readyz")
    assert ready["upstreams"] == {"stable": {"healthy": True}, "canary": {"healthy": True}}
    assert (await fb.route())["state"] == "canary"

    dead = f"http://127.0.0.1:{free_port()}"
    cfg["upstreams"]["canary"]["url"] = dead
    fb2 = await flipback(cfg)
    seen = [(await send(fb2.session, fb2.url, case.json_req)) for _ in range(10)]
    assert [a.status for a in seen] == [200] * 10
    assert {a.header("x-flipback-upstream") for a in seen} == {"stable"}

    async def canary_down() -> bool:
        return (await fb2.route())["upstreams"]["canary"]["healthy"] is False

    await wait_for("the absent canary unhealthy", canary_down)
    route = await fb2.route()
    assert route["state"] == "waiting", route
    assert route["effective_weight"] == 0


async def canary_killed_mid_run(flipback: StartFlipback, case: Case, req: Req,
                                total: int = 160, workers: int = 4) -> dict[str, Any]:
    """stable + canary at 50%, a bounded stream of requests from ``workers`` clients; the
    canary's process group is SIGKILLed once it has answered a few: no client error, and
    the route latches rolled_back. Returns figures for the caller to assert on."""
    cfg = {"upstreams": upstreams(stable=case.stable.url, canary=case.spare.url),
           "routes": [{"name": "r", "match": {"path_prefix": "/"}, "stable": "stable",
                       "canary": {"upstream": "canary", "weight": 50},
                       "retry_canary_on_stable": True,
                       "rollback": {"window": "10s", "min_requests": 5, "max_error_rate": 5,
                                    "consecutive_failures": 3, "max_p99": "30s"}}]}
    fb = await flipback(cfg)
    results: list[Answer] = []
    errors: list[str] = []
    killed_at: list[int] = []
    sent = 0
    deadline = time.monotonic() + 90

    async def worker() -> None:
        nonlocal sent
        while sent < total and time.monotonic() < deadline:
            sent += 1
            try:
                answer = await send(fb.session, fb.url, req)
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(repr(exc))
                continue
            results.append(answer)
            if answer.status != 200:
                errors.append(f"{answer.status} {answer.body[:200]!r}")
            on_canary = sum(a.header("x-flipback-upstream") == "canary" for a in results)
            if not killed_at and on_canary >= 5:
                killed_at.append(len(results))
                case.spare.kill()

    await asyncio.gather(*(worker() for _ in range(workers)))
    assert killed_at, "the canary never answered 5 requests"
    # A canary dying between its head and its body is retried too (the head is held
    # while a retry is possible): no client error at all.
    assert errors == [], errors[:5]
    route = await fb.route()
    assert route["state"] == "rolled_back", route
    assert len(results) == total
    after = results[killed_at[0] + 30:]  # the flip takes a few canary failures
    assert {a.header("x-flipback-upstream") for a in after} == {"stable"}
    return {"route": route, "retried": sum(bool(a.header("x-flipback-retried-from"))
                                          for a in results),
            "killed_after": killed_at[0]}


async def shadow_compare(flipback: StartFlipback, case: Case, tmp_path: Path,
                         n: int = 3) -> list[dict[str, Any]]:
    """stable answers, the canary version is the shadow; compare the listed JSON paths of
    the real answers. ``n`` agreeing and ``n`` differing requests: only the differing
    ones are recorded, under the client's request id. Returns the records."""
    record = tmp_path / "diffs.jsonl"
    cfg = {"upstreams": upstreams(stable=case.stable.url, shadow=case.canary.url),
           "routes": [{"name": "r", "match": {"path_prefix": "/"}, "stable": "stable",
                       "shadow": {"upstream": "shadow", "sample": 100, "timeout": "30s",
                                  "compare": {"status": True, "json_paths": case.json_paths,
                                              "record": str(record)}}}]}
    fb = await flipback(cfg)
    differ_ids = []
    for _ in range(n):
        agree = await send(fb.session, fb.url, case.shadow_agree)
        assert agree.status == 200, agree.body[:300]
        differ = await send(fb.session, fb.url, case.shadow_differ)
        assert differ.status == 200, differ.body[:300]
        differ_ids.append(differ.header("x-request-id"))
    await wait_for("every shadow copy sent",
                   lambda: fb.metric("flipback_shadow_total", route="r", outcome="sent") == 2 * n)

    def lines() -> list[dict[str, Any]]:
        if not record.exists():
            return []
        return [json.loads(line) for line in record.read_text().splitlines()]

    await wait_for("the mismatch records", lambda: len(lines()) >= n, timeout=5)
    await asyncio.sleep(0.3)  # nothing more should come
    recs = lines()
    assert fb.metric("flipback_shadow_mismatch_total", route="r", kind="status") == 0
    assert fb.metric("flipback_shadow_mismatch_total", route="r", kind="body") == n
    assert sorted(r["request_id"] for r in recs) == sorted(differ_ids), (recs, differ_ids)
    for r in recs:
        assert r["mismatch"] == ["body"]
        assert r["primary"]["upstream"] == "stable" and r["shadow"]["upstream"] == "shadow"
    return recs


async def keepalive_reuse(flipback: StartFlipback, tap: Callable[..., Any], case: Case,
                          sequential: int = 40, concurrent: int = 40,
                          width: int = 4) -> Tap:
    """``sequential`` requests one after another, then ``concurrent`` of them ``width`` at
    a time: flipback opens at most ``width`` connections to the server in all."""
    t = await tap(case.stable.port)
    fb = await flipback(plain_route(t.url))
    for _ in range(sequential):
        assert (await send(fb.session, fb.url, case.json_req)).status == 200
    assert t.connections == 1, t.connections
    sem = asyncio.Semaphore(width)

    async def one() -> int:
        async with sem:
            return (await send(fb.session, fb.url, case.json_req)).status

    statuses = await asyncio.gather(*(one() for _ in range(concurrent)))
    assert statuses == [200] * concurrent
    assert len(t.responses()) == sequential + concurrent
    assert t.connections <= width, t.connections
    return t


async def server_closed_idle_connection(flipback: StartFlipback, tap: Callable[..., Any],
                                        case: Case, idle: float = 5.5) -> None:
    """uvicorn (under MLflow, MLServer and llama-cpp-python alike) closes a keep-alive
    connection idle for 5 s, far sooner than flipback's pool would: the next request,
    with a body too big to replay, must go on a new connection, not the closed one."""
    t = await tap(case.stable.port)
    fb = await flipback(plain_route(t.url))
    assert (await send(fb.session, fb.url, case.json_req)).status == 200
    await asyncio.sleep(idle)
    big = case.big_req(2 * MIB)  # over inspect_body (1 MiB): streamed, never replayed
    answer = await send(fb.session, fb.url, big)
    assert answer.status == 200, answer.body[:300]
    assert t.connections == 2


async def gzip_body(flipback: StartFlipback, tap: Callable[..., Any],
                    case: Case) -> tuple[Answer, Answer]:
    """A ``Content-Encoding: gzip`` request body reaches the server compressed and
    labelled, byte for byte, and the client gets the server's own answer to it (the same
    as sent directly). Returns (through flipback, direct)."""
    raw = case.json_req
    req = Req(raw.path, gzip.compress(raw.body, mtime=0),
              headers={**raw.headers, "Content-Encoding": "gzip"})
    t = await tap(case.stable.port)
    fb = await flipback(plain_route(t.url))
    through = await send(fb.session, fb.url, req)
    got = t.requests()[-1]
    assert got.header("content-encoding") == "gzip"
    assert got.header("content-length") == str(len(req.body))
    assert_same_as_upstream(through, t, req)
    direct = await send(fb.session, case.stable.url, req)
    assert direct.status == through.status
    return through, direct


async def large_bodies(flipback: StartFlipback, tap: Callable[..., Any], case: Case,
                       size: int = 10 * MIB) -> Answer:
    """A ``size`` request body (the default ``max_body``) passes whole, byte for byte, and
    so does the answer; one byte more is flipback's own 413, and never reaches the server."""
    t = await tap(case.stable.port)
    fb = await flipback(plain_route(t.url))
    req = case.big_req(size)
    assert len(req.body) == size
    answer = await send(fb.session, fb.url, req)
    assert answer.status == 200, answer.body[:500]
    assert_same_as_upstream(answer, t, req)
    over = Req(req.path, req.body + b" ", headers=req.headers)
    refused = await send(fb.session, fb.url, over)
    assert refused.status == 413
    assert json.loads(refused.body)["error"]
    assert len(t.requests()) == 1
    return answer
