"""End to end: real fake model servers, a real flipback on real sockets (SPEC §4)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson

from tests.fakes import Behaviour
from tests.waiting import wait_until

ONE_ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
"""

PLAIN = """
upstreams:
  v1: {{url: "{v1}"{extra}}}
routes:
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
"""


async def test_proxy_forwards_and_labels_upstream(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ONE_ROUTE, v1=v1.url, v2=v2.url, weight=0)
    async with fb.session.post(fb.url + "/v1/chat?x=1", data=b'{"a":1}',
                               headers={"X-Request-Id": "abc"}) as resp:
        assert resp.status == 200
        assert resp.headers["x-flipback-upstream"] == "v1"
        assert resp.headers["x-request-id"] == "abc"
        body = await resp.json()
    assert body["model"] == "v1" and body["echo_len"] == 7
    seen = v1.seen[-1]
    assert seen.path == "/v1/chat?x=1"
    assert seen.body == b'{"a":1}'
    assert seen.headers["X-Request-Id"] == "abc"
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == f"127.0.0.1:{fb.app.data_port}"
    assert v2.count == 0


async def test_proxy_generates_request_id(model, flipback):
    v1 = await model("v1")
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    async with fb.session.get(fb.url + "/x") as resp:
        rid = resp.headers["x-request-id"]
    assert uuid.UUID(rid).version == 4 and str(uuid.UUID(rid)) == rid
    assert v1.seen[-1].headers["X-Request-Id"] == rid


async def test_proxy_no_route_is_json_404(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ONE_ROUTE, v1=v1.url, v2=v2.url, weight=0)
    async with fb.session.get(fb.url + "/other") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert "no route" in body["error"] and body["request_id"]


async def test_split_follows_weight(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ONE_ROUTE, v1=v1.url, v2=v2.url, weight=30)
    n = 400

    async def one() -> str:
        async with fb.session.get(fb.url + "/v1/x") as resp:
            await resp.read()
            return resp.headers["x-flipback-upstream"]

    names = await asyncio.gather(*(one() for _ in range(n)))
    share = names.count("v2") / n
    # Binomial(400, 0.3): sd ~ 2.3 points; 5 sd bounds never flake.
    assert 0.18 < share < 0.42, share
    assert v1.count + v2.count == n


async def test_hop_by_hop_headers_stripped_both_ways(model, flipback):
    v1 = await model("v1")
    v1.behaviour = Behaviour(extra_headers={"Keep-Alive": "timeout=5", "X-Secret": "s",
                                            "Connection": "X-Secret"})
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    headers = {"Connection": "keep-alive, X-Drop-Me, x-forwarded-for", "X-Drop-Me": "1",
               "TE": "trailers", "Proxy-Authorization": "Basic xx", "X-Keep": "1",
               "X-Forwarded-For": "10.9.9.9"}
    async with fb.session.get(fb.url + "/h", headers=headers) as resp:
        assert resp.status == 200
        assert "X-Secret" not in resp.headers
        assert "Keep-Alive" not in resp.headers
    seen = v1.seen[-1].headers
    assert "X-Drop-Me" not in seen and "TE" not in seen and "Proxy-Authorization" not in seen
    assert seen["X-Keep"] == "1"
    # Listing x-forwarded-for in Connection drops the client's value, never ours.
    assert seen["X-Forwarded-For"] == "127.0.0.1"


async def test_content_encoding_passes_untouched(model, flipback):
    v1 = await model("v1")
    import gzip

    raw = gzip.compress(b'{"hello": "world"}')
    v1.behaviour = Behaviour(body=raw, extra_headers={"Content-Encoding": "gzip"})
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    async with fb.session.get(fb.url + "/z", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == raw  # session has auto_decompress=False


async def test_sse_events_arrive_one_by_one(model, flipback):
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="sse", events=3, event_gap=1.0)
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    loop = asyncio.get_running_loop()
    async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
        t0 = loop.time()
        first = await resp.content.readuntil(b"\n\n")
        t_first = loop.time() - t0
        rest = await resp.read()
    assert orjson.loads(first[6:])["i"] == 0
    assert t_first < 0.6, t_first  # not held back until the next event (1 s later)
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_cut_stream_is_not_a_clean_end(model, flipback):
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="cut", events=6)
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    got = b""
    broken = False
    try:
        async with fb.session.get(fb.url + "/s") as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                got += chunk
    except aiohttp.ClientPayloadError:
        broken = True
    assert broken, f"client saw a clean end after {got!r}"
    assert b"[DONE]" not in got


async def test_refused_upstream_is_502_and_other_routes_work(model, flipback, unused_tcp_port):
    v1 = await model("v1")
    text = """
upstreams:
  dead: {{url: "http://127.0.0.1:{dead}"}}
  v1: {{url: "{v1}"}}
routes:
  - name: broken
    match: {{path_prefix: "/dead/"}}
    stable: dead
  - name: fine
    match: {{path_prefix: "/"}}
    stable: v1
"""
    fb = await flipback(text, dead=unused_tcp_port, v1=v1.url)
    async with fb.session.get(fb.url + "/dead/x") as resp:
        assert resp.status == 502
        body = await resp.json()
        assert "dead" in body["error"] and body["request_id"] == resp.headers["x-request-id"]
    async with fb.session.get(fb.url + "/ok") as resp:
        assert resp.status == 200


async def test_upstream_timeout_is_504(model, flipback):
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="hang")
    fb = await flipback(PLAIN, v1=v1.url, extra=", timeout: 300ms")
    async with fb.session.get(fb.url + "/slow") as resp:
        assert resp.status == 504
        assert "request_id" in await resp.json()


async def test_idle_timeout_cuts_a_stalled_stream(model, flipback):
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="sse", events=3, event_gap=1.0)
    fb = await flipback(PLAIN, v1=v1.url, extra=", idle_timeout: 300ms")
    with_error = False
    try:
        async with fb.session.get(fb.url + "/s") as resp:
            await resp.read()
    except aiohttp.ClientPayloadError:
        with_error = True
    assert with_error


async def test_long_stream_not_cut_by_total_timeout(model, flipback):
    # No cap on a whole stream: 6 events 0.2 s apart outlive a 0.5 s idle timeout x 2.
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="sse", events=6, event_gap=0.2)
    fb = await flipback(PLAIN, v1=v1.url, extra=", idle_timeout: 500ms, timeout: 500ms")
    async with fb.session.get(fb.url + "/s") as resp:
        body = await resp.read()
    assert body.count(b"data: ") == 7


async def test_client_disconnect_cancels_upstream(model, flipback):
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="hang")
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    task = asyncio.ensure_future(fb.session.get(fb.url + "/gen"))
    await asyncio.wait_for(v1.started.wait(), 5)
    task.cancel()
    await wait_until(lambda: v1.disconnects, what="the upstream to see the client go")
    assert v1.disconnects == 1


async def test_body_over_max_body_is_413(model, flipback):
    v1 = await model("v1")
    text = 'server: {{listen: "127.0.0.1:0", max_body: 1KiB, inspect_body: 512}}\n' + PLAIN
    fb = await flipback(text, v1=v1.url, extra="")
    async with fb.session.post(fb.url + "/p", data=b"x" * 2048) as resp:
        assert resp.status == 413
    assert v1.count == 0

    async def chunks():
        for _ in range(8):
            yield b"y" * 512

    async with fb.session.post(fb.url + "/p", data=chunks()) as resp:
        assert resp.status == 413


async def test_large_streamed_body_and_response(model, flipback):
    v1 = await model("v1")
    payload = random.randbytes(5 * 1024 * 1024)
    v1.behaviour = Behaviour(body=payload)
    fb = await flipback(PLAIN, v1=v1.url, extra="")
    async with fb.session.post(fb.url + "/big", data=io.BytesIO(payload)) as resp:
        assert await resp.read() == payload
    assert v1.seen[-1].body == payload


async def test_upstream_headers_and_base_path(model, flipback):
    v1 = await model("v1")
    text = """
upstreams:
  v1: {{url: "{v1}/base", headers: {{Authorization: "Bearer up"}}}}
routes:
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
"""
    fb = await flipback(text, v1=v1.url)
    async with fb.session.get(fb.url + "/x", headers={"Authorization": "client"}) as resp:
        assert resp.status == 200
    seen = v1.seen[-1]
    assert seen.path == "/base/x"
    assert seen.headers["Authorization"] == "Bearer up"


async def test_suite_runs_on_uvloop():
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_upstream(answer: Answer) -> AsyncIterator[str]:
    """An upstream on raw sockets: ``answer(head, reader, writer)`` per request, on
    keep-alive connections; yields its URL and closes everything after."""
    writers: list[asyncio.StreamWriter] = []
    serving = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal serving
        serving += 1
        writers.append(writer)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    await answer(await reader.readuntil(b"\r\n\r\n"), reader, writer)
                    await writer.drain()
            writer.close()
        finally:
            serving -= 1

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        await wait_until(lambda: serving == 0, what="the handlers to see the close and return")


async def test_a_body_still_arriving_streams_through_unbuffered(flipback):
    """A body that has all arrived goes upstream as bytes; one still arriving is not
    waited for: the upstream sees the request while the client is still sending."""
    got_head = asyncio.Event()
    received: list[bytes] = []

    async def answer(head: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        got_head.set()
        received.append(head)
        if b"transfer-encoding: chunked" in head.lower():
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                received.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readexactly(2)
        else:
            received.append(await reader.readexactly(10))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with scripted_upstream(answer) as url:
        fb = await flipback(PLAIN, v1=url, extra="")
        reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        await asyncio.wait_for(got_head.wait(), 2)  # before the body's second half
        writer.write(b"67890")
        response = await asyncio.wait_for(reader.readuntil(b"ok"), 2)
        assert response.startswith(b"HTTP/1.1 200")
        assert b"".join(received[1:]) == b"1234567890"
        got_head.clear()
        received.clear()
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"a\r\nabcdefghij\r\n0\r\n\r\n")  # all of it in one segment
        await asyncio.wait_for(reader.readuntil(b"ok"), 2)
        assert b"content-length: 10\r\n" in received[0].lower()  # arrived whole: as bytes
        assert received[1] == b"abcdefghij"
        writer.close()
        await writer.wait_closed()


async def test_headers_are_not_held_for_a_body_still_on_its_way(flipback):
    """Headers go with the body in one write when it came with them, and at once when
    it did not: a client waiting on a slow first token sees the status meanwhile."""

    async def answer(head: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if head.startswith(b"GET /slow"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.6)  # not a wait: the upstream's slow body
            writer.write(b"late")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfast")

    loop = asyncio.get_running_loop()
    async with scripted_upstream(answer) as url:
        fb = await flipback(PLAIN, v1=url, extra="")
        async with fb.session.get(fb.url + "/fast") as resp:
            assert resp.status == 200 and await resp.read() == b"fast"
            assert resp.headers["x-flipback-upstream"] == "v1"
        t0 = loop.time()
        async with fb.session.get(fb.url + "/slow") as resp:
            t_headers = loop.time() - t0
            assert resp.status == 200
            assert await resp.read() == b"late"
        assert t_headers < 0.4, t_headers  # not held back until the body (0.6 s)
