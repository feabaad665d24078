"""The config schema (SPEC §3) as frozen dataclasses.

Field names are the YAML keys, so an error's ``path.to.field`` is the field path, and
defaults here are the documented defaults. ``config.parser`` turns YAML into these;
nothing else constructs them from user input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.units import Bytes, Percent, Seconds

KIB = 1024
MIB = 1024 * KIB

NOTIFY_KINDS = (
    "rollback",
    "promote",
    "step",
    "weight",
    "resume",
    "kill",
    "reload",
    "reload_refused",
    "canary_unhealthy",
    "canary_healthy",
    "verified",
    "verify_failed",
    "step_stalled",
)
DEFAULT_NOTIFY_KINDS = ("rollback", "promote", "verify_failed", "kill", "reload_refused")


def _frozen() -> dict[str, bool]:
    return {"frozen": True, "slots": True, "kw_only": True}


@dataclass(**_frozen())
class RequestIdConfig:
    header: str = "x-request-id"  # lower-cased
    generate: str = "uuid4"  # or "hex32", or "off" (pass the client's, make none)


@dataclass(**_frozen())
class ServerConfig:
    listen: str = "0.0.0.0:8080"
    max_body: Bytes = 10 * MIB
    inspect_body: Bytes = 1 * MIB
    header_timeout: Seconds = 10.0
    body_timeout: Seconds = 60.0  # longest gap between request body bytes (-> 408)
    keepalive_timeout: Seconds = 75.0  # an idle client connection is closed after this
    max_header_bytes: Bytes = 64 * KIB  # request line and headers (-> 431)
    headers_with_underscores: str = "drop"  # or "allow", "reject" (-> 400)
    request_id: RequestIdConfig = field(default_factory=RequestIdConfig)
    drain_timeout: Seconds = 30.0


@dataclass(**_frozen())
class AdminConfig:
    listen: str = "127.0.0.1:9901"
    token_env: str = "FLIPBACK_ADMIN_TOKEN"


@dataclass(**_frozen())
class StateConfig:
    file: str | None = ".flipback/state.json"
    redis: str | None = None


@dataclass(**_frozen())
class LogConfig:
    access: bool = False


@dataclass(**_frozen())
class NotifyConfig:
    webhook: str | None = None
    timeout: Seconds = 2.0
    kinds: tuple[str, ...] = DEFAULT_NOTIFY_KINDS


@dataclass(**_frozen())
class HealthConfig:
    path: str | None = None
    interval: Seconds = 5.0
    timeout: Seconds = 1.0
    unhealthy_after: int = 2
    healthy_after: int = 2


@dataclass(**_frozen())
class UpstreamConfig:
    name: str
    url: str
    connect_timeout: Seconds = 2.0
    timeout: Seconds = 120.0
    idle_timeout: Seconds = 60.0
    max_connections: int = 512
    max_pending: int = 1024
    headers: tuple[tuple[str, str], ...] = ()
    health: HealthConfig = field(default_factory=HealthConfig)
    # The model version it serves (a registry version, an LLM model id): returned as
    # x-flipback-version, exported in flipback_upstream_info, shown in events and status.
    version: str | None = None
    # Derived from ``url`` by the parser: where to connect and what Host to send.
    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 80
    base_path: str = ""  # prefix joined before the client's path ("" for none)


@dataclass(**_frozen())
class MatchConfig:
    path_prefix: str = "/"
    methods: tuple[str, ...] = ()  # empty: any method
    headers: tuple[tuple[str, str], ...] = ()  # lower-cased names; exact value match


@dataclass(**_frozen())
class CanaryConfig:
    upstream: str
    weight: Percent = 0.0


@dataclass(**_frozen())
class ProgressiveConfig:
    steps: tuple[Percent, ...] = (1.0, 5.0, 25.0, 50.0, 100.0)
    interval: Seconds = 60.0


@dataclass(**_frozen())
class StickyConfig:
    header: str | None = None
    cookie: str | None = None
    json_field: str | None = None
    ttl: Seconds = 3600.0
    max_sessions: int = 1_000_000


@dataclass(**_frozen())
class CompareConfig:
    status: bool = True
    json_paths: tuple[str, ...] = ()
    record: str | None = ".flipback/shadow-diffs.jsonl"
    record_max: Bytes = 10 * MIB
    bodies: bool = False  # flipback extension: store both bodies in the record


@dataclass(**_frozen())
class ShadowConfig:
    upstream: str
    sample: Percent = 10.0
    by: str = "request"  # or "session"
    max_in_flight: int = 32
    timeout: Seconds = 30.0
    compare: CompareConfig | None = None


@dataclass(**_frozen())
class OutputGuardConfig:
    json_path: str  # the answer value whose distribution is compared (predictions.0)


@dataclass(**_frozen())
class FeedbackGuardConfig:
    json_path: str | None = None  # the answer value a posted label is compared with
    max_pending: int = 100_000  # answers awaiting feedback; the oldest are dropped past it
    ttl: Seconds = 3600.0  # how long an answer awaits feedback
    min_accuracy: float | None = None  # 0-1; null: only "canary worse than stable" trips


@dataclass(**_frozen())
class CompareGuardConfig:
    json_paths: tuple[str, ...]
    sample: Percent = 10.0  # of canary-served requests, also sent to stable
    max_disagreement: Percent = 10.0  # (over the noise floor, with one)
    noise_floor: bool = False  # also pair stable with itself and judge against that


@dataclass(**_frozen())
class GuardConfig:
    alpha: float = 0.01  # each guard flips a healthy canary with at most this probability
    output: OutputGuardConfig | None = None
    feedback: FeedbackGuardConfig | None = None
    compare: CompareGuardConfig | None = None


@dataclass(**_frozen())
class RollbackConfig:
    enabled: bool = True
    # "sequential": canary vs stable, request by request, false rollbacks bounded by
    # alpha (proxy.rollout.judge); "threshold": the fixed-threshold rules alone. A config
    # file that leaves it out gets sequential, threshold on a sticky route (a session is
    # one unit, not a random sample), and no max_error_rate with sequential (the judge's
    # failure test replaces it) unless the file sets one.
    judge: str = "sequential"
    alpha: float = 0.01
    tolerance: Percent = 2.0  # progressive gate: canary failure/4xx rate within this (pp)
    latency_tolerance: Percent = 20.0  # ... and its p75 within this % of stable's
    window: Seconds = 10.0
    min_requests: int = 20
    max_error_rate: Percent | None = 5.0
    max_p99: Seconds | None = 0.5
    max_p99_ratio: float | None = None
    consecutive_failures: int | None = 5
    compare_to_stable: bool = True
    latency: str = "ttfb"  # or "total"
    # Every status code that counts as a failure, expanded from "5xx", "4xx", 429, ...
    failure_statuses: frozenset[int] = frozenset(range(500, 600))
    verify: Seconds | None = 60.0
    # LLM rules (route needs llm.telemetry): time to first token, and token cost.
    max_ttft_p99: Seconds | None = None
    max_ttft_ratio: float | None = None  # canary TTFT p99 / stable's
    max_tokens_ratio: float | None = None  # canary completion tokens per request / stable's
    max_finish_length_rate: Percent | None = None  # answers cut at max_tokens


@dataclass(**_frozen())
class KillSwitchConfig:
    enabled: bool = False
    status: int = 503
    content_type: str = "application/json"
    body: str = '{"error":"model temporarily disabled"}'
    openai_message: str | None = None


@dataclass(**_frozen())
class LlmConfig:
    telemetry: bool = False  # read OpenAI-style responses: TTFT, tokens, finish reasons


@dataclass(**_frozen())
class RouteConfig:
    name: str
    match: MatchConfig
    stable: str
    canary: CanaryConfig | None = None
    progressive: ProgressiveConfig | None = None
    sticky: StickyConfig | None = None
    shadow: ShadowConfig | None = None
    fallback: str | None = None
    # True, False, or "unsent": only failures where the canary provably never got the
    # request (connect refused, pool saturated), for endpoints that must not run twice.
    retry_canary_on_stable: bool | str = True
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    kill_switch: KillSwitchConfig = field(default_factory=KillSwitchConfig)
    override_header: str | None = None  # lower-cased
    llm: LlmConfig = field(default_factory=LlmConfig)
    guard: GuardConfig | None = None  # quality guards (issue 17)


@dataclass(**_frozen())
class ProxyConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    notify: NotifyConfig | None = None
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    source: str = "<memory>"  # the file it came from, for messages
    sha256: str = ""  # content hash of that file
