"""Shadow traffic units (SPEC §6): sampling, session buckets, JSON paths, SSE folding,
comparison verdicts, the capped primary copy and the capped diff record."""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from proxy.answer import MISSING, document, fold, is_sse, lookup, same, sse_data
from proxy.config.model import CompareConfig, ShadowConfig, UpstreamConfig
from proxy.metrics import Metrics
from proxy.rollout.sticky import bucket, key_hash
from proxy.shadow.compare import PathDiff, compare
from proxy.shadow.mirror import SESSION_BUCKETS, ShadowCopy, ShadowMirror, Side, session_bucket
from proxy.shadow.record import DiffRecord
from proxy.upstream.pool import UpstreamPool


def make_mirror(sample: float, by: str = "request", seed: int = 7,
                compare_cfg: CompareConfig | None = None) -> ShadowMirror:
    cfg = ShadowConfig(upstream="v3", sample=sample, by=by, compare=compare_cfg)
    pool = UpstreamPool(UpstreamConfig(name="v3", url="http://127.0.0.1:9", port=9))
    return ShadowMirror(route="chat", cfg=cfg, pool=pool, metrics=Metrics(),
                        rng=random.Random(seed))


def within_5_sd(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p))


# -- sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [0.1, 1, 10, 30, 50, 99])
def test_sampling_by_request_hits_the_rate(sample: float) -> None:
    mirror = make_mirror(sample)
    n = 20_000
    hits = sum(mirror.should_mirror() for _ in range(n))
    assert within_5_sd(hits, n, sample / 100), hits


def test_sampling_zero_never_and_hundred_always() -> None:
    never, always = make_mirror(0), make_mirror(100)
    assert not any(never.should_mirror() for _ in range(10_000))
    assert all(always.should_mirror() for _ in range(10_000))


def test_sampling_is_reproducible_with_a_seeded_rng() -> None:
    m1, m2 = make_mirror(10, seed=3), make_mirror(10, seed=3)
    assert [m1.should_mirror() for _ in range(500)] == [m2.should_mirror() for _ in range(500)]


def test_session_bucket_pins_exact_values() -> None:
    assert session_bucket("alice") == 8020
    assert session_bucket("bob") == 9389
    assert session_bucket("conv-42") == 8640
    assert session_bucket("") == 7883


def test_session_bucket_is_the_same_in_another_process() -> None:
    code = "from proxy.shadow.mirror import session_bucket; print(session_bucket('alice'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert int(out) == session_bucket("alice")


def test_session_bucket_is_independent_of_the_canary_bucket() -> None:
    keys = [f"user-{i}" for i in range(20_000)]
    # Sessions on a 10% canary and sessions shadowed at 10% must not be the same set.
    canary = {k for k in keys if bucket(key_hash(k)) < 1000}
    shadowed = {k for k in keys if session_bucket(k) < 1000}
    both = len(canary & shadowed)
    assert within_5_sd(both, len(canary), 0.10), both


def test_sampling_by_session_mirrors_whole_conversations_at_the_rate() -> None:
    mirror = make_mirror(20, by="session")
    keys = [f"conv-{i}" for i in range(20_000)]
    first = {k: mirror.should_mirror(k) for k in keys}
    assert within_5_sd(sum(first.values()), len(keys), 0.20)
    # every later request of a conversation gets the same answer
    assert all(mirror.should_mirror(k) == first[k] for k in keys[:2000])
    assert all(first[k] == (session_bucket(k) < 20 * SESSION_BUCKETS / 100) for k in keys)


def test_sampling_by_session_without_a_key_falls_back_to_the_request_rate() -> None:
    mirror = make_mirror(30, by="session")
    n = 10_000
    assert within_5_sd(sum(mirror.should_mirror(None) for _ in range(n)), n, 0.30)


# -- JSON paths --------------------------------------------------------------------------

DOC = {
    "id": "x",
    "choices": [
        {"finish_reason": "stop", "message": {"content": "hi", "tool_calls": []}},
        {"finish_reason": "length"},
    ],
    "usage": {"total_tokens": 12},
    "flags": {"0": "zero-key"},
    "none": None,
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("id", "x"),
        ("choices.0.finish_reason", "stop"),
        ("choices.1.finish_reason", "length"),
        ("choices.-1.finish_reason", "length"),
        ("choices.0.message.content", "hi"),
        ("choices.0.message.tool_calls", []),
        ("usage.total_tokens", 12),
        ("flags.0", "zero-key"),  # a digit is a key in an object
        ("none", None),  # present and null is not missing
        ("choices.2.finish_reason", MISSING),  # index out of range
        ("choices.-3", MISSING),
        ("choices.first", MISSING),  # not an index
        ("usage.prompt_tokens", MISSING),  # absent key
        ("id.more", MISSING),  # through a scalar
        ("none.x", MISSING),
        ("", MISSING),
    ],
)
def test_lookup_follows_dotted_paths(path: str, expected: object) -> None:
    got = lookup(DOC, path)
    assert got is expected if expected is MISSING else got == expected


def test_lookup_in_missing_document_is_missing() -> None:
    assert lookup(MISSING, "a.b") is MISSING
    assert lookup([1, 2], "1") == 2


def test_same_is_json_equality() -> None:
    assert same(1, 1.0)
    assert not same(True, 1)
    assert not same({"a": [True]}, {"a": [1]})
    assert same({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})
    assert not same([1], [1, 2])
    assert same(MISSING, MISSING)
    assert not same(MISSING, None)


# -- SSE -----------------------------------------------------------------------------------

def test_sse_data_follows_the_event_stream_rules() -> None:
    body = (b": comment\r\n"
            b"event: message\r\ndata: one\r\n\r\n"
            b"data:two\n"
            b"data:  three\n\n"  # only one space is dropped
            b"id: 7\nretry: 100\n\n"  # no data: no event
            b"data\n\n"  # a bare data line is empty data
            b"data: incomplete")  # no blank line after it: not an event
    assert sse_data(body) == ["one", "two\n three", ""]


def test_is_sse_tells_streams_from_json() -> None:
    assert is_sse(b"data: {}\n\n")
    assert is_sse(b"\n: keep-alive\n\n")
    assert is_sse(b"event: x\ndata: 1\n\n")
    assert not is_sse(b'{"data": 1}')
    assert not is_sse(b"[1, 2]")


def _chunk(**fields: object) -> bytes:
    return b"data: " + orjson.dumps(fields) + b"\n\n"


OPENAI_STREAM = b"".join([
    _chunk(id="c1", model="m", choices=[{"index": 0, "delta": {"role": "assistant",
                                                              "content": ""},
                                          "finish_reason": None}]),
    _chunk(id="c1", model="m", choices=[{"index": 0, "delta": {"content": "Hel"},
                                          "finish_reason": None}]),
    _chunk(id="c1", model="m", choices=[{"index": 1, "delta": {"content": "Other"},
                                          "finish_reason": None}]),
    _chunk(id="c1", model="m", choices=[{"index": 0, "delta": {"content": "lo"},
                                          "finish_reason": None}]),
    _chunk(id="c1", model="m", choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    _chunk(id="c1", model="m", choices=[{"index": 1, "delta": {}, "finish_reason": "length"}]),
    _chunk(id="c1", model="m", choices=[], usage={"completion_tokens": 3}),
    b"data: not json\n\n",
    b"data: [DONE]\n\n",
])


def test_fold_assembles_an_openai_chunk_stream() -> None:
    doc = document(OPENAI_STREAM)
    assert lookup(doc, "choices.0.finish_reason") == "stop"
    assert lookup(doc, "choices.0.delta.content") == "Hello"
    assert lookup(doc, "choices.0.delta.role") == "assistant"
    assert lookup(doc, "choices.1.delta.content") == "Other"
    assert lookup(doc, "choices.1.finish_reason") == "length"
    assert lookup(doc, "usage.completion_tokens") == 3
    assert lookup(doc, "id") == "c1"  # not concatenated: only text fields are


def test_fold_of_completion_stream_and_plain_lists() -> None:
    doc = fold(['{"choices":[{"text":"a","index":0}],"seq":[1,2]}',
                '{"choices":[{"text":"b","index":0}],"seq":[3]}', "[DONE]"])
    assert lookup(doc, "choices.0.text") == "ab"
    assert lookup(doc, "seq") == [3, 2]  # position-wise merge, later wins
    assert fold(["[DONE]", "plain text"]) is MISSING
    assert document(b"<html>oops</html>") is MISSING


# -- verdicts ------------------------------------------------------------------------------

def test_compare_status_and_paths() -> None:
    cfg = CompareConfig(json_paths=("choices.0.finish_reason", "model", "usage.x"))
    a = b'{"model": "m", "choices": [{"finish_reason": "stop"}]}'
    b = b'{"model": "m", "choices": [{"finish_reason": "length"}], "usage": {"x": 1}}'
    v = compare(cfg, primary_status=200, shadow_status=500, primary_body=a, shadow_body=b)
    assert v.status_differs and v.kinds == ["status", "body"]
    assert [d.path for d in v.paths] == ["choices.0.finish_reason", "usage.x"]
    assert v.paths[0].as_json() == {"path": "choices.0.finish_reason", "primary": "stop",
                                    "shadow": "length"}
    assert v.paths[1].as_json() == {"path": "usage.x", "primary": None, "shadow": 1,
                                    "missing": ["primary"]}
    same_v = compare(cfg, primary_status=200, shadow_status=200, primary_body=a, shadow_body=a)
    assert same_v.kinds == [] and same_v.paths_compared


def test_compare_without_status_check_or_whole_bodies() -> None:
    cfg = CompareConfig(status=False, json_paths=("a",))
    v = compare(cfg, primary_status=200, shadow_status=503, primary_body=None,
                shadow_body=b'{"a": 1}')
    assert v.kinds == [] and not v.paths_compared
    assert PathDiff(path="p", primary=MISSING, shadow=MISSING).as_json()["missing"] == [
        "primary", "shadow"]


def test_compare_sse_against_json() -> None:
    cfg = CompareConfig(json_paths=("choices.0.finish_reason",))
    json_body = b'{"choices": [{"finish_reason": "stop"}]}'
    v = compare(cfg, primary_status=200, shadow_status=200, primary_body=OPENAI_STREAM,
                shadow_body=json_body)
    assert v.kinds == []


# -- the capped primary copy -----------------------------------------------------------------

def test_pair_keeps_at_most_the_cap() -> None:
    mirror = make_mirror(100, compare_cfg=CompareConfig(json_paths=("a",), record=None))
    pair = ShadowCopy(mirror, "POST", "/v1/x", [], b"", "rid", 10, keep_bodies=True)
    assert pair.wants_body
    for chunk in (b"1234", b"5678", b"90ab", b"cdef"):
        pair.keep(chunk)
    pair.primary_done("v1", 200, 0.1, 0.2)
    assert pair._primary is not None
    assert pair._primary.body == b"1234567890" and pair._primary.truncated
    for chunk in (b"12345", b"67890"):  # exactly the cap: whole, not truncated
        pair.body(chunk)
    assert pair._s_body is not None
    assert pair._s_body.take() == b"1234567890" and not pair._s_body.truncated
    lean = ShadowCopy(mirror, "POST", "/v1/x", [], b"", "rid", 10, keep_bodies=False)
    assert not lean.wants_body


def test_pair_is_judged_once_when_both_sides_are_in() -> None:
    cfg = CompareConfig(json_paths=("a",), record=None)
    mirror = make_mirror(100, compare_cfg=cfg)
    pair = ShadowCopy(mirror, "POST", "/v1/x", [], b"", "rid", 100, keep_bodies=True)
    pair.keep(b'{"a": 1}')
    pair._shadow_done(Side("v3", 200, 0.5, 0.6, b'{"a": 2}', False))
    pair._primary = Side("v1", 200, 0.1, 0.2, b'{"a": 1}', False)
    verdict = mirror.judge(pair)
    assert verdict is not None and verdict.kinds == ["body"]
    assert mirror.judge(pair) is None  # already judged


# -- the record ------------------------------------------------------------------------------

async def test_record_stops_at_record_max_and_counts(tmp_path: Path) -> None:
    counts: dict[str, int] = {}

    def count(result: str, n: int) -> None:
        counts[result] = counts.get(result, 0) + n

    path = tmp_path / "sub" / "diffs.jsonl"
    entry = {"request_id": "r" * 20, "route": "chat"}
    line = len(orjson.dumps(entry)) + 1
    record = DiffRecord(str(path), line * 3 + line // 2, count)
    for _ in range(5):
        record.append(entry)
    await record.flush()
    assert path.stat().st_size == line * 3
    assert [orjson.loads(x) for x in path.read_bytes().splitlines()] == [entry] * 3
    assert counts == {"written": 3, "full": 2}
    assert record.full
    record.append(entry)  # counted at once, nothing queued
    assert counts["full"] == 3 and not record._pending
    await record.aclose()


async def test_record_honours_the_size_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "diffs.jsonl"
    path.write_bytes(b"x" * 95 + b"\n")
    counts: dict[str, int] = {}
    record = DiffRecord(str(path), 100, lambda r, n: counts.__setitem__(r, n))
    record.append({"a": 1})  # 8 bytes: would make 104
    await record.flush()
    assert path.stat().st_size == 96 and counts == {"full": 1}


async def test_record_append_never_waits_for_the_disk(tmp_path: Path) -> None:
    record = DiffRecord(str(tmp_path / "d.jsonl"), 10_000_000, lambda r, n: None)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(1000):
        record.append({"i": i})
    assert loop.time() - t0 < 0.5  # queued, not written, on the loop
    await record.flush()
    assert len((tmp_path / "d.jsonl").read_bytes().splitlines()) == 1000


def test_compare_survives_absurdly_deep_documents() -> None:
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    v = compare(CompareConfig(json_paths=("a",)), primary_status=200, shadow_status=200,
                primary_body=deep, shadow_body=deep)
    assert v.paths_compared  # judged (as differing: too deep to tell), never raised
    stream = b"".join(b"data: " + b'{"a":' * 995 + b"1" + b"}" * 995 + b"\n\n" for _ in range(2))
    document(stream)  # folding either works or gives MISSING, never raises
