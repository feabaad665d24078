"""Everything that reads a primary answer as it streams to the client, behind one object.

Four features read the answer a client gets, never delaying a byte of it: the shadow
comparison (a capped copy, ``ShadowCopy.keep``), the quality guards (a capped copy for
output drift and feedback, ``Rollout.answered``; a paired copy's primary side for
``guard.compare``, another ``ShadowCopy``) and LLM telemetry (``ResponseReader``: first
token, tokens, finish reason). ``AnswerWatch.start`` builds a watch only for a
response some feature wants to read, so a plain route's answers pay one None check per
chunk; ``feed`` after each chunk is written, then exactly one of ``done`` (the answer
reached the client whole), ``broken`` (it broke after its head) or ``cancel`` (the
client went away).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from proxy.answer import Capped, header_value
from proxy.llm.reader import ResponseReader
from proxy.rollout.lanes import Lane
from proxy.rollout.machine import Rollout
from proxy.shadow.mirror import ShadowCopy

_draw = random.random


def _guarded_arm(rollout: Rollout, lane: Lane, role: str, status: int,
                 judged: bool) -> str | None:
    """The arm the route's guards read this answer as ("canary", "stable", or "replay"
    for an answer to a request another lane failed), or None when they do not read it."""
    if rollout.guards is None or not 200 <= status < 300 or role == "override":
        return None
    if lane is rollout.canary:
        return "canary" if judged else "replay"
    if lane is rollout.base_lane:
        return "stable" if judged else "replay"
    return None


def guard_answer(rollout: Rollout, lane: Lane, role: str, status: int, body: bytes,
                 request_id: str, *, judged: bool, limit: int) -> None:
    """A whole answer (it came in one piece with its head) for the route's guards, read
    after the request, without an ``AnswerWatch``: the usual JSON answer of a route whose
    only readers are the guards (the cheap path: no watch, no copy)."""
    arm = _guarded_arm(rollout, lane, role, status, judged)
    if arm is None:
        return
    guards = rollout.guards
    assert guards is not None
    draw = _draw()
    if guards.wants_answer(arm, draw):
        rollout.answered(arm, body if len(body) <= limit else None, draw=draw,
                         request_id=request_id)
    elif guards.store is not None:
        rollout.answered(arm, None, draw=draw, request_id=request_id)


class AnswerWatch:
    """The readers of one primary answer (see the module docstring)."""

    __slots__ = ("rollout", "lane", "role", "request_id", "judged", "tap", "pair", "reader",
                 "arm", "draw", "copy", "_now", "_keep")

    def __init__(self, rollout: Rollout, lane: Lane, role: str, request_id: str,
                 judged: bool, now: Callable[[], float]) -> None:
        self.rollout = rollout
        self.lane = lane
        self.role = role
        self.request_id = request_id
        self.judged = judged
        self.tap: ShadowCopy | None = None
        self.pair: ShadowCopy | None = None  # guard.compare's copy, when this is a pair
        self.reader: ResponseReader | None = None
        self.arm: str | None = None  # "canary", "stable" or "replay": the guards read it
        self.draw = 0.0
        self.copy: Capped | None = None  # the guards' capped copy of the body
        self._now = now
        self._keep: Callable[[bytes], None] | None = None

    @classmethod
    def start(cls, rollout: Rollout, lane: Lane, role: str, *, status: int,
              headers: list[tuple[bytes, bytes]], request_id: str, sent_at: float,
              judged: bool, tap: ShadowCopy | None, pair: ShadowCopy | None,
              inspect_body: int, now: Callable[[], float]) -> AnswerWatch | None:
        """A watch for this answer, or None when no feature reads it. ``judged``: the
        answer is not a replay of a request another lane failed."""
        watch: AnswerWatch | None = None
        if tap is not None:
            watch = cls(rollout, lane, role, request_id, judged, now)
            watch.tap = tap
            if tap.wants_body:
                watch._keep = tap.keep
        if pair is not None and judged:  # a replay's answer is not the paired version's
            watch = watch or cls(rollout, lane, role, request_id, judged, now)
            watch.pair = pair
        llm = lane.llm
        if llm is not None and 200 <= status < 300:
            watch = watch or cls(rollout, lane, role, request_id, judged, now)
            watch.reader = llm.reader(
                start=sent_at, content_type=header_value(headers, b"content-type"),
                content_encoding=header_value(headers, b"content-encoding"), judged=judged)
        arm = _guarded_arm(rollout, lane, role, status, judged)
        if arm is not None:
            guards = rollout.guards
            assert guards is not None
            draw = _draw()
            wanted = guards.wants_answer(arm, draw)
            if wanted or guards.store is not None:  # else the guards would not read it
                watch = watch or cls(rollout, lane, role, request_id, judged, now)
                watch.arm = arm
                watch.draw = draw
                if wanted:
                    watch.copy = Capped(inspect_body)
        return watch

    def feeder(self) -> Callable[[bytes], None]:
        """What the handler calls with each chunk: ``feed``, or, when LLM telemetry is the
        only reader (the usual LLM route), the reader itself behind one closure: a 200-chunk
        stream pays ~10 µs less."""
        reader = self.reader
        if reader is None or self._keep is not None or self.copy is not None or self.pair:
            return self.feed
        feed, clock = reader.feed, self._now

        def read(chunk: bytes) -> None:
            feed(chunk, clock())

        return read

    def feed(self, chunk: bytes) -> None:
        """A body chunk, just written to the client."""
        if self._keep is not None:
            self._keep(chunk)
        if self.copy is not None:
            self.copy.add(chunk)
        if self.pair is not None:
            self.pair.keep(chunk)
        if self.reader is not None:
            self.reader.feed(chunk, self._now())

    def done(self, upstream: str, status: int, ttfb: float, total: float) -> None:
        """The answer reached the client whole."""
        reading = None
        if self.reader is not None and self.lane.llm is not None:
            reading = self.lane.llm.end(self.reader, self._now(), role=self.role,
                                        judged=self.judged)
        if self.arm is not None:
            copy = self.copy
            body = copy.take() if copy is not None and not copy.truncated else None
            self.rollout.answered(self.arm, body, draw=self.draw, request_id=self.request_id)
        if self.tap is not None:
            self.tap.primary_done(upstream, status, ttfb, total, reading)
        if self.pair is not None:
            self.pair.primary_done(upstream, status, ttfb, total)

    def broken(self) -> None:
        """The answer broke after its head reached the client: the LLM reader says so
        (finish ``error``); a cut answer is no evidence for the guards."""
        if self.reader is not None and self.lane.llm is not None:
            self.lane.llm.end(self.reader, self._now(), role=self.role, broken=True,
                              judged=self.judged)

    def cancel(self) -> None:
        """The client went away: nothing is recorded."""
        if self.reader is not None and self.lane.llm is not None:
            self.lane.llm.cancel(self.reader)
