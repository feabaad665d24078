"""LLM figures of one lane (route x upstream) over the route's rollback window.

The same ring of time slots as ``proxy.rollout.windows.SlidingWindow`` (``window /
slots`` wide, running totals kept as slots expire, nothing allocated per response), with
its latency buckets and quantile rule for time to first token, and per-slot sums for the
rest: completion tokens per response, output tokens per second, the share of answers cut
at max_tokens. A response counts when the reader hands it over, and its first token as
soon as it arrives (``record_ttft``, through the reader's ``on_first_token``), so a slow
first token is judged before the stream ends. Responses still waiting for their first
token are marked (``begin``) by the time their request was sent, so ``stats(slow_after)``
counts one waiting longer than ``slow_after`` as a first token that slow already, as the
request window does for hung requests: a canary that sends its headers at once and then
no token trips ``max_ttft_p99`` without waiting for any token or timeout.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from operator import sub

from proxy.llm.reader import Reading
from proxy.rollout.windows import BOUNDS, BUCKETS, Clock, quantiles
from proxy.units import Percent, Seconds, format_duration

_ZEROS = (0,) * BUCKETS


@dataclass(frozen=True, slots=True, kw_only=True)
class LlmStats:
    """One reading of an ``LlmWindow``; None where nothing was measured.

    ``ttft_p50``/``ttft_p99`` are over ``ttft_count`` first tokens (bucket upper bounds,
    as the request windows report; ``slow_waiting`` counted in). ``tokens_per_request`` is
    the mean completion tokens of the ``responses`` with a count (``estimated`` of them
    counted from content events), ``tokens_per_second`` the mean output speed of those
    that had one, and ``finish_length_rate`` the percent of responses cut at max_tokens.
    """

    responses: int
    ttft_count: int
    ttft_p50: Seconds | None
    ttft_p99: Seconds | None
    tokens_per_request: float | None
    estimated: int
    tokens_per_second: float | None
    finish_length_rate: Percent
    finish_errors: int
    waiting: int = 0  # responses with no first token yet
    slow_waiting: int = 0  # of which counted in the TTFT figures (``stats(slow_after)``)


class LlmWindow:
    """Responses of one lane over the last ``window`` seconds (see the module doc)."""

    __slots__ = ("_clock", "_window", "_slots", "_inv", "_head", "_pos", "_ttft", "_ttft_n",
                 "_slot_ttft", "_slot_ttft_n", "_n", "_slot_n", "_sums", "_slot_sums",
                 "_slot_waiting", "_old_waiting", "_waiting")

    # _sums / _slot_sums fields: tokens, responses with tokens, estimated, rate sum,
    # responses with a rate, finish length, finish error
    _FIELDS = 7

    def __init__(self, window: Seconds, clock: Clock, slots: int = 20) -> None:
        if window <= 0 or slots < 1:
            raise ValueError(f"window must be > 0 and slots >= 1, got {window!r}, {slots!r}")
        self._clock = clock
        self._window = window
        self._slots = slots
        self._inv = slots / window
        self._head = int(clock() * self._inv)
        self._pos = self._head % slots
        self._ttft = [0] * BUCKETS
        self._ttft_n = 0
        self._slot_ttft = [[0] * BUCKETS for _ in range(slots)]
        self._slot_ttft_n = [0] * slots
        self._n = 0
        self._slot_n = [0] * slots
        self._sums: list[float] = [0.0] * self._FIELDS
        self._slot_sums: list[list[float]] = [[0.0] * self._FIELDS for _ in range(slots)]
        self._slot_waiting = [0] * slots  # by the slot their request was sent in
        self._old_waiting = 0  # sent before the ring's oldest slot
        self._waiting = 0

    @property
    def window(self) -> Seconds:
        return self._window

    def begin(self, started: float) -> None:
        """A response to a request sent at ``started`` (this window's clock) awaits its
        first token. Every ``begin`` is matched by one ``record_ttft(..., started)`` or
        one ``settle(started)``."""
        self._move()
        if self._head - int(started * self._inv) < self._slots:
            self._slot_waiting[int(started * self._inv) % self._slots] += 1
        else:
            self._old_waiting += 1
        self._waiting += 1

    def settle(self, started: float) -> None:
        """The response begun at ``started`` ended (or its client left) with no token."""
        self._move()
        if self._head - int(started * self._inv) < self._slots:
            self._slot_waiting[int(started * self._inv) % self._slots] -= 1
        else:
            self._old_waiting -= 1
        self._waiting -= 1

    def record_ttft(self, ttft: Seconds, started: float | None = None) -> None:
        """A first token arrived ``ttft`` seconds after the request was sent; with
        ``started``, it ends the wait ``begin(started)`` marked."""
        if started is not None:
            self.settle(started)
        else:
            self._move()
        bucket = bisect_left(BOUNDS, ttft)
        self._slot_ttft[self._pos][bucket] += 1
        self._slot_ttft_n[self._pos] += 1
        self._ttft[bucket] += 1
        self._ttft_n += 1

    def record(self, reading: Reading) -> None:
        """A response ended. Its TTFT counts here unless the reader already handed it to
        ``record_ttft`` (``reading.ttft_reported``)."""
        if reading.ttft is not None and not reading.ttft_reported:
            self.record_ttft(reading.ttft)
        else:
            self._move()
        pos = self._pos
        self._slot_n[pos] += 1
        self._n += 1
        slot, sums = self._slot_sums[pos], self._sums
        tokens = reading.completion_tokens
        if tokens is not None:
            slot[0] += tokens
            slot[1] += 1
            sums[0] += tokens
            sums[1] += 1
            if reading.estimated:
                slot[2] += 1
                sums[2] += 1
        rate = reading.tokens_per_second
        if rate is not None:
            slot[3] += rate
            slot[4] += 1
            sums[3] += rate
            sums[4] += 1
        finish = reading.finish_reason
        if finish == "length":
            slot[5] += 1
            sums[5] += 1
        elif finish == "error":
            slot[6] += 1
            sums[6] += 1

    def stats(self, slow_after: Seconds | None = None) -> LlmStats:
        """Read the window. With ``slow_after``, a response waiting for its first token
        for longer counts as a first token at its known age (to slot resolution, never
        earlier than ``slow_after``), as ``SlidingWindow.stats`` counts hung requests."""
        self._move()
        ttft, count, slow = self._ttft, self._ttft_n, 0
        if slow_after is not None and self._waiting:
            ttft, slow = self._with_slow(slow_after)
            count += slow
        p50, p99 = quantiles(ttft, count)
        sums, n = self._sums, self._n
        return LlmStats(
            responses=n,
            ttft_count=count,
            ttft_p50=p50,
            ttft_p99=p99,
            tokens_per_request=sums[0] / sums[1] if sums[1] else None,
            estimated=round(sums[2]),
            tokens_per_second=sums[3] / sums[4] if sums[4] else None,
            finish_length_rate=sums[5] * 100.0 / n if n else 0.0,
            finish_errors=round(sums[6]),
            waiting=self._waiting,
            slow_waiting=slow,
        )

    def reset(self) -> None:
        """Forget the figures (a new rollout starts clean). Responses waiting for a first
        token are real and will still settle, so they stay tracked."""
        for pos in range(self._slots):
            self._clear(pos)
        self._ttft[:] = _ZEROS
        self._ttft_n = 0
        self._n = 0
        self._sums[:] = [0.0] * self._FIELDS

    def __repr__(self) -> str:
        s = self.stats()
        p99 = "-" if s.ttft_p99 is None else f"{s.ttft_p99:g}s"
        tokens = "-" if s.tokens_per_request is None else f"{s.tokens_per_request:.1f}"
        return (f"<LlmWindow {format_duration(self._window)}: {s.responses} responses, "
                f"ttft p99 {p99}, {tokens} tokens/req, {s.finish_length_rate:.1f}% length>")

    def _move(self) -> None:
        idx = int(self._clock() * self._inv)
        if idx > self._head:
            self._advance(idx)

    def _advance(self, idx: int) -> None:
        """Move the head to slot ``idx``, expiring the slots it passes over."""
        if idx - self._head >= self._slots:
            self._old_waiting += sum(self._slot_waiting)
            self._slot_waiting[:] = (0,) * self._slots
            self.reset()
        else:
            for j in range(self._head + 1, idx + 1):
                pos = j % self._slots
                if self._slot_waiting[pos]:
                    self._old_waiting += self._slot_waiting[pos]
                    self._slot_waiting[pos] = 0
                if self._slot_ttft_n[pos]:
                    self._ttft[:] = map(sub, self._ttft, self._slot_ttft[pos])
                    self._ttft_n -= self._slot_ttft_n[pos]
                if self._slot_n[pos]:
                    self._n -= self._slot_n[pos]
                    self._sums[:] = map(sub, self._sums, self._slot_sums[pos])
                self._clear(pos)
            if not self._n:
                self._sums[:] = [0.0] * self._FIELDS  # no float residue once empty
        self._head = idx
        self._pos = idx % self._slots

    def _with_slow(self, slow_after: Seconds) -> tuple[list[int], int]:
        """The TTFT histogram plus the responses waiting longer than ``slow_after``."""
        now = self._clock()
        width = self._window / self._slots
        last = int((now - slow_after) * self._inv) - 1  # slots whose waits are all slow
        oldest = self._head - self._slots + 1
        ttft = self._ttft.copy()
        slow = 0
        if self._old_waiting and oldest - 1 <= last:
            ttft[bisect_right(BOUNDS, now - oldest * width)] += self._old_waiting
            slow = self._old_waiting
        for j in range(oldest, min(last, self._head) + 1):
            n = self._slot_waiting[j % self._slots]
            if n:
                ttft[bisect_right(BOUNDS, now - (j + 1) * width)] += n
                slow += n
        return ttft, slow

    def _clear(self, pos: int) -> None:
        if self._slot_ttft_n[pos]:
            self._slot_ttft[pos][:] = _ZEROS
            self._slot_ttft_n[pos] = 0
        if self._slot_n[pos]:
            self._slot_n[pos] = 0
            self._slot_sums[pos][:] = [0.0] * self._FIELDS
