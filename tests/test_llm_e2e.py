"""LLM telemetry end to end (issue 18): the official ``openai`` SDK (async and sync,
streaming and not) through a real flipback in front of real streaming upstreams; the
figures to the token, the LLM rules tripping, and the stream reaching the client intact."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    llm: {{telemetry: true}}
    rollback: {{judge: threshold, min_requests: 5, window: 30s{rules}}}
"""


def chat_stream(words: list[str], *, usage: bool = True, finish: str = "stop",
                prompt_tokens: int = 7) -> list[bytes]:
    """An OpenAI chat.completion.chunk stream, one chunk per word (each a token)."""

    def event(delta: dict[str, Any], finish_reason: str | None = None,
              **extra: Any) -> bytes:
        doc = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
               **extra}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    chunks = [event({"role": "assistant", "content": ""})]
    chunks += [event({"content": w}) for w in words]
    chunks.append(event({}, finish))
    if usage:
        chunks.append(b"data: " + orjson.dumps({
            "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                     "completion_tokens": len(words),
                                     "total_tokens": prompt_tokens + len(words)}}) + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def chat_json(words: list[str], prompt_tokens: int = 7) -> bytes:
    return orjson.dumps({
        "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "".join(words)}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                  "total_tokens": prompt_tokens + len(words)}})


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of ``/metrics`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def scrape(fb: Any) -> str:
    async with fb.session.get(fb.admin + "/metrics") as resp:
        return await resp.text()


def client(fb: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=fb.url + "/v1", api_key="test", max_retries=0)


_OPEN: list[AsyncOpenAI] = []


async def opened(sdk: AsyncOpenAI) -> AsyncOpenAI:
    """An SDK client closed after the test (its pooled connections would outlive the
    event loop otherwise)."""
    _OPEN.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
async def _close_clients() -> Any:
    yield
    while _OPEN:
        await _OPEN.pop().close()


async def test_stream_figures_are_right_to_the_token_with_the_sdk(model, flipback):
    """12 words streamed with include_usage: 12 completion and 7 prompt tokens counted
    (not estimated), one finish "stop", a TTFT; the client gets exactly the words."""
    words = [f"w{i} " for i in range(12)]
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(mode="sse", chunks=chat_stream(words), event_gap=0.002)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, rules="")
    text = ""
    async with client(fb) as sdk:
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text == "".join(words)
    metrics = await scrape(fb)
    labels = {"route": "chat", "upstream": "v1", "role": "stable"}
    assert metric(metrics, "flipback_llm_tokens_total", kind="completion", estimated="false",
                  **labels) == 12
    assert metric(metrics, "flipback_llm_tokens_total", kind="prompt", **labels) == 7
    assert metric(metrics, "flipback_llm_finish_total", finish_reason="stop", **labels) == 1
    assert metric(metrics, "flipback_llm_ttft_seconds_count", **labels) == 1
    route = await fb.get_json("/routes/chat")
    llm = route["upstreams"]["v1"]["llm"]
    assert llm["tokens_per_request"] == 12 and llm["ttft_p50_ms"] is not None


async def test_json_answers_and_the_sync_sdk_are_counted_too(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(body=chat_json(["a", "b", "c"], prompt_tokens=4))
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, rules="")

    def call() -> str:
        with OpenAI(base_url=fb.url + "/v1", api_key="test", max_retries=0) as sync:
            answer = sync.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}])
            return answer.choices[0].message.content or ""

    assert await asyncio.to_thread(call) == "abc"
    metrics = await scrape(fb)
    assert metric(metrics, "flipback_llm_tokens_total", kind="completion", route="chat",
                  upstream="v1") == 3
    assert metric(metrics, "flipback_llm_tokens_total", kind="prompt", route="chat") == 4


async def test_a_canary_answering_5x_longer_trips_tokens(model, flipback):
    """The runaway-generation case: same speed, five times the completion tokens."""
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(mode="sse", chunks=chat_stream(["x "] * 10))
    v2.behaviour = Behaviour(mode="sse", chunks=chat_stream(["x "] * 50))
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=50,
                        rules=", max_tokens_ratio: 3")
    sdk = await opened(client(fb))

    async def one() -> None:
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        async for _ in stream:
            pass

    async def tripped() -> bool:
        await asyncio.gather(*(one() for _ in range(4)))
        return fb.runtime.rollout("chat").latch is not None

    await wait_until(tripped, timeout=20, what="a tokens trip")
    latch = fb.runtime.rollout("chat").latch
    assert latch.reason == "tokens", latch
    event = next(e for e in fb.runtime.events.recent(20) if e.kind == "rollback")
    assert event.figures["canary"]["tokens_per_request"] == 50
    assert event.figures["stable"]["tokens_per_request"] == 10


async def test_a_slow_first_token_behind_fast_headers_trips_ttft(model, flipback):
    """Headers and a role-only chunk at once, the first word 2 s later: TTFB is fast, so
    only the time to first token sees it; the trip comes while the token is awaited."""
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(mode="sse", chunks=chat_stream(["a ", "b "]))
    v2.behaviour = Behaviour(mode="sse", chunks=chat_stream(["a ", "b "]), first_gap=2.0)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=50,
                        rules=", max_ttft_p99: 500ms, max_p99: 10s")
    sdk = await opened(client(fb))

    async def one() -> None:
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        async for _ in stream:
            pass

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = [asyncio.ensure_future(one()) for _ in range(24)]  # ~12 canary, min 5
    await wait_until(lambda: fb.runtime.rollout("chat").latch is not None, timeout=10,
                     what="a ttft trip")
    elapsed = loop.time() - start
    await asyncio.gather(*tasks)
    latch = fb.runtime.rollout("chat").latch
    assert latch.reason == "ttft", latch
    assert elapsed < 2.0, elapsed  # before any canary first token arrived
    rollout = fb.runtime.rollout("chat")
    assert rollout.route.rollback.latency == "ttfb"  # TTFB alone would not have seen it


@pytest.mark.parametrize("gap", [0.02])
async def test_streams_pass_byte_for_byte_with_their_timing(model, flipback, gap):
    """Telemetry on changes nothing for the client: the same bytes, and each chunk
    arrives when the upstream sent it (within a few ms), not buffered."""
    chunks = chat_stream([f"t{i} " for i in range(10)])
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(mode="sse", chunks=chunks, event_gap=gap)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, rules="")
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    body = b""
    async with fb.session.post(fb.url + "/v1/chat/completions", data=b"{}") as resp:
        start = loop.time()
        async for piece in resp.content.iter_any():
            arrivals.append(loop.time() - start)
            body += piece
    assert body == b"".join(chunks)
    assert len(arrivals) >= len(chunks) // 2  # pieces, not one buffered body
    assert arrivals[-1] >= gap * (len(chunks) - 2)  # spread over the upstream's pace


SHADOWED = """
upstreams:
  v1: {{url: "{v1}"}}
  v3: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    llm: {{telemetry: true}}
    shadow:
      upstream: v3
      sample: 100
      compare: {{status: true, json_paths: [choices.0.finish_reason], record: "{record}"}}
"""


async def test_the_shadow_leg_is_read_too_and_its_record_shows_both_sides(
        model, flipback, tmp_path):
    """The copies' answers count under role "shadow"; a mismatch record carries what
    telemetry read of each side (a shadow answering 3x longer, cut at max_tokens)."""
    v1, v3 = await model("v1"), await model("v3")
    v1.behaviour = Behaviour(mode="sse", chunks=chat_stream(["a "] * 4))
    v3.behaviour = Behaviour(mode="sse", chunks=chat_stream(["a "] * 12, finish="length"))
    record = tmp_path / "diffs.jsonl"
    fb = await flipback(SHADOWED, v1=v1.url, v3=v3.url, record=record)
    async with fb.session.post(fb.url + "/v1/chat/completions", data=b"{}") as resp:
        await resp.read()
    await wait_until(lambda: record.exists() and record.stat().st_size > 0,
                     what="a shadow mismatch record")
    entry = orjson.loads(record.read_bytes().splitlines()[0])
    assert entry["primary"]["llm"]["completion_tokens"] == 4
    assert entry["shadow"]["llm"]["completion_tokens"] == 12
    assert entry["shadow"]["llm"]["finish_reason"] == "length"
    metrics = await scrape(fb)
    assert metric(metrics, "flipback_llm_tokens_total", kind="completion", role="shadow",
                  upstream="v3") == 12
    assert metric(metrics, "flipback_llm_finish_total", finish_reason="length",
                  role="shadow") == 1


async def test_sync_streaming_and_async_json_with_the_sdk(model, flipback):
    """The other two SDK combinations: the sync client streaming (no usage asked: the
    completion is estimated from the content events) and the async client without a
    stream."""
    words = ["one ", "two ", "three "]
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(mode="sse", chunks=chat_stream(words, usage=False))
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, rules="")

    def call() -> str:
        with OpenAI(base_url=fb.url + "/v1", api_key="test", max_retries=0) as sync:
            stream = sync.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(call) == "one two three "
    metrics = await scrape(fb)
    assert metric(metrics, "flipback_llm_tokens_total", kind="completion", estimated="true",
                  route="chat", upstream="v1") == 3
    v1.behaviour = Behaviour(body=chat_json(["x", "y"], prompt_tokens=2))
    sdk = await opened(client(fb))
    answer = await sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "xy"
    metrics = await scrape(fb)
    assert metric(metrics, "flipback_llm_tokens_total", kind="completion", estimated="false",
                  route="chat", upstream="v1") == 2
