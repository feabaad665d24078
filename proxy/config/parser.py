"""YAML text -> ``ProxyConfig``, reporting every problem as ``FILE:LINE: path: message``.

``flipback check`` and hot reload both go through ``parse_config``: a config is either
whole and valid or refused with all its errors at once, so a user fixes a file in one
round. The tables are in ``config.schema``; walking, lines and errors in ``yamlnodes``.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from urllib.parse import urlsplit

import yaml

from proxy.config import model as c
from proxy.config.schema import Schema
from proxy.config.yamlnodes import NodeReader
from proxy.errors import ConfigError
from proxy.fleet.state import display_url
from proxy.units import format_duration

_OPENS = (
    yaml.FlowSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.BlockMappingStartToken,
)
_CLOSES = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


# No config nests anywhere near this deep; PyYAML composes recursively and takes seconds
# to fail on some thousands of levels, so deeper input is refused before composing.
MAX_DEPTH = 64


def parse_config(text: str, source: str) -> c.ProxyConfig:
    """The config in ``text``; raises ``ConfigError`` listing every problem found."""
    try:
        deep = _too_deep(text)
        if deep is not None:
            raise ConfigError([f"{source}:{deep}: (syntax): nested too deeply"])
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        # Unreachable below MAX_DEPTH, kept as the last guard of the recursive composer.
        raise ConfigError([f"{source}:1: (syntax): nested too deeply"]) from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError([f"{source}:{line}: (syntax): {problem}{context}"]) from None
    except yaml.YAMLError as exc:
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        problem = str(exc).splitlines()[0]  # drop PyYAML's "in <unicode string>" trailer
        raise ConfigError([f"{source}:{line}: (syntax): {problem}"]) from None
    if root is None:
        raise ConfigError([f"{source}:1: (root): the file is empty; it needs upstreams and routes"])
    reader = NodeReader(source)
    try:
        cfg: c.ProxyConfig = reader.read(root, "", Schema().proxy)
    except RecursionError:
        raise ConfigError([f"{source}:1: (root): nested too deeply"]) from None
    if reader.errors:
        raise ConfigError(reader.errors)
    return replace(cfg, source=source)


def _too_deep(text: str) -> int | None:
    """The line where lists and mappings first nest past ``MAX_DEPTH``, else None. The
    scanner is not recursive, and stops there: deep input costs little more than
    shallow."""
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, _OPENS):
                depth += 1
                if depth > MAX_DEPTH:
                    return int(token.start_mark.line) + 1
            elif isinstance(token, _CLOSES):
                depth -= 1
    except yaml.YAMLError:
        return None  # compose reports the syntax error with its line
    return None


def load_config(path: str) -> c.ProxyConfig:
    """``parse_config`` of a file, with ``source`` and the sha256 of its bytes set."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not UTF-8 ({exc.reason})"]) from None
    cfg = parse_config(text, path)
    return replace(cfg, sha256=hashlib.sha256(data).hexdigest())


def _origin(url: str) -> str:
    """``scheme://host:port`` of a webhook: its path often holds the token (Slack's do)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..." if parts.path.strip("/") else url


def summarize(cfg: c.ProxyConfig) -> str:
    """The one-screen text ``flipback check`` prints for a valid config."""
    lines = [
        f"config {cfg.source}" + (f" (sha256 {cfg.sha256[:12]})" if cfg.sha256 else ""),
        f"listen {cfg.server.listen}, admin {cfg.admin.listen}",
        "state: " + ", ".join(
            part for part in (
                f"file {cfg.state.file}" if cfg.state.file else "no state file",
                f"shared in {display_url(cfg.state.redis)}" if cfg.state.redis else "",
            ) if part),
    ]
    if cfg.notify is not None and cfg.notify.webhook:
        lines.append(f"notify: {_origin(cfg.notify.webhook)} "
                     f"({', '.join(cfg.notify.kinds)})")
    lines.append(f"upstreams ({len(cfg.upstreams)}):")
    width = max(len(name) for name in cfg.upstreams) if cfg.upstreams else 0
    for name, up in cfg.upstreams.items():
        health = (
            f", health {up.health.path} every {format_duration(up.health.interval)}"
            if up.health.path
            else ""
        )
        lines.append(
            f"  {name:<{width}}  {up.url}  timeout {format_duration(up.timeout)}, "
            f"max_connections {up.max_connections}{health}"
        )
    lines.append(f"routes ({len(cfg.routes)}, first match wins):")
    for route in cfg.routes:
        methods = ",".join(route.match.methods) or "*"
        headers = "".join(f" [{k}: {v}]" for k, v in route.match.headers)
        lines.append(f"  {route.name}: {methods} {route.match.path_prefix}*{headers}")
        split = f"stable {route.stable}"
        if route.canary is not None:
            split += f", canary {route.canary.upstream} at {route.canary.weight:g}%"
        lines.append(f"    {split}")
        lines.extend(f"    {extra}" for extra in _route_extras(route))
        if route.canary is not None:
            lines.append(f"    rollback: {_rollback_summary(route.rollback)}")
    return "\n".join(lines)


def _route_extras(route: c.RouteConfig) -> list[str]:
    extras = []
    if route.progressive is not None:
        steps = "/".join(f"{s:g}" for s in route.progressive.steps)
        extras.append(f"progressive {steps} every {format_duration(route.progressive.interval)}")
    if route.sticky is not None:
        keys = [
            f"{k} {v}"
            for k, v in (
                ("header", route.sticky.header),
                ("cookie", route.sticky.cookie),
                ("json_field", route.sticky.json_field),
            )
            if v
        ]
        extras.append(f"sticky by {' / '.join(keys) or 'override'}")
    if route.shadow is not None:
        extras.append(
            f"shadow {route.shadow.upstream} {route.shadow.sample:g}% by {route.shadow.by}"
        )
    if route.guard is not None:
        extras.append(_guard_summary(route.guard))
    if route.fallback is not None:
        extras.append(f"fallback {route.fallback}")
    if route.override_header is not None:
        extras.append(f"override via {route.override_header}")
    if route.kill_switch.enabled:
        ks = route.kill_switch
        answer = "an OpenAI-style message" if ks.openai_message is not None else str(ks.status)
        extras.append(f"kill switch ON: answers {answer}, calls no upstream")
    if route.llm.telemetry:
        extras.append("llm telemetry: time to first token, tokens, finish reasons")
    if not route.retry_canary_on_stable and route.canary is not None:
        extras.append("no retry of canary failures")
    return extras


def _guard_summary(g: c.GuardConfig) -> str:
    parts = []
    if g.output is not None:
        parts.append(f"output drift on {g.output.json_path}")
    if g.feedback is not None:
        fb = g.feedback
        floor = f", min accuracy {fb.min_accuracy:g}" if fb.min_accuracy is not None else ""
        parts.append(f"feedback ({fb.max_pending} ids for {format_duration(fb.ttl)}{floor})")
    if g.compare is not None:
        cp = g.compare
        noise = " over stable's own" if cp.noise_floor else ""
        parts.append(f"{cp.sample:g}% paired with stable, max {cp.max_disagreement:g}% "
                     f"disagreement{noise} on {', '.join(cp.json_paths)}")
    return f"guards (alpha {g.alpha:g}): {'; '.join(parts)}"


def _rollback_summary(rb: c.RollbackConfig) -> str:
    if not rb.enabled:
        return "off"
    trips = []
    if rb.judge == "sequential":
        trips.append(f"judge vs stable (alpha {rb.alpha:g})")
    if rb.max_error_rate is not None:
        trips.append(
            f"errors>{rb.max_error_rate:g}%" + (" and >stable" if rb.compare_to_stable else "")
        )
    if rb.max_p99 is not None:
        trips.append(f"p99>{format_duration(rb.max_p99)}")
    if rb.max_p99_ratio is not None:
        trips.append(f"p99>{rb.max_p99_ratio:g}x stable")
    if rb.consecutive_failures is not None:
        trips.append(f"{rb.consecutive_failures} failures in a row")
    if rb.max_ttft_p99 is not None:
        trips.append(f"ttft p99>{format_duration(rb.max_ttft_p99)}")
    if rb.max_ttft_ratio is not None:
        trips.append(f"ttft p99>{rb.max_ttft_ratio:g}x stable")
    if rb.max_tokens_ratio is not None:
        trips.append(f"tokens/req>{rb.max_tokens_ratio:g}x stable")
    if rb.max_finish_length_rate is not None:
        trips.append(f"cut at max_tokens>{rb.max_finish_length_rate:g}%")
    verify = f", verify {format_duration(rb.verify)}" if rb.verify is not None else ""
    return (
        f"window {format_duration(rb.window)} (min {rb.min_requests} req, {rb.latency}, "
        f"failing {_statuses_summary(rb.failure_statuses)}): "
        f"{' | '.join(trips) or 'no trips set'}{verify}"
    )


def _statuses_summary(statuses: frozenset[int]) -> str:
    """``{500..599, 429}`` -> ``5xx,429``: whole classes folded back as written."""
    parts, rest = [], set(statuses)
    for first in range(100, 600, 100):
        block = set(range(first, first + 100))
        if block <= rest:
            parts.append(f"{first // 100}xx")
            rest -= block
    parts.extend(str(code) for code in sorted(rest))
    return ",".join(parts) or "none"
