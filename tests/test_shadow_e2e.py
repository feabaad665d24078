"""Shadow traffic end to end (SPEC §6): real fake model servers as primary and shadow; the
shadow answers, differs, hangs, refuses, resets, or is flooded, and the primary must never
notice."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.server import App
from proxy.shadow.mirror import session_bucket
from tests.conftest import make_config
from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTES = """
server: {{listen: "127.0.0.1:0", inspect_body: {inspect_body}}}
upstreams:
  v1: {{url: "{v1}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    shadow: {{upstream: v3, sample: {sample}, max_in_flight: {max_in_flight},
             timeout: {timeout}{compare}}}
  - name: plain
    match: {{path_prefix: "/"}}
    stable: v1
"""


def _cfg(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(inspect_body="1MiB", sample=100, max_in_flight=32,
                                timeout="5s", compare="")
    base.update(kw)
    return base


def _compare(record: Path | None, paths: tuple[str, ...] = ("choices.0.finish_reason",),
             bodies: bool = False) -> str:
    rec = f", record: {record}" if record else ", record: null"
    return (f", compare: {{status: true, json_paths: {list(paths)!r}{rec}, "
            f"bodies: {str(bodies).lower()}}}")


def count(fb: Any, outcome: str) -> float:
    value = fb.runtime.metrics.registry.get_sample_value(
        "flipback_shadow_total", {"route": "chat", "outcome": outcome})
    return value or 0.0


def mismatches(fb: Any, kind: str, primary: str = "v1") -> float:
    value = fb.runtime.metrics.registry.get_sample_value(
        "flipback_shadow_mismatch_total", {"route": "chat", "kind": kind, "primary": primary})
    return value or 0.0


def mismatched(fb: Any, primary: str = "v1") -> float:
    """Requests with any mismatch (a pair differing in status and body counts once)."""
    value = fb.runtime.metrics.registry.get_sample_value(
        "flipback_shadow_mismatched_requests_total", {"route": "chat", "primary": primary})
    return value or 0.0


def compared(fb: Any) -> float:
    """Pairs judged (each observes the latency delta once)."""
    value = fb.runtime.metrics.registry.get_sample_value(
        "flipback_shadow_latency_delta_seconds_count", {"route": "chat"})
    return value or 0.0


def mirror(fb: Any) -> Any:
    return fb.runtime.rollout("chat").shadow


async def post(fb: Any, path: str = "/v1/chat", body: bytes = b'{"prompt": "hi"}',
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with fb.session.post(fb.url + path, data=body, headers=headers) as resp:
        return resp.status, await resp.read()


async def raw_exchange(port: int, request: bytes) -> bytes:
    """One request on a fresh connection (Connection: close); the response bytes as sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


def _without_date(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = [x for x in head.split(b"\r\n") if not x.lower().startswith(b"date:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


async def records(fb: Any, path: Path) -> list[dict[str, Any]]:
    await mirror(fb).flush()
    return _read_lines(path)


# -- copies --------------------------------------------------------------------------------

async def test_shadow_copy_carries_marker_original_headers_and_identical_body(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg())
    body = b'{"model": "x", "messages": [{"role": "user", "content": "hello"}]}'
    request = (b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: api.example\r\n"
               b"Content-Type: application/json\r\nAuthorization: Bearer t0k\r\n"
               b"X-Custom: a\r\nX-Custom: b\r\nX-Hop: drop-me\r\nTE: trailers\r\n"
               b"X-Flipback-Shadow: 0\r\nX-Request-Id: rid-copy\r\n"
               b"Connection: close, X-Hop\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    response = await raw_exchange(fb.app.data_port, request)
    assert response.startswith(b"HTTP/1.1 200")
    await wait_until(lambda: count(fb, "sent") == 1)
    primary, shadow = v1.seen[0], v3.seen[0]
    assert shadow.method == "POST" and shadow.path == "/v1/chat?x=1"
    assert shadow.body == primary.body == body

    def names(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [(k.lower(), v) for k, v in raw if k.lower() not in (b"host", b"x-flipback-shadow")]

    assert names(shadow.raw_headers) == names(primary.raw_headers)
    assert [v for k, v in shadow.raw_headers if k.lower() == b"x-flipback-shadow"] == [b"1"]
    assert "x-flipback-shadow" not in primary.headers  # the client's copy is dropped
    assert not {"x-hop", "te", "connection"} & {k.lower() for k in shadow.headers}
    assert shadow.headers.getall("x-custom") == ["a", "b"]
    assert shadow.headers["authorization"] == "Bearer t0k"
    assert shadow.headers["x-request-id"] == "rid-copy"
    assert mirror(fb).in_flight == 0


async def test_a_body_arriving_in_pieces_is_mirrored_whole(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg())
    body = b'{"prompt": "' + b"x" * 2000 + b'"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body[:700]))
    await writer.drain()
    # Not a wait: a slow client's pace, so the handler starts with the body incomplete.
    await asyncio.sleep(0.05)
    writer.write(body[700:])
    response = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert response.startswith(b"HTTP/1.1 200")
    await wait_until(lambda: count(fb, "sent") == 1)
    assert v3.seen[0].body == v1.seen[0].body == body


async def test_shadow_get_without_body_is_mirrored(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg())
    async with fb.session.get(fb.url + "/v1/models") as resp:
        assert resp.status == 200
    await wait_until(lambda: count(fb, "sent") == 1)
    assert v3.seen[0].method == "GET" and v3.seen[0].body == b""


# -- comparison ------------------------------------------------------------------------------

@pytest.mark.parametrize("slower", ["shadow", "primary"])
async def test_status_mismatch_is_counted_and_recorded(model, flipback, tmp_path, slower):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(status=500, delay=0.15 if slower == "shadow" else 0.0)
    v1.behaviour = Behaviour(delay=0.15 if slower == "primary" else 0.0)
    path = tmp_path / "diffs.jsonl"
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(compare=_compare(path)))
    status, _ = await post(fb, headers={"x-request-id": "rid-500"})
    assert status == 200  # the client never sees the shadow's answer
    await wait_until(lambda: mismatches(fb, "status") == 1)
    assert mismatches(fb, "body") == 0
    lines = await records(fb, path)
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "rid-500" and line["route"] == "chat"
    assert line["method"] == "POST" and line["path"] == "/v1/chat"
    assert line["mismatch"] == ["status"]
    assert line["primary"]["status"] == 200 and line["primary"]["upstream"] == "v1"
    assert line["shadow"]["status"] == 500 and line["shadow"]["upstream"] == "v3"
    for side in ("primary", "shadow"):
        assert line[side]["ttfb_ms"] >= 0 and line[side]["total_ms"] >= line[side]["ttfb_ms"]
    assert line["paths"] == []  # finish_reason agrees (the fake answers "stop" either way)
    assert "bodies" not in line
    # shadow minus primary: positive when the shadow was slower
    reg = fb.runtime.metrics.registry
    name = "flipback_shadow_latency_delta_seconds"
    assert reg.get_sample_value(f"{name}_count", {"route": "chat"}) == 1
    below_zero = reg.get_sample_value(f"{name}_bucket", {"route": "chat", "le": "0.0"})
    assert below_zero == (0 if slower == "shadow" else 1)
    assert count(fb, "sent") == 1


async def test_json_path_mismatch_records_both_values(model, flipback, tmp_path):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(body=orjson.dumps(
        {"choices": [{"finish_reason": "length", "message": {"content": "hi"}}]}))
    path = tmp_path / "diffs.jsonl"
    paths = ("choices.0.finish_reason", "choices.0.message.content", "model")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(compare=_compare(path, paths)))
    for i in range(3):
        assert (await post(fb, headers={"x-request-id": f"rid-{i}"}))[0] == 200
    await wait_until(lambda: mismatches(fb, "body") == 3)
    assert mismatches(fb, "status") == 0
    lines = await records(fb, path)
    assert sorted(x["request_id"] for x in lines) == ["rid-0", "rid-1", "rid-2"]
    assert lines[0]["mismatch"] == ["body"]
    assert lines[0]["paths"] == [
        {"path": "choices.0.finish_reason", "primary": "stop", "shadow": "length"},
        {"path": "model", "primary": "v1", "shadow": None, "missing": ["shadow"]},
    ]
    assert "bodies" not in lines[0]


async def test_bodies_are_recorded_only_when_asked(model, flipback, tmp_path):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(status=503, body=b'{"error": "overloaded"}')
    path = tmp_path / "diffs.jsonl"
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url,
                        **_cfg(compare=_compare(path, bodies=True)))
    await post(fb)
    await wait_until(lambda: mismatches(fb, "status") == 1)
    (line,) = await records(fb, path)
    assert line["bodies"]["shadow"] == '{"error": "overloaded"}'
    assert orjson.loads(line["bodies"]["primary"])["model"] == "v1"
    assert line["mismatch"] == ["status", "body"]
    assert line["paths"][0]["shadow"] is None and line["paths"][0]["missing"] == ["shadow"]
    # Two kinds, one request: the alert's rate (requests / copies sent) stays <= 100%.
    await wait_until(lambda: mismatches(fb, "body") == 1)
    assert mismatched(fb) == 1 == count(fb, "sent")


async def test_paths_are_not_compared_past_inspect_body(model, flipback, tmp_path):
    v1, v3 = await model("v1"), await model("v3")
    big = orjson.dumps({"choices": [{"finish_reason": "stop"}], "pad": "x" * 4000})
    v1.behaviour = Behaviour(body=big)
    v3.behaviour = Behaviour(status=500, body=orjson.dumps(
        {"choices": [{"finish_reason": "length"}]}))
    path = tmp_path / "diffs.jsonl"
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url,
                        **_cfg(inspect_body="1KiB", compare=_compare(path, bodies=True)))
    status, body = await post(fb)
    assert status == 200 and body == big  # the client gets it all, whatever is kept
    await wait_until(lambda: mismatches(fb, "status") == 1)
    assert mismatches(fb, "body") == 0
    (line,) = await records(fb, path)
    assert line["paths"] == [] and line["paths_skipped"] == "a body was over inspect_body"
    assert len(line["bodies"]["primary"]) == 1024
    assert line["bodies"]["truncated"] == ["primary"]


def _sse(content: list[str], finish: str) -> list[bytes]:
    chunks = [b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": c},
                                                       "finish_reason": None}]}) + b"\n\n"
              for c in content]
    chunks.append(b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {},
                                                          "finish_reason": finish}]}) + b"\n\n")
    return [*chunks, b"data: [DONE]\n\n"]


async def test_streams_are_compared_on_the_assembled_sse_data(model, flipback, tmp_path):
    v1, v3 = await model("v1"), await model("v3")
    v1.behaviour = Behaviour(mode="sse", chunks=_sse(["Hel", "lo", " world"], "stop"),
                             event_gap=0.01)
    v3.behaviour = Behaviour(mode="sse", chunks=_sse(["Hello", " there"], "length"))
    path = tmp_path / "diffs.jsonl"
    paths = ("choices.0.finish_reason", "choices.0.delta.content")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(compare=_compare(path, paths)))
    status, body = await post(fb, headers={"x-request-id": "rid-sse"})
    assert status == 200 and body == b"".join(_sse(["Hel", "lo", " world"], "stop"))
    await wait_until(lambda: mismatches(fb, "body") == 1)
    (line,) = await records(fb, path)
    assert line["paths"] == [
        {"path": "choices.0.finish_reason", "primary": "stop", "shadow": "length"},
        {"path": "choices.0.delta.content", "primary": "Hello world", "shadow": "Hello there"},
    ]


async def test_long_streams_are_compared_off_the_loop(model, flipback, tmp_path):
    v1, v3 = await model("v1"), await model("v3")
    words = ["w" * 100] * 400  # ~70 KB of SSE per side: folded in a worker thread
    v1.behaviour = Behaviour(mode="sse", chunks=_sse(words, "stop"))
    v3.behaviour = Behaviour(mode="sse", chunks=_sse(words, "length"))
    path = tmp_path / "diffs.jsonl"
    paths = ("choices.0.finish_reason", "choices.0.delta.content")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(compare=_compare(path, paths)))
    assert (await post(fb))[0] == 200
    await wait_until(lambda: mismatches(fb, "body") == 1)
    (line,) = await records(fb, path)
    assert line["paths"] == [
        {"path": "choices.0.finish_reason", "primary": "stop", "shadow": "length"}]


async def test_agreeing_shadow_counts_no_mismatch_and_writes_nothing(model, flipback, tmp_path):
    v1, v3 = await model("v1"), await model("v1")  # same answers
    path = tmp_path / "diffs.jsonl"
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(compare=_compare(path)))
    for _ in range(5):
        await post(fb)
    await wait_until(lambda: compared(fb) == 5, what="the 5 pairs judged")
    assert count(fb, "sent") == 5
    assert mismatches(fb, "status") == mismatches(fb, "body") == 0
    assert await records(fb, path) == []


# -- failures of the shadow never reach the primary -------------------------------------------

async def test_hung_shadow_times_out_and_never_slows_the_primary(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(mode="hang")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(timeout="300ms",
                                                            compare=_compare(None)))
    loop = asyncio.get_running_loop()
    for _ in range(5):
        t0 = loop.time()
        status, body = await post(fb)
        assert status == 200 and orjson.loads(body)["model"] == "v1"
        assert loop.time() - t0 < 0.15  # the shadow hangs for 300 ms+
    assert mirror(fb).in_flight == 5 and count(fb, "timeout") == 0
    await wait_until(lambda: count(fb, "timeout") == 5 and mirror(fb).in_flight == 0)
    assert count(fb, "sent") == 0
    await wait_until(lambda: v3.disconnects == 5)  # the hung exchanges were aborted
    assert mismatches(fb, "status") == 0  # a failed shadow is not compared


async def test_over_max_in_flight_copies_are_dropped(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(mode="hang")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(max_in_flight=2, timeout="400ms"))
    for _ in range(6):
        assert (await post(fb))[0] == 200
    assert count(fb, "dropped") == 4 and mirror(fb).in_flight == 2
    await wait_until(lambda: count(fb, "timeout") == 2 and mirror(fb).in_flight == 0)
    v3.behaviour = Behaviour()
    assert (await post(fb))[0] == 200  # room again
    await wait_until(lambda: count(fb, "sent") == 1)
    assert v3.count == 3


async def test_refused_shadow_counts_error(model, flipback, unused_tcp_port):
    v1 = await model("v1")
    fb = await flipback(ROUTES, v1=v1.url, v3=f"http://127.0.0.1:{unused_tcp_port}",
                        **_cfg(compare=_compare(None)))
    for _ in range(3):
        assert (await post(fb))[0] == 200
    await wait_until(lambda: count(fb, "error") == 3)
    assert count(fb, "sent") == 0 and v1.count == 3


async def test_reset_shadow_counts_error(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(mode="reset")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg())
    for _ in range(3):
        status, body = await post(fb)
        assert status == 200 and orjson.loads(body)["model"] == "v1"
    await wait_until(lambda: count(fb, "error") == 3)
    assert count(fb, "sent") == 0


async def test_shadow_stream_cut_midway_counts_error(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(mode="cut", events=6)
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(compare=_compare(None)))
    assert (await post(fb))[0] == 200
    await wait_until(lambda: count(fb, "error") == 1)


async def test_body_over_inspect_body_is_not_mirrored(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(inspect_body="1KiB"))
    big = b"x" * 4096
    status, body = await post(fb, body=big)
    assert status == 200 and orjson.loads(body)["echo_len"] == 4096
    assert count(fb, "skipped_body") == 1
    assert (await post(fb, body=b"small"))[0] == 200
    await wait_until(lambda: count(fb, "sent") == 1)
    assert [s.body for s in v3.seen] == [b"small"]
    assert v1.seen[0].body == big


# -- sampling ----------------------------------------------------------------------------------

async def _burst(fb: Any, n: int, concurrency: int = 16) -> None:
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            assert (await post(fb))[0] == 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def test_sample_zero_never_mirrors(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(sample=0))
    await _burst(fb, 50)
    # A copy is in flight from the request that offers it until counted: none was offered.
    assert mirror(fb).in_flight == 0
    assert [count(fb, o) for o in ("sent", "error", "timeout", "dropped")] == [0] * 4
    assert v3.count == 0 and v1.count == 50


async def test_sample_thirty_mirrors_about_thirty_percent(model, flipback):
    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url, **_cfg(sample=30, max_in_flight=1000))
    n = 400
    await _burst(fb, n)
    await wait_until(lambda: mirror(fb).in_flight == 0)
    hits = v3.count
    assert count(fb, "sent") == hits and count(fb, "dropped") == 0
    assert abs(hits - n * 0.3) <= 5 * math.sqrt(n * 0.3 * 0.7), hits


SESSION_ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    canary: {{upstream: v2, weight: 50}}
    sticky: {{json_field: user}}
    shadow: {{upstream: v3, sample: 30, by: session, max_in_flight: 1000}}
"""


async def test_by_session_mirrors_whole_conversations(model, flipback):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    fb = await flipback(SESSION_ROUTE, v1=v1.url, v2=v2.url, v3=v3.url)
    users = [f"user-{i}" for i in range(120)]
    for turn in range(3):
        for user in users:
            body = b'{"user": "%s", "turn": %d}' % (user.encode(), turn)
            async with fb.session.post(fb.url + "/v1/chat", data=body) as resp:
                assert resp.status == 200
                await resp.read()
    await wait_until(lambda: mirror(fb).in_flight == 0)
    copies: dict[str, int] = {}
    for seen in v3.seen:
        user = orjson.loads(seen.body)["user"]
        copies[user] = copies.get(user, 0) + 1
    assert set(copies.values()) == {3}  # every turn of a mirrored conversation, or none
    assert set(copies) == {u for u in users if session_bucket(u) < 3000}  # the key's bucket
    assert 0.15 < len(copies) / len(users) < 0.45


# -- isolation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_primary_response_is_byte_identical_with_and_without_shadow(
        model, flipback, tmp_path, mode):
    v1, v3 = await model("v1"), await model("v3")
    if mode == "sse":
        v1.behaviour = Behaviour(mode="sse", chunks=_sse(["a", "b"], "stop"))
    v3.behaviour = Behaviour(status=500, body=b"nope")  # disagrees on everything
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url,
                        **_cfg(compare=_compare(tmp_path / "d.jsonl", bodies=True)))
    body = b'{"prompt": "same"}'

    def request(path: bytes) -> bytes:
        return (b"POST %s HTTP/1.1\r\nHost: h\r\nX-Request-Id: fixed\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (path, len(body), body))

    shadowed = await raw_exchange(fb.app.data_port, request(b"/v1/chat"))
    plain = await raw_exchange(fb.app.data_port, request(b"/chat"))
    await wait_until(lambda: mismatches(fb, "status") == 1)
    assert _without_date(shadowed) == _without_date(plain)
    assert b"x-flipback-upstream: v1" in shadowed.lower()
    assert v3.count == 1 and v1.count == 2


async def test_shutdown_with_hung_shadows_is_prompt(model, tmp_path):
    v1, v3 = await model("v1"), await model("v3")
    v3.behaviour = Behaviour(mode="hang")
    app = App(make_config(ROUTES, tmp_path, v1=v1.url, v3=v3.url, **_cfg(timeout="30s")))
    await app.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"http://127.0.0.1:{app.data_port}/v1/x", data=b"{}") as r:
                assert r.status == 200
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await app.aclose()
    assert loop.time() - t0 < 2.0
    assert app.runtime.rollout("chat").shadow.in_flight == 0


async def test_mirrored_requests_leave_no_cyclic_garbage(model, flipback, tmp_path):
    import gc

    v1, v3 = await model("v1"), await model("v3")
    fb = await flipback(ROUTES, v1=v1.url, v3=v3.url,
                        **_cfg(compare=_compare(tmp_path / "d.jsonl")))
    await post(fb)
    await wait_until(lambda: count(fb, "sent") == 1)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            await post(fb)
        await wait_until(lambda: count(fb, "sent") == 21)
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("proxy.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []  # freed by refcount: the GC never has to run for the shadow path


RELOADED = """
upstreams:
  v1: {{url: "{v1}"}}
  v3: {{url: "{v3}"}}
  v4: {{url: "{v4}"}}
routes:
  - name: chat
    match: {{path_prefix: /}}
    stable: v1
    shadow: {{upstream: {shadow}, sample: 100}}
    {extra}
"""


async def test_reload_keeps_an_unchanged_mirror_and_closes_a_replaced_one(model, tmp_path):
    v1, v3, v4 = await model("v1"), await model("v3"), await model("v4")

    def config(shadow: str, extra: str = "") -> Any:  # written to tmp_path/flipback.yaml
        return make_config(RELOADED, tmp_path, v1=v1.url, v3=v3.url, v4=v4.url,
                           shadow=shadow, extra=extra)

    app = App(config("v3"), str(tmp_path / "flipback.yaml"))
    await app.start()
    try:
        first = app.runtime.rollout("chat").shadow
        config("v3", extra="fallback: v4")
        assert (await app.watcher.check(force=True)).ok
        assert app.runtime.rollout("chat").shadow is first  # unchanged: the same mirror
        v3.behaviour = Behaviour(mode="hang")  # a copy still out when the mirror goes
        url = f"http://127.0.0.1:{app.data_port}/v1/x"
        async with aiohttp.ClientSession() as session, session.post(url, data=b"{}") as r:
            assert r.status == 200
        await wait_until(lambda: first.in_flight == 1)
        config("v4")
        assert (await app.watcher.check(force=True)).ok
        assert app.runtime.rollout("chat").shadow is not first
        assert not first.closed
        await wait_until(lambda: first.closed and first.in_flight == 0)  # after its 1 s grace
        assert first.pool.in_flight == 0  # the hung copy's connection was aborted
    finally:
        await app.aclose()


AA_ROUTES = """
server: {{listen: "127.0.0.1:0"}}
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    shadow: {{upstream: {shadow}, sample: 100, compare: {{json_paths: [model], record: null}}}}
"""


@pytest.mark.parametrize("shadow", ["v1", "v2"])
async def test_shadow_may_be_the_stable_or_the_canary_and_mismatches_name_the_primary(
        model, flipback, shadow):
    # Issue 17: an A/A shadow (the stable's own upstream) and a canary shadowing stable's
    # answers, each counted by the primary that answered the client.
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(AA_ROUTES, v1=v1.url, v2=v2.url, weight=0, shadow=shadow)
    for _ in range(3):
        assert (await post(fb, "/x"))[0] == 200
    await wait_until(lambda: compared(fb) == 3)
    copies = [s for s in (v1 if shadow == "v1" else v2).seen if "x-flipback-shadow" in s.headers]
    assert len(copies) == 3
    differs = 0 if shadow == "v1" else 3  # the fake answers {"model": its name}
    assert mismatches(fb, "body", primary="v1") == differs == mismatched(fb, primary="v1")
    assert mismatches(fb, "status", primary="v1") == 0
    # The canary's series are there at 0 before it answers anything.
    assert mismatched(fb, primary="v2") == 0
    assert fb.runtime.metrics.registry.get_sample_value(
        "flipback_shadow_mismatched_requests_total", {"route": "chat", "primary": "v2"}) == 0
