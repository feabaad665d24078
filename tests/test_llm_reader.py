"""ResponseReader on recorded-shape OpenAI responses: figures right to the token and to the
chunk's timestamp, whatever the chunking."""

from __future__ import annotations

from bisect import bisect_left
from pathlib import Path

import pytest

from proxy.llm.reader import INTER_TOKEN_BOUNDS, MAX_LINE, Reading, ResponseReader
from tests import llm_streams as s

START = 100.0
FIRST = 0.5  # the first chunk arrives START + FIRST; each next one STEP later
STEP = 0.03125  # a binary fraction: sums of it are exact
SSE = "text/event-stream; charset=utf-8"


def at(i: int) -> float:
    return START + FIRST + i * STEP


def read(chunks: list[bytes], *, content_type: str = SSE, broken: bool = False,
         cls: type[ResponseReader] = ResponseReader, **kw: object) -> Reading | None:
    reader = cls(start=START, content_type=content_type, **kw)  # type: ignore[arg-type]
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, at(i))
    return reader.end(at(len(chunks) - 1), broken=broken)


def gaps(n: int, gap: float = STEP) -> tuple[int, ...]:
    counts = [0] * (len(INTER_TOKEN_BOUNDS) + 1)
    counts[bisect_left(INTER_TOKEN_BOUNDS, gap)] = n
    return tuple(counts)


def test_reader_openai_stream_with_usage() -> None:
    r = read(s.sse(s.OPENAI_CHAT_USAGE))
    assert r == Reading(
        streamed=True, ttft=FIRST + STEP, ttft_reported=False, content_events=9,
        prompt_tokens=19, completion_tokens=9, estimated=False, finish_reason="stop",
        tokens_per_second=9 / (11 * STEP), inter_token=gaps(8), inter_token_sum=8 * STEP,
    )


def test_reader_stream_without_usage_estimates_tokens_from_content_events() -> None:
    r = read(s.sse(s.VLLM_CHAT_NO_USAGE))
    assert r is not None
    assert (r.ttft, r.content_events, r.completion_tokens, r.estimated) == (
        FIRST + STEP, 6, 6, True)
    assert (r.prompt_tokens, r.finish_reason, r.inter_token_sum) == (None, "stop", 5 * STEP)


def test_reader_tool_call_arguments_are_the_tokens() -> None:
    r = read(s.sse(s.OPENAI_TOOL_CALL))
    assert r is not None
    # the name-only first chunk is not a token; the 5 argument pieces are
    assert (r.ttft, r.content_events, r.finish_reason) == (FIRST + STEP, 5, "tool_calls")
    assert (r.prompt_tokens, r.completion_tokens, r.estimated) == (81, 15, False)


def test_reader_length_cut_stream_from_llamacpp() -> None:
    r = read(s.sse(s.LLAMACPP_LENGTH))
    assert r is not None
    assert (r.ttft, r.content_events, r.finish_reason) == (FIRST, 8, "length")
    assert (r.prompt_tokens, r.completion_tokens, r.estimated) == (14, 8, False)
    assert r.inter_token == gaps(7)


def test_reader_error_chunk_midway_is_an_error_finish() -> None:
    r = read(s.sse(s.OPENAI_ERROR_MIDWAY), broken=True)
    assert r is not None
    assert (r.content_events, r.completion_tokens, r.finish_reason) == (3, 3, "error")


@pytest.mark.parametrize("events", [s.VLLM_CHAT_NO_USAGE[:4], s.OPENAI_CHAT_USAGE[:-1]])
def test_reader_stream_that_ends_without_done_or_finish_is_an_error(events: list[str]) -> None:
    cut = read(s.sse(s.VLLM_CHAT_NO_USAGE[:4]))  # connection closed cleanly, mid-answer
    assert cut is not None and cut.finish_reason == "error"
    r = read(s.sse(events), broken=True)
    assert r is not None
    # a finish_reason already seen stands: the client had the whole answer
    assert r.finish_reason == ("stop" if "stop" in "".join(events) else "error")


def test_reader_error_event_field_is_an_error_finish() -> None:
    chunks = s.sse(s.VLLM_CHAT_NO_USAGE[:3])
    chunks.append(b'event: error\ndata: {"message":"model crashed"}\n\n')
    r = read(chunks)
    assert r is not None and (r.content_events, r.finish_reason) == (2, "error")


def test_reader_legacy_completions_stream() -> None:
    r = read(s.sse(s.LEGACY_COMPLETION))
    assert r is not None
    assert (r.ttft, r.content_events, r.completion_tokens, r.estimated) == (FIRST, 4, 4, True)
    assert r.finish_reason == "length"


def test_reader_non_streamed_json() -> None:
    r = read([s.OPENAI_JSON[:100], s.OPENAI_JSON[100:]], content_type="application/json")
    assert r == Reading(
        streamed=False, ttft=None, ttft_reported=False, content_events=0, prompt_tokens=9,
        completion_tokens=8, estimated=False, finish_reason="stop",
        tokens_per_second=8 / (FIRST + STEP), inter_token=gaps(0), inter_token_sum=0.0,
    )


def test_reader_json_over_the_cap_or_not_a_completion_reads_nothing() -> None:
    assert read([s.OPENAI_JSON], content_type="application/json", max_json=100) is None
    assert read([b'{"data": [1, 2]}'], content_type="application/json") is None
    assert read([b"not json"], content_type="application/json") is None
    broken = read([s.OPENAI_JSON[:50]], content_type="application/json", broken=True)
    assert broken is not None and broken.finish_reason == "error"


@pytest.mark.parametrize(("content_type", "encoding"), [
    ("text/plain", None), (None, None), ("text/event-stream", "gzip"),
])
def test_reader_other_bodies_are_not_read(content_type: str | None, encoding: str | None) -> None:
    reader = ResponseReader(start=START, content_type=content_type, content_encoding=encoding)
    assert not reader.active
    reader.feed(b"".join(s.sse(s.OPENAI_CHAT_USAGE)), at(0))
    assert reader.end(at(1)) is None


def figures(r: Reading | None) -> tuple[object, ...]:
    assert r is not None
    return (r.content_events, r.prompt_tokens, r.completion_tokens, r.estimated,
            r.finish_reason)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_reader_split_at_every_byte_offset(newline: str) -> None:
    whole = b"".join(s.sse(s.OPENAI_CHAT_USAGE, newline))
    expected = (9, 19, 9, False, "stop")
    assert figures(read([whole])) == expected
    for cut in range(1, len(whole)):
        assert figures(read([whole[:cut], whole[cut:]])) == expected, cut
    # and in single bytes, mid-UTF-8 included
    accented = whole.replace(b"Hello", "Héllo 👋".encode())
    assert figures(read([accented[i:i + 1] for i in range(len(accented))])) == expected


def test_reader_split_chunks_time_the_event_when_its_line_completes() -> None:
    chunks = s.sse(s.VLLM_CHAT_NO_USAGE)
    first = chunks[1]  # the first content event, split in three
    split = [chunks[0], first[:10], first[10:-3], first[-3:], *chunks[2:]]
    r = read(split)
    assert r is not None and r.ttft == FIRST + 3 * STEP  # when its line ended
    assert r.content_events == 6


def test_reader_several_events_in_one_chunk() -> None:
    whole = b"".join(s.sse(s.OPENAI_CHAT_USAGE))
    r = read([whole])
    assert r is not None
    assert (r.ttft, r.inter_token[0], r.inter_token_sum) == (FIRST, 8, 0.0)
    assert r.tokens_per_second is None  # no time between first token and end


def test_reader_calls_on_first_token_once_at_the_first_content_event() -> None:
    seen: list[float] = []
    r = read(s.sse(s.OPENAI_CHAT_USAGE), on_first_token=seen.append)
    assert seen == [FIRST + STEP]
    assert r is not None and r.ttft_reported


def test_reader_spaced_json_and_comments_and_multiline_data() -> None:
    chunks = [
        b": keep-alive\n\n",
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}, '
        b'"finish_reason": null}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, '
        b'"finish_reason": null}]}\n\n',
        b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": " you"}, '
        b'"finish_reason": null}]}\n\n',
        b'id: 4\ndata: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], '
        b'"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    r = read(chunks)
    assert r is not None
    assert (r.ttft, r.content_events, r.completion_tokens, r.finish_reason) == (
        FIRST + 2 * STEP, 2, 2, "stop")


def test_reader_reasoning_content_counts_as_first_token() -> None:
    event = ('{"choices":[{"index":0,"delta":{"content":"","reasoning_content":"%s"},'
             '"finish_reason":null}]}')
    events = [event % "Let", event % " me", event.replace('"content":""', '"content":"4"')
              % "", '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', "[DONE]"]
    r = read(s.sse(events))
    assert r is not None and (r.ttft, r.content_events) == (FIRST, 3)


def test_reader_unknown_finish_reasons_map_and_the_worst_choice_wins() -> None:
    events = ['{"choices":[{"index":0,"text":"a","finish_reason":null}]}',
              '{"choices":[{"index":0,"text":"","finish_reason":"eos_token"}]}',
              '{"choices":[{"index":1,"text":"","finish_reason":"length"}]}',
              '{"choices":[{"index":2,"text":"","finish_reason":"weird"}]}', "[DONE]"]
    r = read(s.sse(events))
    assert r is not None and r.finish_reason == "length"
    r = read(s.sse([events[0], events[3], "[DONE]"]))
    assert r is not None and r.finish_reason == "other"


def test_reader_turns_off_on_an_endless_line() -> None:
    reader = ResponseReader(start=START, content_type=SSE)
    reader.feed(b"data: " + b"x" * MAX_LINE, at(0))
    reader.feed(b"x" * 10, at(1))
    assert not reader.active
    assert reader.end(at(2)) is None


class _ParseEveryEvent(ResponseReader):
    __slots__ = ()
    byte_test = False


@pytest.mark.parametrize("events", [
    s.OPENAI_CHAT_USAGE, s.VLLM_CHAT_NO_USAGE, s.OPENAI_TOOL_CALL, s.LLAMACPP_LENGTH,
    s.OPENAI_ERROR_MIDWAY, s.LEGACY_COMPLETION,
])
def test_reader_byte_test_reads_every_fixture_as_parsing_does(events: list[str]) -> None:
    chunks = s.sse(events)
    parsed = _ParseEveryEvent(start=START, content_type=SSE)
    fast = ResponseReader(start=START, content_type=SSE)
    for i, chunk in enumerate(chunks):
        parsed.feed(chunk, at(i))
        fast.feed(chunk, at(i))
    assert fast._fast  # the byte test was in use
    assert fast.end(at(len(chunks))) == parsed.end(at(len(chunks)))


@pytest.mark.parametrize("events", [
    s.OPENAI_CHAT_USAGE, s.VLLM_CHAT_NO_USAGE, s.OPENAI_TOOL_CALL, s.LLAMACPP_LENGTH,
    s.OPENAI_ERROR_MIDWAY, s.LEGACY_COMPLETION,
])
@pytest.mark.parametrize("group", [2, 3])
def test_reader_coalesced_events_read_as_parsing_does(events: list[str], group: int) -> None:
    """Events a server wrote apart arriving together (two or three per read), after the
    byte test took over: the several-events quick path reads them as parsing does."""
    chunks = s.sse(events)
    coalesced = chunks[:2] + [b"".join(chunks[i:i + group])
                              for i in range(2, len(chunks), group)]
    parsed = _ParseEveryEvent(start=START, content_type=SSE)
    fast = ResponseReader(start=START, content_type=SSE)
    for i, chunk in enumerate(coalesced):
        parsed.feed(chunk, at(i))
        fast.feed(chunk, at(i))
    assert fast.end(at(len(coalesced))) == parsed.end(at(len(coalesced)))


@pytest.mark.parametrize("key", ["reasoning", "refusal"])
def test_reader_byte_test_counts_every_text_key_parsing_counts(key: str) -> None:
    def event(text: str) -> str:
        return '{"choices":[{"index":0,"delta":{"' + key + '":"' + text + '"},' \
            '"finish_reason":null}]}'

    events = [event("a"), event("b"), event(""), event("c"),
              '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', "[DONE]"]
    fast, parsed = read(s.sse(events)), read(s.sse(events), cls=_ParseEveryEvent)
    assert fast == parsed
    assert fast is not None and fast.content_events == 3


def test_reader_events_with_several_choices_are_always_parsed() -> None:
    two = ('{"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":%s},'
           '{"index":1,"delta":{"content":"x"},"finish_reason":null}]}')
    events = [two.replace("%s", "a", 1).replace("%s", "null"),
              two.replace("%s", "", 1).replace("%s", '"length"'), "[DONE]"]
    reader = ResponseReader(start=START, content_type=SSE)
    for i, chunk in enumerate(s.sse(events)):
        reader.feed(chunk, at(i))
    assert not reader._fast
    r = reader.end(at(3))
    assert r is not None and (r.content_events, r.finish_reason) == (2, "length")


# Recorded from llama-cpp-python's server (tests/interop's tiny random GGUF, max_tokens 12,
# temperature 0): spaced JSON, no usage chunk even with include_usage, and byte-fallback
# tokens that stream as empty content deltas (6 of 12 tokens carry text).
RECORDED = Path(__file__).resolve().parent / "recorded"


def recorded(name: str) -> list[bytes]:
    """A recorded SSE body as the server flushed it: one event per chunk."""
    body = (RECORDED / name).read_bytes()
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


@pytest.mark.parametrize(("name", "first", "events"), [
    ("llamacpp_python_chat_stream.sse", 1, 6),
    ("llamacpp_python_completions_stream.sse", 1, 3),
])
def test_reader_recorded_llamacpp_python_streams(name: str, first: int, events: int) -> None:
    chunks = recorded(name)
    reader = ResponseReader(start=START, content_type=SSE)
    for i, chunk in enumerate(chunks):
        reader.feed(chunk, at(i))
    assert reader._fast and reader._style.null_finish == b'"finish_reason": null'
    r = reader.end(at(len(chunks) - 1))
    assert r is not None
    assert (r.ttft, r.content_events, r.completion_tokens, r.estimated, r.prompt_tokens,
            r.finish_reason) == (FIRST + first * STEP, events, events, True, None, "length")
    assert r == read(chunks, cls=_ParseEveryEvent)
    whole = b"".join(chunks)
    for cut in range(1, len(whole), 7):
        assert figures(read([whole[:cut], whole[cut:]])) == figures(r), cut


def test_reader_recorded_llamacpp_python_json() -> None:
    body = (RECORDED / "llamacpp_python_chat.json").read_bytes()
    r = read([body], content_type="application/json")
    assert r is not None
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason, r.streamed) == (
        35, 12, "length", False)
