"""Cost of the window on the request path: begin()+end() and stats(), with timeit.

Run: ``python loadtests/bench_windows.py``. Targets (CPython 3.11): begin()+end() under
~2 us together, stats() under ~20 us. The clock is ``time.monotonic``, as in production
(``loop.time``), so clock reads and slot rotation are part of the figure.
"""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.rollout.windows import SlidingWindow  # noqa: E402

LATENCIES = (0.012, 0.05, 0.2, 0.35, 1.7, 0.09, 0.004, 0.6)


def per_call_us(stmt: Callable[[], object], number: int) -> float:
    """Best of 5 runs, in microseconds per call (the minimum is the least noisy)."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


def bench(slots: int) -> None:
    window = SlidingWindow(10.0, time.monotonic, slots)
    i = 0

    def request() -> None:
        nonlocal i
        i += 1
        window.end(window.begin(), LATENCIES[i & 7], not i % 50)

    for _ in range(100_000):
        request()
    hung = [window.begin() for _ in range(200)]  # in flight across many slots
    for _ in range(2_000):
        request()
    time.sleep(0.3)  # noqa: TID251 (no event loop here): let the hung requests age
    begin_end = per_call_us(request, 200_000)
    plain = per_call_us(window.stats, 20_000)
    slow = per_call_us(lambda: window.stats(0.2), 20_000)
    s = window.stats(0.2)
    print(
        f"slots={slots:<4} begin()+end() {begin_end:5.2f} us   stats() {plain:5.2f} us   "
        f"stats(slow_after) {slow:5.2f} us   ({s.requests} req, {s.in_flight} in flight, "
        f"{s.slow_in_flight} slow)"
    )
    for started in hung:
        window.forget(started)


if __name__ == "__main__":
    print(f"CPython {sys.version.split()[0]}")
    for slots in (20, 100):
        bench(slots)
