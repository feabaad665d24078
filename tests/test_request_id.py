"""Request ids (server.request_id): what the upstream sees is what the client gets back,
in a form every model server accepts."""

from __future__ import annotations

import re
import uuid

import orjson

from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTE = """
server: {{listen: "127.0.0.1:0"{server}}}
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 100}}
    shadow: {{upstream: v3, sample: 100, compare: {{status: true, record: {record}}}}}
"""


async def _three(model):
    return await model("v1"), await model("v2"), await model("v3")


async def test_generated_ids_are_uuid4_and_the_same_on_every_leg(model, flipback, tmp_path):
    v1, v2, v3 = await _three(model)
    v2.behaviour = Behaviour(mode="status", status=500)  # retried on stable
    v3.behaviour = Behaviour(mode="status", status=404)  # a shadow mismatch, recorded
    record = tmp_path / "diffs.jsonl"
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, v3=v3.url, server="", record=record)
    ids = set()
    for _ in range(5):
        async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
            assert resp.status == 200
            rid = resp.headers["x-request-id"]
        assert uuid.UUID(rid).version == 4 and str(uuid.UUID(rid)) == rid
        ids.add(rid)
    assert len(ids) == 5
    seen = {s.headers["x-request-id"] for s in v1.seen}
    assert seen == ids == {s.headers["x-request-id"] for s in v2.seen}
    await wait_until(lambda: len({s.headers["x-request-id"] for s in v3.seen}) == 5
                     and record.exists() and len(record.read_bytes().splitlines()) == 5,
                     what="five shadow copies and five diff records")
    assert {s.headers["x-request-id"] for s in v3.seen} == ids
    assert {orjson.loads(line)["request_id"] for line in record.read_bytes().splitlines()} == ids


async def test_client_id_passes_untouched_and_generation_can_be_hex32_or_off(model, flipback,
                                                                          tmp_path):
    v1, v2, v3 = await _three(model)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, v3=v3.url, record="null",
                        server=", request_id: {header: x-correlation-id, generate: hex32}")
    async with fb.session.get(fb.url + "/a", headers={"X-Correlation-Id": "Client-ID_42"}) as r:
        assert r.headers["x-correlation-id"] == "Client-ID_42"
        assert "x-request-id" not in r.headers
    assert v2.seen[-1].headers["x-correlation-id"] == "Client-ID_42"
    async with fb.session.get(fb.url + "/a", headers={"X-Request-Id": "other"}) as r:
        made = r.headers["x-correlation-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert v2.seen[-1].headers["x-correlation-id"] == made
    assert v2.seen[-1].headers["x-request-id"] == "other"  # not ours: passed as any header

    v4, v5, v6 = await _three(model)
    off = await flipback(ROUTE, v1=v4.url, v2=v5.url, v3=v6.url, record="null",
                         server=", request_id: {generate: off}")
    async with off.session.get(off.url + "/a") as r:
        assert r.status == 200 and "x-request-id" not in r.headers
    assert "x-request-id" not in v5.seen[-1].headers
    async with off.session.get(off.url + "/a", headers={"X-Request-Id": "mine"}) as r:
        assert r.headers["x-request-id"] == "mine"


async def test_a_garbage_client_id_is_replaced_not_crashed_on(model, flipback):
    """A non-ASCII (or huge) id would break the JSON error body, the logs and the events:
    it is replaced by a generated one, and the upstream sees that one."""
    import asyncio

    v1, v2, v3 = await _three(model)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, v3=v3.url, record="null", server="")
    reader, writer = await asyncio.open_connection("127.0.0.1", fb.app.data_port)
    writer.write(b"GET /nothing HTTP/1.1\r\nHost: a\r\nX-Request-Id: \xff\xfe\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
    rid = re.search(rb"X-Request-Id: ([^\r]+)", reply, re.I).group(1).decode()
    assert uuid.UUID(rid).version == 4
    assert v2.seen[-1].headers["x-request-id"] == rid


async def test_an_upstream_echoing_the_id_and_flipback_headers_gives_the_client_one_each(
        model, flipback, tmp_path):
    """Model servers echo x-request-id (uvicorn's apps do), and a flipback in front of a
    flipback sends its own x-flipback-*: the client still gets one of each, flipback's."""
    v1, v2, v3 = await _three(model)
    echo = {"x-request-id": "from-upstream", "x-flipback-upstream": "inner",
            "x-flipback-version": "inner-v"}
    v2.behaviour = Behaviour(extra_headers=echo)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, v3=v3.url, server="",
                        record=tmp_path / "d.jsonl")
    async with fb.session.post(fb.url + "/x", data=b"{}",
                               headers={"x-request-id": "mine"}) as resp:
        await resp.read()
        assert resp.headers.getall("x-request-id") == ["mine"]
        assert resp.headers.getall("x-flipback-upstream") == ["v2"]
        assert "x-flipback-version" not in resp.headers  # v2 says no version
    off = await flipback(ROUTE, v1=v1.url, v2=v2.url, v3=v3.url,
                         server=", request_id: {generate: off}", record=tmp_path / "e.jsonl")
    async with off.session.post(off.url + "/x", data=b"{}") as resp:
        await resp.read()
        # no id of its own: the upstream's passes through
        assert resp.headers.getall("x-request-id") == ["from-upstream"]
