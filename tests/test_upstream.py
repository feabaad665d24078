"""UpstreamPool against real servers on 127.0.0.1: aiohttp apps where aiohttp can play the
upstream, raw asyncio servers sending scripted bytes where it must misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.config.model import UpstreamConfig
from proxy.errors import ConnectFailed, Saturated, StreamBroken, UpstreamTimeout
from proxy.upstream import pool as upstream_mod
from proxy.upstream.conn import HIGH_WATER
from proxy.upstream.pool import UpstreamPool, UpstreamResponse
from tests.waiting import wait_until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def make_cfg(port: int, **kw: Any) -> UpstreamConfig:
    kw.setdefault("host", "127.0.0.1")
    return UpstreamConfig(name="up", url=f"http://127.0.0.1:{port}", port=port, **kw)


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., UpstreamPool]]:
    """``pools(port, **cfg)`` makes a pool that is closed after the test."""
    made: list[UpstreamPool] = []

    def make(port: int, **kw: Any) -> UpstreamPool:
        pool = UpstreamPool(make_cfg(port, **kw))
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.aclose(0)


class RawServer:
    """An asyncio server running ``handle`` per connection; counts connections."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.connections = 0
        self.closed = asyncio.Event()  # set when a handler saw the client go away
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.set()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_server(handle: Handler, tls: ssl.SSLContext | None = None
                     ) -> AsyncIterator[RawServer]:
    raw = RawServer(handle)
    server = await asyncio.start_server(raw._on_conn, "127.0.0.1", 0, ssl=tls)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):  # a broken pool fails the test instead of hanging it
            yield raw
    finally:
        server.close()
        for writer in raw._writers:
            writer.close()
        for task in raw._tasks:
            task.cancel()
        await asyncio.gather(*raw._tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head (bodiless requests only)."""
    return await reader.readuntil(b"\r\n\r\n")


def answer_once(answer: bytes) -> Handler:
    """A connection handler that reads one request, writes ``answer`` and hangs up."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    return handle


async def wait_for_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def read_all(resp: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await resp.read():
        parts.append(chunk)
    resp.release()
    return b"".join(parts)


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.path_qs,
        "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
        "body": body.decode(),
        "peer": request.transport.get_extra_info("peername")[1] if request.transport else 0,
    })


@pytest.fixture
async def echo_server(aiohttp_server: Any) -> Any:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return await aiohttp_server(app)


async def send_json(pool: UpstreamPool, method: str, target: str = "/", body: Any = None,
                    headers: list[tuple[bytes, bytes]] | None = None,
                    **kw: Any) -> dict[str, Any]:
    resp = await pool.send(method, target, headers or [], body, **kw)
    assert resp.status == 200
    data: dict[str, Any] = orjson.loads(await read_all(resp))
    data["hdrs"] = {k.lower(): v for k, v in data["headers"]}
    return data


# -- requests ---------------------------------------------------------------------------


async def test_upstream_get_and_post_bytes_bodies(pools: Any, echo_server: Any) -> None:
    pool = pools(echo_server.port)
    got = await send_json(pool, "GET", "/a?x=1", None)
    assert got["method"] == "GET" and got["path"] == "/a?x=1" and got["body"] == ""
    assert "content-length" not in got["hdrs"] and "transfer-encoding" not in got["hdrs"]
    got = await send_json(pool, "POST", "/b", b'{"q": 1}')
    assert got["body"] == '{"q": 1}' and got["hdrs"]["content-length"] == "8"
    got = await send_json(pool, "POST", "/c", b"")
    assert got["hdrs"]["content-length"] == "0"
    got = await send_json(pool, "GET", "/d", b"")
    assert "content-length" not in got["hdrs"]


async def test_upstream_sends_host_configured_headers_and_base_path(
        pools: Any, echo_server: Any) -> None:
    pool = pools(echo_server.port, base_path="/api/",
                 headers=(("Authorization", "Bearer s3cret"), ("X-Team", "ml")))
    got = await send_json(pool, "GET", "/v1/chat?stream=1", None,
                          headers=[(b"authorization", b"Bearer client"), (b"X-Keep", b"yes")])
    assert got["path"] == "/api/v1/chat?stream=1"
    assert got["hdrs"]["host"] == f"127.0.0.1:{echo_server.port}"
    names = [k.lower() for k, _ in got["headers"]]
    assert names.count("authorization") == 1 and names.count("host") == 1
    assert got["hdrs"]["authorization"] == "Bearer s3cret"
    assert got["hdrs"]["x-team"] == "ml" and got["hdrs"]["x-keep"] == "yes"


def test_upstream_host_header_omits_default_port() -> None:
    cfg = UpstreamConfig(name="u", url="https://models.internal", scheme="https",
                         host="models.internal", port=443)
    assert UpstreamPool(cfg)._host_line == b"Host: models.internal\r\n"
    assert UpstreamPool(make_cfg(8080, host="::1"))._host_line == b"Host: [::1]:8080\r\n"
    with pytest.raises(ValueError):
        UpstreamPool(make_cfg(80, headers=(("X-Bad", "a\r\nInjected: 1"),)))


async def _gen(parts: list[bytes], gap: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if gap:
            await asyncio.sleep(gap)  # not a wait: a slow body's pace
        yield part


async def test_upstream_streams_request_body_chunked_and_with_length(
        pools: Any, echo_server: Any) -> None:
    pool = pools(echo_server.port)
    got = await send_json(pool, "POST", "/", _gen([b"hello ", b"", b"streamed ", b"world"], 0.01))
    assert got["body"] == "hello streamed world"
    assert got["hdrs"]["transfer-encoding"] == "chunked" and "content-length" not in got["hdrs"]
    got = await send_json(pool, "PUT", "/", _gen([b"abc", b"def"]), content_length=6)
    assert got["body"] == "abcdef" and got["hdrs"]["content-length"] == "6"
    assert "transfer-encoding" not in got["hdrs"]
    assert pool.idle == 1  # both streamed requests completed cleanly on one connection


async def test_upstream_body_iterator_error_is_stream_broken_with_cause(
        pools: Any, echo_server: Any) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise RuntimeError("client went away")

    pool = pools(echo_server.port)
    with pytest.raises(StreamBroken) as info:
        await pool.send("POST", "/", [], failing())
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(StreamBroken, match="ended at 3 of 10"):
        await pool.send("POST", "/", [], _gen([b"abc"]), content_length=10)
    assert pool.in_flight == 0


async def test_upstream_answers_early_while_request_body_streams(pools: Any) -> None:
    release_body = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n"
                     b"Connection: close\r\n\r\nbig")
        await writer.drain()
        await wait_for_eof(reader)

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await release_body.wait()
        yield b"never needed"

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        async with asyncio.timeout(2):
            resp = await pool.send("POST", "/", [], body())
        assert resp.status == 413 and resp.will_close
        assert await read_all(resp) == b"big"
        assert pool.in_flight == 0 and pool.idle == 0


async def test_upstream_request_body_respects_write_flow_control(pools: Any) -> None:
    started = asyncio.Event()
    produced = 0
    chunk = b"x" * 65536

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        started.set()
        await asyncio.sleep(3600)  # not a wait: the upstream never reads the body

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(1024):  # 64 MiB
            produced += len(chunk)
            yield chunk

    async with raw_server(handle) as srv:
        pool = pools(srv.port, timeout=5.0)
        task = asyncio.ensure_future(pool.send("POST", "/", [], body(), content_length=1 << 26))
        await started.wait()
        await asyncio.sleep(0.3)  # not a wait: time for the body to run ahead, could it
        # Without flow control the whole 64 MiB would sit in the transport buffer by now.
        assert produced < 24 << 20
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- responses --------------------------------------------------------------------------


async def test_upstream_reads_chunked_and_content_length_responses(
        pools: Any, aiohttp_server: Any) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 100_000)

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/fixed", fixed)
    server = await aiohttp_server(app)
    pool = pools(server.port)
    resp = await pool.send("GET", "/chunked", [], None)
    assert resp.content_length is None
    assert (b"transfer-encoding", b"chunked") in [(k.lower(), v) for k, v in resp.headers]
    assert await read_all(resp) == b"part0;part1;part2;part3;part4;"
    resp = await pool.send("GET", "/fixed", [], None)
    assert resp.content_length == 100_000 and not resp.will_close
    assert await read_all(resp) == b"y" * 100_000
    assert pool.idle == 1


async def test_upstream_sse_piece_is_readable_before_the_next_is_sent(
        pools: Any, aiohttp_server: Any) -> None:
    proceed = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await proceed.wait()  # the second event only after the client read the first
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/sse", sse)
    pool = pools((await aiohttp_server(app)).port)
    async with asyncio.timeout(2):
        resp = await pool.send("GET", "/sse", [], None)
        assert await resp.read() == b"data: one\n\n"
        proceed.set()
        assert await resp.read() == b"data: two\n\n"
        assert await resp.read() == b""
    resp.release()


async def test_upstream_reuses_keepalive_connection_lifo(pools: Any, echo_server: Any) -> None:
    pool = pools(echo_server.port)
    peers = {(await send_json(pool, "GET", "/"))["peer"] for _ in range(3)}
    assert len(peers) == 1 and pool.idle == 1
    # Two at once need two connections; afterwards the last one released is reused.
    a, b = await asyncio.gather(pool.send("GET", "/", [], None), pool.send("GET", "/", [], None))
    assert pool.in_flight == 2
    await read_all(a)
    await read_all(b)
    assert pool.idle == 2 and pool.in_flight == 0
    last = (await send_json(pool, "GET", "/"))["peer"]
    assert last == (await send_json(pool, "GET", "/"))["peer"]


async def test_upstream_skips_interim_and_handles_bodiless_responses(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif head.startswith(b"GET /204"):
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif head.startswith(b"GET /304"):
                writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                             b"Link: </s.css>\r\n\r\n" + OK)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        async with asyncio.timeout(2):
            resp = await pool.send("GET", "/", [], None)
            assert resp.status == 200 and resp.headers == [(b"Content-Length", b"2")]
            assert await read_all(resp) == b"ok"
            resp = await pool.send("HEAD", "/", [], None)
            assert resp.status == 200 and resp.content_length == 1234
            assert await read_all(resp) == b""
            for path in ("/204", "/304", "/"):
                resp = await pool.send("GET", path, [], None)
                assert await read_all(resp) == (b"ok" if path == "/" else b"")
        assert srv.connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n\r\nok",  # delimited by the end of the connection
])
async def test_upstream_does_not_reuse_closing_connections(pools: Any, answer: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        for _ in range(2):
            resp = await pool.send("GET", "/", [], None)
            assert resp.will_close
            assert await read_all(resp) == b"ok"
        assert pool.idle == 0 and srv.connections == 2


async def test_upstream_drops_idle_connections_closed_or_expired(
        pools: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    drop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        if srv.connections == 1:
            await drop.wait()
            return  # the first connection is closed by the upstream once idle
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        await read_all(await pool.send("GET", "/", [], None))
        assert pool.idle == 1
        drop.set()
        await wait_until(lambda: pool.idle == 0)  # upstream closed it: gone from the pool
        monkeypatch.setattr(upstream_mod, "IDLE_TTL", 0.1)
        pool = pools(srv.port, idle_timeout=0.2)  # ticks every 20 ms
        await read_all(await pool.send("GET", "/", [], None))
        assert pool.idle == 1
        await wait_until(lambda: pool.idle == 0)  # idle past IDLE_TTL: closed by us
        assert srv.connections == 2


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 and a server context using it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    return cert, server_ctx


async def test_upstream_https_verifies_the_certificate(
        pools: Any, tls_cert: tuple[Path, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch) -> None:
    cert, server_ctx = tls_cert
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(OK)

    async with raw_server(handle, tls=server_ctx) as srv:
        untrusted = pools(srv.port, scheme="https")
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.send("GET", "/", [], None)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the pool makes its context
        pool = pools(srv.port, scheme="https")
        for _ in range(2):
            assert await read_all(await pool.send("GET", "/tls", [], None)) == b"ok"
        assert seen[0].startswith(b"GET /tls HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % srv.port)
        assert pool.idle == 1


# -- failures ---------------------------------------------------------------------------


async def test_upstream_refused_port_is_connect_failed(pools: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    pool = pools(port)
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await pool.send("GET", "/", [], None)
    assert pool.in_flight == 0 and pool.idle == 0


async def test_upstream_connect_timeout_is_connect_failed(pools: Any) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue until a connect no longer completes
            sock = socket.socket()
            sock.settimeout(0.2)
            fillers.append(sock)
            try:
                sock.connect(listener.getsockname())
            except TimeoutError:
                break
        else:
            pytest.skip("the kernel accepts connections beyond the backlog")
        pool = pools(listener.getsockname()[1], connect_timeout=0.2, timeout=5.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectFailed, match="timed out"):
            await pool.send("GET", "/", [], None)
        assert loop.time() - started < 1.0
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


async def test_upstream_no_headers_in_time_is_timeout_and_closes(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await wait_for_eof(reader)
        srv.closed.set()

    async with raw_server(handle) as srv:
        pool = pools(srv.port, timeout=0.2)
        with pytest.raises(UpstreamTimeout, match="no response headers"):
            await pool.send("GET", "/", [], None)
        async with asyncio.timeout(1):
            await srv.closed.wait()  # the hung request was dropped upstream too
        assert pool.in_flight == 0


async def test_upstream_body_gap_over_idle_timeout_is_timeout(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port, idle_timeout=0.2)
        resp = await pool.send("GET", "/", [], None)
        assert await resp.read() == b"abc"
        with pytest.raises(UpstreamTimeout, match="no response body data"):
            await resp.read()
        resp.release()
        assert pool.in_flight == 0 and pool.idle == 0


@pytest.mark.parametrize("reset", [False, True])
async def test_upstream_cut_mid_body_is_stream_broken(pools: Any, reset: bool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # not a wait: the upstream stalls mid-body, then is cut
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        resp = await pool.send("GET", "/", [], None)
        assert await resp.read() == b"hello"
        with pytest.raises(StreamBroken, match="mid-body"):
            await resp.read()
        resp.release()


@pytest.mark.parametrize("answer, match", [
    (b"", "before the response headers"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "before the response headers"),
    (b"HTTP/1.1 abc nonsense\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "malformed"),
])
async def test_upstream_broken_before_headers_is_stream_broken(
        pools: Any, answer: bytes, match: str) -> None:
    async with raw_server(answer_once(answer)) as srv:
        pool = pools(srv.port)
        with pytest.raises(StreamBroken, match=match):
            await pool.send("GET", "/", [], None)
        assert srv.connections == 1  # a fresh connection is never retried
        assert pool.in_flight == 0


async def test_upstream_body_ready_says_whether_the_body_came_with_the_headers(
        pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # headers and body in one write
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # not a wait: the upstream sends its body apart
        writer.write(b"ok")
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        together = await pool.send("GET", "/", [], None)
        assert together.body_ready
        assert await read_all(together) == b"ok"
        apart = await pool.send("GET", "/", [], None)
        assert not apart.body_ready
        assert await read_all(apart) == b"ok"
        assert not apart.body_ready  # released


async def test_upstream_retries_stale_keepalive_connection_once(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        if srv.connections == 1:  # the first connection is dropped as the next request comes
            await read_request(reader)
            return
        while True:
            await read_request(reader)
            writer.write(OK)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        assert await read_all(await pool.send("POST", "/", [], b"")) == b"ok"
        resp = await pool.send("POST", "/", [], b"again")
        assert await read_all(resp) == b"ok"
        assert srv.connections == 2


@pytest.mark.parametrize("streamed, partial", [(True, b""), (False, b"HTTP/1.1 2")])
async def test_upstream_no_retry_for_streamed_body_or_after_a_response_byte(
        pools: Any, streamed: bool, partial: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await read_request(reader)
        writer.write(partial)
        await writer.drain()

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        await read_all(await pool.send("GET", "/", [], None))
        with pytest.raises(StreamBroken, match="keep-alive" if streamed else "before the resp"):
            await pool.send("POST", "/", [], _gen([b"x"], 0.05) if streamed else b"x")
        assert srv.connections == 1


async def test_upstream_waits_fifo_then_saturates(pools: Any) -> None:
    go = asyncio.Event()
    order: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            order.append(head.split()[1].decode())
            await go.wait()
            writer.write(OK)

    async with raw_server(handle) as srv:
        pool = pools(srv.port, max_connections=1, max_pending=2)
        t1 = asyncio.ensure_future(pool.send("GET", "/1", [], None))
        await wait_until(lambda: pool.in_flight == 1)
        t2 = asyncio.ensure_future(pool.send("GET", "/2", [], None))
        t3 = asyncio.ensure_future(pool.send("GET", "/3", [], None))
        await wait_until(lambda: pool.pending == 2)
        with pytest.raises(Saturated):
            await pool.send("GET", "/4", [], None)
        go.set()
        for task in (t1, t2, t3):
            await read_all(await task)
        assert order == ["/1", "/2", "/3"]
        assert srv.connections == 1 and pool.pending == 0


async def test_upstream_waiter_cancelled_as_it_is_handed_a_slot_gives_the_slot_back(
    pools: Any,
) -> None:
    """A's connection dies, its slot goes to B, and B's client leaves in the same loop
    step: the slot must come back, or the pool has one connection fewer for good."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            if head.split()[1] != b"/hang":
                writer.write(OK)

    async with raw_server(handle) as srv:
        pool = pools(srv.port, max_connections=1, timeout=1.0)
        a = asyncio.ensure_future(pool.send("GET", "/hang", [], None))
        await wait_until(lambda: pool.in_flight == 1)
        b = asyncio.ensure_future(pool.send("GET", "/b", [], None))
        await wait_until(lambda: pool.pending == 1)
        conn = next(iter(pool._busy))
        conn.fail(StreamBroken("the upstream dropped it"))  # as connection_lost does
        b.cancel()
        for task in (a, b):
            with contextlib.suppress(StreamBroken, asyncio.CancelledError):
                await task
        resp = await pool.send("GET", "/c", [], None)
        assert await read_all(resp) == b"ok"
        assert pool.in_flight == 0 and pool.pending == 0


async def test_upstream_waiting_for_a_connection_counts_toward_timeout(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port, max_connections=1, timeout=0.3)
        held = await pool.send("GET", "/", [], None)  # holds the only connection
        waiting = asyncio.ensure_future(pool.send("GET", "/", [], None))
        await wait_until(lambda: pool.pending == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.pending == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await pool.send("GET", "/", [], None)
        assert 0.25 < loop.time() - started < 1.0
        assert pool.pending == 0 and pool.in_flight == 1
        held.release()


@pytest.mark.parametrize("phase", ["headers", "body"])
async def test_upstream_cancel_aborts_upstream_connection(pools: Any, phase: str) -> None:
    asked, first_read = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if phase == "body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n6\r\ntoken1\r\n")
        asked.set()
        await wait_for_eof(reader)
        srv.closed.set()

    async with raw_server(handle) as srv:
        pool = pools(srv.port)

        async def client() -> None:
            resp = await pool.send("POST", "/", [], b"{}")
            await resp.read()
            first_read.set()
            await resp.read()  # waits forever

        task = asyncio.ensure_future(client())
        waiting = asked if phase == "headers" else first_read  # for headers, or for more body
        await wait_until(waiting.is_set, what=f"the client waiting in the {phase}")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(1):
            await srv.closed.wait()
        assert pool.in_flight == 0 and pool.idle == 0


async def test_upstream_abandoned_response_aborts_connection(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await wait_for_eof(reader)
        srv.closed.set()

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        resp = await pool.send("GET", "/", [], None)
        resp.release()
        async with asyncio.timeout(1):
            await srv.closed.wait()
        assert await resp.read() == b""
        assert pool.idle == 0


async def test_upstream_large_stream_to_slow_consumer_stays_bounded(pools: Any) -> None:
    total = 100 << 20
    sent = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"z" * (1 << 20)
        while sent < total:
            writer.write(block)
            sent += len(block)
            await writer.drain()
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        resp = await pool.send("GET", "/", [], None)
        # Not a wait: a stalled consumer, and time for the upstream to run ahead, could it.
        await asyncio.sleep(0.3)
        assert sent < 40 << 20
        assert pool.buffered <= HIGH_WATER + (256 << 10)
        got = 0
        peak = 0
        while chunk := await resp.read():
            got += len(chunk)
            peak = max(peak, len(chunk), pool.buffered)
            await asyncio.sleep(0)  # not a wait: the consumer yields between reads
        resp.release()
        assert got == total
        assert peak <= HIGH_WATER + (256 << 10)


async def test_upstream_aclose_waits_for_in_flight_then_refuses(pools: Any) -> None:
    finish = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await finish.wait()
        writer.write(b"cd")
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        resp = await pool.send("GET", "/", [], None)
        closing = asyncio.ensure_future(pool.aclose(timeout=5))
        await wait_until(lambda: pool._closing, what="aclose to have started")
        assert not closing.done()
        with pytest.raises(ConnectFailed, match="closed"):
            await pool.send("GET", "/", [], None)
        finish.set()
        assert await read_all(resp) == b"abcd"
        async with asyncio.timeout(1):
            await closing
        assert pool.in_flight == 0 and pool.idle == 0


async def test_upstream_aclose_timeout_aborts_the_rest(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        resp = await pool.send("GET", "/", [], None)
        assert await resp.read() == b"ab"
        await pool.aclose(timeout=0.1)
        with pytest.raises(StreamBroken, match="pool closed"):
            await resp.read()
        assert pool.in_flight == 0


def test_upstream_runs_on_uvloop() -> None:
    """Production runs uvloop, whose transports differ (types, read sizes, writelines)."""
    import uvloop

    gone = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            if head.startswith(b"POST"):
                body = b""
                while not body.endswith(b"0\r\n\r\n"):
                    body += await reader.read(65536)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            elif head.startswith(b"GET /big"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (32 << 20))
                for _ in range(32):
                    writer.write(b"b" * (1 << 20))
                    await writer.drain()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n")
                await writer.drain()
                await wait_for_eof(reader)
                gone.set()
                return

    async def scenario() -> None:
        async with raw_server(handle) as srv:
            pool = UpstreamPool(make_cfg(srv.port))
            resp = await pool.send("POST", "/", [], _gen([b"ab", b"cd"]))
            assert await read_all(resp) == b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
            resp = await pool.send("GET", "/big", [], None)
            await asyncio.sleep(0.1)  # not a wait: a stalled consumer; the upstream runs ahead
            got = peak = 0
            while chunk := await resp.read():
                got += len(chunk)
                peak = max(peak, len(chunk))
            resp.release()
            assert got == 32 << 20 and peak <= HIGH_WATER + (256 << 10)
            assert srv.connections == 1 and pool.idle == 1
            resp = await pool.send("GET", "/stream", [], None)
            assert await resp.read() == b"hello"
            task = asyncio.ensure_future(resp.read())
            await wait_until(lambda: resp._conn._body_waiter is not None,
                             what="the read to wait for more body")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(1):
                await gone.wait()
            await pool.aclose(0)

    uvloop.run(scenario())
