"""Open-loop (constant arrival rate) and closed-loop (saturation) HTTP load generator.

Open loop: request i is due at t0 + i/rate whether or not earlier ones have finished, and
its latency runs from that *scheduled* time, so a slow or queueing target shows up in the
percentiles instead of silently lowering the send rate (no coordinated omission).
Closed loop: N workers send back to back; a fallback for saturation when wrk is missing.

    python loadtests/loadgen.py http://127.0.0.1:8080/ --rate 1000 --duration 10
    python loadtests/loadgen.py http://127.0.0.1:8080/ --closed 32 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import uvloop

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(slots=True)
class Traced:
    """One request of a traced open-loop run (times from time.perf_counter)."""

    index: int
    request_id: str  # sent as x-request-id
    scheduled: float
    sent: float
    done: float = 0.0
    status: int | None = None  # None: no response (see `error`)
    error: str | None = None
    header: str | None = None  # the value of the traced response header


@dataclass(slots=True, kw_only=True)
class LoadResult:
    """What one run measured. Latencies are in milliseconds."""

    url: str
    mode: str  # "open" or "closed"
    target_rate: float | None  # open loop: requests/s asked for
    concurrency: int | None  # closed loop: workers
    duration: float  # seconds of sending
    sent: int = 0
    completed: int = 0  # got a full response (any status)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0  # first scheduled send to last completion
    achieved_rate: float = 0.0  # completed / elapsed
    send_rate: float = 0.0  # sent / sending window
    latency_ms: dict[str, float] = field(default_factory=dict)  # from the scheduled send
    service_ms: dict[str, float] = field(default_factory=dict)  # from the actual send
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # generator lateness

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 400)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + sum(n for s, n in self.statuses.items() if s >= 400)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["statuses"] = {str(k): v for k, v in self.statuses.items()}
        return d

    def summary(self) -> str:
        lat = self.latency_ms
        head = (
            f"{self.mode}-loop {self.url}: sent {self.sent}, completed {self.completed} "
            f"in {self.elapsed:.2f}s = {self.achieved_rate:,.0f} req/s"
        )
        lines = [
            head,
            "  latency ms: "
            + "  ".join(f"{k} {v:.2f}" for k, v in lat.items())
            + f"  (send lag p50 {self.send_lag_ms.get('p50', 0):.2f}"
            + f" p99 {self.send_lag_ms.get('p99', 0):.2f})",
            f"  statuses: {dict(sorted(self.statuses.items()))}  errors: {self.errors or '{}'}",
        ]
        return "\n".join(lines)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_latency(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in ms from seconds."""
    values = sorted(latencies_s)
    out = {f"p{p:g}": percentile(values, p) * 1000 for p in PERCENTILES}
    out["max"] = (values[-1] * 1000) if values else 0.0
    out["mean"] = (sum(values) / len(values) * 1000) if values else 0.0
    return out


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "disconnect"
    return type(exc).__name__


class _Recorder:
    """Tallies of one phase; an inactive recorder (warmup) keeps nothing."""

    def __init__(self, *, active: bool = True, trace: list[Traced] | None = None) -> None:
        self.active = active
        self.trace = trace if active else None  # per-request records, when asked for
        self.trace_header = "x-flipback-upstream"
        self.latencies: list[float] = []  # completion - scheduled send
        self.services: list[float] = []  # completion - actual send
        self.lags: list[float] = []  # actual send - scheduled send
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.last_done = 0.0


def _make_session(connections: int, timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def _one(
    session: aiohttp.ClientSession,
    rec: _Recorder,
    method: str,
    url: str,
    body: bytes | None,
    headers: Mapping[str, str] | None,
    scheduled: float,
    index: int = 0,
) -> None:
    start = time.perf_counter()
    traced: Traced | None = None
    if rec.trace is not None:
        traced = Traced(index, f"lt-{index}", scheduled, start)
        rec.trace.append(traced)
        headers = {**(headers or {}), "x-request-id": traced.request_id}
    try:
        async with session.request(method, url, data=body, headers=headers) as resp:
            await resp.read()
            status = resp.status
            if traced is not None:
                traced.header = resp.headers.get(rec.trace_header)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if rec.active:
            rec.errors[_error_name(exc)] += 1
        if traced is not None:
            traced.error, traced.done = _error_name(exc), time.perf_counter()
        return
    if rec.active:
        now = time.perf_counter()
        rec.latencies.append(now - scheduled)
        rec.services.append(now - start)
        rec.lags.append(start - scheduled)
        rec.statuses[status] += 1
        rec.last_done = now
        if traced is not None:
            traced.status, traced.done = status, now


async def run_open_loop(
    url: str,
    rate: float,
    duration: float,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    connections: int = 64,
    request_timeout: float = 10.0,
    max_in_flight: int = 10_000,
    warmup: float = 0.0,
    trace: list[Traced] | None = None,
    trace_header: str = "x-flipback-upstream",
) -> LoadResult:
    """Send `rate` requests/s for `duration` s on a fixed schedule; return what was measured.

    At most `connections` sockets are used; requests beyond that queue inside the client
    and their wait counts as latency. Requests due while `max_in_flight` are already out
    are not sent and count as error "overload" (keeps memory bounded against a dead
    target). After the window, stragglers get up to `request_timeout` s, then count as "timeout".
    `warmup` seconds at the same rate run first on the same connections, unrecorded.
    Event-loop timers tick in whole milliseconds, so sends lag their schedule by up to
    ~1 ms; that lag is in `latency_ms` (it is the same for every target) and is reported
    apart in `send_lag_ms`, and `service_ms` measures from the actual send.
    With a `trace` list, every recorded (non-warmup) request is appended to it as a
    `Traced`, carries `x-request-id: lt-<index>`, and keeps its `trace_header` value.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    interval = 1.0 / rate
    loop = asyncio.get_running_loop()
    async with _make_session(connections, request_timeout) as session:
        for length, active in ((warmup, False), (duration, True)):
            if length <= 0:
                continue
            rec = _Recorder(active=active, trace=trace)
            rec.trace_header = trace_header
            gc.collect()  # start each phase clean, not with a full generation 2 pending
            total = int(round(rate * length))
            in_flight: set[asyncio.Task[None]] = set()
            sent = i = 0
            t0 = time.perf_counter()
            while i < total:
                now = time.perf_counter()
                batch = 0
                # Launch everything that is due; tasks only start running at the next yield.
                while i < total and t0 + i * interval <= now and batch < 256:
                    if len(in_flight) >= max_in_flight:
                        rec.errors["overload"] += active
                    else:
                        task = loop.create_task(
                            _one(session, rec, method, url, body, headers, t0 + i * interval, i)
                        )
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                        sent += 1
                    i += 1
                    batch += 1
                delay = t0 + i * interval - time.perf_counter()
                await asyncio.sleep(max(delay, 0.0))
            send_window = time.perf_counter() - t0
            if in_flight:
                _, pending = await asyncio.wait(in_flight, timeout=request_timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
                    rec.errors["timeout"] += len(pending) * active
    elapsed = max(rec.last_done - t0, send_window)
    return _result(
        rec,
        url=url,
        mode="open",
        target_rate=rate,
        concurrency=None,
        duration=duration,
        sent=sent,
        elapsed=elapsed,
        send_window=send_window,
    )


async def run_closed_loop(
    url: str,
    concurrency: int,
    duration: float,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    request_timeout: float = 10.0,
    warmup: float = 0.0,
) -> LoadResult:
    """`concurrency` workers send back to back for `duration` s (saturation throughput).

    Latency here is per request from its own send: closed-loop numbers describe
    throughput, not what users would see at a given arrival rate.
    """
    if concurrency <= 0 or duration <= 0:
        raise ValueError("concurrency and duration must be positive")
    rec = _Recorder()
    sent = 0

    async def worker(stop_at: float) -> None:
        nonlocal sent
        while time.perf_counter() < stop_at:
            sent += 1
            await _one(session, rec, method, url, body, headers, time.perf_counter())

    async with _make_session(concurrency, request_timeout) as session:
        for length, active in ((warmup, False), (duration, True)):
            if length <= 0:
                continue
            rec = _Recorder(active=active)
            sent = 0
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for _ in range(concurrency):
                    tg.create_task(worker(t0 + length))
            elapsed = time.perf_counter() - t0
    return _result(
        rec,
        url=url,
        mode="closed",
        target_rate=None,
        concurrency=concurrency,
        duration=duration,
        sent=sent,
        elapsed=elapsed,
        send_window=elapsed,
    )


def _result(
    rec: _Recorder, *, sent: int, elapsed: float, send_window: float, **fields: Any
) -> LoadResult:
    lags = sorted(rec.lags)
    return LoadResult(
        sent=sent,
        completed=len(rec.latencies),
        statuses=dict(rec.statuses),
        errors=dict(rec.errors),
        elapsed=elapsed,
        achieved_rate=len(rec.latencies) / elapsed if elapsed > 0 else 0.0,
        send_rate=sent / send_window if send_window > 0 else 0.0,
        latency_ms=summarize_latency(rec.latencies),
        service_ms=summarize_latency(rec.services),
        send_lag_ms={
            "p50": percentile(lags, 50) * 1000,
            "p99": percentile(lags, 99) * 1000,
            "max": (lags[-1] * 1000) if lags else 0.0,
        },
        **fields,
    )


def install_uvloop() -> None:
    """Make new event loops (asyncio.run) uvloop loops."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _parse_headers(items: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"header {item!r} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: requests/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (max 300)")
    parser.add_argument("--closed", type=int, metavar="N", help="closed loop with N workers")
    parser.add_argument("--connections", type=int, default=64, help="open loop: pool limit")
    parser.add_argument("--method", default=None, help="default GET, or POST with a body")
    parser.add_argument("--body", help="request body (string)")
    parser.add_argument("--body-file", help="request body from a file")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--warmup", type=float, default=0.0, help="unrecorded seconds first")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 300:
        parser.error("--duration must be in (0, 300]")
    body: bytes | None = None
    if args.body_file:
        with open(args.body_file, "rb") as fh:
            body = fh.read()
    elif args.body is not None:
        body = args.body.encode()
    method = args.method or ("POST" if body is not None else "GET")
    try:
        headers = _parse_headers(args.header)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    install_uvloop()
    if args.closed:
        coro = run_closed_loop(
            args.url,
            args.closed,
            args.duration,
            method=method,
            body=body,
            headers=headers,
            request_timeout=args.timeout,
            warmup=args.warmup,
        )
    else:
        coro = run_open_loop(
            args.url,
            args.rate,
            args.duration,
            method=method,
            body=body,
            headers=headers,
            connections=args.connections,
            request_timeout=args.timeout,
            warmup=args.warmup,
        )
    result = asyncio.run(coro)
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(result.summary())
    return 0 if result.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())
