"""Baseline: the least a Python (aiohttp + uvloop) weighted reverse proxy does; no features.

python loadtests/minimal_proxy.py --port 8080 --upstream URL1 --canary URL2 --weight 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDictProxy

# Host and Content-Length are set again by the client and by the StreamResponse.
HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ]
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def strip(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    listed = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    return [
        (k, v)
        for k, v in headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in listed
    ]


def make_app(upstream: str, canary: str, weight: float) -> web.Application:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=512)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as app[SESSION]:
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        base = canary if random.random() * 100 < weight else upstream
        body = request.content if request.body_exists else None
        resp: web.StreamResponse | None = None
        try:
            async with request.app[SESSION].request(
                request.method,
                base + request.path_qs,
                headers=strip(request.headers),
                data=body,
                allow_redirects=False,
            ) as up:
                resp = web.StreamResponse(status=up.status, headers=strip(up.headers))
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientError:
            if resp is not None and resp.prepared:
                raise  # the client went away mid-stream, or the upstream broke it
            return web.json_response({"error": "upstream failed"}, status=502)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--canary", required=True)
    p.add_argument("--weight", type=float, default=10.0, help="percent to the canary")
    a = p.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        make_app(a.upstream.rstrip("/"), a.canary.rstrip("/"), a.weight),
        host="127.0.0.1",
        port=a.port,
        access_log=None,
        print=None,
    )
