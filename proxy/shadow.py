"""Shadow traffic (SPEC §6): sampled copies of a route's requests sent to a shadow
upstream, in the background, and compared with the primary response.

The request path calls ``should_mirror`` (one RNG draw or one hash), then ``offer`` right
before it sends the primary: ``offer`` only schedules a task, from a set bounded by
``max_in_flight`` (full: the copy is dropped and counted), and returns at once. Nothing
here raises into the request path or waits on it. The shadow exchange has its own
``timeout``; its response is read to the end in pieces and discarded, keeping at most
``inspect_body`` bytes when the comparison needs the body.

With ``compare``, the handler reports the primary's status, time to headers and (only
when JSON paths are compared or bodies recorded) a capped copy of its body to the
``ShadowPair`` that ``offer`` returned; whichever side finishes last triggers the
comparison (``shadow_compare``), the metrics and, on a mismatch, a line in the record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterable
from typing import Any, NamedTuple

from proxy.config import CompareConfig, ShadowConfig
from proxy.diffrecord import DiffRecord
from proxy.errors import UpstreamError
from proxy.events import rfc3339_now
from proxy.metrics import OUTCOME_ERROR, OUTCOME_TIMEOUT, Metrics, outcome_index
from proxy.shadow_compare import Verdict, compare
from proxy.tasks import TaskSet
from proxy.upstream import UpstreamPool

logger = logging.getLogger(__name__)

SHADOW_HEADER = (b"x-flipback-shadow", b"1")
SESSION_BUCKETS = 10_000
# Salt for session sampling: the sticky canary split hashes the same keys into buckets,
# and an unsalted hash would mirror exactly the sessions that are on the canary.
_PERSON = b"flipback-shadow"
OUTCOMES = ("sent", "dropped", "skipped_body", "error", "timeout")
# Bodies up to this size (both together) are compared on the event loop (well under a
# millisecond); longer ones in a worker thread, at most JUDGES at a time per route.
INLINE_COMPARE = 64 * 1024
JUDGES = 4

RawHeaders = list[tuple[bytes, bytes]]


def session_bucket(key: str) -> int:
    """The shadow bucket (0..9999) of a session key: stable across processes and
    replicas (blake2b, never ``hash()``), and independent of the canary split."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                             person=_PERSON).digest()
    return int.from_bytes(digest, "big") % SESSION_BUCKETS


class _Side(NamedTuple):
    upstream: str
    status: int
    ttfb: float
    total: float
    body: bytes | None  # None when the comparison does not need it
    truncated: bool  # the body passed inspect_body: only its first bytes are in ``body``

    def as_json(self) -> dict[str, Any]:
        return {"upstream": self.upstream, "status": self.status,
                "ttfb_ms": round(self.ttfb * 1000, 3), "total_ms": round(self.total * 1000, 3)}


class ShadowPair:
    """The two sides of one mirrored request with ``compare``; judged once both are done.

    When ``wants_body``, the handler calls ``keep`` with each primary body chunk; it
    calls ``primary_done`` once the primary response ended cleanly. Neither raises or
    blocks. (No reference cycles here: a pair is freed by refcount, not by the GC.)
    """

    __slots__ = ("wants_body", "request_id", "method", "target", "_mirror", "_parts", "_room",
                 "_truncated", "_primary", "_shadow", "_dead")

    def __init__(self, mirror: ShadowMirror, request_id: str, method: str, target: str,
                 cap: int, keep_bodies: bool) -> None:
        self.request_id = request_id
        self.method = method
        self.target = target
        self._mirror = mirror
        self._parts: list[bytes] = []
        self._room = cap
        self._truncated = False
        self._primary: _Side | None = None
        self._shadow: _Side | None = None
        self._dead = False
        self.wants_body = keep_bodies

    def keep(self, chunk: bytes) -> None:
        room = self._room
        if len(chunk) <= room:
            self._parts.append(chunk)
            self._room = room - len(chunk)
        elif not self._truncated:
            self._truncated = True
            if room > 0:
                self._parts.append(chunk[:room])
            self._room = 0

    def primary_done(self, upstream: str, status: int, ttfb: float, total: float) -> None:
        """The primary response reached the client whole."""
        if self._dead:
            return
        body = b"".join(self._parts) if self.wants_body else None
        self._parts = []
        self._primary = _Side(upstream, status, ttfb, total, body, self._truncated)
        if self._shadow is not None:
            # Judged from the loop, not here: nothing in a comparison can reach the handler.
            loop = self._mirror._loop
            assert loop is not None
            loop.call_soon(self._mirror.judge, self)

    def _shadow_done(self, side: _Side | None) -> None:
        if side is None:  # the shadow failed: nothing to compare, stop keeping the primary
            self._dead = True
            self._parts = []
            self._room = 0
            return
        self._shadow = side
        if self._primary is not None:
            self._mirror.judge(self)

    def __repr__(self) -> str:
        return (f"<ShadowPair {self.request_id} primary={self._primary is not None} "
                f"shadow={self._shadow is not None}>")


class ShadowMirror:
    """Shadow traffic of one route. Created with the route's ``Rollout``; ``aclose`` at
    shutdown cancels copies still in flight and flushes the record."""

    def __init__(self, *, route: str, cfg: ShadowConfig, pool: UpstreamPool,
                 metrics: Metrics, rng: random.Random | None = None) -> None:
        self.route = route
        self.cfg = cfg
        self.upstream = cfg.upstream
        self._pool = pool
        self.pool = pool  # read by a reload, to keep a mirror whose upstream did not change
        self._p = cfg.sample / 100.0
        self._threshold = cfg.sample * (SESSION_BUCKETS / 100.0)
        self.by_session = cfg.by == "session"
        self._random = (rng or random.Random()).random
        self._max = cfg.max_in_flight
        self._timeout = cfg.timeout
        self._tasks = TaskSet(f"shadow-{route}", limit=cfg.max_in_flight)
        self._judges = TaskSet(f"shadow-compare-{route}", limit=JUDGES)
        self._loop: asyncio.AbstractEventLoop | None = None  # taken at the first offer
        self._expired: set[asyncio.Task[Any]] = set()
        sent, dropped, skipped, error, timeout = (
            metrics.shadow_total.labels(route=route, outcome=o) for o in OUTCOMES)
        self._sent, self._dropped, self._skipped = sent.inc, dropped.inc, skipped.inc
        self._error, self._timed_out = error.inc, timeout.inc
        self._series = metrics.series(route, cfg.upstream, "shadow")
        self._in_flight = metrics.in_flight(route, cfg.upstream)
        self._compare: CompareConfig | None = cfg.compare
        self._keep_bodies = False
        self._record: DiffRecord | None = None
        if cfg.compare is not None:
            c = cfg.compare
            self._keep_bodies = bool(c.json_paths) or c.bodies
            self._mismatch = {k: metrics.shadow_mismatch_total.labels(route=route, kind=k).inc
                              for k in ("status", "body")}
            self._delta = metrics.shadow_latency_delta_seconds.labels(route=route).observe
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
              inspect_body: int) -> ShadowPair | None:
        """Schedule the copy of a sampled request and return at once (call it right
        before sending the primary). ``body`` must be the buffered body: a streamed one
        (over ``inspect_body``) is not mirrored. Returns the pair to report the primary
        to when there is something to compare, else None."""
        if body is not None and not isinstance(body, bytes):
            self._skipped()
            return None
        if len(self._tasks) >= self._max:
            self._dropped()
            return None
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        pair = None
        if self._compare is not None:
            pair = ShadowPair(self, request_id, method, target, inspect_body, self._keep_bodies)
        self._tasks.spawn(self._exchange(method, target, headers, body, pair, inspect_body))
        return pair

    # -- in the background ---------------------------------------------------------------
    async def _exchange(self, method: str, target: str, headers: RawHeaders,
                        body: bytes | None, pair: ShadowPair | None, cap: int) -> None:
        loop = self._loop
        assert loop is not None
        task = asyncio.current_task(loop)
        assert task is not None
        self._in_flight.value += 1
        keep = pair is not None and pair.wants_body
        parts: list[bytes] = []
        size = 0
        ttfb: float | None = None
        status = 0
        t0 = loop.time()
        # One timer for the whole exchange (cheaper than asyncio.timeout's context).
        expiry = loop.call_at(t0 + self._timeout, self._expire, task)
        try:
            up = await self._pool.send(method, target, [*headers, SHADOW_HEADER], body)
            ttfb = loop.time() - t0
            status = up.status
            try:
                while chunk := await up.read():
                    if keep and size <= cap:  # one byte past the cap marks it truncated
                        parts.append(chunk[:cap + 1 - size])
                        size += len(chunk)
            finally:
                up.release()
        except UpstreamError as exc:
            kind = OUTCOME_TIMEOUT if exc.kind == "timeout" else OUTCOME_ERROR
            self._failed(pair, kind, ttfb, loop.time() - t0)
            return
        except asyncio.CancelledError:
            if task not in self._expired:  # cancelled from outside (shutdown): let it go
                if pair is not None:
                    pair._shadow_done(None)
                raise
            task.uncancel()
            self._failed(pair, OUTCOME_TIMEOUT, ttfb, loop.time() - t0)
            return
        except BaseException:
            if pair is not None:
                pair._shadow_done(None)
            raise
        finally:
            expiry.cancel()
            self._expired.discard(task)
            self._in_flight.value -= 1
        total = loop.time() - t0
        self._sent()
        self._series.observe(outcome_index(status), ttfb, total)
        if pair is not None:
            data = b"".join(parts)[:cap] if keep else None
            pair._shadow_done(_Side(self.upstream, status, ttfb, total, data, size > cap))

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self._expired.add(task)
        task.cancel()

    def _failed(self, pair: ShadowPair | None, outcome: int, ttfb: float | None,
                total: float) -> None:
        (self._timed_out if outcome == OUTCOME_TIMEOUT else self._error)()
        self._series.observe(outcome, ttfb, total)
        if pair is not None:
            pair._shadow_done(None)

    def judge(self, pair: ShadowPair) -> Verdict | None:
        """Compare the two sides of a finished pair: metrics, and a record line on a
        mismatch. Called once per pair by whichever side finished last."""
        p, s, cfg = pair._primary, pair._shadow, self._compare
        if p is None or s is None or cfg is None:
            return None
        pair._primary = pair._shadow = None  # judged once; free the bodies
        self._delta(s.ttfb - p.ttfb)
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

    async def _judge_in_thread(self, pair: ShadowPair, p: _Side, s: _Side,
                               p_body: bytes | None, s_body: bytes | None,
                               cfg: CompareConfig) -> None:
        verdict = await asyncio.to_thread(
            compare, cfg, primary_status=p.status, shadow_status=s.status,
            primary_body=p_body, shadow_body=s_body)
        self._conclude(pair, p, s, verdict, cfg, "a body was over inspect_body")

    def _conclude(self, pair: ShadowPair, p: _Side, s: _Side, verdict: Verdict,
                  cfg: CompareConfig, skipped: str) -> None:
        kinds = verdict.kinds
        for kind in kinds:
            self._mismatch[kind]()
        if kinds and self._record is not None:
            self._record.append(self._entry(pair, p, s, verdict, cfg, skipped))

    def _entry(self, pair: ShadowPair, p: _Side, s: _Side, verdict: Verdict,
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
        return len(self._tasks)

    async def flush(self) -> None:
        """Wait until queued record lines are written (tests, shutdown)."""
        if self._record is not None:
            await self._record.flush()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Give copies in flight up to ``timeout`` s, cancel the rest, flush the record."""
        await self._tasks.aclose(min(timeout, self._timeout))
        await self._judges.aclose(timeout)
        if self._record is not None:
            await self._record.aclose()

    def __repr__(self) -> str:
        return (f"<ShadowMirror {self.route} -> {self.upstream} {self.cfg.sample:g}% "
                f"by {self.cfg.by}: {len(self._tasks)}/{self._max} in flight>")

