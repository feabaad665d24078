"""SlidingWindow: expiry, quantiles, in-flight and slow tracking, driven by a fake clock."""

from __future__ import annotations

import pytest

from proxy.rollout.windows import BOUNDS, SlidingWindow

T0 = 1000.0  # not 0, so slot indexes are large like a real monotonic clock's


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(window: float = 10.0, slots: int = 20) -> tuple[SlidingWindow, FakeClock]:
    clock = FakeClock()
    return SlidingWindow(window, clock, slots), clock


def record(w: SlidingWindow, latency: float, failed: bool = False, n: int = 1) -> None:
    for _ in range(n):
        w.end(w.begin(), latency, failed)


def test_window_counts_requests_failures_and_error_rate() -> None:
    w, _ = make()
    record(w, 0.01, n=6)
    record(w, 0.01, failed=True, n=2)
    s = w.stats()
    assert (s.requests, s.failures, s.in_flight) == (8, 2, 0)
    assert s.error_rate == 25.0


def test_window_empty_has_no_quantiles() -> None:
    s = make()[0].stats()
    assert (s.requests, s.error_rate, s.p50, s.p99) == (0, 0.0, None, None)


def test_window_slots_expire_after_window() -> None:
    w, clock = make()
    record(w, 0.01, failed=True, n=5)
    clock.advance(9.4)
    assert w.stats().requests == 5
    clock.advance(0.6)  # the slot of T0 has now left the ring
    s = w.stats()
    assert (s.requests, s.failures, s.error_rate, s.p99) == (0, 0, 0.0, None)


def test_window_partial_expiry_keeps_younger_slots() -> None:
    w, clock = make()
    record(w, 0.01, failed=True, n=5)
    clock.advance(5.0)
    record(w, 2.0, n=3)
    clock.advance(4.9)
    assert (w.stats().requests, w.stats().failures) == (8, 5)
    clock.advance(0.1)
    s = w.stats()
    assert (s.requests, s.failures, s.p50, s.p99) == (3, 0, 2.0, 2.0)
    clock.advance(5.0)
    assert w.stats().requests == 0


def test_window_expiry_while_recording_subtracts_old_figures() -> None:
    w, clock = make(window=1.0, slots=4)
    for _ in range(40):  # 10 s of steady traffic, 1 request per 0.25 s slot
        record(w, 0.05, failed=True)
        clock.advance(0.25)
    s = w.stats()
    assert (s.requests, s.failures) == (3, 3)
    assert s.p99 == 0.05


def test_window_quantiles_two_slow_in_a_hundred() -> None:
    w, _ = make()
    record(w, 0.01, n=98)
    record(w, 3.0, n=2)
    s = w.stats()
    assert s.p50 == 0.01
    assert s.p99 == 3.0


def test_window_quantiles_one_slow_in_a_hundred_is_ignored_by_p99() -> None:
    w, _ = make()
    record(w, 0.01, n=99)
    record(w, 3.0)
    assert w.stats().p99 == 0.01


def test_window_quantiles_are_bucket_upper_bounds() -> None:
    w, _ = make()
    for ms in range(1, 101):
        record(w, ms / 1000)
    s = w.stats()
    assert s.p50 == 0.05  # the 50th sample, 50 ms, is a bound itself
    assert s.p99 == 0.1  # 99 ms lies in (75 ms, 100 ms]


def test_window_quantile_on_a_bound_is_exact() -> None:
    w, _ = make()
    record(w, 0.5, n=100)
    assert w.stats().p99 == 0.5  # not > 0.5: a max_p99 of 500ms does not trip
    record(w, 0.5001, n=3)
    assert w.stats().p99 == 0.6


def test_window_latency_beyond_last_bucket_reports_top_bound() -> None:
    w, _ = make(window=1000.0)
    record(w, 500.0)
    assert w.stats().p99 == BOUNDS[-1] == 120.0


def test_window_in_flight_tracked_until_end() -> None:
    w, _ = make()
    started = [w.begin() for _ in range(3)]
    assert w.stats().in_flight == 3
    assert w.stats().requests == 0  # not counted as completed
    w.end(started[0], 0.1, False)
    s = w.stats()
    assert (s.in_flight, s.requests) == (2, 1)


def test_window_forget_drops_in_flight_without_counting() -> None:
    w, clock = make()
    started = w.begin()
    clock.advance(30.0)  # long enough for its slot to have left the ring
    young = w.begin()
    w.forget(started)
    clock.advance(1.0)
    s = w.stats(slow_after=0.5)
    assert (s.in_flight, s.slow_in_flight, s.requests, s.consecutive_failures) == (1, 1, 1, 0)
    w.forget(young)
    s = w.stats(slow_after=0.5)
    assert (s.in_flight, s.slow_in_flight, s.requests) == (0, 0, 0)


def test_window_counts_hung_request_as_slow_only_after_slow_after() -> None:
    w, clock = make()  # slots of 0.5 s
    record(w, 0.01, n=50)
    clock.advance(0.25)
    w.begin()
    w.begin()
    clock.advance(0.4)
    s = w.stats(slow_after=0.5)
    assert (s.slow_in_flight, s.requests, s.p99) == (0, 50, 0.01)
    clock.advance(0.35)  # 0.75 s since start: the whole start slot is over 0.5 s old
    s = w.stats(slow_after=0.5)
    assert (s.slow_in_flight, s.requests, s.in_flight) == (2, 52, 2)
    assert s.p99 is not None and s.p99 > 0.5
    assert w.stats().requests == 50  # only counted when asked for
    clock.advance(4.0)
    assert w.stats(slow_after=0.5).p99 == 5.0  # the histogram knows how long they hung


def test_window_hung_request_stops_counting_as_slow_once_ended() -> None:
    w, clock = make()
    record(w, 0.01, n=50)
    started = w.begin()
    clock.advance(2.0)
    assert w.stats(slow_after=0.5).slow_in_flight == 1
    w.end(started, 2.0, True)
    s = w.stats(slow_after=0.5)
    assert (s.slow_in_flight, s.in_flight, s.requests, s.failures) == (0, 0, 51, 1)


def test_window_young_in_flight_is_not_slow() -> None:
    w, clock = make()
    w.begin()
    clock.advance(3.0)
    w.begin()
    s = w.stats(slow_after=1.0)
    assert (s.slow_in_flight, s.in_flight) == (1, 2)


@pytest.mark.parametrize("step", [0.5, 60.0], ids=["slot_by_slot", "one_jump"])
def test_window_in_flight_older_than_ring_counted_and_ended(step: float) -> None:
    w, clock = make()
    old = w.begin()
    for _ in range(int(60.0 / step)):
        clock.advance(step)
        w.stats()
    young = w.begin()
    s = w.stats(slow_after=1.0)
    assert (s.in_flight, s.slow_in_flight) == (2, 1)
    # Its exact age is lost with its slot; it sits at the ring's age, the most it can prove.
    assert s.p99 is not None and s.p99 >= 9.5
    w.end(old, 60.0, True)
    clock.advance(1.5)
    s = w.stats(slow_after=1.0)
    # Ending the old request must not have taken the young one's in-flight mark.
    assert (s.in_flight, s.slow_in_flight) == (1, 1)
    w.end(young, 1.5, False)
    s = w.stats(slow_after=1.0)
    assert (s.in_flight, s.slow_in_flight, s.requests) == (0, 0, 2)


def test_window_old_in_flight_not_slow_when_slow_after_exceeds_ring() -> None:
    w, clock = make(window=1.0, slots=4)
    w.begin()
    clock.advance(2.0)
    assert w.stats(slow_after=30.0).slow_in_flight == 0
    assert w.stats(slow_after=0.5).slow_in_flight == 1


def test_window_consecutive_failures_reset_on_success() -> None:
    w, _ = make()
    record(w, 0.01, failed=True, n=3)
    assert w.stats().consecutive_failures == 3
    record(w, 0.01)
    assert w.stats().consecutive_failures == 0
    record(w, 0.01, failed=True, n=2)
    assert w.stats().consecutive_failures == 2


def test_window_consecutive_failures_outlive_expiry() -> None:
    w, clock = make()
    record(w, 0.01, failed=True, n=2)
    clock.advance(30.0)
    record(w, 0.01, failed=True)
    assert w.stats().consecutive_failures == 3


def test_window_reset_forgets_completed_keeps_in_flight() -> None:
    w, clock = make()
    record(w, 0.3, failed=True, n=4)
    started = w.begin()
    w.reset()
    s = w.stats()
    assert (s.requests, s.failures, s.consecutive_failures, s.in_flight) == (0, 0, 0, 1)
    clock.advance(20.0)
    w.end(started, 20.0, False)
    assert (w.stats().in_flight, w.stats().requests) == (0, 1)


def test_window_repr() -> None:
    w, _ = make()
    assert repr(w) == "<SlidingWindow 10s: 0 req, 0 fail, p99 -, 0 in flight>"
    record(w, 0.2, n=117)
    record(w, 0.25, failed=True, n=3)
    w.begin()
    assert repr(w) == "<SlidingWindow 10s: 120 req, 3 fail, p99 0.25s, 1 in flight>"


def test_window_rejects_empty_window() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0.0, FakeClock())
