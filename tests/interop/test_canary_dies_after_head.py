"""A canary that dies between its response head and its body (what a real model server
does when it is killed mid-run: uvicorn writes a FastAPI/Starlette answer's head and body in
two writes, with an event-loop step between them when a middleware is in the stack, as in
MLflow's scoring server). No client byte has to depend on the canary's head, so the
request must be retried on stable with no client error, like a failure before the head.

Found by the interop suite's kill test (test_*::test_canary_killed_mid_run_...): about one
run in six had a client see ``200, Content-Length: 26`` and then a cut connection. No
install needed: two raw asyncio servers stand in for the model servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.interop.common import JSON, Req, send, upstreams

STABLE_BODY = b'{"predictions": [1, 1, 0]}'


async def _serve(dies_after_head: bool) -> tuple[asyncio.AbstractServer, list[int]]:
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                seen.append(1)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(STABLE_BODY))
                if dies_after_head:
                    await writer.drain()
                    await asyncio.sleep(0.05)  # the process is killed here
                    writer.transport.abort()
                    return
                writer.write(STABLE_BODY)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


@pytest.fixture
async def two() -> AsyncIterator[tuple[str, str, list[int], list[int]]]:
    stable, stable_seen = await _serve(False)
    canary, canary_seen = await _serve(True)
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in (stable, canary)]
    yield urls[0], urls[1], stable_seen, canary_seen
    for server in (stable, canary):
        server.close()


async def test_canary_dying_after_its_head_is_retried_on_stable(flipback, two) -> None:
    stable_url, canary_url, stable_seen, canary_seen = two
    fb = await flipback({
        "upstreams": upstreams(stable=stable_url, canary=canary_url),
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "stable": "stable",
                    "canary": {"upstream": "canary", "weight": 100},
                    "rollback": {"enabled": False}}]})
    answer = await send(fb.session, fb.url,
                        Req("/invocations", json.dumps({"inputs": [[1.0]]}).encode(),
                            headers=dict(JSON)))
    assert len(canary_seen) == 1
    assert answer.status == 200
    assert answer.body == STABLE_BODY
    assert answer.header("x-flipback-upstream") == "stable"
    assert answer.header("x-flipback-retried-from") == "canary"
    assert len(stable_seen) == 1
