"""A scriptable toy model server: a real aiohttp server whose behaviour a test changes
while traffic flows (answer, fail with a status, hang, slow first byte, reset, stream
SSE, cut a stream midway)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Behaviour:
    mode: str = "ok"  # ok | status | hang | reset | sse | cut | slow_body
    status: int = 200
    delay: float = 0.0  # before the response headers
    events: int = 3  # SSE events
    event_gap: float = 0.0
    first_gap: float = 0.0  # sse chunks: a pause after the first chunk only
    body: bytes | None = None
    bodies: list[bytes] | None = None  # ok mode: request n answers bodies[n % len]
    extra_headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None  # sse: write exactly these chunks instead
    # ok mode: request n (counted from 0) answers pattern_status when pattern[n % len] is
    # "x" (a failure rate without randomness: "x.." is one request in three)
    pattern: str = ""
    pattern_status: int = 500


class FakeModel:
    """One upstream. ``behaviour`` may be replaced at any time; ``seen`` records requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.behaviour = Behaviour()
        self.seen: list[Seen] = []
        self.disconnects = 0
        self.health_status = 200
        self.health_probes = 0
        self.in_handler = 0
        self.server: Any = None
        self.started = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def count(self) -> int:
        return len(self.seen)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":  # probes are answered apart and not recorded
            self.health_probes += 1
            return web.Response(status=self.health_status, text="health")
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers),
                              list(request.raw_headers), body))
        self.started.set()
        b = self.behaviour
        status = b.status
        if b.pattern and b.pattern[(len(self.seen) - 1) % len(b.pattern)] == "x":
            status = b.pattern_status
        self.in_handler += 1
        try:
            if b.delay:
                await asyncio.sleep(b.delay)
            if b.mode == "hang":
                await asyncio.sleep(3600)
            if b.mode == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if b.mode in ("sse", "cut"):
                return await self._sse(request, b)
            if b.bodies:
                payload = b.bodies[(len(self.seen) - 1) % len(b.bodies)]
            elif b.body is not None:
                payload = b.body
            else:
                payload = orjson.dumps({
                    "model": self.name,
                    "choices": [{"finish_reason": "stop", "message": {"content": "hi"}}],
                    "echo_len": len(body),
                })
            resp = web.StreamResponse(status=status, headers=b.extra_headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload)
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        finally:
            self.in_handler -= 1

    async def _sse(self, request: web.Request, b: Behaviour) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if b.chunks is not None:
            for n, chunk in enumerate(b.chunks):
                await resp.write(chunk)
                if b.first_gap and n == 0:
                    await asyncio.sleep(b.first_gap)  # not a wait: a slow first token
                if b.event_gap:
                    await asyncio.sleep(b.event_gap)
            await resp.write_eof()
            return resp
        for i in range(b.events):
            await resp.write(b"data: " + orjson.dumps({"i": i, "model": self.name}) + b"\n\n")
            if b.mode == "cut" and i == b.events // 2:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if b.event_gap:
                await asyncio.sleep(b.event_gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
