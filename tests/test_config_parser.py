from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from proxy.config.model import (
    CanaryConfig,
    CompareConfig,
    HealthConfig,
    KillSwitchConfig,
    MatchConfig,
    NotifyConfig,
    ProgressiveConfig,
    RollbackConfig,
    ServerConfig,
    ShadowConfig,
    StickyConfig,
)
from proxy.config.parser import load_config, parse_config, summarize
from proxy.config.values import parse_redis_url
from proxy.config.yamlnodes import Invalid
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "configs" / "bad"
BAD_CASES = sorted(p.stem for p in BAD.glob("*.yaml"))

MINIMAL = """\
upstreams:
  a: {url: "http://127.0.0.1:9001"}
routes:
  - name: r
    match: {}
    stable: a
"""

FULL = """\
server:
  listen: "[::1]:8080"
  max_body: 20MiB
  inspect_body: 64KiB
  header_timeout: 5s
  drain_timeout: 0
admin: {listen: "127.0.0.1:9901", token_env: MY_TOKEN}
state: {file: null, redis: "redis://127.0.0.1:6379/0"}
log: {access: true}
notify:
  webhook: "http://127.0.0.1:9099/hooks/flipback"
  timeout: 500ms
  kinds: [rollback, kill, rollback]
upstreams:
  llm-v1:
    url: "https://models.internal/api/v1/"
    connect_timeout: 1.5
    timeout: 2m
    idle_timeout: 30s
    max_connections: 8
    max_pending: 0
    headers: {Authorization: "Bearer x"}
    health: {path: /health, interval: 2s, timeout: 250ms, unhealthy_after: 3, healthy_after: 1}
  llm-v2: {url: "http://[::1]:9002"}
  llm-v3: {url: "http://127.0.0.1:9003"}
  small: {url: "http://127.0.0.1:9004"}
routes:
  - name: chat
    match: {path_prefix: /v1/, methods: [post, Get], headers: {X-Tenant: acme}}
    stable: llm-v1
    canary: {upstream: llm-v2, weight: 0.5}
    progressive: {steps: [1, 5, 25, 50, 100], interval: 1m}
    sticky: {header: X-Session-Id, cookie: sid, json_field: user, ttl: 1h, max_sessions: 10}
    shadow:
      upstream: llm-v3
      sample: "2.5%"
      by: session
      max_in_flight: 4
      timeout: 10s
      compare: {status: false, json_paths: [choices.0.finish_reason], record: null,
                record_max: 1MiB, bodies: true}
    fallback: small
    retry_canary_on_stable: false
    rollback:
      enabled: true
      judge: sequential
      alpha: 0.05
      tolerance: 1
      latency_tolerance: 10%
      window: 5s
      min_requests: 10
      max_error_rate: null
      max_p99: 250ms
      max_p99_ratio: 2
      consecutive_failures: null
      compare_to_stable: false
      latency: total
      failure_statuses: [5xx, 429, "408"]
      verify: null
    kill_switch: {enabled: true, status: 200, content_type: text/plain, body: "",
                  openai_message: "Back soon."}
    override_header: X-Flipback-Upstream
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml")
    return info.value.errors


def test_parse_config_reads_every_section() -> None:
    cfg = parse_config(FULL, "full.yaml")
    assert cfg.source == "full.yaml"
    assert cfg.server == ServerConfig(
        listen="[::1]:8080",
        max_body=20 * 1024**2,
        inspect_body=64 * 1024,
        header_timeout=5.0,
        drain_timeout=0.0,
    )
    assert (cfg.admin.listen, cfg.admin.token_env) == ("127.0.0.1:9901", "MY_TOKEN")
    assert (cfg.state.file, cfg.state.redis) == (None, "redis://127.0.0.1:6379/0")
    assert cfg.log.access is True
    assert cfg.notify == NotifyConfig(
        webhook="http://127.0.0.1:9099/hooks/flipback", timeout=0.5, kinds=("rollback", "kill")
    )
    assert list(cfg.upstreams) == ["llm-v1", "llm-v2", "llm-v3", "small"]
    v1 = cfg.upstreams["llm-v1"]
    assert v1.name == "llm-v1"
    assert (v1.scheme, v1.host, v1.port, v1.base_path) == (
        "https",
        "models.internal",
        443,
        "/api/v1",
    )
    assert (v1.connect_timeout, v1.timeout, v1.idle_timeout) == (1.5, 120.0, 30.0)
    assert (v1.max_connections, v1.max_pending) == (8, 0)
    assert v1.headers == (("Authorization", "Bearer x"),)
    assert v1.health == HealthConfig(
        path="/health", interval=2.0, timeout=0.25, unhealthy_after=3, healthy_after=1
    )
    v2 = cfg.upstreams["llm-v2"]
    assert (v2.scheme, v2.host, v2.port, v2.base_path) == ("http", "::1", 9002, "")

    (route,) = cfg.routes
    assert route.name == "chat"
    assert route.match == MatchConfig(
        path_prefix="/v1/", methods=("POST", "GET"), headers=(("x-tenant", "acme"),)
    )
    assert route.stable == "llm-v1"
    assert route.canary == CanaryConfig(upstream="llm-v2", weight=0.5)
    assert route.progressive == ProgressiveConfig(
        steps=(1.0, 5.0, 25.0, 50.0, 100.0), interval=60.0
    )
    assert route.sticky == StickyConfig(
        header="x-session-id", cookie="sid", json_field="user", ttl=3600.0, max_sessions=10
    )
    assert route.shadow == ShadowConfig(
        upstream="llm-v3",
        sample=2.5,
        by="session",
        max_in_flight=4,
        timeout=10.0,
        compare=CompareConfig(
            status=False,
            json_paths=("choices.0.finish_reason",),
            record=None,
            record_max=1024**2,
            bodies=True,
        ),
    )
    assert route.fallback == "small"
    assert route.retry_canary_on_stable is False
    assert route.rollback == RollbackConfig(
        enabled=True,
        judge="sequential",  # said, on a sticky route (where the default is threshold)
        alpha=0.05,
        tolerance=1.0,
        latency_tolerance=10.0,
        window=5.0,
        min_requests=10,
        max_error_rate=None,
        max_p99=0.25,
        max_p99_ratio=2.0,
        consecutive_failures=None,
        compare_to_stable=False,
        latency="total",
        failure_statuses=frozenset(range(500, 600)) | {429, 408},
        verify=None,
    )
    assert route.kill_switch == KillSwitchConfig(
        enabled=True, status=200, content_type="text/plain", body="", openai_message="Back soon."
    )
    assert route.override_header == "x-flipback-upstream"


def test_parse_config_applies_defaults() -> None:
    cfg = parse_config(MINIMAL, "min.yaml")
    assert cfg.server == ServerConfig()
    assert cfg.state.file == ".flipback/state.json" and cfg.state.redis is None
    assert cfg.notify is None and cfg.log.access is False
    up = cfg.upstreams["a"]
    assert (up.timeout, up.max_connections, up.headers, up.health) == (
        120.0,
        512,
        (),
        HealthConfig(),
    )
    (route,) = cfg.routes
    assert route.match == MatchConfig()
    assert route.canary is route.progressive is route.sticky is route.shadow is None
    assert route.fallback is route.override_header is None
    assert route.retry_canary_on_stable is True
    # With the sequential judge (the default), max_error_rate is off unless set.
    assert route.rollback == RollbackConfig(max_error_rate=None)
    assert route.kill_switch == KillSwitchConfig()


def test_parse_config_fills_omitted_keys_of_present_sections() -> None:
    text = MINIMAL.replace("a: {url", "b: {url: 'http://127.0.0.1:9002'}\n  a: {url")
    text += "    canary: {upstream: b}\n    rollback: {enabled: false}\n"
    (route,) = parse_config(text, "f.yaml").routes
    assert route.canary == CanaryConfig(upstream="b", weight=0.0)
    assert route.rollback == RollbackConfig(enabled=False, max_error_rate=None)


def test_parse_config_shrinks_default_inspect_body_to_max_body() -> None:
    cfg = parse_config("server: {max_body: 4KiB}\n" + MINIMAL, "f.yaml")
    assert cfg.server.inspect_body == 4096


def test_parse_config_expands_yaml_merge_keys() -> None:
    text = """\
upstreams:
  a: &base {url: "http://127.0.0.1:9001", timeout: 5s}
  b: {<<: *base, url: "http://127.0.0.1:9002"}
routes: [{name: r, match: {}, stable: a, canary: {upstream: b, weight: 1}}]
"""
    b = parse_config(text, "f.yaml").upstreams["b"]
    assert (b.port, b.timeout) == (9002, 5.0)


def test_parse_config_reads_a_merged_anchor_once_however_often_it_is_merged() -> None:
    # Each level merges the one below nine times: 9**7 expansions if none were shared.
    levels = ["  l0: &l0 {timeout: 5s}"] + [
        f"  l{i}: &l{i} {{<<: [{', '.join([f'*l{i - 1}'] * 9)}]}}" for i in range(1, 8)
    ]
    text = "x-defaults:\n" + "\n".join(levels) + "\n" + MINIMAL.replace(
        '{url: "http://127.0.0.1:9001"}', '{<<: *l7, url: "http://127.0.0.1:9001"}')
    started = time.perf_counter()
    assert errors_of(text) == [
        "f.yaml:1: x-defaults: unknown key 'x-defaults' (expected one of: server, admin, "
        "state, log, notify, upstreams, routes)"
    ]
    assert time.perf_counter() - started < 0.5  # about 3 s when each merge is expanded


def test_parse_config_reports_a_chain_of_merges_too_deep_to_follow() -> None:
    chain = ["  m0: &m0 {timeout: 5s}"] + [f"  m{i}: &m{i} {{<<: *m{i - 1}}}"
                                           for i in range(1, 600)]
    text = "x-chain:\n" + "\n".join(chain) + "\n" + MINIMAL.replace(
        '{url: "http://127.0.0.1:9001"}', '{<<: *m599, url: "http://127.0.0.1:9001"}')
    assert errors_of(text) == ["f.yaml:1: (root): nested too deeply"]


def test_parse_config_accepts_state_redis() -> None:
    cfg = parse_config('state: {redis: "redis://127.0.0.1:6379/0"}\n' + MINIMAL, "f.yaml")
    assert cfg.state.redis == "redis://127.0.0.1:6379/0"


def test_parse_config_treats_null_optional_sections_as_absent() -> None:
    text = MINIMAL + "    sticky: null\n    canary: ~\n    override_header: null\n"
    route = parse_config(text, "f.yaml").routes[0]
    assert route.sticky is None and route.canary is None and route.override_header is None


def test_parse_config_reports_syntax_error_with_yaml_line() -> None:
    assert errors_of("upstreams:\n  a: [\n") == [
        "f.yaml:3: (syntax): expected the node content, but found '<stream end>'"
        " (while parsing a flow node)"
    ]


@pytest.mark.parametrize("case", BAD_CASES)
def test_load_config_reports_every_error_of_bad_config(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(BAD)
    expected = (BAD / f"{case}.expected").read_text().splitlines()
    with pytest.raises(ConfigError) as info:
        load_config(f"{case}.yaml")
    assert info.value.errors == expected


def test_bad_configs_cover_enough_cases() -> None:
    assert len(BAD_CASES) >= 12
    assert all((BAD / f"{case}.expected").exists() for case in BAD_CASES)


def test_load_config_sets_source_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "flipback.yaml"
    path.write_text(MINIMAL)
    cfg = load_config(str(path))
    assert cfg.source == str(path)
    assert cfg.sha256 == hashlib.sha256(MINIMAL.encode()).hexdigest()


def test_load_config_reports_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.errors == [f"{missing}: cannot read: No such file or directory"]


def test_load_config_accepts_example_config() -> None:
    cfg = load_config(str(ROOT / "config" / "flipback.yaml"))
    assert [r.name for r in cfg.routes] == ["chat", "predict"]
    chat = cfg.routes[0]
    assert chat.canary == CanaryConfig(upstream="llm-v2", weight=10.0)
    assert chat.rollback == RollbackConfig(max_error_rate=None)
    assert cfg.upstreams["small"].port == 9004
    assert (cfg.server.listen, cfg.admin.listen) == ("127.0.0.1:8080", "127.0.0.1:9901")


def test_summarize_shows_routes_and_rollback() -> None:
    text = summarize(parse_config(FULL, "full.yaml"))
    assert "listen [::1]:8080, admin 127.0.0.1:9901" in text
    assert "https://models.internal/api/v1/" in text
    assert "chat: POST,GET /v1/* [x-tenant: acme]" in text
    assert "stable llm-v1, canary llm-v2 at 0.5%" in text
    assert "shadow llm-v3 2.5% by session" in text
    assert "kill switch ON: answers an OpenAI-style message" in text
    assert (
        "    rollback: window 5s (min 10 req, total, failing 5xx,408,429):"
        " judge vs stable (alpha 0.05) | p99>250ms | p99>2x stable\n" in text + "\n"
    )
    assert "Bearer" not in text  # upstream headers may hold secrets
    assert len(text.splitlines()) < 30


def test_summarize_marks_plain_route_without_rollback() -> None:
    text = summarize(parse_config(MINIMAL, "min.yaml"))
    assert "  r: * /*\n    stable a" in text
    assert "rollback" not in text


@pytest.mark.parametrize("url", ["redis://:s3cret@cache:6379/1",
                                 "unix:///run/redis.sock?db=3&password=s3cret"])
def test_summarize_shows_the_redis_url_without_its_password(url: str) -> None:
    text = summarize(parse_config(f'state: {{redis: "{url}"}}\n' + MINIMAL, "f.yaml"))
    assert "shared in " in text and "s3cret" not in text


def test_summarize_shows_the_webhook_without_its_path() -> None:
    hook = "https://hooks.slack.com/services/T0/B0/S3cretToken"
    text = summarize(parse_config(f'notify: {{webhook: "{hook}"}}\n' + MINIMAL, "f.yaml"))
    assert "notify: https://hooks.slack.com/... (" in text and "S3cret" not in text


def test_parse_config_reports_control_character_on_one_line() -> None:
    assert errors_of(MINIMAL + "log: {access: \x00}\n") == [
        "f.yaml:7: (syntax): unacceptable character #x0000: special characters are not allowed"
    ]


def test_parse_config_explains_a_yaml_date_given_for_a_string() -> None:
    assert errors_of(MINIMAL.replace("name: r", "name: 2024-01-01")) == [
        "f.yaml:4: routes[0].name: expected a string, got 2024-01-01"
        " (YAML reads it as a date; quote it)"
    ]


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://:secret@cache.internal", "rediss://c:6380/3",
    "unix:///run/redis.sock?db=2", "redis://[::1]:6379/1",
])
def test_redis_urls_the_client_reads_are_accepted(url: str) -> None:
    assert parse_redis_url(url) == url


@pytest.mark.parametrize(("url", "why"), [
    ("redis://127.0.0.1:notaport/0", "invalid port"),
    ("redis://127.0.0.1:6379/zero", "database number"),
    ("redis:///0", "no host"),
    ("unix://", "no socket path"),
    ("unix:///run/redis.sock?db=x", "db must be a number"),
    ("http://127.0.0.1:6379", "expected a redis://"),
])
def test_redis_urls_the_client_would_refuse_at_start_are_refused(url: str, why: str) -> None:
    with pytest.raises(Invalid, match=why):
        parse_redis_url(url)


def test_deep_nesting_is_refused_where_it_passes_the_limit_before_composing():
    """PyYAML composes recursively (thousands of levels took ~2.6 s to fail, a reload
    test timed out on a slow machine): the scan stops at the first level past the limit,
    so the error names that line, not the deepest one."""
    from proxy.config.parser import MAX_DEPTH

    text = "upstreams:\n  a: {url: 'http://127.0.0.1:1'}\nlog:\n" + "  [\n" * 3000
    with pytest.raises(ConfigError) as info:
        parse_config(text, "deep.yaml")
    line = int(info.value.errors[0].split(":")[1])  # line 4 holds the first "["
    assert info.value.errors[0].endswith("(syntax): nested too deeply")
    assert line < 4 + MAX_DEPTH, line
