"""The data-plane HTTP/1.1 server (proxy/http1) on raw sockets: pipelining in order,
HTTP/1.0, HEAD, one write for a head and a small body, backpressure both ways, and
refusals that keep their place in a pipeline."""

from __future__ import annotations

import asyncio

from tests.fakes import Behaviour
from tests.waiting import wait_until

PLAIN = """
server: {{listen: "127.0.0.1:0"{server}}}
upstreams:
  v1: {{url: "{v1}"}}
routes:
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
"""


async def _start(model, flipback, server: str = ""):
    v1 = await model("v1")
    return await flipback(PLAIN, v1=v1.url, server=server), v1


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def test_http1_pipelined_requests_are_answered_in_order(model, flipback):
    fb, v1 = await _start(model, flipback)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                 b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nde\r\n0\r\n\r\n"
                 b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    bodies = [(await _response(reader))[1] for _ in range(4)]
    assert await _read_all(reader) == b""  # closed after the last, as it asked
    writer.close()
    assert [s.path for s in v1.seen] == ["/a", "/b", "/c", "/d"]
    assert [s.body for s in v1.seen] == [b"", b"abc", b"de", b""]
    assert [b'"echo_len":%d' % n in b for n, b in zip((0, 3, 2, 0), bodies, strict=True)]


async def test_http1_a_malformed_request_behind_good_ones_is_answered_last(model, flipback):
    fb, v1 = await _start(model, flipback)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    reply = await _read_all(reader)
    writer.close()
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert reply.rindex(b"HTTP/1.1 400 Bad Request") > reply.rindex(b"HTTP/1.1 200 OK")
    assert [s.path for s in v1.seen] == ["/a", "/b"]


async def test_http1_http10_closes_unless_asked_and_never_gets_chunks(model, flipback):
    fb, v1 = await _start(model, flipback)
    port = fb.app.data_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.0\r\n\r\n")
    reply = await _read_all(reader)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in reply
    # keep-alive asked for: kept, said so, and a second request is served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for path in (b"/b", b"/c"):
        writer.write(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, _ = await _response(reader)
        assert b"Connection: keep-alive" in head, head
    writer.close()
    # a streamed (chunked upstream) answer to 1.0 ends with the connection, unchunked
    v1.behaviour = Behaviour(mode="sse", events=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    reply = await _read_all(reader)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head
    assert body.count(b"data: {") == 2 and body.endswith(b"data: [DONE]\n\n")


async def test_http1_head_gets_the_length_and_no_body(model, flipback):
    fb, v1 = await _start(model, flipback)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /none HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    _, body = await _response(reader)  # the next response follows the head directly
    writer.close()
    assert b'"model":"v1"' in body


async def test_http1_an_upgrade_request_is_answered_as_plain_http_then_closed(model, flipback):
    fb, v1 = await _start(model, flipback)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: upgrade\r\n\r\n\x81\x05hello")
    reply = await _read_all(reader)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply
    assert "upgrade" not in {k.lower() for k in v1.seen[-1].headers}


async def test_http1_broken_chunked_framing_in_a_body_is_400(model, flipback):
    fb, v1 = await _start(model, flipback)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nab\r\n")
    await asyncio.sleep(0.05)  # not a wait: the broken chunk comes in a later read
    writer.write(b"zz\r\n")
    reply = await _read_all(reader)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]


async def test_http1_a_client_that_does_not_read_holds_the_upstream_back(model, flipback):
    """Response backpressure: a client that stops reading a big answer stops the proxy
    reading the upstream, so the proxy's buffers stay bounded."""
    fb, v1 = await _start(model, flipback)
    v1.behaviour = Behaviour(body=b"x" * (32 << 20))
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    pool = fb.runtime.snapshot.pools["v1"]
    await wait_until(lambda: pool.in_flight == 1, what="the stream to start")
    await asyncio.sleep(0.3)  # not a wait: nothing may happen while the client is stalled
    assert pool.buffered < 1 << 20  # stalled at the socket buffers, not in memory
    got = 0
    while got < 32 << 20:
        chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
        assert chunk
        got += len(chunk)
    writer.close()


async def test_http1_a_fast_client_body_is_held_back_while_the_upstream_is_slow(flipback):
    """Request backpressure: the proxy stops reading a client that sends faster than the
    upstream takes, instead of buffering the body."""
    from tests.test_proxying import scripted_upstream

    start = asyncio.Event()
    done = asyncio.Event()

    async def answer(head: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await start.wait()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while length:
            length -= len(await reader.read(min(length, 1 << 20)))
        done.set()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with scripted_upstream(answer) as url:
        fb = await flipback(PLAIN, v1=url, server=", max_body: 100MiB")
        reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
        sent = 0
        chunk = b"y" * (1 << 20)
        while sent < 64 << 20:
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                break  # the proxy stopped reading: held back
        assert sent < 64 << 20, "the proxy read a 64 MiB body the upstream never took"
        start.set()
        while sent < 64 << 20:
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), 10)
        await asyncio.wait_for(done.wait(), 10)
        head, body = await _response(reader)
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        writer.close()


async def test_http1_a_refused_body_still_in_flight_does_not_reset_the_answer(model, flipback):
    """Closing a socket with unread bytes resets it, which can destroy the 413 before
    the client reads it: the proxy stops writing, reads on for a moment, then closes."""
    fb, v1 = await _start(model, flipback, server=", max_body: 1KiB")
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (8 << 20))

        async def blast(writer: asyncio.StreamWriter) -> None:
            try:
                for _ in range(64):
                    writer.write(b"z" * (128 << 10))
                    await writer.drain()
            except ConnectionError:
                pass

        sender = asyncio.ensure_future(blast(writer))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413"), head
        await asyncio.wait_for(sender, 10)
        writer.close()
    assert v1.count == 0


async def test_http1_a_pipelined_burst_is_not_taken_for_one_big_head(model, flipback):
    """The header cap counts the head being read, not the requests before it in the same
    read: 40 KiB of small pipelined requests, the last one split, all answered."""
    fb, v1 = await _start(model, flipback, server=", max_header_bytes: 8KiB")
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    one = b"GET /p HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 60 + b"\r\n\r\n"
    n = 40 * 1024 // len(one)
    burst = one * n + one[:20]
    writer.write(burst)
    await writer.drain()
    await asyncio.sleep(0.05)  # not a wait: the rest of the last head comes in a later read
    writer.write(one[20:])
    for _ in range(n + 1):
        head, _ = await _response(reader)
        assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()
    assert v1.count == n + 1


async def test_http1_a_pipelined_head_waiting_its_turn_is_not_a_slow_client(model, flipback):
    """Reading pauses while a pipelined request waits for the one before it: the header
    clock must not run out on a head the proxy itself stopped reading."""
    fb, v1 = await _start(model, flipback, server=", header_timeout: 200ms")
    v1.behaviour = Behaviour(delay=0.6)  # the first answer takes three header timeouts
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /last HTTP/1.1\r\nHo")  # /next queued: reading pauses
    await wait_until(lambda: v1.count == 1, what="the first request upstream")
    writer.write(b"st: x\r\n\r\n")
    for _ in range(3):
        head, _ = await _response(reader)
        assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()
    assert [s.path for s in v1.seen] == ["/slow", "/next", "/last"]
