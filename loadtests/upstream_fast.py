"""A fast toy upstream: any method and path get a ~100-byte JSON 200, over HTTP/1.1 keep-alive.

A raw asyncio protocol with the httptools (llhttp) parser on uvloop, so that in overhead
measurements the upstream costs far less than the proxy in front of it. Request bodies
(Content-Length or chunked) are parsed and discarded; pipelining works.

    python loadtests/upstream_fast.py --port 9001 [--name stable] [--impl aiohttp]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import cast

import uvloop

try:
    import httptools
except ImportError:  # pragma: no cover - httptools is a flipback dependency
    httptools = None  # type: ignore[assignment]


def make_body(name: str) -> bytes:
    """The fixed JSON answer, ~100 bytes, naming the upstream."""
    return (
        b'{"id":"bench-1","object":"text_completion","model":"%s",'
        b'"choices":[{"index":0,"text":"ok"}]}' % name.encode()
    )


class FastHTTP(asyncio.Protocol):
    """One connection: parse requests with httptools, answer each with the canned response."""

    def __init__(self, keep_alive: bytes, close: bytes) -> None:
        self._keep_alive = keep_alive
        self._close = close
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self._transport.close()

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._parser.should_keep_alive():
            transport.write(self._keep_alive)
        else:
            transport.write(self._close)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def _responses(body: bytes, name: str) -> tuple[bytes, bytes]:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"x-upstream: %s\r\nContent-Length: %d\r\n" % (name.encode(), len(body))
    )
    return head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body


async def serve_raw(host: str, port: int, name: str, stop: asyncio.Event) -> None:
    keep_alive, close = _responses(make_body(name), name)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FastHTTP(keep_alive, close), host, port, backlog=1024, reuse_address=True
    )
    print(f"upstream_fast[{name}] (httptools) on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


async def serve_aiohttp(host: str, port: int, name: str, stop: asyncio.Event) -> None:
    """Fallback when httptools is missing: aiohttp's low-level server (slower)."""
    from aiohttp import web

    body = make_body(name)

    async def handler(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(
            body=body, content_type="application/json", headers={"x-upstream": name}
        )

    runner = web.ServerRunner(web.Server(handler), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"upstream_fast[{name}] (aiohttp) on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def amain(host: str, port: int, name: str, impl: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if impl == "raw" and httptools is not None:
        await serve_raw(host, port, name, stop)
    else:
        await serve_aiohttp(host, port, name, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fast", help="appears in the body and x-upstream")
    parser.add_argument("--impl", choices=("raw", "aiohttp"), default="raw")
    args = parser.parse_args(argv)
    uvloop.run(amain(args.host, args.port, args.name, args.impl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
