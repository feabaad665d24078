"""LlmLane end to end without sockets: readers fed recorded-shape streams on a fake clock,
the window watched by the LLM rules as the rollout machine will do. A canary whose first
token comes 2 s late (headers at once) trips ``ttft`` on that first token; one whose answers
grow 5x longer trips ``tokens``."""

from __future__ import annotations

from proxy.config.model import RollbackConfig
from proxy.llm.lane import LlmLane
from proxy.llm.rules import LlmTrip, LlmTripReason, evaluate
from proxy.llm.window import LlmWindow
from proxy.metrics import Metrics
from tests import llm_streams as s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = RollbackConfig(min_requests=5, max_ttft_p99=1.0, max_tokens_ratio=3.0)


def lanes() -> tuple[LlmLane, LlmLane, Clock, list[LlmTrip], Metrics]:
    clock, metrics = Clock(), Metrics()
    canary, stable = (LlmLane(route="chat", upstream=name, window=LlmWindow(10.0, clock),
                              metrics=metrics) for name in ("v2", "v1"))
    trips: list[LlmTrip] = []

    def judge() -> None:
        trip = evaluate(POLICY, canary.window.stats(), stable.window.stats())
        if trip is not None and not trips:
            trips.append(trip)

    canary.watch(judge)
    return canary, stable, clock, trips, metrics


def serve(lane: LlmLane, clock: Clock, events: list[str], first: float, role: str,
          repeat: int = 1) -> None:
    """One streamed answer: headers at once, the first chunk ``first`` s after sending."""
    start = clock.now
    reader = lane.reader(start=start, content_type="text/event-stream")
    for _ in range(repeat):
        chunks = s.sse(events[:-1] if repeat > 1 else events)
        for i, chunk in enumerate(chunks):
            clock.now = start + first + i * 0.01
            reader.feed(chunk, clock.now)
        start = clock.now - first
    lane.end(reader, clock.now, role=role)


def test_llm_lane_late_first_token_trips_ttft_on_the_first_token() -> None:
    canary, stable, clock, trips, metrics = lanes()
    for _ in range(5):
        serve(stable, clock, s.VLLM_CHAT_NO_USAGE, 0.1, "stable")
    for i in range(4):
        serve(canary, clock, s.VLLM_CHAT_NO_USAGE, 2.0, "canary")
        assert not trips, i
    # the fifth: the trip lands as its first token arrives, before the stream ends
    reader = canary.reader(start=clock.now, content_type="text/event-stream")
    chunks = s.sse(s.VLLM_CHAT_NO_USAGE)
    reader.feed(chunks[0], clock.now + 0.01)  # role chunk: no token yet
    assert not trips
    reader.feed(chunks[1], clock.now + 2.0)
    assert [t.reason for t in trips] == [LlmTripReason.TTFT]
    # first tokens at 2.01 s and 0.11 s: reported as their buckets' upper bounds
    assert trips[0].detail == "canary TTFT p99 2.5s > 1s over 5 first tokens (stable p99 125ms)"
    assert "v2" in metrics.render().decode()


def test_llm_lane_runaway_answers_trip_tokens() -> None:
    canary, stable, clock, trips, _ = lanes()
    for _ in range(5):
        serve(stable, clock, s.OPENAI_TOOL_CALL, 0.1, "stable")  # 15 tokens each (usage)
    for _ in range(5):
        serve(canary, clock, s.VLLM_CHAT_NO_USAGE, 0.1, "canary", repeat=15)  # 90 each
    assert [t.reason for t in trips] == [LlmTripReason.TOKENS]
    assert trips[0].figures["canary"]["tokens_per_request"] == 90.0  # type: ignore[index]
    assert trips[0].figures["stable"]["tokens_per_request"] == 15.0  # type: ignore[index]


def test_llm_lane_replays_count_in_metrics_not_in_the_window() -> None:
    canary, _, clock, trips, metrics = lanes()
    reader = canary.reader(start=clock.now, content_type="text/event-stream", judged=False)
    for i, chunk in enumerate(s.sse(s.OPENAI_CHAT_USAGE)):
        reader.feed(chunk, clock.now + 3.0 + i * 0.01)
    reading = canary.end(reader, clock.now + 4.0, role="canary", judged=False)
    assert reading is not None and reading.completion_tokens == 9
    assert canary.window.stats().responses == 0 and canary.window.stats().ttft_count == 0
    assert canary.series("canary").tokens == [19, 9, 0]
    other = canary.reader(start=clock.now, content_type="text/plain")
    assert canary.end(other, clock.now, role="canary") is None
    assert not trips


def test_llm_lane_canary_that_never_sends_a_token_trips_on_its_wait() -> None:
    canary, stable, clock, trips, _ = lanes()
    for _ in range(5):
        serve(stable, clock, s.VLLM_CHAT_NO_USAGE, 0.1, "stable")
    readers = []
    for _ in range(5):  # headers at once, then a role chunk, then nothing
        reader = canary.reader(start=clock.now, content_type="text/event-stream")
        reader.feed(s.sse(s.VLLM_CHAT_NO_USAGE)[0], clock.now + 0.01)
        readers.append(reader)
    assert not trips and canary.window.stats().waiting == 5
    clock.now += 1.6  # what the rollout's 100 ms tick would read
    trip = evaluate(POLICY, canary.window.stats(slow_after=POLICY.max_ttft_p99),
                    stable.window.stats())
    assert trip is not None and trip.reason is LlmTripReason.TTFT
    assert "5 still waiting for one" in trip.detail
    for reader in readers:  # the clients give up
        canary.cancel(reader)
    assert canary.window.stats().waiting == 0
