"""UpstreamPool.send_detached (the shadow copies' exchange) against real servers on
127.0.0.1: the response reaches the sink's callbacks, the connection goes back to the
pool by itself, and every failure and timeout ends the exchange exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.errors import ConnectFailed, StreamBroken, UpstreamError, UpstreamTimeout
from proxy.upstream.conn import Connection
from proxy.upstream.pool import UpstreamPool
from tests.test_upstream import (
    OK,
    answer_once,
    pools,
    raw_server,
    read_request,
    wait_for_eof,
)
from tests.waiting import wait_until

__all__ = ["pools"]  # the fixture, imported for this module's tests


class Recorder:
    """A Sink that keeps what it was told; ``ended`` resolves with "done" or the error."""

    def __init__(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + timeout
        self.conn: Connection | None = None
        self.status: int | None = None
        self.chunks: list[bytes] = []
        self.calls: list[str] = []
        self.ended: asyncio.Future[str | BaseException] = loop.create_future()

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.calls.append("head")
        self.status = status

    def body(self, chunk: bytes) -> None:
        self.calls.append("body")
        self.chunks.append(chunk)

    def done(self) -> None:
        self.calls.append("done")
        assert not self.ended.done(), "ended twice"
        self.ended.set_result("done")

    def failed(self, exc: BaseException) -> None:
        self.calls.append("failed")
        assert not self.ended.done(), "ended twice"
        self.ended.set_result(exc)

    async def outcome(self) -> str | BaseException:
        async with asyncio.timeout(3):
            return await self.ended


def detach(pool: UpstreamPool, sink: Recorder, method: str = "POST", target: str = "/",
           body: bytes | None = b"{}") -> None:
    pool.send_detached(method, target, [(b"x-id", b"1")], body, sink, b"x-flipback-shadow: 1\r\n")
    assert sink.calls == []  # never called back before it returns


async def hold_until_gone(reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
    """Answer nothing more; set ``gone`` when the client closes or resets."""
    try:
        await wait_for_eof(reader)
    finally:
        gone.set()


async def serve_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        await reader.readexactly(2)  # the {} body
        writer.write(OK)


async def test_detached_response_reaches_the_sink_and_the_connection_is_reused(
        pools: Any) -> None:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            heads.append(await read_request(reader))
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        for _ in range(3):
            sink = Recorder()
            detach(pool, sink)
            assert await sink.outcome() == "done"
            assert sink.status == 200 and b"".join(sink.chunks) == b"abcde"
            assert sink.calls[0] == "head" and sink.calls[-1] == "done"
            await wait_until(lambda: pool.idle == 1 and pool.in_flight == 0)
        assert srv.connections == 1  # the first took the slow path, the rest the idle one
        assert b"x-flipback-shadow: 1\r\n" in heads[0] and b"x-id: 1\r\n" in heads[0]
        assert b"Content-Length: 2\r\n" in heads[0]


async def test_detached_retries_a_stale_keepalive_connection_once(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.readexactly(2)
        writer.write(OK)
        if srv.connections == 1:  # dropped as the next request comes
            await read_request(reader)
            return
        await serve_ok(reader, writer)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        first = Recorder()
        detach(pool, first)
        assert await first.outcome() == "done"
        await wait_until(lambda: pool.idle == 1)
        again = Recorder()
        detach(pool, again)
        assert await again.outcome() == "done" and again.status == 200
        assert srv.connections == 2


async def test_detached_waits_for_a_busy_pool(pools: Any) -> None:
    async with raw_server(serve_ok) as srv:
        pool = pools(srv.port, max_connections=1)
        sinks = [Recorder() for _ in range(4)]
        for sink in sinks:
            detach(pool, sink)
        assert pool.in_flight + pool.pending <= 1 + 4
        for sink in sinks:
            assert await sink.outcome() == "done"
        assert srv.connections == 1


async def test_detached_whole_exchange_deadline_beats_a_long_upstream_timeout(
        pools: Any) -> None:
    gone = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")  # then stalls
        await hold_until_gone(reader, gone)

    async with raw_server(handle) as srv:
        # The upstream's own timeouts are a minute: the pool's tick must follow the sink's.
        pool = pools(srv.port, timeout=60.0, idle_timeout=60.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sink = Recorder(timeout=0.3)
        detach(pool, sink)
        got = await sink.outcome()
        assert isinstance(got, UpstreamTimeout), got
        assert 0.3 <= loop.time() - t0 < 1.0
        assert sink.status == 200 and sink.chunks == [b"some"]
        await wait_until(lambda: pool.in_flight == 0 and pool.idle == 0)  # aborted, not reused
        await asyncio.wait_for(gone.wait(), 2)


async def test_detached_headers_deadline_is_the_upstream_timeout(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port, timeout=0.2)
        sink = Recorder(timeout=30.0)
        detach(pool, sink)
        got = await sink.outcome()
        assert isinstance(got, UpstreamTimeout) and "no response headers" in str(got)
        assert sink.status is None


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # cut mid-body
    b"HTTP/1.1 20",  # cut mid-headers
])
async def test_detached_cut_is_stream_broken(pools: Any, answer: bytes) -> None:
    async with raw_server(answer_once(answer)) as srv:
        pool = pools(srv.port)
        sink = Recorder()
        detach(pool, sink)
        got = await sink.outcome()
        assert isinstance(got, StreamBroken), got
        await wait_until(lambda: pool.in_flight == 0 and pool.idle == 0)


async def test_detached_refused_port_is_connect_failed(pools: Any,
                                                       unused_tcp_port: int) -> None:
    pool = pools(unused_tcp_port)
    sink = Recorder()
    detach(pool, sink)
    got = await sink.outcome()
    assert isinstance(got, ConnectFailed), got


async def test_detached_response_stands_when_junk_follows_it(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK + b"garbage")
        await wait_for_eof(reader)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        sink = Recorder()
        detach(pool, sink)
        assert await sink.outcome() == "done"
        assert b"".join(sink.chunks) == b"ok"
        await wait_until(lambda: pool.in_flight == 0 and pool.idle == 0)  # not reused


async def test_detached_head_and_eof_delimited_bodies_end_cleanly(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            await serve_ok(reader, writer)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            await writer.drain()

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        sink = Recorder()
        detach(pool, sink, method="HEAD", body=None)
        assert await sink.outcome() == "done" and sink.chunks == []
        await wait_until(lambda: pool.idle == 1)
        after = Recorder()  # the HEAD left the connection reusable
        detach(pool, after)
        assert await after.outcome() == "done" and b"".join(after.chunks) == b"ok"
        assert srv.connections == 1
        eof = Recorder()
        pool2 = pools(srv.port)
        detach(pool2, eof, method="GET", body=None)
        assert await eof.outcome() == "done"
        assert b"".join(eof.chunks) == b"until the end"


async def test_detached_in_flight_is_aborted_by_pool_close(pools: Any) -> None:
    gone = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await hold_until_gone(reader, gone)

    async with raw_server(handle) as srv:
        pool = pools(srv.port)
        sink = Recorder()
        detach(pool, sink)
        await wait_until(lambda: sink.conn is not None)
        await pool.aclose(0.05)
        got = await sink.outcome()
        assert isinstance(got, UpstreamError)
        await asyncio.wait_for(gone.wait(), 2)


async def test_detached_waiting_for_a_connection_ends_when_the_pool_closes(pools: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await wait_for_eof(reader)  # never answers

    async with raw_server(handle) as srv:
        pool = pools(srv.port, max_connections=1)
        first, waiting = Recorder(), Recorder()
        detach(pool, first)
        await wait_until(lambda: first.conn is not None)
        detach(pool, waiting)  # the only connection is busy: it waits in a task
        await wait_until(lambda: pool.pending == 1, what="the second copy to wait")
        assert waiting.calls == [] and waiting.conn is None
        await pool.aclose(0.05)
        for sink in (first, waiting):
            got = await sink.outcome()
            assert isinstance(got, UpstreamError), got
        assert isinstance(await waiting.outcome(), ConnectFailed)
        assert pool.in_flight == 0
