"""LlmWindow (figures over the rollback window, fake clock) and the LLM rollback rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.config.model import RollbackConfig
from proxy.llm.reader import INTER_TOKEN_BOUNDS, Reading, ResponseReader
from proxy.llm.rules import LlmTripReason, evaluate, figures_of
from proxy.llm.window import LlmStats, LlmWindow
from tests import llm_streams as s

T0 = 1000.0
_GAPS = (0,) * (len(INTER_TOKEN_BOUNDS) + 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def reading(ttft: float | None = 0.2, tokens: int | None = 100, finish: str = "stop",
            rate: float | None = 50.0, estimated: bool = False,
            reported: bool = False) -> Reading:
    return Reading(streamed=True, ttft=ttft, ttft_reported=reported, content_events=tokens or 0,
                   prompt_tokens=10, completion_tokens=tokens, estimated=estimated,
                   finish_reason=finish, tokens_per_second=rate, inter_token=_GAPS,
                   inter_token_sum=0.0)


def test_llm_window_figures() -> None:
    w = LlmWindow(10.0, FakeClock())
    for i in range(8):
        w.record(reading(ttft=0.2, tokens=100 + i, rate=40.0 + i))
    w.record(reading(ttft=1.7, tokens=200, finish="length", rate=None, estimated=True))
    w.record(reading(ttft=None, tokens=None, finish="error", rate=None))
    st = w.stats()
    assert st == LlmStats(responses=10, ttft_count=9, ttft_p50=0.2, ttft_p99=2.0,
                          tokens_per_request=(sum(range(100, 108)) + 200) / 9, estimated=1,
                          tokens_per_second=sum(range(40, 48)) / 8, finish_length_rate=10.0,
                          finish_errors=1)
    figures = figures_of(st)
    assert figures["ttft_p99_ms"] == 2000.0 and figures["finish_length_rate"] == 10.0


def test_llm_window_first_token_counts_once_when_reported_early() -> None:
    w = LlmWindow(10.0, FakeClock())
    reader = ResponseReader(start=T0, content_type="text/event-stream",
                            on_first_token=w.record_ttft)
    for i, chunk in enumerate(s.sse(s.OPENAI_CHAT_USAGE)):
        reader.feed(chunk, T0 + 0.3 + i * 0.01)
        if i == 1:  # judged as soon as the first token is in
            assert (w.stats().ttft_count, w.stats().responses) == (1, 0)
    got = reader.end(T0 + 1.0)
    assert got is not None
    w.record(got)
    st = w.stats()
    assert (st.ttft_count, st.responses, st.tokens_per_request) == (1, 1, 9.0)
    assert st.ttft_p50 == 0.4  # 0.31 s, in the bucket up to 0.4


def test_llm_window_slides() -> None:
    clock = FakeClock()
    w = LlmWindow(10.0, clock, slots=20)
    w.record(reading(ttft=3.0, tokens=500, finish="length"))
    clock.now += 5.0
    w.record(reading(ttft=0.1, tokens=10))
    assert w.stats().responses == 2
    clock.now += 5.0  # the first slot left
    st = w.stats()
    assert (st.responses, st.ttft_p99, st.tokens_per_request, st.finish_length_rate) == (
        1, 0.1, 10.0, 0.0)
    clock.now += 60.0
    st = w.stats()
    assert (st.responses, st.ttft_count, st.ttft_p99, st.tokens_per_request) == (0, 0, None, None)
    w.record(reading(tokens=7))
    assert w.stats().tokens_per_request == 7.0
    w.reset()
    assert w.stats().responses == 0
    assert "0 responses" in repr(w)


def stats(n: int = 20, p99: float | None = 0.3, tokens: float | None = 100.0,
          length: float = 0.0, estimated: int = 0) -> LlmStats:
    return LlmStats(responses=n, ttft_count=n, ttft_p50=0.1, ttft_p99=p99,
                    tokens_per_request=tokens, estimated=estimated, tokens_per_second=40.0,
                    finish_length_rate=length, finish_errors=0)


POLICY = RollbackConfig(min_requests=20, max_ttft_p99=1.0, max_ttft_ratio=3.0,
                        max_tokens_ratio=2.0, max_finish_length_rate=10.0)


@pytest.mark.parametrize(("canary", "reason", "detail"), [
    (stats(p99=2.0), LlmTripReason.TTFT,
     "canary TTFT p99 2s > 1s over 20 first tokens (stable p99 300ms)"),
    (stats(p99=1.0, tokens=10.0), LlmTripReason.TTFT_RATIO,
     "canary TTFT p99 1s is 3.3x stable's 300ms > 3x over 20 first tokens"),
    (stats(tokens=500.0), LlmTripReason.TOKENS,
     "canary answers 500.0 completion tokens per request, 5.0x stable's 100.0 > 2x over "
     "20 responses"),
    (stats(tokens=500.0, estimated=20), LlmTripReason.TOKENS,
     "canary answers 500.0 completion tokens per request, 5.0x stable's 100.0 > 2x over "
     "20 responses (some counts estimated from streamed chunks)"),
    (stats(length=15.0), LlmTripReason.FINISH_LENGTH,
     "canary cut 15.0% of answers at max_tokens > 10% over 20 responses (stable 0.0%)"),
])
def test_llm_rules_trip(canary: LlmStats, reason: LlmTripReason, detail: str) -> None:
    trip = evaluate(POLICY, canary, stats())
    assert trip is not None
    assert (trip.reason, trip.detail) == (reason, detail)
    assert trip.figures["canary"] == figures_of(canary)
    assert trip.figures["thresholds"] == {
        "window_s": 10.0, "min_requests": 20, "max_ttft_p99_ms": 1000.0, "max_ttft_ratio": 3.0,
        "max_tokens_ratio": 2.0, "max_finish_length_rate": 10.0}


def test_llm_rules_hold_below_min_requests_off_or_within() -> None:
    bad = stats(p99=5.0, tokens=900.0, length=90.0)
    assert evaluate(POLICY, replace(bad, responses=19, ttft_count=19), stats()) is None
    assert evaluate(replace(POLICY, enabled=False), bad, stats()) is None
    assert evaluate(RollbackConfig(), bad, stats()) is None  # no LLM rule set
    assert evaluate(POLICY, stats(p99=0.75, tokens=200.0, length=10.0), stats(p99=0.25)) is None


def test_llm_ratio_rules_need_stable_figures() -> None:
    canary = stats(p99=1.0, tokens=500.0)
    assert evaluate(POLICY, canary, stats(n=5)) is None
    assert evaluate(POLICY, canary, stats(p99=None, tokens=None)) is None
    assert evaluate(POLICY, canary, stats(tokens=0.0, p99=0.0)) is None


def test_llm_window_counts_a_long_wait_for_a_first_token_as_slow() -> None:
    clock = FakeClock()
    w = LlmWindow(10.0, clock, slots=20)  # 0.5 s slots
    w.begin(T0)
    clock.now = T0 + 0.6
    w.begin(T0 + 0.6)
    clock.now = T0 + 1.4
    assert w.stats().waiting == 2
    # a wait counts once its whole slot is over slow_after old: T0's slot ended at +0.5
    assert w.stats(slow_after=1.0).slow_waiting == 0
    clock.now = T0 + 1.6
    st = w.stats(slow_after=1.0)
    assert (st.ttft_count, st.slow_waiting, st.waiting, st.ttft_p99) == (1, 1, 2, 1.25)
    assert w.stats().ttft_count == 0  # only when asked
    clock.now = T0 + 2.1
    assert w.stats(slow_after=1.0).slow_waiting == 2
    w.record_ttft(1.9, T0)  # the token comes: a real first token now, no longer waiting
    st = w.stats(slow_after=1.0)
    assert (st.ttft_count, st.slow_waiting, st.waiting) == (2, 1, 1)
    clock.now += 30.0  # the wait outlives the ring: still counted, at the ring's age
    st = w.stats(slow_after=1.0)
    assert (st.ttft_count, st.slow_waiting, st.ttft_p99) == (1, 1, 10.0)
    w.settle(T0 + 0.6)
    st = w.stats(slow_after=1.0)
    assert (st.ttft_count, st.waiting, st.slow_waiting) == (0, 0, 0)
