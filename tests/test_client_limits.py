"""Server limits at the client edge (issue: edge hardening): bodies pass byte for byte,
slow bodies and huge header blocks are cut, idle connections close, and requests no
upstream could read the same way are refused. Raw sockets where a client library would
tidy up what is sent."""

from __future__ import annotations

import asyncio
import gzip
import re

import aiohttp
import orjson

CONFIG = """
server: {{listen: "127.0.0.1:0", body_timeout: 300ms, keepalive_timeout: 500ms{server}}}
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: buffered
    match: {{path_prefix: "/canary/"}}
    stable: v1
    canary: {{upstream: v2, weight: 50}}
  - name: sticky
    match: {{path_prefix: "/sticky/"}}
    stable: v1
    canary: {{upstream: v2, weight: 50}}
    sticky: {{header: x-session-id}}
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v3
"""


async def _start(model, flipback, server: str = ""):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    fb = await flipback(CONFIG, v1=v1.url, v2=v2.url, v3=v3.url, server=server)
    return fb, (v1, v2, v3)


async def _exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data``, read until the proxy closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    finally:
        writer.close()
    return b"".join(chunks)


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


async def test_gzip_request_body_reaches_the_upstream_byte_for_byte(model, flipback):
    fb, (v1, v2, v3) = await _start(model, flipback, server=", max_body: 2KiB")
    plain = orjson.dumps({"messages": [{"role": "user", "content": "hi " * 2000}]})
    packed = gzip.compress(plain)
    assert len(plain) > 2048 > len(packed)  # max_body counts the bytes on the wire
    for path in ("/plain", "/canary/x"):  # streamed and buffered paths alike
        async with fb.session.post(fb.url + path, data=packed, headers={
                "Content-Encoding": "gzip", "Content-Type": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
    seen = [v3.seen[-1], (v1.seen + v2.seen)[-1]]
    for s in seen:
        assert s.headers["Content-Encoding"] == "gzip"
        assert s.body == packed and gzip.decompress(s.body) == plain


async def test_a_body_that_stops_flowing_gets_408_and_the_connection_closes(model, flipback):
    fb, (v1, v2, v3) = await _start(model, flipback)
    loop = asyncio.get_running_loop()
    for path in ("/plain", "/canary/x", "/sticky/x"):  # streamed, buffered, sticky
        head = (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n"
                "Content-Type: application/json\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
        writer.write(head + b"{")
        t0 = loop.time()
        reply = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                reply += chunk
        writer.close()
        assert _status(reply) == 408, (path, reply[:200])
        assert b"no request body byte" in reply
        assert 0.25 < loop.time() - t0 < 3
    # a slow but steady body is not idle: a byte every 100 ms for 1 s passes
    body = b"x" * 10
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"POST /canary/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    for byte in body:
        await asyncio.sleep(0.1)  # not a wait: a slow client's pace
        writer.write(bytes([byte]))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert _status(head) == 200
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'flipback_client_rejections_total{reason="body_timeout"} 3.0' in text


async def test_header_block_over_the_cap_is_431(model, flipback):
    fb, (v1, v2, v3) = await _start(model, flipback, server=", max_header_bytes: 8KiB")
    port = fb.app.data_port
    # 100 headers of 1,000 bytes, no end of headers yet: cut before the headers end
    reply = await _exchange(port, b"GET /plain HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-Big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(100)))
    assert _status(reply) == 431, reply[:100]
    assert b"request headers over 8KiB" in reply
    # 12 KiB of headers with a body, all in one write: measured exactly, 431
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(12))
    reply = await _exchange(port, b"POST /plain HTTP/1.1\r\nHost: a\r\n" + big
                            + b"Content-Length: 2\r\n\r\n{}")
    assert _status(reply) == 431, reply[:100]
    # 6 KiB of headers with a 20 KiB body in one write: under the cap, served
    ok = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(6))
    reply = await _exchange(port, b"POST /plain HTTP/1.1\r\nHost: a\r\n" + ok
                            + b"Content-Length: 20000\r\nConnection: close\r\n\r\n"
                            + b"x" * 20000)
    assert _status(reply) == 200, reply[:100]
    assert v3.count == 1 and len(v3.seen[0].body) == 20000


async def test_idle_keepalive_connections_close_and_are_counted(model, flipback):
    fb, _ = await _start(model, flipback)

    async def connections() -> float:
        async with fb.session.get(fb.admin + "/metrics") as resp:
            text = await resp.text()
        return float(re.search(r"^flipback_client_connections (\S+)$", text, re.M).group(1))

    opened = []
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
        writer.write(b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        opened.append((reader, writer))
    assert await connections() == 5
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for reader, _ in opened:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass  # the rest of the response, then EOF: the proxy closed it
    assert 0.3 < loop.time() - t0 < 3
    assert await connections() == 0
    for _, writer in opened:
        writer.close()


async def test_requests_no_upstream_could_read_alike_are_400(model, flipback):
    fb, (v1, v2, v3) = await _start(model, flipback)
    port = fb.app.data_port
    cases = {
        "gzip coding dropped": b"POST /plain HTTP/1.1\r\nHost: a\r\n"
                               b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        "fragment": b"GET /v1/a#b HTTP/1.1\r\nHost: a\r\n\r\n",
    }
    for what, data in cases.items():
        reply = await _exchange(port, data)
        assert _status(reply) == 400, (what, reply[:200])
        assert b'"request_id"' in reply
    assert v3.count == 0
    reply = await _exchange(port, b"POST /plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert _status(reply) == 200 and v3.seen[-1].body == b"{}"


async def test_header_names_with_underscores_drop_reject_or_allow(model, flipback):
    raw = (b"GET /plain HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nX-Ok: 1\r\n"
           b"Connection: close\r\n\r\n")
    fb, (_, _, v3) = await _start(model, flipback)  # default: drop, as NGINX and gunicorn
    assert _status(await _exchange(fb.app.data_port, raw)) == 200
    names = [n.lower() for n, _ in v3.seen[-1].raw_headers]
    assert b"x_forwarded_for" not in names and b"x-ok" in names
    fb, (_, _, v3) = await _start(model, flipback, ", headers_with_underscores: reject")
    reply = await _exchange(fb.app.data_port, raw)
    assert _status(reply) == 400 and b"underscore" in reply and v3.count == 0
    fb, (_, _, v3) = await _start(model, flipback, ", headers_with_underscores: allow")
    assert _status(await _exchange(fb.app.data_port, raw)) == 200
    assert v3.seen[-1].headers["X_Forwarded_For"] == "6.6.6.6"


async def test_a_sticky_key_that_is_not_utf8_is_hashed_as_bytes(model, flipback, caplog):
    fb, (v1, v2, _) = await _start(model, flipback)
    sticky = b"GET /sticky/x HTTP/1.1\r\nHost: a\r\nx-session-id: \xff\xfe\r\n\r\n"
    upstreams = set()
    for _ in range(4):
        reply = await _exchange(fb.app.data_port, sticky[:-2] + b"Connection: close\r\n\r\n")
        assert _status(reply) == 200, reply[:200]
        upstreams.add(re.search(rb"x-flipback-upstream: (\w+)", reply, re.I).group(1))
    assert len(upstreams) == 1  # the same session every time
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert "Traceback" not in caplog.text


async def test_keepalive_and_limits_follow_a_reload(model, flipback, tmp_path):
    """A reload reaches the limits of open connections (they share one Limits)."""
    fb, _ = await _start(model, flipback, server=", max_header_bytes: 8KiB")
    from proxy.config.parser import parse_config

    path = tmp_path / "flipback.yaml"
    text = path.read_text().replace("max_header_bytes: 8KiB", "max_header_bytes: 2KiB")
    path.write_text(text)
    assert fb.runtime.apply(parse_config(text, str(path))).ok
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(4))
    reply = await _exchange(fb.app.data_port, b"GET /plain HTTP/1.1\r\nHost: a\r\n" + big
                            + b"Connection: close\r\n\r\n")
    assert _status(reply) == 431
    async with aiohttp.ClientSession() as s, s.get(fb.url + "/plain") as resp:
        assert resp.status == 200
