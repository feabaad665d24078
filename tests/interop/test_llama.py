"""flipback in front of llama-cpp-python's OpenAI-compatible server, on a tiny
llama-architecture GGUF written at test time (``make_gguf.py``: two layers of seeded
random weights, a byte-fallback vocabulary): JSON and SSE completions byte for byte, the
OpenAI SDK, probes on /v1/models (the server has no /health), a killed canary, shadow
compare on ``choices.0.text`` of real (streamed) answers, keep-alive, a gzip body (the
server cannot read it: 500), 10 MiB bodies, and the request ids the server validates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop import common
from tests.interop.common import MIB, UUID4, Case, Req, send, upstreams
from tests.interop.servers import HERE, LLAMA, llama_models, llama_server, start_all

pytestmark = pytest.mark.skipif(LLAMA.missing() is not None, reason=str(LLAMA.missing()))

COMPLETIONS = "/v1/completions"
# Token 70 is the byte 0x43, "C": a +100 bias makes both versions write "CCCC".
FORCED = {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "logit_bias": {"70": 100}}


def big(size: int) -> Req:
    """A completion request carrying a field the server ignores, to ``size`` bytes."""
    doc: dict[str, Any] = {"prompt": "Hello", "max_tokens": 2, "temperature": 0,
                           "padding": ""}
    base = len(json.dumps(doc).encode())
    doc["padding"] = "x" * (size - base)
    return Req.json(COMPLETIONS, doc)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    work = tmp_path_factory.mktemp("llama")
    # stable and the spare load weights of seed 1, the canary of seed 2: they write
    # different text for the same prompt
    one, two = llama_models(work, [1, 2])
    servers = [llama_server(one, work), llama_server(two, work), llama_server(one, work)]
    start_all(servers)
    try:
        yield Case(
            stable=servers[0], canary=servers[1], spare=servers[2],
            json_req=Req.json(COMPLETIONS, {"prompt": "Hello", "max_tokens": 16,
                                            "temperature": 0}),
            # 128 tokens: 16 from the tiny test model could all land in one read on a
            # busy machine, and "pieces > 1" would say nothing about buffering
            sse_req=Req.json(COMPLETIONS, {"prompt": "Hello", "max_tokens": 128,
                                           "temperature": 0, "stream": True}),
            shadow_agree=Req.json(COMPLETIONS, FORCED),
            shadow_differ=Req.json(COMPLETIONS, {"prompt": "Hello", "max_tokens": 8,
                                                 "temperature": 0, "stream": True}),
            json_paths=["choices.0.text", "choices.0.finish_reason", "object"],
            big_req=big,
            ready_path=LLAMA.ready_path)
    finally:
        for server in servers:
            server.kill()


async def test_json_byte_for_byte(flipback, tap, case: Case) -> None:
    answer = await common.json_byte_for_byte(flipback, tap, case)
    doc = json.loads(answer.body)
    assert doc["object"] == "text_completion"
    assert doc["choices"][0]["finish_reason"] in ("length", "stop")


async def test_sse_byte_for_byte(flipback, tap, case: Case) -> None:
    answer, pieces = await common.sse_byte_for_byte(flipback, tap, case)
    events = [line[6:] for line in answer.body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert len(events) > 2
    assert pieces > 1  # the stream reached the client in pieces, not as one buffered body


async def test_openai_sdk_through_flipback(flipback, case: Case) -> None:
    """The OpenAI SDK (in the llama venv) against a 50/50 stable/canary route."""
    fb = await flipback({
        "upstreams": upstreams(stable=case.stable.url, canary=case.canary.url),
        "routes": [{"name": "r", "match": {"path_prefix": "/v1/"}, "stable": "stable",
                    "canary": {"upstream": "canary", "weight": 50}}]})
    proc = await asyncio.create_subprocess_exec(
        str(LLAMA.bin / "python"), str(HERE / "openai_client.py"), fb.url + "/v1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=LLAMA.env())
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    got = json.loads(out)
    for call in ("completion", "chat", "stream"):
        headers = got[call]["headers"]
        assert len(headers["x-request-id"]) == 1, headers  # one id, not the server's and ours
        assert UUID4.match(headers["x-request-id"][0])
        assert headers["x-flipback-upstream"][0] in ("stable", "canary")
    assert got["completion"]["request_id"] == got["completion"]["headers"]["x-request-id"][0]
    assert got["completion"]["finish_reason"] in ("length", "stop")
    assert got["chat"]["role"] == "assistant"
    assert got["stream"]["chunks"] > 2
    assert got["stream"]["finish_reason"] in ("length", "stop")


async def test_health_probes_on_v1_models(flipback, case: Case) -> None:
    await common.health_on_readiness_path(flipback, case)


async def test_canary_killed_mid_run_flips_with_no_client_errors(flipback, case: Case) -> None:
    req = Req.json(COMPLETIONS, {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    figures = await common.canary_killed_mid_run(flipback, case, req, total=100)
    assert figures["route"]["last_event"]["kind"] == "rollback"


async def test_shadow_compare_on_streamed_text(flipback, case: Case, tmp_path: Path) -> None:
    """Agreeing requests are forced to the same text; the differing ones stream (SSE,
    folded by flipback) and the two weight seeds write different text."""
    records = await common.shadow_compare(flipback, case, tmp_path)
    for rec in records:
        paths = {p["path"]: p for p in rec["paths"]}
        assert set(paths) == {"choices.0.text"}, json.dumps(rec)
        assert paths["choices.0.text"]["primary"] != paths["choices.0.text"]["shadow"]


async def test_keepalive_reuse(flipback, tap, case: Case) -> None:
    await common.keepalive_reuse(flipback, tap, case, sequential=20, concurrent=20, width=2)


async def test_gzip_request_body_passes_as_sent(flipback, tap, case: Case) -> None:
    """llama-cpp-python's server does not decode Content-Encoding: gzip: a plain-text
    500, the same through flipback as direct."""
    through, direct = await common.gzip_body(flipback, tap, case)
    assert through.status == 500
    assert through.body == direct.body == b"Internal Server Error"


async def test_large_bodies(flipback, tap, case: Case) -> None:
    answer = await common.large_bodies(flipback, tap, case, 10 * MIB)
    assert json.loads(answer.body)["object"] == "text_completion"


async def test_request_ids(flipback, case: Case) -> None:
    """flipback's generated ids are UUID4s, which the server's starlette-context plugin
    accepts; a client's own id passes untouched, so a client sending one the server
    refuses gets the server's own empty 400, as it would direct."""
    fb = await flipback(common.plain_route(case.stable.url))
    ok = await send(fb.session, fb.url, case.json_req)
    assert ok.status == 200
    assert len(ok.all("x-request-id")) == 1 and UUID4.match(ok.all("x-request-id")[0])
    mine = "3f2b6c1e-8a4d-4f0e-9b7a-2c5d8e1f4a6b"
    kept = await send(fb.session, fb.url, case.json_req, {"x-request-id": mine})
    assert kept.status == 200 and kept.all("x-request-id") == [mine]
    bad = {"x-request-id": "0123456789abcdef"}
    through = await send(fb.session, fb.url, case.json_req, bad)
    direct = await send(fb.session, case.stable.url, case.json_req, bad)
    assert (through.status, through.body) == (direct.status, direct.body) == (400, b"")
