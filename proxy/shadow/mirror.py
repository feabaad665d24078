"""Shadow traffic (SPEC §6): sampled copies of a route's requests sent to a shadow
upstream, in the background, and compared with the primary response.

The request path calls ``should_mirror`` (one RNG draw or one hash), then ``offer`` right
before it sends the primary: ``offer`` queues the copy for the next loop step, at most
``max_in_flight`` at a time (full: the copy is dropped and counted), and returns at once.
Nothing here raises into the request path or waits on it. A copy is a detached exchange
of the upstream pool (``UpstreamPool.send_detached``): no task, future or timer per copy,
because copies are pure overhead on the proxy's CPU. Its response is read to the end as
it arrives and discarded, keeping at most ``inspect_body`` bytes when the comparison
needs the body; its own ``timeout`` bounds the whole exchange.

With ``compare``, the handler reports the primary's status, time to headers and (only
when JSON paths are compared or bodies recorded) a capped copy of its body to the
``ShadowCopy`` that ``offer`` returned; whichever side finishes last triggers the
comparison (``shadow.compare``), the metrics and, on a mismatch, a line in the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterable, Callable
from typing import Any, NamedTuple

from proxy.answer import Capped, header_value
from proxy.config.model import CompareConfig, ShadowConfig
from proxy.errors import StreamBroken, UpstreamError
from proxy.events import rfc3339_now
from proxy.llm.lane import LlmLane
from proxy.llm.reader import Reading, ResponseReader
from proxy.metrics import (
    OUTCOME_ERROR,
    OUTCOME_TIMEOUT,
    SHADOW_OUTCOMES,
    Metrics,
    ShadowStats,
    outcome_index,
)
from proxy.rollout.sticky import key_hash
from proxy.shadow.compare import Verdict, compare
from proxy.shadow.record import DiffRecord
from proxy.tasks import TaskSet
from proxy.upstream.conn import Connection
from proxy.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)

SHADOW_LINE = b"x-flipback-shadow: 1\r\n"  # on every copy


def _ignore(chunk: bytes) -> None:
    """``ShadowCopy.keep`` when no body is compared."""


SESSION_BUCKETS = 10_000
# Salt for session sampling: the sticky canary split hashes the same keys into buckets,
# and an unsalted hash would mirror exactly the sessions that are on the canary.
_PERSON = b"flipback-shadow"
SENT, DROPPED, SKIPPED, ERROR, TIMEOUT = (SHADOW_OUTCOMES.index(o) for o in (
    "sent", "dropped", "skipped_body", "error", "timeout"))
# Bodies up to this size (both together) are compared on the event loop (well under a
# millisecond); longer ones in a worker thread, at most JUDGES at a time per route.
INLINE_COMPARE = 64 * 1024
JUDGES = 4

RawHeaders = list[tuple[bytes, bytes]]


def session_bucket(key: str) -> int:
    """The shadow bucket (0..9999) of a session key: stable across processes and
    replicas (``sticky.key_hash``), and salted so it is independent of the canary split."""
    return key_hash(key, _PERSON) % SESSION_BUCKETS


class Side(NamedTuple):
    upstream: str
    status: int
    ttfb: float
    total: float
    body: bytes | None  # None when the comparison does not need it
    truncated: bool  # the body passed inspect_body: only its first bytes are in ``body``
    llm: Reading | None = None  # what LLM telemetry read of the answer (llm.telemetry)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "upstream": self.upstream, "status": self.status,
            "ttfb_ms": round(self.ttfb * 1000, 3), "total_ms": round(self.total * 1000, 3)}
        if self.llm is not None:
            out["llm"] = self.llm.as_json()
        return out


class ShadowCopy:
    """One mirrored request: the copy's exchange (a ``proxy.upstream.pool.Sink``: the pool
    calls ``head``, ``body`` and ``done`` or ``failed``) and, with ``compare``, the pair
    that is judged once both sides are done.

    The handler calls ``keep`` with each primary body chunk when ``wants_body``, and
    ``primary_done`` once the primary response ended cleanly; neither raises. (No
    reference cycles: a copy is freed by refcount, not by the GC.)
    """

    __slots__ = ("deadline", "conn", "request_id", "method", "target", "wants_body", "keep",
                 "kind", "_mirror", "_headers", "_payload", "_t0", "_status", "_ttfb",
                 "_p_body", "_s_body", "_primary", "_shadow", "_dead", "_reader")

    def __init__(self, mirror: ShadowMirror, method: str, target: str, headers: RawHeaders,
                 payload: bytes | None, request_id: str, cap: int, keep_bodies: bool) -> None:
        self.deadline = 0.0  # set when sent
        self.conn: Connection | None = None  # set by the connection that takes it
        self.request_id = request_id
        self.method = method
        self.target = target
        self.wants_body = keep_bodies
        self.kind: str | None = None  # a guard pair's kind ("canary" or "noise")
        self._mirror = mirror
        self._headers: RawHeaders | None = headers  # until sent
        self._payload = payload
        self._t0 = 0.0
        self._status = 0
        self._ttfb: float | None = None
        # Capped copies of both bodies, kept only when the comparison reads them.
        self._p_body = Capped(cap) if keep_bodies else None
        self._s_body = Capped(cap) if keep_bodies else None
        self.keep = self._p_body.add if self._p_body is not None else _ignore
        self._primary: Side | None = None
        self._shadow: Side | None = None
        self._dead = False
        self._reader: ResponseReader | None = None  # the copy's answer, read as LLM output

    # -- the shadow side, called by the upstream connection -------------------------------
    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        mirror = self._mirror
        self._status = status
        self._ttfb = mirror._now() - self._t0
        if mirror.llm is not None and 200 <= status < 300:
            self._reader = mirror.llm.reader(
                start=self._t0, content_type=header_value(headers, b"content-type"),
                content_encoding=header_value(headers, b"content-encoding"), judged=False)

    def body(self, chunk: bytes) -> None:
        if self._s_body is not None:
            self._s_body.add(chunk)
        if self._reader is not None:
            self._reader.feed(chunk, self._mirror._now())

    def done(self) -> None:
        self._mirror._copy_done(self)

    def failed(self, exc: BaseException) -> None:
        self._mirror._copy_failed(self, exc)

    # -- the primary side, called by the handler (and ``keep``) ----------------------------
    def primary_done(self, upstream: str, status: int, ttfb: float, total: float,
                     llm: Reading | None = None) -> None:
        """The primary response reached the client whole (``llm``: what LLM telemetry
        read of it, for the record)."""
        if self._dead:
            return
        kept = self._p_body
        body = kept.take() if kept is not None else None
        truncated = kept is not None and kept.truncated
        self._primary = Side(upstream, status, ttfb, total, body, truncated, llm)
        if self._shadow is not None:
            self._mirror.judge_safely(self)

    def _shadow_done(self, side: Side | None) -> None:
        if side is None:  # the shadow failed: nothing to compare, stop keeping the primary
            self._dead = True
            if self._p_body is not None:
                self._p_body.stop()
            return
        self._shadow = side
        if self._primary is not None:
            self._mirror.judge_safely(self)

    def __repr__(self) -> str:
        return (f"<ShadowCopy {self.request_id} primary={self._primary is not None} "
                f"shadow={self._shadow is not None}>")


# Where a guard pair goes once both sides are done: (kind, primary, copy).
PairSink = Callable[[str, Side, Side], None]


class ShadowMirror:
    """Shadow traffic of one route. Created with the route's ``Rollout``; ``aclose``
    (shutdown, or a reload that replaces it) waits briefly for copies in flight, aborts
    the rest unjudged, and flushes the record.

    The same machinery sends the paired copies of ``guard.compare`` (a sample of
    requests also sent to stable): built with ``sink``, a mirror hands each finished pair
    to it instead of comparing, counting and recording it as shadow traffic, and counts
    its copies under the role ``pair``."""

    def __init__(self, *, route: str, cfg: ShadowConfig, pool: UpstreamPool,
                 metrics: Metrics, rng: random.Random | None = None,
                 primaries: tuple[str, ...] = (), sink: PairSink | None = None) -> None:
        self.route = route
        self.cfg = cfg
        self.upstream = cfg.upstream
        self.pool = pool  # also read by a reload, to keep a mirror whose upstream is the same
        self._p = cfg.sample / 100.0
        self._threshold = cfg.sample * (SESSION_BUCKETS / 100.0)
        self.by_session = cfg.by == "session"
        self._random = (rng or random.Random()).random
        self._max = cfg.max_in_flight
        self._timeout = cfg.timeout
        self._live: set[ShadowCopy] = set()  # copies queued or under way
        self._emptied: asyncio.Future[None] | None = None  # for aclose: set at _live == 0
        self._closed = False
        self._judges = TaskSet(f"shadow-compare-{route}", limit=JUDGES)
        self._loop: asyncio.AbstractEventLoop | None = None  # taken at the first offer
        self._now = time.monotonic  # the loop's clock, once there is a loop
        self.sink = sink  # set again when a reload hands this mirror to a new rollout
        # LLM telemetry of the copies' answers (the route's llm.telemetry), role "shadow"
        self.llm: LlmLane | None = None
        # primaries: the route's stable and canary, whose mismatch series start at 0
        self._stats = (metrics.shadow(route, compares=cfg.compare is not None,
                                      primaries=primaries) if sink is None
                       else ShadowStats())  # pairs are not shadow traffic
        self._outcomes = self._stats.outcomes
        self._series = metrics.series(route, cfg.upstream, "shadow" if sink is None else "pair")
        self._in_flight = metrics.in_flight(route, cfg.upstream)
        self._compare: CompareConfig | None = cfg.compare
        self._keep_bodies = False
        self._record: DiffRecord | None = None
        if cfg.compare is not None:
            c = cfg.compare
            self._keep_bodies = bool(c.json_paths) or c.bodies
            records = metrics.shadow_records_total

            def count(result: str, n: int) -> None:
                records.labels(route=route, result=result).inc(n)

            if c.record:
                self._record = DiffRecord(c.record, c.record_max, count)
                for result in ("written", "full", "dropped", "error"):
                    records.labels(route=route, result=result)  # at 0 from the start

    # -- the request path ----------------------------------------------------------------
    def should_mirror(self, session_key: str | None = None) -> bool:
        """Whether this request gets a copy: by its session's bucket with ``by: session``
        and a key (a whole conversation or none of it), else by a draw at ``sample``%."""
        if self.by_session and session_key is not None:
            return session_bucket(session_key) < self._threshold
        p = self._p
        return p >= 1.0 or (p > 0.0 and self._random() < p)

    def offer(self, method: str, target: str, headers: RawHeaders,
              body: bytes | AsyncIterable[bytes] | None, *, request_id: str,
              inspect_body: int, kind: str | None = None) -> ShadowCopy | None:
        """Queue the copy of a sampled request and return at once (call it right before
        sending the primary: the copy is written in the next loop step, after it). ``body``
        must be the buffered body: a streamed one (over ``inspect_body``) is not mirrored.
        Returns the copy to report the primary to when there is something to compare."""
        if body is not None and not isinstance(body, bytes):
            self._outcomes[SKIPPED] += 1
            return None
        if len(self._live) >= self._max:
            self._outcomes[DROPPED] += 1
            return None
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._now = loop.time
        copy = ShadowCopy(self, method, target, headers, body, request_id, inspect_body,
                          self._keep_bodies)
        copy.kind = kind
        self._live.add(copy)
        self._in_flight.value += 1
        loop.call_soon(self._send, copy)
        return copy if self._compare is not None else None

    # -- in the background ---------------------------------------------------------------
    def _send(self, copy: ShadowCopy) -> None:
        now = copy._t0 = self._now()
        copy.deadline = now + self._timeout
        headers, copy._headers = copy._headers, None
        payload, copy._payload = copy._payload, None
        assert headers is not None
        try:
            self.pool.send_detached(copy.method, copy.target, headers, payload, copy,
                                     SHADOW_LINE)
        except Exception as exc:  # noqa: BLE001 - a request the pool cannot encode
            self._copy_failed(copy, exc)

    def _copy_done(self, copy: ShadowCopy) -> None:
        now = self._now()
        total = now - copy._t0
        reading = None
        if copy._reader is not None and self.llm is not None:
            reading = self.llm.end(copy._reader, now, role="shadow", judged=False)
        ttfb = copy._ttfb if copy._ttfb is not None else total
        status = copy._status
        self._outcomes[SENT] += 1
        self._series.observe(outcome_index(status), ttfb, total)
        self._ended(copy)
        if self._compare is not None:
            kept = copy._s_body
            data = kept.take() if kept is not None else None
            truncated = kept is not None and kept.truncated
            copy._shadow_done(Side(self.upstream, status, ttfb, total, data, truncated,
                                   reading))

    def _copy_failed(self, copy: ShadowCopy, exc: BaseException) -> None:
        if copy._reader is not None and self.llm is not None:
            self.llm.end(copy._reader, self._now(), role="shadow", broken=True, judged=False)
        self._ended(copy)
        if self._closed:  # aborted by aclose: not the shadow's failure
            return
        total = self._now() - copy._t0
        timed_out = isinstance(exc, UpstreamError) and exc.kind == "timeout"
        self._outcomes[TIMEOUT if timed_out else ERROR] += 1
        self._series.observe(OUTCOME_TIMEOUT if timed_out else OUTCOME_ERROR, copy._ttfb, total)
        if not isinstance(exc, UpstreamError):
            logger.warning("shadow copy %s on route %s failed: %r", copy.request_id,
                           self.route, exc)
        copy._shadow_done(None)

    def _ended(self, copy: ShadowCopy) -> None:
        copy.conn = None
        live = self._live
        live.discard(copy)
        self._in_flight.value -= 1
        if not live and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    def judge_safely(self, pair: ShadowCopy) -> None:
        """``judge``, with anything it raises logged: it runs inside the handler."""
        try:
            self.judge(pair)
        except Exception:
            logger.exception("shadow comparison on route %s failed", self.route)

    def judge(self, pair: ShadowCopy) -> Verdict | None:
        """Compare the two sides of a finished pair: metrics, and a record line on a
        mismatch. Called once per pair by whichever side finished last."""
        p, s, cfg = pair._primary, pair._shadow, self._compare
        if p is None or s is None or cfg is None or self._closed:
            return None
        pair._primary = pair._shadow = None  # judged once; free the bodies
        if self.sink is not None:
            if pair.kind is not None:
                self.sink(pair.kind, p, s)
            return None
        self._stats.delta.observe(s.ttfb - p.ttfb)
        p_body = None if p.truncated else p.body
        s_body = None if s.truncated else s.body
        skipped = "a body was over inspect_body"
        if cfg.json_paths and len(p_body or b"") + len(s_body or b"") > INLINE_COMPARE:
            # Folding a long stream takes milliseconds: off the loop, a few at a time.
            if self._judges.spawn(self._judge_in_thread(pair, p, s, p_body, s_body, cfg)):
                return None
            p_body = s_body = None
            skipped = "too many long bodies to compare at once"
        verdict = compare(cfg, primary_status=p.status, shadow_status=s.status,
                          primary_body=p_body, shadow_body=s_body)
        self._conclude(pair, p, s, verdict, cfg, skipped)
        return verdict

    async def _judge_in_thread(self, pair: ShadowCopy, p: Side, s: Side,
                               p_body: bytes | None, s_body: bytes | None,
                               cfg: CompareConfig) -> None:
        verdict = await asyncio.to_thread(
            compare, cfg, primary_status=p.status, shadow_status=s.status,
            primary_body=p_body, shadow_body=s_body)
        self._conclude(pair, p, s, verdict, cfg, "a body was over inspect_body")

    def _conclude(self, pair: ShadowCopy, p: Side, s: Side, verdict: Verdict,
                  cfg: CompareConfig, skipped: str) -> None:
        if not verdict.status_differs and not verdict.paths:
            return
        self._stats.count_mismatch(p.upstream, verdict.status_differs, bool(verdict.paths))
        if self._record is not None:
            self._record.append(self._entry(pair, p, s, verdict, cfg, skipped))

    def _entry(self, pair: ShadowCopy, p: Side, s: Side, verdict: Verdict,
               cfg: CompareConfig, skipped: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": rfc3339_now(),
            "request_id": pair.request_id,
            "route": self.route,
            "method": pair.method,
            "path": pair.target,
            "mismatch": verdict.kinds,
            "primary": p.as_json(),
            "shadow": s.as_json(),
        }
        if cfg.json_paths:
            entry["paths"] = [d.as_json() for d in verdict.paths]
            if not verdict.paths_compared:
                entry["paths_skipped"] = skipped
        if cfg.bodies:
            sides = (("primary", p), ("shadow", s))
            bodies: dict[str, Any] = {
                name: (x.body or b"").decode("utf-8", "replace") for name, x in sides}
            truncated = [name for name, x in sides if x.truncated]
            if truncated:
                bodies["truncated"] = truncated
            entry["bodies"] = bodies
        return entry

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Copies queued or under way."""
        return len(self._live)

    @property
    def closed(self) -> bool:
        """``aclose`` has given up on copies in flight: no more are judged."""
        return self._closed

    async def flush(self) -> None:
        """Wait until queued record lines are written (tests, shutdown)."""
        if self._record is not None:
            await self._record.flush()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Give copies in flight up to ``timeout`` s, abort the rest (uncounted: they are
        not the shadow's failures), then flush the record."""
        if self._live:
            loop = asyncio.get_running_loop()
            self._emptied = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._emptied), min(timeout, self._timeout))
        self._closed = True
        for copy in list(self._live):
            if copy.conn is not None:
                copy.conn.fail(StreamBroken(f"shadow of route {self.route} closed"))
        # A copy still waiting for a connection ends when the pool closes or serves it.
        await self._judges.aclose(timeout)
        if self._record is not None:
            await self._record.aclose()

    def __repr__(self) -> str:
        return (f"<ShadowMirror {self.route} -> {self.upstream} {self.cfg.sample:g}% "
                f"by {self.cfg.by}: {len(self._live)}/{self._max} in flight>")

