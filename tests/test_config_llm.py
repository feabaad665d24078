"""Config of LLM telemetry (issue 18): ``llm.telemetry`` and the four LLM rollback rules,
which are refused on a route that does not read the figures they judge."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.config.model import LlmConfig, RouteConfig
from proxy.config.parser import parse_config, summarize
from proxy.errors import ConfigError

ROUTE = """\
upstreams:
  a: {{url: "http://127.0.0.1:9001"}}
  b: {{url: "http://127.0.0.1:9002"}}
routes:
  - name: chat
    match: {{path_prefix: /v1/}}
    stable: a
    canary: {{upstream: b, weight: 10}}
{extra}
"""


def parse(extra: str = "") -> RouteConfig:
    return parse_config(ROUTE.format(extra=extra), "f.yaml").routes[0]


def test_llm_telemetry_is_off_and_rules_unset_by_default() -> None:
    route = parse()
    assert route.llm == LlmConfig(telemetry=False)
    rb = route.rollback
    assert (rb.max_ttft_p99, rb.max_ttft_ratio, rb.max_tokens_ratio,
            rb.max_finish_length_rate) == (None, None, None, None)
    assert "llm" not in summarize(parse_config(ROUTE.format(extra=""), "f.yaml"))


def test_llm_rules_read_on_a_route_with_telemetry() -> None:
    route = parse("    llm: {telemetry: true}\n"
                  "    rollback: {max_ttft_p99: 1500ms, max_ttft_ratio: 2, max_tokens_ratio: 3.5,"
                  " max_finish_length_rate: 20}")
    assert route.llm.telemetry
    assert route.rollback == replace(parse().rollback, max_ttft_p99=1.5, max_ttft_ratio=2.0,
                                     max_tokens_ratio=3.5, max_finish_length_rate=20.0)


def test_llm_summary_shows_telemetry_and_rules() -> None:
    cfg = parse_config(ROUTE.format(
        extra="    llm: {telemetry: true}\n    rollback: {max_ttft_p99: 2s, max_tokens_ratio: 3,"
              " max_ttft_ratio: 1.5, max_finish_length_rate: 10}"), "f.yaml")
    text = summarize(cfg)
    assert "llm telemetry: time to first token, tokens, finish reasons" in text
    assert ("ttft p99>2s | ttft p99>1.5x stable | tokens/req>3x stable | "
            "cut at max_tokens>10%") in text


@pytest.mark.parametrize("llm", ["", "    llm: {telemetry: false}\n"])
def test_llm_rules_need_telemetry_on(llm: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"{llm}    rollback:\n      max_p99: 1s\n      max_tokens_ratio: 3")
    line = 12 if llm else 11
    assert info.value.errors == [
        f"f.yaml:{line}: routes[0].rollback.max_tokens_ratio: needs llm: {{telemetry: true}} "
        "on the route (the figures it judges are only read then)"]


def test_llm_rules_set_to_null_need_nothing() -> None:
    route = parse("    rollback: {max_ttft_p99: null, max_finish_length_rate: null}")
    assert route.rollback == parse().rollback
