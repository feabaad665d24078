"""Bad and slow clients at the raw socket level: malformed requests, smuggling attempts,
slowloris. None of them may reach an upstream or hold a connection forever."""

from __future__ import annotations

import asyncio

PLAIN = """
server: {{listen: "127.0.0.1:0", header_timeout: 300ms}}
upstreams:
  v1: {{url: "{v1}"}}
routes:
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
"""


async def _raw(port: int, data: bytes, read_timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()


async def test_malformed_request_line_is_400(model, flipback):
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    reply = await _raw(fb.app.data_port, b"GARBAGE\r\n\r\n")
    assert reply.split(b"\r\n")[0].endswith(b" 400 Bad Request"), reply[:60]
    assert v1.count == 0


async def test_content_length_with_transfer_encoding_is_refused(model, flipback):
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    smuggle = (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n")
    reply = await _raw(fb.app.data_port, smuggle)
    assert reply.split(b"\r\n")[0].endswith(b" 400 Bad Request"), reply[:60]
    assert v1.count == 0


async def test_invalid_content_length_is_refused(model, flipback):
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    reply = await _raw(fb.app.data_port,
                       b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd")
    assert reply.split(b"\r\n")[0].endswith(b" 400 Bad Request"), reply[:60]
    assert v1.count == 0


async def test_slowloris_connection_is_closed_after_header_timeout(model, flipback):
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")
    closed_at = None
    for i in range(30):  # one header byte every 50 ms: never finishes within 300 ms
        try:
            writer.write(b"X-Slow-%d: 1\r\n" % i)
            await writer.drain()
        except ConnectionError:
            closed_at = loop.time()
            break
        try:
            data = await asyncio.wait_for(reader.read(1), 0.05)
            if data == b"":
                closed_at = loop.time()
                break
        except TimeoutError:
            pass
    writer.close()
    assert closed_at is not None, "slow client kept its connection"
    assert closed_at - t0 < 1.0
    assert v1.count == 0


async def test_idle_connection_without_bytes_is_closed(model, flipback):
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    data = await asyncio.wait_for(reader.read(10), 2.0)
    assert data == b""
    writer.close()


async def test_keepalive_request_after_timeout_window_still_served(model, flipback):
    # The header clock starts at a request's first byte, not at the connection's start:
    # a keep-alive connection idle between requests is not cut by header_timeout.
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert first.startswith(b"HTTP/1.1 200")
    length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    await asyncio.sleep(0.45)  # not a wait: the connection idles past header_timeout (300 ms)
    writer.write(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert second.startswith(b"HTTP/1.1 200")
    writer.close()
    assert [s.path for s in v1.seen] == ["/a", "/b"]


def test_aiohttp_c_parser_in_use():
    from aiohttp import http_parser

    assert http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


async def test_expect_100_continue_is_answered_before_the_body_is_sent(model, flipback):
    """curl sends ``Expect: 100-continue`` for bodies over 1 KiB and waits (1 s) for the
    interim answer: flipback gives it, the body follows, and the upstream gets it whole;
    a body over max_body gets its 413 instead, without a 100."""
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    for framing, body in ((b"Content-Length: 5\r\n", b"hello"),
                          (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
        try:
            writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\n" + framing
                         + b"Expect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer = await asyncio.wait_for(reader.readexactly(length), 2.0)
            assert b'"echo_len":5' in answer
            assert v1.seen[-1].body == b"hello" and "expect" not in v1.seen[-1].headers
        finally:
            writer.close()
    reply = await _raw(fb.app.data_port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: "
                       b"999999999\r\nExpect: 100-continue\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:60]


async def test_absolute_form_target_is_routed_by_its_path(model, flipback):
    """RFC 9112 §3.2.2: a server must accept ``GET http://host/path`` (clients talking
    to a proxy send it); the upstream gets the origin form."""
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url)
    for target, want in ((b"http://front.example/v1/x?y=1", "/v1/x?y=1"),
                         (b"HTTPS://front.example?y=2", "/?y=2"),
                         (b"http://front.example", "/")):
        reply = await _raw(fb.app.data_port,
                           b"GET " + target + b" HTTP/1.1\r\nHost: front.example\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200"), (target, reply[:60])
        assert v1.seen[-1].path == want
