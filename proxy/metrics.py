"""Prometheus metrics (SPEC §9) on a private registry.

Per-request figures are plain Python ints in slotted objects that the request path holds
directly (no label lookup, no lock per request); a collector turns them into metric
families at scrape time. Route-level gauges (weight, state) are read from the live
rollouts at scrape time too, so they cannot drift from the truth.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import add

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.llm.reader import FINISH_REASONS, INTER_TOKEN_BOUNDS, Reading
from proxy.llm.rules import LlmTripReason
from proxy.rollout.rules import TripReason

OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "error", "timeout")
OUTCOME_4XX = 2
OUTCOME_ERROR = 4
OUTCOME_TIMEOUT = 5
TRIP_REASONS = (*(reason.value for reason in TripReason),
                *(reason.value for reason in LlmTripReason))
JUDGE_STATES = ("passing", "failing", "inconclusive")
ROUTE_STATES = ("stable", "canary", "waiting", "promoted", "rolled_back", "killed")
# Seconds; wide on the right because an LLM stream can legitimately last minutes.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0, 120.0, 300.0)
# Shadow minus primary time to headers: either can be faster, so the buckets are symmetric.
_DELTA = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DELTA_BUCKETS = (*(-b for b in reversed(_DELTA)), 0.0, *_DELTA)
# LLM telemetry: time to first token (prefill plus queueing), and output speed per request.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0,
                30.0, 60.0)
TOKENS_PER_SECOND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0,
                             300.0, 500.0, 1000.0)
_FINISH_INDEX = {reason: i for i, reason in enumerate(FINISH_REASONS)}
SHADOW_OUTCOMES = ("sent", "dropped", "skipped_body", "error", "timeout")
MISMATCH_KINDS = ("status", "body")


def outcome_index(status: int) -> int:
    """Index into OUTCOMES for an HTTP status (1xx counts with 2xx: it never ends a request)."""
    klass = status // 100
    return 0 if klass < 2 else min(klass - 2, 3)


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class Series:
    """Counters for one (route, upstream, role): what one request outcome updates."""

    __slots__ = ("outcomes", "duration", "ttfb")

    def __init__(self) -> None:
        self.outcomes = [0] * len(OUTCOMES)
        self.duration = Histogram()
        self.ttfb = Histogram()

    def observe(self, outcome: int, ttfb: float | None, total: float) -> None:
        self.outcomes[outcome] += 1
        self.duration.observe(total)
        if ttfb is not None:
            self.ttfb.observe(ttfb)


class LlmSeries:
    """LLM figures for one (route, upstream, role), on routes with ``llm.telemetry``."""

    __slots__ = ("ttft", "inter_token", "tokens_per_second", "tokens", "finishes")

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(INTER_TOKEN_BOUNDS)
        self.tokens_per_second = Histogram(TOKENS_PER_SECOND_BUCKETS)
        self.tokens = [0, 0, 0]  # prompt, completion from usage, completion estimated
        self.finishes = [0] * len(FINISH_REASONS)

    def record(self, reading: Reading) -> None:
        """A response's reading (``ResponseReader.end``), when the response ended."""
        if reading.ttft is not None:
            self.ttft.observe(reading.ttft)
        if reading.content_events > 1:
            gaps = self.inter_token
            gaps.counts[:] = map(add, gaps.counts, reading.inter_token)
            gaps.total += reading.inter_token_sum
        if reading.tokens_per_second is not None:
            self.tokens_per_second.observe(reading.tokens_per_second)
        if reading.prompt_tokens is not None:
            self.tokens[0] += reading.prompt_tokens
        if reading.completion_tokens is not None:
            self.tokens[2 if reading.estimated else 1] += reading.completion_tokens
        if reading.finish_reason is not None:
            self.finishes[_FINISH_INDEX[reading.finish_reason]] += 1


class ShadowStats:
    """Shadow figures of one route: copies by outcome (``SHADOW_OUTCOMES``), mismatches
    by the primary upstream that answered the client (per kind, ``MISMATCH_KINDS``, and
    requests with any mismatch: a pair differing in status and body is one request) and
    the latency delta; the last two only with compare."""

    __slots__ = ("outcomes", "mismatches", "delta", "compares")

    def __init__(self) -> None:
        self.outcomes = [0] * len(SHADOW_OUTCOMES)
        # primary upstream -> [status, body, requests with any mismatch]
        self.mismatches: dict[str, list[int]] = {}
        self.delta = Histogram(DELTA_BUCKETS)
        self.compares = False  # set once a config compares: then its series are shown

    def declare(self, primaries: Iterable[str]) -> None:
        """Show the mismatch series of these primaries at 0 from the start."""
        for name in primaries:
            self.mismatches.setdefault(name, [0] * (len(MISMATCH_KINDS) + 1))

    def count_mismatch(self, primary: str, status: bool, body: bool) -> None:
        """One pair that differs (``MISMATCH_KINDS`` order: status, body)."""
        row = self.mismatches.get(primary)
        if row is None:
            row = self.mismatches[primary] = [0] * (len(MISMATCH_KINDS) + 1)
        row[0] += status
        row[1] += body
        row[2] += 1

    def totals(self) -> list[int]:
        """Mismatches over every primary: by kind, then requests."""
        out = [0] * (len(MISMATCH_KINDS) + 1)
        for row in list(self.mismatches.values()):
            for i, n in enumerate(row):
                out[i] += n
        return out


class InFlight:
    """Requests under way for one (route, upstream)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@dataclass(frozen=True, slots=True)
class RouteGauges:
    """What the collector reads of one route at scrape time."""

    route: str
    state: str
    canary_weight: float
    sticky_sessions: int
    judge: str | None = None  # "sequential" or "threshold"; None: nothing to judge
    judge_state: str | None = None  # one of JUDGE_STATES
    guards: tuple[tuple[str, str], ...] = ()  # (guard, one of JUDGE_STATES)


class Metrics:
    """Owns the registry. One instance per process (tests make one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._series: dict[tuple[str, str, str], Series] = {}
        self._llm: dict[tuple[str, str, str], LlmSeries] = {}
        self._in_flight: dict[tuple[str, str], InFlight] = {}
        self._shadow: dict[str, ShadowStats] = {}
        self._route_gauges: Callable[[], Iterable[RouteGauges]] = lambda: ()
        self._upstream_health: Callable[[], Iterable[tuple[str, bool | None]]] = lambda: ()
        # (name, version, max_connections) of each configured upstream
        self._upstreams: Callable[[], Iterable[tuple[str, str | None, int]]] = lambda: ()
        self._redis: Callable[[], tuple[bool, dict[str, int]]] | None = None
        self._connections: Callable[[], int] | None = None
        self._rejected: Callable[[], dict[str, int]] = dict
        r = self.registry
        self.rollbacks_total = Counter(
            "flipback_rollbacks_total", "Rollbacks by route and reason", ["route", "reason"],
            registry=r,
        )
        self.config_reloads_total = Counter(
            "flipback_config_reloads_total", "Config reloads by result", ["result"], registry=r
        )
        self.config_info = Gauge(
            "flipback_config_info", "1 for the loaded config's content hash", ["sha256"],
            registry=r,
        )
        self.shadow_records_total = Counter(
            "flipback_shadow_records_total",
            "Shadow mismatch records by result (written, full, dropped, error)",
            ["route", "result"], registry=r,
        )
        self.verifications_total = Counter(
            "flipback_verifications_total", "Post-rollback verifications", ["route", "result"],
            registry=r,
        )
        self.notifications_total = Counter(
            "flipback_notifications_total", "Webhook notifications", ["result"], registry=r
        )
        self.body_not_replayable_total = Counter(
            "flipback_body_not_replayable_total",
            "Requests whose body was too large to buffer, so not retried or mirrored",
            ["route"],
            registry=r,
        )
        self.override_ignored_total = Counter(
            "flipback_override_ignored_total",
            "Override headers naming no upstream of the route (ignored)",
            ["route"],
            registry=r,
        )
        self.retries_total = Counter(
            "flipback_retries_total",
            "Requests replayed on another upstream after a failure before any response byte "
            "(cause: connect_error, saturated, reset, timeout, status)",
            ["route", "from_upstream", "to_upstream", "cause"],
            registry=r,
        )
        for result in ("ok", "refused"):
            self.config_reloads_total.labels(result=result)
        for result in ("sent", "failed", "dropped"):
            self.notifications_total.labels(result=result)
        r.register(_Collector(self))

    def declare_routes(self, routes: Iterable[str]) -> None:
        """Create every per-route counter at 0, so ``increase()`` sees a route's first
        rollback (a labelled counter otherwise appears only at its first increment)."""
        for route in routes:
            for reason in TRIP_REASONS:
                self.rollbacks_total.labels(route=route, reason=reason)
            for result in ("verified", "failed"):
                self.verifications_total.labels(route=route, result=result)

    def series(self, route: str, upstream: str, role: str) -> Series:
        key = (route, upstream, role)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series()
        return found

    def llm_series(self, route: str, upstream: str, role: str) -> LlmSeries:
        """The LLM cells of (route, upstream, role): hold it, then ``record`` each reading."""
        key = (route, upstream, role)
        found = self._llm.get(key)
        if found is None:
            found = self._llm[key] = LlmSeries()
        return found

    def shadow(self, route: str, compares: bool, primaries: Iterable[str] = ()) -> ShadowStats:
        """The shadow figures of ``route``, shared by the mirrors a reload replaces;
        ``primaries`` (the route's stable and canary) get mismatch series at 0."""
        found = self._shadow.get(route)
        if found is None:
            found = self._shadow[route] = ShadowStats()
        found.compares = found.compares or compares
        if compares:
            found.declare(primaries)
        return found

    def in_flight(self, route: str, upstream: str) -> InFlight:
        key = (route, upstream)
        found = self._in_flight.get(key)
        if found is None:
            found = self._in_flight[key] = InFlight()
        return found

    def set_sources(
        self,
        routes: Callable[[], Iterable[RouteGauges]],
        upstream_health: Callable[[], Iterable[tuple[str, bool | None]]],
        upstreams: Callable[[], Iterable[tuple[str, str | None, int]]] = lambda: (),
    ) -> None:
        """Where scrape-time gauges come from (the runtime sets this once)."""
        self._route_gauges = routes
        self._upstream_health = upstream_health
        self._upstreams = upstreams

    def set_redis_source(self, source: Callable[[], tuple[bool, dict[str, int]]]) -> None:
        """With ``state.redis``: (connected, failures by operation), read at scrape time.
        Without it the ``flipback_redis_*`` extension metrics are absent."""
        self._redis = source

    def set_client_sources(self, connections: Callable[[], int],
                           rejected: Callable[[], dict[str, int]]) -> None:
        """The data-plane listener's open connections and refused requests by reason,
        read at scrape time (the server sets this once)."""
        self._connections = connections
        self._rejected = rejected

    def set_config(self, sha256: str) -> None:
        self.config_info.clear()
        self.config_info.labels(sha256=sha256).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(
            "flipback_requests", "Proxied requests", labels=["route", "upstream", "role", "outcome"]
        )
        duration = HistogramMetricFamily(
            "flipback_request_duration_seconds", "Whole request duration",
            labels=["route", "upstream", "role"],
        )
        ttfb = HistogramMetricFamily(
            "flipback_upstream_ttfb_seconds", "Time to upstream response headers",
            labels=["route", "upstream", "role"],
        )
        for (route, upstream, role), s in list(m._series.items()):
            for name, count in zip(OUTCOMES, s.outcomes, strict=True):
                if count:
                    requests.add_metric([route, upstream, role, name], count)
            duration.add_metric([route, upstream, role], s.duration.buckets(), s.duration.total)
            ttfb.add_metric([route, upstream, role], s.ttfb.buckets(), s.ttfb.total)
        yield requests
        yield duration
        yield ttfb
        in_flight = GaugeMetricFamily(
            "flipback_in_flight", "Requests under way", labels=["route", "upstream"]
        )
        for (route, upstream), cell in list(m._in_flight.items()):
            in_flight.add_metric([route, upstream], cell.value)
        yield in_flight
        yield from _shadow_families(m._shadow)
        yield from _llm_families(m._llm)
        weight = GaugeMetricFamily(
            "flipback_canary_weight", "Effective canary weight (percent)", labels=["route"]
        )
        state = GaugeMetricFamily(
            "flipback_route_state", "1 for the route's current state", labels=["route", "state"]
        )
        sticky = GaugeMetricFamily(
            "flipback_sticky_sessions", "Pinned sticky sessions", labels=["route"]
        )
        judge = GaugeMetricFamily(
            "flipback_judge_state", "1 for the state of the route's canary judge",
            labels=["route", "judge", "state"],
        )
        guard = GaugeMetricFamily(
            "flipback_guard_state", "1 for the state of each quality guard of the route",
            labels=["route", "guard", "state"],
        )
        for g in m._route_gauges():
            for name, now in g.guards:
                for label in JUDGE_STATES:
                    guard.add_metric([g.route, name, label], 1.0 if now == label else 0.0)
            weight.add_metric([g.route], g.canary_weight)
            for name in ROUTE_STATES:
                state.add_metric([g.route, name], 1.0 if g.state == name else 0.0)
            sticky.add_metric([g.route], g.sticky_sessions)
            if g.judge is not None:
                for name in JUDGE_STATES:
                    judge.add_metric([g.route, g.judge, name],
                                     1.0 if g.judge_state == name else 0.0)
        yield weight
        yield state
        yield sticky
        yield judge
        yield guard
        healthy = GaugeMetricFamily(
            "flipback_upstream_healthy", "1 healthy, 0 unhealthy (only probed upstreams)",
            labels=["upstream"],
        )
        for name, ok in m._upstream_health():
            if ok is not None:
                healthy.add_metric([name], 1.0 if ok else 0.0)
        yield healthy
        info = GaugeMetricFamily(
            "flipback_upstream_info", "1 per upstream, with the model version it serves",
            labels=["upstream", "version"],
        )
        limit = GaugeMetricFamily(
            "flipback_upstream_max_connections", "Configured max_connections per upstream",
            labels=["upstream"],
        )
        for name, version, max_connections in m._upstreams():
            info.add_metric([name, version or ""], 1.0)
            limit.add_metric([name], float(max_connections))
        yield info
        yield limit
        if m._connections is not None:
            yield GaugeMetricFamily(
                "flipback_client_connections", "Open client connections on the data plane",
                value=float(m._connections()),
            )
        rejected = CounterMetricFamily(
            "flipback_client_rejections",
            "Client requests or connections refused by a server limit, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(m._rejected().items()):
            rejected.add_metric([reason], count)
        yield rejected
        if m._redis is not None:
            connected, errors = m._redis()
            yield GaugeMetricFamily(
                "flipback_redis_connected",
                "1 while fleet state in Redis is reachable, 0 while serving from local state",
                value=1.0 if connected else 0.0,
            )
            failures = CounterMetricFamily(
                "flipback_redis_errors", "Redis calls that failed or timed out, by operation",
                labels=["op"],
            )
            for op, count in sorted(errors.items()):
                failures.add_metric([op], count)
            yield failures


def _shadow_families(stats: dict[str, ShadowStats]) -> Iterator[Metric]:
    total = CounterMetricFamily("flipback_shadow", "Shadow copies by outcome",
                                labels=["route", "outcome"])
    mismatch = CounterMetricFamily(
        "flipback_shadow_mismatch", "Shadow disagreements by kind and by the primary upstream "
        "that answered the client", labels=["route", "kind", "primary"])
    mismatched = CounterMetricFamily(
        "flipback_shadow_mismatched_requests", "Shadow copies whose answer differed from the "
        "primary's in any way (status or body), by primary upstream", labels=["route", "primary"])
    # Built by hand: HistogramMetricFamily leaves out _count and _sum when a bucket is
    # negative, and these buckets must be (either side can be the faster).
    hist = "flipback_shadow_latency_delta_seconds"
    delta = Metric(hist, "Shadow minus primary time to response headers (negative: shadow "
                   "was faster)", "histogram")
    for route, s in list(stats.items()):
        for outcome, count in zip(SHADOW_OUTCOMES, s.outcomes, strict=True):
            total.add_metric([route, outcome], count)
        if s.compares:
            for primary, row in sorted(s.mismatches.items()):
                for kind, count in zip(MISMATCH_KINDS, row, strict=False):
                    mismatch.add_metric([route, kind, primary], count)
                mismatched.add_metric([route, primary], row[-1])
            buckets = s.delta.buckets()
            for le, running in buckets:
                delta.add_sample(f"{hist}_bucket", {"route": route, "le": le}, running)
            delta.add_sample(f"{hist}_count", {"route": route}, buckets[-1][1])
            delta.add_sample(f"{hist}_sum", {"route": route}, s.delta.total)
    yield total
    yield mismatch
    yield mismatched
    yield delta


def _llm_families(series: dict[tuple[str, str, str], LlmSeries]) -> Iterator[Metric]:
    labels = ["route", "upstream", "role"]
    ttft = HistogramMetricFamily(
        "flipback_llm_ttft_seconds", "Time from sending the request to the first streamed "
        "token (content, reasoning or tool call arguments)", labels=labels)
    gaps = HistogramMetricFamily(
        "flipback_llm_inter_token_seconds", "Time between streamed content chunks",
        labels=labels)
    speed = HistogramMetricFamily(
        "flipback_llm_output_tokens_per_second", "Completion tokens per second of each "
        "response (a stream: from its first token)", labels=labels)
    tokens = CounterMetricFamily(
        "flipback_llm_tokens", "Tokens by kind (prompt, completion); estimated=true: "
        "completion counted as streamed chunks, the response had no usage",
        labels=[*labels, "kind", "estimated"])
    finish = CounterMetricFamily("flipback_llm_finish", "Responses by finish_reason",
                                 labels=[*labels, "finish_reason"])
    for key, s in list(series.items()):
        ttft.add_metric(key, s.ttft.buckets(), s.ttft.total)
        gaps.add_metric(key, s.inter_token.buckets(), s.inter_token.total)
        speed.add_metric(key, s.tokens_per_second.buckets(), s.tokens_per_second.total)
        prompt, completion, estimated = s.tokens
        tokens.add_metric([*key, "prompt", "false"], prompt)
        tokens.add_metric([*key, "completion", "false"], completion)
        if estimated:
            tokens.add_metric([*key, "completion", "true"], estimated)
        for reason, count in zip(FINISH_REASONS, s.finishes, strict=True):
            if count:
                finish.add_metric([*key, reason], count)
    yield ttft
    yield gaps
    yield speed
    yield tokens
    yield finish
