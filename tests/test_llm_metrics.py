"""The flipback_llm_* metrics: what ``LlmSeries.record`` of real readings exposes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.llm.reader import ResponseReader
from proxy.metrics import Metrics
from tests import llm_streams as s

LANE = {"route": "chat", "upstream": "llm-v2", "role": "canary"}


def feed(events: list[str], start: float = 0.0) -> ResponseReader:
    reader = ResponseReader(start=start, content_type="text/event-stream")
    for i, chunk in enumerate(s.sse(events)):
        reader.feed(chunk, start + 0.25 + i * 0.0625)
    return reader


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({**LANE, **labels}.items()))


def test_llm_metrics_record_readings() -> None:
    m = Metrics()
    series = m.llm_series("chat", "llm-v2", "canary")
    assert m.llm_series("chat", "llm-v2", "canary") is series
    with_usage = feed(s.OPENAI_CHAT_USAGE).end(0.25 + 12 * 0.0625)
    estimated = feed(s.VLLM_CHAT_NO_USAGE).end(0.25 + 7 * 0.0625)
    cut = feed(s.LLAMACPP_LENGTH).end(0.25 + 9 * 0.0625, broken=True)
    for reading in (with_usage, estimated, cut):
        assert reading is not None
        series.record(reading)
    got = samples(m)
    assert got[key("flipback_llm_tokens_total", kind="prompt", estimated="false")] == 19 + 14
    assert got[key("flipback_llm_tokens_total", kind="completion", estimated="false")] == 9 + 8
    assert got[key("flipback_llm_tokens_total", kind="completion", estimated="true")] == 6
    assert got[key("flipback_llm_finish_total", finish_reason="stop")] == 2
    assert got[key("flipback_llm_finish_total", finish_reason="length")] == 1
    assert key("flipback_llm_finish_total", finish_reason="error") not in got
    assert got[key("flipback_llm_ttft_seconds_count")] == 3
    assert got[key("flipback_llm_ttft_seconds_sum")] == 0.3125 + 0.3125 + 0.25
    # 8 + 5 + 7 gaps of 62.5 ms, all in the bucket up to 75 ms
    assert got[key("flipback_llm_inter_token_seconds_count")] == 20
    assert got[key("flipback_llm_inter_token_seconds_bucket", le="0.075")] == 20
    assert got[key("flipback_llm_inter_token_seconds_bucket", le="0.05")] == 0
    assert got[key("flipback_llm_inter_token_seconds_sum")] == 20 * 0.0625
    assert got[key("flipback_llm_output_tokens_per_second_count")] == 3


def test_llm_metrics_json_response_and_no_series() -> None:
    m = Metrics()
    assert not [k for k in samples(m) if k[0].startswith("flipback_llm_")]
    reader = ResponseReader(start=0.0, content_type="application/json")
    reader.feed(s.OPENAI_JSON, 0.5)
    reading = reader.end(0.5)
    assert reading is not None
    m.llm_series("chat", "llm-v2", "canary").record(reading)
    got = samples(m)
    assert got[key("flipback_llm_ttft_seconds_count")] == 0
    assert got[key("flipback_llm_inter_token_seconds_count")] == 0
    assert got[key("flipback_llm_output_tokens_per_second_sum")] == 16.0
    assert got[key("flipback_llm_tokens_total", kind="completion", estimated="false")] == 8
