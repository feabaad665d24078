"""The data-plane request path (SPEC §4, §5), read top to bottom.

match route -> kill switch -> body (buffered only when a retry or a shadow copy could need
it) -> pick stable or canary -> offer a shadow copy (scheduled, never awaited) -> send ->
on a failure before any byte reached the client, retry on the next lane (canary -> stable
-> fallback) -> stream the response -> record.
``Proxy.fail`` is the request path's one error boundary: the connection
(``proxy.http1.protocol``) hands it whatever ``handle`` raised.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import orjson

from proxy.config.model import ProxyConfig
from proxy.errors import (
    BodyTooLarge,
    ClientRequestError,
    ConnectFailed,
    Saturated,
    StreamBroken,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.headers import RequestHeaders, downstream_head, not_forwarded_down
from proxy.http1.listener import Limits
from proxy.http1.request import Request, RequestBody
from proxy.http1.response import Reply, header_lines, json_error
from proxy.killswitch import kill_response
from proxy.metrics import OUTCOME_ERROR, OUTCOME_TIMEOUT, outcome_index
from proxy.rollout import pick
from proxy.rollout.lanes import Lane
from proxy.rollout.machine import Rollout
from proxy.rollout.sticky import session_key
from proxy.runtime import Runtime
from proxy.shadow.mirror import ShadowCopy
from proxy.watch import AnswerWatch, guard_answer

logger = logging.getLogger(__name__)
_draw = random.random
access_logger = logging.getLogger("proxy.access")

_NO_BODY_STATUSES = frozenset({204, 304})
_SCHEMES = ("http://", "https://")


def origin_form(target: str) -> str:
    """The path and query of an absolute-form request target (``GET http://host/p?q``),
    which RFC 9112 says a server must accept; other forms (``*``) stay as they are."""
    if target[:8].lower().startswith(_SCHEMES):
        rest = target.partition("://")[2]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        rest = rest[cut:]
        return rest if rest.startswith("/") else "/" + rest
    return target


class _Body:
    """A streamed request body that enforces ``max_body`` while it flows. ``fault`` keeps
    a failure that is the client's (too large, too slow): the upstream exchange it broke
    says nothing about the upstream."""

    __slots__ = ("_content", "_limit", "_prefix", "fault")

    def __init__(self, content: RequestBody, limit: int, prefix: bytes = b"") -> None:
        self._content = content
        self._limit = limit
        self._prefix = prefix
        self.fault: ClientRequestError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = len(self._prefix)
        if self._prefix:
            yield self._prefix
        try:
            async for chunk in self._content.iter_any():
                seen += len(chunk)
                if seen > self._limit:
                    raise BodyTooLarge(f"request body over {self._limit} bytes")
                yield chunk
        except ClientRequestError as exc:
            self.fault = exc
            raise


_BROKEN = StreamBroken("the upstream broke between its response head and body")


def _retry_cause(exc: UpstreamError | None) -> str:
    """The ``cause`` label of a retry: the error's kind, or ``status`` for an answer."""
    if exc is None:
        return "status"
    if isinstance(exc, Saturated):
        return "saturated"
    if isinstance(exc, ConnectFailed):
        return "connect_error"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    return "reset"


def _never_sent(exc: UpstreamError | None) -> bool:
    """The upstream provably never got the request: it could not be connected to, or the
    pool refused it before a connection."""
    return isinstance(exc, ConnectFailed | Saturated)


class Proxy:
    """Holds what every request needs, hoisted out of the per-request path."""

    def __init__(self, runtime: Runtime, limits: Limits | None = None) -> None:
        self.runtime = runtime
        self.limits = limits if limits is not None else Limits(0, 0, 1 << 62)
        self._loop_time = asyncio.get_running_loop().time
        self.configure(runtime.snapshot.config)
        runtime.on_apply(self.configure)

    def configure(self, config: ProxyConfig) -> None:
        """Hoist the server settings the request path reads (again after a reload)."""
        self.max_body = config.server.max_body
        self.inspect_body = config.server.inspect_body
        self.access_log = config.log.access
        self.headers = RequestHeaders(config.server)
        self.id_header = self.headers.id_name
        self._id_line = self.id_header.encode() + b": "
        self._id_raw = self.id_header.lower().encode("latin-1")
        self._not_down = not_forwarded_down(self._id_raw)  # flipback sets the id
        self._not_down_no_id = not_forwarded_down(None)  # no id: the upstream's passes
        self._lane_cache: dict[tuple[str, str | None], bytes] = {}

    def _lane_lines(self, lane: Lane) -> bytes:
        """The ``x-flipback-upstream`` (and ``-version``) lines of a lane, encoded once."""
        key = (lane.upstream, lane.version)
        lines = self._lane_cache.get(key)
        if lines is None:
            pairs = [("x-flipback-upstream", lane.upstream)]
            if lane.version is not None:
                pairs.append(("x-flipback-version", lane.version))
            lines = self._lane_cache[key] = header_lines(pairs)
        return lines

    def fail(self, request: Request, exc: Exception) -> None:
        """The error boundary of ``handle`` (the connection calls it with what ``handle``
        raised, so a request costs one coroutine less): a limit the client ran into gets
        its 4xx; anything else is logged and answered 502, or cut once the head is out."""
        if isinstance(exc, ClientRequestError):
            self.refuse(request, exc, self.request_id(request))
            return
        logger.error("unexpected error on %s %s", request.method, request.target,
                     exc_info=exc)
        if request.response_started:
            request.abort()
            return
        rid = self.request_id(request, new=False)
        send(request, json_error(502, "internal proxy error", rid, self.id_header))

    def request_id(self, request: Request, new: bool = True) -> str:
        """The client's request id when it is a plain one (printable ASCII, at most 200
        characters: it goes into logs, events and JSON), else a new one (or none)."""
        raw = request.headers.get_bytes(self._id_raw)
        if raw and len(raw) <= 200 and raw.isascii():
            rid = raw.decode("ascii")
            if rid.isprintable():
                return rid
        return self.headers.new_id() if new else ""

    def refuse(self, request: Request, exc: ClientRequestError, rid: str) -> None:
        """A client-side error: the 4xx it names, and the connection closes (what is left
        of the request on it cannot be trusted to frame the next one)."""
        self.limits.count(exc.reason)
        if request.response_started:  # too late for a status: the answer is cut
            request.abort()
            return
        send(request, json_error(exc.status, str(exc), rid, self.id_header), close=True)

    async def handle(self, request: Request) -> None:
        """Answer one request; the connection calls it, one request at a time, and hands
        what it raises (but cancellation and a gone client) to ``fail``."""
        snap = self.runtime.snapshot
        raw_path = request.target
        if raw_path[:1] != "/":
            raw_path = origin_form(raw_path)
        rid = self.request_id(request)
        if "#" in raw_path:  # RFC 9112 3.2: no fragment in a request target (as Envoy)
            raise ClientRequestError(400, "fragment ('#') in the request target",
                                     reason="bad_target")
        content_length = request.content_length
        if content_length is None and request.body_exists:
            te = ", ".join(request.headers.getall("transfer-encoding", ()))
            if te.strip().lower() != "chunked":  # only chunked is decoded: refuse the rest
                raise ClientRequestError(400, f"unsupported Transfer-Encoding {te!r}",
                                         reason="bad_transfer_encoding")
        path = raw_path.partition("?")[0]
        if snap.takes_feedback and path == "/feedback" and request.method == "POST":
            await self._feedback(request, rid)
            return
        rollout = snap.table.match(request.method, path, request.headers)
        if rollout is None:
            send(request, json_error(404, f"no route for {request.method} {path}", rid,
                                     self.id_header))
            return
        if rollout.killed:
            await self._killed(request, rollout, rid)
            return
        if content_length is not None and content_length > self.max_body:
            raise BodyTooLarge(f"request body over {self.max_body} bytes")
        if request.body_exists and request.version == "1.1":
            expect = request.headers.get_bytes(b"expect")
            if expect is not None and expect.lower() == b"100-continue":
                # The client holds its body back until told to send it (curl does, for
                # bodies over 1 KiB); only a request that is routed and fits gets it.
                request.send_continue()

        body: bytes | _Body | None = None
        if rollout.wants_body_first and request.body_exists:
            body = await self._buffer(request, content_length)  # sticky json_field
        # The session key, read once for the sticky pick and for shadow sampling by session.
        key = None
        sticky = rollout.route.sticky
        shadow = rollout.shadow
        if sticky is not None and (rollout.pins is not None
                                   or (shadow is not None and shadow.by_session)):
            key = session_key(sticky, request.headers, body if isinstance(body, bytes) else None)
        choice = pick.choose(rollout, request.headers, key)
        if not isinstance(choice, tuple):  # a session not cached here, pins shared in Redis
            choice = await choice
        lane, role = choice
        if shadow is not None and not shadow.should_mirror(key):
            shadow = None
        # guard.compare: a sample of requests also goes to stable, as a detached copy
        pair_kind = None
        if rollout.pairs is not None and rollout.guards is not None:
            pair_kind = rollout.guards.pair_kind(role, _draw())
        replayable = True
        if body is not None:
            replayable = not isinstance(body, _Body)
        elif not request.body_exists:
            body = b"" if content_length == 0 else None
        else:
            # A copy or a retry needs the body in memory (up to inspect_body); else it
            # streams through, unless it is already here whole.
            keep = (shadow is not None or pair_kind is not None
                    or self._next_lane(rollout, lane) is not None)
            content = request.body
            assert content is not None
            body = _whole_body(content, self.inspect_body if keep else self.max_body)
            if body is None:
                if keep:
                    body = await self._buffer(request, content_length)
                    replayable = not isinstance(body, _Body)
                else:
                    body = _Body(content, self.max_body)
                    replayable = False
        if not replayable and self._next_lane(rollout, lane) is not None:
            self.runtime.metrics.body_not_replayable_total.labels(route=rollout.name).inc()
        headers = self.headers.upstream(
            request.raw_headers,
            client_ip=request.client_ip,
            proto=b"http",
            request_id=rid,
        )
        # The copy is only scheduled here: it runs once the primary below is on its way.
        tap = (shadow.offer(request.method, raw_path, headers, body, request_id=rid,
                            inspect_body=self.inspect_body) if shadow is not None else None)
        pair = None
        if pair_kind is not None:
            assert rollout.pairs is not None
            pair = rollout.pairs.offer(request.method, raw_path, headers, body, request_id=rid,
                                       inspect_body=self.inspect_body, kind=pair_kind)
        await self._forward(request, rollout, lane, role, raw_path, headers, body,
                            replayable, rid, tap, pair)

    async def _forward(
        self,
        request: Request,
        rollout: Rollout,
        lane: Lane,
        role: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | _Body | None,
        replayable: bool,
        rid: str,
        tap: ShadowCopy | None = None,
        pair: ShadowCopy | None = None,
    ) -> None:
        now = self._loop_time
        failure_statuses = rollout.route.rollback.failure_statuses
        method = request.method
        content_length = request.content_length if isinstance(body, _Body) else None
        retried_from: list[str] | None = None
        while True:
            started = lane.begin()
            t0 = now()
            try:
                up = await lane.pool.send(method, target, headers, body,
                                          content_length=content_length)
            except UpstreamError as exc:
                if isinstance(body, _Body) and body.fault is not None:
                    lane.cancel(started)  # the client's fault: the upstream is not judged
                    raise body.fault from None
                lane.end(started, not retried_from,
                         role=role, outcome=_outcome_of(exc), failed=True, ttfb=None,
                         total=now() - t0)
                nxt = self._retry_lane(rollout, lane, exc) if replayable else None
                if nxt is None:
                    text = str(exc)  # the pool's own messages name the upstream already
                    if not text.startswith("upstream "):
                        text = f"upstream {lane.upstream}: {text}"
                    send(request, json_error(exc.status, text, rid, self.id_header))
                    return
                retried_from = self._retried(rollout, lane, nxt, exc, retried_from)
                lane = nxt
                role = nxt.role
                continue
            except BaseException:
                lane.cancel(started)
                raise
            ttfb = now() - t0
            status = up.status
            failed = status in failure_statuses
            if replayable and (failed if lane is rollout.canary else status >= 500):
                nxt = self._retry_lane(rollout, lane, None)
                if nxt is not None:
                    up.release()
                    lane.end(started, not retried_from,
                             role=role, outcome=outcome_index(status), failed=failed,
                             ttfb=ttfb, total=ttfb)
                    retried_from = self._retried(rollout, lane, nxt, None, retried_from)
                    lane = nxt
                    role = nxt.role
                    continue
            first = b""
            if replayable and not up.body_ready:
                # A retry is still possible while no byte reached the client: hold the
                # head until the first body bytes (servers on uvicorn write the head
                # first), so an upstream dying in between is retried, not a cut answer.
                nxt = self._retry_lane(rollout, lane, _BROKEN)
                if nxt is not None:
                    try:
                        first = await up.read()
                    except UpstreamError as exc:
                        up.release()
                        lane.end(started, not retried_from,
                                 role=role, outcome=_outcome_of(exc), failed=True,
                                 ttfb=ttfb, total=now() - t0)
                        retried_from = self._retried(rollout, lane, nxt, exc, retried_from)
                        lane = nxt
                        role = nxt.role
                        continue
                    except BaseException:
                        up.release()
                        lane.cancel(started)
                        raise
            break

        head = downstream_head(up.headers, self._not_down if rid else self._not_down_no_id)
        head += self._lane_lines(lane)
        if retried_from is not None:
            head += b"x-flipback-retried-from: %s\r\n" % ", ".join(retried_from).encode()
        if rid:
            head += self._id_line + rid.encode() + b"\r\n"
        watch: AnswerWatch | None = None
        whole_answer: bytes | None = None  # for the guards, when no watch reads it
        try:
            # The body came with the headers (most JSON answers), or was waited for: the
            # head then leaves with the first body bytes, one write instead of two. An
            # answer still on its way (a stream's first token) gets its head at once.
            proto = request.proto  # the connection writes the response
            length = up.content_length if status not in _NO_BODY_STATUSES else None
            read_nowait = up.read_nowait  # no coroutine for bytes already here
            chunk: bytes | None = first or read_nowait()
            whole = chunk is not None and length is not None and len(chunk) == length
            # What reads the answer as it goes (the shadow's copy, a guard pair, the
            # guards, LLM telemetry): None on a route with none of them. A whole answer
            # on a route where only the guards read answers goes to them as it is, after
            # the request (``whole_answer``): no watch, no copy.
            guards = rollout.guards
            reads = guards is not None and guards.reads_answers
            if (tap is not None or pair is not None or lane.llm is not None
                    or (reads and not whole)):
                watch = AnswerWatch.start(rollout, lane, role, status=status,
                                          headers=up.headers, request_id=rid, sent_at=t0,
                                          judged=not retried_from, tap=tap, pair=pair,
                                          inspect_body=self.inspect_body, now=now)
            feed = watch.feeder() if watch is not None else None
            if whole:
                # the whole body is here (most JSON answers): one call, one write
                assert chunk is not None
                proto.respond(status, head, chunk, reason=up.reason)
                if feed is not None:
                    feed(chunk)
                elif reads:
                    whole_answer = chunk
            else:
                proto.start_response(status, up.reason, head, length,
                                     defer=chunk is not None)
                read = up.read
                write = proto.write
                while True:
                    if chunk is None:
                        chunk = await read()
                    if not chunk:
                        break
                    if write(chunk):  # the client's socket buffer is full: wait for it
                        if feed is not None:
                            feed(chunk)
                        await proto.drain()
                    elif feed is not None:
                        feed(chunk)
                    chunk = read_nowait()
                proto.end()
        except UpstreamError as exc:
            # Broke after the client got headers: the client must see a broken response,
            # never a clean end of stream (a cut SSE stream must not look complete).
            if watch is not None:
                watch.broken()
            up.release()
            lane.end(started, not retried_from,
                     role=role, outcome=_outcome_of(exc), failed=True, ttfb=ttfb,
                     total=now() - t0)
            request.abort()
            self._log(request, rollout.name, lane.upstream, role, 0, now() - t0, rid)
            return
        except BaseException:
            if watch is not None:
                watch.cancel()
            up.release()
            lane.cancel(started)
            raise
        up.release()
        total = now() - t0
        lane.end(started, not retried_from,
                 role=role, outcome=outcome_index(status), failed=failed, ttfb=ttfb,
                 total=total)
        if watch is not None:
            watch.done(lane.upstream, status, ttfb, total)
        elif whole_answer is not None:
            guard_answer(rollout, lane, role, status, whole_answer, rid,
                         judged=not retried_from, limit=self.inspect_body)
        if self.access_log:
            self._log(request, rollout.name, lane.upstream, role, status, total, rid)

    @staticmethod
    def _next_lane(rollout: Rollout, lane: Lane) -> Lane | None:
        """Where a request could go when ``lane`` failed before any byte reached the
        client (so whether its body must be kept for a replay)."""
        if lane is rollout.canary:
            return rollout.stable if rollout.route.retry_canary_on_stable else None
        if lane is rollout.stable:
            return rollout.fallback
        return None

    @staticmethod
    def _retry_lane(rollout: Rollout, lane: Lane, exc: UpstreamError | None) -> Lane | None:
        """Where a request goes now that ``lane`` failed before any byte reached the
        client, by ``exc`` (None: a failing status). ``retry_canary_on_stable: unsent``
        replays only what the canary provably never received."""
        if lane is rollout.canary:
            policy = rollout.route.retry_canary_on_stable
            if policy is True or (policy == "unsent" and _never_sent(exc)):
                return rollout.stable
            return None
        if lane is rollout.stable:
            return rollout.fallback
        return None

    def _retried(self, rollout: Rollout, failed: Lane, nxt: Lane, exc: UpstreamError | None,
                 so_far: list[str] | None) -> list[str]:
        """Count a replay and remember the upstream it left, for the response header."""
        self.runtime.metrics.retries_total.labels(
            route=rollout.name, from_upstream=failed.upstream, to_upstream=nxt.upstream,
            cause=_retry_cause(exc)).inc()
        return [failed.upstream] if so_far is None else [*so_far, failed.upstream]

    async def _buffer(self, request: Request, length: int | None) -> bytes | _Body:
        """Read the body into memory when it fits ``inspect_body``, so it can be replayed;
        a larger one streams through (what was read so far goes first)."""
        limit = self.inspect_body
        content = request.body
        assert content is not None
        whole = _whole_body(content, limit)
        if whole is not None:
            return whole
        if length is not None:
            if length > limit:
                return _Body(content, self.max_body)
            return await content.readexactly(length) if length else b""
        parts: list[bytes] = []
        size = 0
        async for chunk in content.iter_any():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return _Body(content, self.max_body, prefix=b"".join(parts))
        return b"".join(parts)

    async def _feedback(self, request: Request, rid: str) -> None:
        """``POST /feedback`` on a config with ``guard.feedback``: a rating for an answer,
        by the request id flipback returned with it (see ``Runtime.feedback``)."""
        body = b""
        if request.body_exists:
            got = await self._buffer(request, request.content_length)
            if not isinstance(got, bytes):
                raise BodyTooLarge(f"a feedback body over {self.inspect_body} bytes")
            body = got
        status, answer = self.runtime.feedback(body)
        headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
        if rid:
            headers += ((self.id_header, rid),)
        send(request, Reply(status=status, headers=headers, body=orjson.dumps(answer)))

    async def _killed(self, request: Request, rollout: Rollout, rid: str) -> None:
        t0 = self._loop_time()
        body = b""
        if rollout.route.kill_switch.openai_message is not None and request.body_exists:
            got = await self._buffer(request, request.content_length)
            body = got if isinstance(got, bytes) else b""
        reply = kill_response(rollout.route.kill_switch, body, rid, self.id_header)
        send(request, reply)
        series = self.runtime.metrics.series(rollout.name, "kill_switch", "static")
        series.observe(outcome_index(reply.status), None, self._loop_time() - t0)

    def _log(self, request: Request, route: str, upstream: str, role: str,
             status: int, seconds: float, rid: str) -> None:
        if not self.access_log:
            return
        access_logger.info(orjson.dumps({
            "request_id": rid, "method": request.method, "path": request.target,
            "route": route, "upstream": upstream, "role": role, "status": status,
            "ms": round(seconds * 1000, 3),
        }).decode())


def _whole_body(content: RequestBody, limit: int) -> bytes | None:
    """The request body when all of it arrived with the headers (most API calls) and
    fits ``limit``: bytes at once, sent in the same write as the upstream headers."""
    if content.complete and content.total_bytes <= limit:
        return content.read_nowait()
    return None


def _outcome_of(exc: UpstreamError) -> int:
    return OUTCOME_TIMEOUT if exc.kind == "timeout" else OUTCOME_ERROR


def send(request: Request, reply: Reply, *, close: bool = False) -> None:
    """A response the proxy makes itself, head and body in one write."""
    request.respond(reply.status, header_lines(reply.headers), reply.body, close=close)
