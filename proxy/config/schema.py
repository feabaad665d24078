"""The config schema of SPEC §3 as converter tables, one per section.

``config.parser`` runs it over the composed YAML; each table maps a YAML key to the
converter that checks and converts its node (``yamlnodes``), so the key list, the
checks and the defaults (from ``config``'s dataclasses) sit side by side. Rules that
span keys (references to upstreams, roles that must differ) are in ``Schema``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from yaml.nodes import Node

from proxy.config import model as c
from proxy.config import values as v
from proxy.config.yamlnodes import (
    Conv,
    Invalid,
    NodeReader,
    Reported,
    Section,
    as_str,
    boolean,
    child,
    choice,
    duration,
    integer,
    is_null,
    line_of,
    list_of,
    nullable,
    number,
    percent,
    scalar,
    section,
    size,
    string,
    text,
)
from proxy.units import format_size


def _server_check(reader: NodeReader, sec: Section) -> None:
    limit = sec.values.get("max_body", c.ServerConfig().max_body)
    inspect = sec.values.get("inspect_body")
    if inspect is None:
        # Only a body within max_body is ever read, so the default shrinks to fit it.
        sec.values["inspect_body"] = min(limit, c.ServerConfig().inspect_body)
    elif inspect > limit:
        reader.error(
            sec.key_line("inspect_body"),
            f"{sec.path}.inspect_body",
            f"must not exceed max_body ({format_size(limit)}), got {format_size(inspect)}",
        )


_REQUEST_ID = section(
    c.RequestIdConfig,
    {"header": v.header_name, "generate": scalar(v.id_generator)},
)
_HEALTH = section(
    c.HealthConfig,
    {
        "path": nullable(v.path_prefix),
        "interval": duration(),
        "timeout": duration(),
        "unhealthy_after": integer(1),
        "healthy_after": integer(1),
    },
)
_MATCH = section(
    c.MatchConfig,
    {
        "path_prefix": v.path_prefix,
        "methods": list_of(v.method),
        "headers": v.header_map(lower=True),
    },
)
_PROGRESSIVE = section(c.ProgressiveConfig, {"steps": v.progressive_steps, "interval": duration()})
_STICKY = section(
    c.StickyConfig,
    {
        "header": nullable(v.header_name),
        "cookie": nullable(string(pattern=v.TOKEN, hint="expected a cookie name")),
        "json_field": nullable(string()),
        "ttl": duration(),
        "max_sessions": integer(1),
    },
)
_COMPARE = section(
    c.CompareConfig,
    {
        "status": boolean(),
        "json_paths": list_of(string()),
        "record": nullable(string()),
        "record_max": size(minimum=1),
        "bodies": boolean(),
    },
)
_ROLLBACK = section(
    c.RollbackConfig,
    {
        "enabled": boolean(),
        "judge": choice("sequential", "threshold"),
        "alpha": scalar(v.alpha),
        "tolerance": percent(),
        "latency_tolerance": percent(),
        "window": duration(),
        "min_requests": integer(1),
        "max_error_rate": nullable(percent()),
        "max_p99": nullable(duration()),
        "max_p99_ratio": nullable(number(1.0)),
        "consecutive_failures": nullable(integer(1)),
        "compare_to_stable": boolean(),
        "latency": choice("ttfb", "total"),
        "failure_statuses": v.failure_statuses,
        "verify": nullable(duration()),
        "max_ttft_p99": nullable(duration()),
        "max_ttft_ratio": nullable(number(1.0)),
        "max_tokens_ratio": nullable(number(1.0)),
        "max_finish_length_rate": nullable(percent()),
    },
)
# Rollback rules on figures only a route with llm.telemetry reads.
LLM_RULES = ("max_ttft_p99", "max_ttft_ratio", "max_tokens_ratio", "max_finish_length_rate")
_GUARD = section(
    c.GuardConfig,
    {
        "alpha": scalar(v.alpha),
        "output": nullable(section(c.OutputGuardConfig, {"json_path": v.json_path},
                                   required=("json_path",))),
        "feedback": nullable(section(c.FeedbackGuardConfig, {
            "json_path": nullable(v.json_path),
            "max_pending": integer(1),
            "ttl": duration(),
            "min_accuracy": nullable(scalar(v.fraction)),
        })),
        "compare": nullable(section(c.CompareGuardConfig, {
            "sample": percent(),
            "json_paths": list_of(v.json_path, min_items=1),
            "max_disagreement": percent(),
            "noise_floor": boolean(),
        }, required=("json_paths",))),
    },
)
_KILL_SWITCH = section(
    c.KillSwitchConfig,
    {
        "enabled": boolean(),
        "status": integer(100, 599),
        "content_type": string(),
        "body": text(),
        "openai_message": nullable(text()),
    },
)
_NOTIFY = section(
    c.NotifyConfig,
    {
        "webhook": nullable(scalar(lambda value: v.parse_url(value).text)),
        "timeout": duration(),
        "kinds": v.notify_kinds,
    },
)
_STATE = section(
    c.StateConfig,
    {
        "file": nullable(string()),
        "redis": nullable(scalar(v.parse_redis_url)),
    },
)


class Schema:
    """The top-level walk. Holds what routes check against: the upstream names and the
    route names seen so far."""

    def __init__(self) -> None:
        self.upstream_names: list[str] | None = None  # None: upstreams unreadable, skip refs
        self.route_lines: dict[str, int] = {}

    def proxy(self, reader: NodeReader, node: Node, path: str) -> c.ProxyConfig:
        sec = Section(
            reader,
            node,
            path,
            {
                "server": section(
                    c.ServerConfig,
                    {
                        "listen": scalar(v.parse_listen),
                        "max_body": size(minimum=1),
                        "inspect_body": size(),
                        "header_timeout": duration(),
                        "body_timeout": duration(),
                        "keepalive_timeout": duration(),
                        "max_header_bytes": size(minimum=1024),
                        "headers_with_underscores": choice("allow", "drop", "reject"),
                        "request_id": _REQUEST_ID,
                        "drain_timeout": duration(positive=False),
                    },
                    check=_server_check,
                ),
                "admin": section(
                    c.AdminConfig, {"listen": scalar(v.parse_listen), "token_env": string()}
                ),
                "state": _STATE,
                "log": section(c.LogConfig, {"access": boolean()}),
                "notify": nullable(_NOTIFY),
                "upstreams": self.upstreams,  # before routes, which refer to them
                "routes": list_of(self.route, min_items=1),
            },
            required=("upstreams", "routes"),
        )
        server = sec.values.get("server", c.ServerConfig())
        admin = sec.values.get("admin", c.AdminConfig())
        if server.listen == admin.listen and not server.listen.endswith(":0"):
            given = child(sec.node("admin"), "listen")
            where = "admin" if given else "server"
            line = line_of(given or child(sec.node("server"), "listen") or node)
            reader.error(line, f"{where}.listen", "server and admin cannot share an address")
        return sec.build(c.ProxyConfig)

    def upstreams(self, reader: NodeReader, node: Node, path: str) -> dict[str, c.UpstreamConfig]:
        entries = reader.entries(node, path)
        self.upstream_names = [name for name, _, _ in entries]
        if not entries:
            raise Invalid("needs at least one upstream")
        result: dict[str, c.UpstreamConfig] = {}
        for name, knode, vnode in entries:
            if not v.NAME.fullmatch(name):
                reader.error(line_of(knode), f"{path}.{name}", f"{v.NAME_HINT}, got {name!r}")
                continue
            upstream = reader.read(vnode, f"{path}.{name}", _upstream_of(name))
            if isinstance(upstream, c.UpstreamConfig):
                result[name] = upstream
        return result

    def upstream_ref(self, reader: NodeReader, node: Node, path: str) -> str:
        name = as_str(reader.scalar(node))
        if self.upstream_names is not None and name not in self.upstream_names:
            known = ", ".join(self.upstream_names)
            raise Invalid(f"unknown upstream {name!r} (defined: {known})")
        return name

    def route(self, reader: NodeReader, node: Node, path: str) -> c.RouteConfig:
        ref = self.upstream_ref
        sec = Section(
            reader,
            node,
            path,
            {
                "name": v.name,
                "match": _MATCH,
                "stable": ref,
                "canary": nullable(
                    section(
                        c.CanaryConfig,
                        {"upstream": ref, "weight": percent()},
                        required=("upstream",),
                    )
                ),
                "progressive": nullable(_PROGRESSIVE),
                "sticky": nullable(_STICKY),
                "shadow": nullable(
                    section(
                        c.ShadowConfig,
                        {
                            "upstream": ref,
                            "sample": percent(),
                            "by": choice("request", "session"),
                            "max_in_flight": integer(1),
                            "timeout": duration(),
                            "compare": nullable(_COMPARE),
                        },
                        required=("upstream",),
                    )
                ),
                "fallback": nullable(ref),
                "retry_canary_on_stable": scalar(v.retry_policy),
                "rollback": _ROLLBACK,
                "kill_switch": _KILL_SWITCH,
                "override_header": nullable(v.header_name),
                "llm": section(c.LlmConfig, {"telemetry": boolean()}),
                "guard": nullable(_GUARD),
            },
            required=("name", "match", "stable"),
        )
        self._check_route(reader, sec)
        return sec.build(c.RouteConfig)

    def _check_route(self, reader: NodeReader, sec: Section) -> None:
        values, path = sec.values, sec.path
        name = values.get("name")
        if name is not None:
            if name in self.route_lines:
                reader.error(
                    sec.key_line("name"),
                    f"{path}.name",
                    f"duplicate route name {name!r} (first at line {self.route_lines[name]})",
                )
            else:
                self.route_lines[name] = sec.key_line("name")
        roles: dict[str, str] = {}  # upstream name -> the role that named it first
        # The shadow may be stable or canary (A/A runs, the guards' pairs), not the fallback.
        for role, node in (
            ("stable", sec.node("stable")),
            ("canary", child(sec.node("canary"), "upstream")),
            ("fallback", sec.node("fallback")),
            ("shadow", child(sec.node("shadow"), "upstream")),
        ):
            used = _role_value(values, role)
            if used is None or node is None:
                continue
            where = (
                f"{path}.{role}" if role in ("stable", "fallback") else f"{path}.{role}.upstream"
            )
            if role == "shadow":
                if roles.get(used) == "fallback":
                    reader.error(line_of(node), where,
                                 f"{used!r} is already this route's fallback; the shadow may "
                                 "be the stable or the canary, not the fallback")
            elif used in roles:
                reader.error(
                    line_of(node),
                    where,
                    f"{used!r} is already this route's {roles[used]}; "
                    "stable, canary and fallback must all differ",
                )
            else:
                roles[used] = role
        if not _is_absent(sec.node("progressive")) and _is_absent(sec.node("canary")):
            reader.error(
                sec.key_line("progressive"),
                f"{path}.progressive",
                "needs a canary section (the upstream it steps up)",
            )
        guard = sec.node("guard")
        kinds = [k for k in ("output", "feedback", "compare") if not _is_absent(child(guard, k))]
        if not _is_absent(guard) and not kinds:
            reader.error(sec.key_line("guard"), f"{path}.guard",
                         "needs one of output, feedback or compare")
        if _is_absent(sec.node("canary")):
            for key in ("output", "compare"):  # both compare the canary with stable
                node = child(guard, key)
                if node is not None and not is_null(node):
                    reader.error(line_of(node), f"{path}.guard.{key}",
                                 "needs a canary section (it compares the canary with stable)")
        sticky, shadow = values.get("sticky"), values.get("shadow")
        _resolve_judge(sec, sticky is not None)
        if sticky is not None and not (
            sticky.header or sticky.cookie or sticky.json_field or values.get("override_header")
        ):
            reader.error(
                sec.key_line("sticky"),
                f"{path}.sticky",
                "needs one of header, cookie or json_field (or the route's override_header)",
            )
        llm = values.get("llm")
        if (llm is None and sec.node("llm") is None) or (llm is not None and not llm.telemetry):
            for key in LLM_RULES:
                rule = child(sec.node("rollback"), key)
                if rule is not None and not is_null(rule):
                    reader.error(line_of(rule), f"{path}.rollback.{key}",
                                 "needs llm: {telemetry: true} on the route (the figures it "
                                 "judges are only read then)")
        if shadow is not None and shadow.by == "session" and _is_absent(sec.node("sticky")):
            by = child(sec.node("shadow"), "by")
            reader.error(
                line_of(by) if by else sec.key_line("shadow"),
                f"{path}.shadow.by",
                "session needs a sticky section",
            )


def _resolve_judge(sec: Section, sticky: bool) -> None:
    """The defaults that depend on other keys: without ``rollback.judge`` a route gets the
    sequential judge, or threshold when sticky (the judge needs each request split at
    random; a session is one unit); with the sequential judge and no ``max_error_rate``
    in the file, that rule is off (the judge's failure test does its work, without the
    false rollbacks of a fixed 5% on a noisy window)."""
    rollback = sec.node("rollback")
    policy = sec.values.get("rollback", c.RollbackConfig())
    if not isinstance(policy, c.RollbackConfig):
        return
    changes: dict[str, Any] = {}
    if child(rollback, "judge") is None and sticky:
        changes["judge"] = "threshold"
    judge = changes.get("judge", policy.judge)
    if judge == "sequential" and child(rollback, "max_error_rate") is None:
        changes["max_error_rate"] = None
    if changes:
        sec.values["rollback"] = replace(policy, **changes)


def _role_value(values: dict[str, Any], role: str) -> str | None:
    value = values.get(role)
    if role in ("canary", "shadow"):
        return value.upstream if value is not None else None
    return value if isinstance(value, str) else None


def _is_absent(node: Node | None) -> bool:
    return node is None or is_null(node)


def _upstream_of(name: str) -> Conv:
    def conv(reader: NodeReader, node: Node, path: str) -> c.UpstreamConfig:
        sec = Section(
            reader,
            node,
            path,
            {
                "url": scalar(v.parse_url),
                "connect_timeout": duration(),
                "timeout": duration(),
                "idle_timeout": duration(),
                "max_connections": integer(1),
                "max_pending": integer(0),
                "headers": v.header_map(lower=False),
                "health": _HEALTH,
                "version": nullable(scalar(v.version_label)),
            },
            required=("url",),
        )
        url = sec.values.pop("url", None)
        if url is None:
            raise Reported
        return sec.build(
            c.UpstreamConfig,
            name=name,
            url=url.text,
            scheme=url.scheme,
            host=url.host,
            port=url.port,
            base_path=url.base_path,
        )

    return conv
