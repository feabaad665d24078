"""The route's guard block (issue 17) and the shadow roles it needs: parsed, defaulted,
refused with FILE:LINE (tests/configs/bad/guards.yaml holds the full list of errors)."""

from __future__ import annotations

import pytest

from proxy.config.model import (
    CompareGuardConfig,
    FeedbackGuardConfig,
    GuardConfig,
    OutputGuardConfig,
)
from proxy.config.parser import parse_config, summarize
from proxy.errors import ConfigError

ROUTE = """\
upstreams:
  a: {{url: "http://127.0.0.1:9001"}}
  b: {{url: "http://127.0.0.1:9002"}}
routes:
  - name: r
    match: {{}}
    stable: a
    canary: {{upstream: b, weight: 20}}
{extra}
"""


def parse(extra: str) -> GuardConfig | None:
    return parse_config(ROUTE.format(extra=extra), "f.yaml").routes[0].guard


def errors_of(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(ROUTE.format(extra=extra), "f.yaml")
    return info.value.errors


def test_config_guard_reads_every_key() -> None:
    guard = parse("""\
    guard:
      alpha: 0.05
      output: {json_path: predictions.0}
      feedback: {json_path: "choices.0.message.content", max_pending: 500, ttl: 10m,
                 min_accuracy: 0.85}
      compare: {sample: 2.5, json_paths: [predictions.0, "outputs.-1"],
                max_disagreement: 20, noise_floor: true}
""")
    assert guard == GuardConfig(
        alpha=0.05,
        output=OutputGuardConfig(json_path="predictions.0"),
        feedback=FeedbackGuardConfig(json_path="choices.0.message.content", max_pending=500,
                                     ttl=600.0, min_accuracy=0.85),
        compare=CompareGuardConfig(sample=2.5, json_paths=("predictions.0", "outputs.-1"),
                                   max_disagreement=20.0, noise_floor=True),
    )


def test_config_guard_defaults() -> None:
    guard = parse("    guard: {feedback: {}, compare: {json_paths: [label]}}")
    assert guard is not None
    assert guard.alpha == 0.01 and guard.output is None
    assert guard.feedback == FeedbackGuardConfig(json_path=None, max_pending=100_000,
                                                 ttl=3600.0, min_accuracy=None)
    assert guard.compare == CompareGuardConfig(json_paths=("label",), sample=10.0,
                                               max_disagreement=10.0, noise_floor=False)
    assert parse("    guard: null") is None
    assert parse("") is None


def test_config_guard_feedback_needs_no_canary() -> None:
    text = ROUTE.format(extra="    guard: {feedback: {min_accuracy: 0}}").replace(
        "    canary: {upstream: b, weight: 20}\n", "")
    route = parse_config(text, "f.yaml").routes[0]
    assert route.canary is None and route.guard is not None


@pytest.mark.parametrize(("extra", "error"), [
    ("    guard: {output: {json_path: 'a.'}}",
     "f.yaml:9: routes[0].guard.output.json_path: expected a dotted path like "
     "'predictions.0' or 'choices.0.message.content', got 'a.'"),
    ("    guard: {output: {json_path: ''}}",
     "f.yaml:9: routes[0].guard.output.json_path: must not be empty"),
    ("    guard: {alpha: 0, output: {json_path: x}}",
     "f.yaml:9: routes[0].guard.alpha: expected a probability above 0 and at most 0.5 "
     "(like 0.01), got 0"),
    ("    guard: {feedback: {min_accuracy: true}}",
     "f.yaml:9: routes[0].guard.feedback.min_accuracy: expected a number from 0 to 1, got true"),
    ("    guard: {compare: {json_paths: [x], max_disagreement: 100.5}}",
     "f.yaml:9: routes[0].guard.compare.max_disagreement: must be between 0 and 100, got 100.5"),
    ("    guard: {compare: {json_paths: x}}",
     "f.yaml:9: routes[0].guard.compare.json_paths: expected a list, got 'x'"),
    ("    guard: {compare: {sample: 5}}",
     "f.yaml:9: routes[0].guard.compare.json_paths: required key missing"),
    ("    guard: {}", "f.yaml:9: routes[0].guard: needs one of output, feedback or compare"),
    ("    guard: {output: null}",
     "f.yaml:9: routes[0].guard: needs one of output, feedback or compare"),
    ("    guard: {outputs: {json_path: x}}",
     "f.yaml:9: routes[0].guard.outputs: unknown key 'outputs' (expected one of: alpha, "
     "output, feedback, compare)"),
])
def test_config_guard_refuses(extra: str, error: str) -> None:
    errors = errors_of(extra)
    assert error in errors, errors


def test_config_guard_output_and_compare_need_a_canary() -> None:
    text = ROUTE.format(extra="""\
    guard:
      output: {json_path: label}
      compare: {json_paths: [label]}""").replace("    canary: {upstream: b, weight: 20}\n", "")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml")
    assert info.value.errors == [
        "f.yaml:9: routes[0].guard.output: needs a canary section (it compares the canary "
        "with stable)",
        "f.yaml:10: routes[0].guard.compare: needs a canary section (it compares the canary "
        "with stable)",
    ]


@pytest.mark.parametrize("shadow", ["a", "b"])
def test_config_shadow_may_be_the_stable_or_the_canary(shadow: str) -> None:
    route = parse_config(ROUTE.format(extra=f"    shadow: {{upstream: {shadow}}}"),
                         "f.yaml").routes[0]
    assert route.shadow is not None and route.shadow.upstream == shadow


def test_config_shadow_may_not_be_the_fallback() -> None:
    text = ROUTE.replace('  b: {{url: "http://127.0.0.1:9002"}}\n',
                         '  b: {{url: "http://127.0.0.1:9002"}}\n  c: {{url: "http://x:1"}}\n')
    with pytest.raises(ConfigError) as info:
        parse_config(text.format(extra="    fallback: c\n    shadow: {upstream: c}"), "f.yaml")
    errors = info.value.errors
    assert errors == ["f.yaml:11: routes[0].shadow.upstream: 'c' is already this route's "
                      "fallback; the shadow may be the stable or the canary, not the fallback"]


def test_summarize_shows_the_guards() -> None:
    text = summarize(parse_config(ROUTE.format(extra="""\
    guard:
      output: {json_path: predictions.0}
      feedback: {ttl: 1h, max_pending: 1000, min_accuracy: 0.85}
      compare: {json_paths: [predictions.0], noise_floor: true}"""), "f.yaml"))
    assert ("    guards (alpha 0.01): output drift on predictions.0; feedback (1000 ids for "
            "1h, min accuracy 0.85); 10% paired with stable, max 10% disagreement over "
            "stable's own on predictions.0\n") in text
