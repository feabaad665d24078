"""The Prometheus alert rules against the metrics a running flipback really exposes, and,
where promtool is installed, through promtool: the rules load, and the connection-limit
alert follows each upstream's own max_connections."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
METRIC = re.compile(r"\bflipback_[a-z0-9_]+")
PROMTOOL = shutil.which("promtool")

UPSTREAMS = """
upstreams:
  small: {{url: "{v1}", max_connections: 64, health: {{path: /health}}}}
  big: {{url: "{v2}"}}
  copy: {{url: "{v3}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: small
    canary: {{upstream: big, weight: 50}}
    shadow: {{upstream: copy, sample: 100, compare: {{record: null}}}}
"""

# 55 of 64 connections in flight to `small` (two routes): 86%, fires; 300 of 512 to `big`
# (59%) does not, where the old fixed threshold (205) fired for `big` and never for `small`.
UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'flipback_in_flight{{instance="a",job="fb",route="chat",upstream="small"}}'
        values: '30x10'
      - series: 'flipback_in_flight{{instance="a",job="fb",route="embed",upstream="small"}}'
        values: '25x10'
      - series: 'flipback_upstream_max_connections{{instance="a",job="fb",upstream="small"}}'
        values: '64x10'
      - series: 'flipback_in_flight{{instance="a",job="fb",route="chat",upstream="big"}}'
        values: '300x10'
      - series: 'flipback_upstream_max_connections{{instance="a",job="fb",upstream="big"}}'
        values: '512x10'
    alert_rule_test:
      - eval_time: 4m
        alertname: FlipbackUpstreamNearConnectionLimit
        exp_alerts: []
      - eval_time: 6m
        alertname: FlipbackUpstreamNearConnectionLimit
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, upstream: small}}
            exp_annotations:
              summary: "a: 85.94% of max_connections in flight to small"
              description: "{description}"
"""


def rules() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


async def test_alert_rules_use_only_metrics_flipback_exposes(model, flipback):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    fb = await flipback(UPSTREAMS, v1=v1.url, v2=v2.url, v3=v3.url)
    async with fb.session.get(fb.url + "/x") as resp:
        assert resp.status == 200
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert 'flipback_upstream_max_connections{upstream="small"} 64.0' in text
    used = {name for rule in rules() for name in METRIC.findall(str(rule["expr"]))}
    assert "flipback_upstream_max_connections" in used
    assert used <= exposed, sorted(used - exposed)


def test_connection_limit_alert_divides_by_each_upstreams_limit():
    (rule,) = [r for r in rules() if r["alert"] == "FlipbackUpstreamNearConnectionLimit"]
    expr = " ".join(str(rule["expr"]).split())
    assert "sum by (instance, upstream) (flipback_in_flight)" in expr
    assert "/ on (instance, upstream)" in expr and expr.endswith("> 0.8")
    assert not re.search(r">\s*\d{2,}", expr)  # no fixed count of connections


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_the_limit_alert_fires_per_upstream(tmp_path):
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    (rule,) = [r for r in rules() if r["alert"] == "FlipbackUpstreamNearConnectionLimit"]
    description = " ".join(str(rule["annotations"]["description"]).split())  # type: ignore[index]
    description = description.replace("{{ $labels.upstream }}", "small")
    tests = tmp_path / "alerts_test.yaml"
    tests.write_text(UNIT_TESTS.format(rules=ALERTS, description=description))
    unit = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True,
                          text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


# Every copy differs in status and body: the kinds add up to 200% of the copies, the
# requests with any mismatch to 100% (the alert's figure), split over two primaries.
MISMATCH_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'flipback_shadow_total{{route="chat",outcome="sent"}}'
        values: '0+100x30'
      - series: 'flipback_shadow_mismatch_total{{route="chat",kind="status",primary="v1"}}'
        values: '0+90x30'
      - series: 'flipback_shadow_mismatch_total{{route="chat",kind="body",primary="v1"}}'
        values: '0+90x30'
      - series: 'flipback_shadow_mismatch_total{{route="chat",kind="status",primary="v2"}}'
        values: '0+10x30'
      - series: 'flipback_shadow_mismatch_total{{route="chat",kind="body",primary="v2"}}'
        values: '0+10x30'
      - series: 'flipback_shadow_mismatched_requests_total{{route="chat",primary="v1"}}'
        values: '0+90x30'
      - series: 'flipback_shadow_mismatched_requests_total{{route="chat",primary="v2"}}'
        values: '0+10x30'
    alert_rule_test:
      - eval_time: 25m
        alertname: FlipbackShadowMismatchRate
        exp_alerts:
          - exp_labels: {{severity: warning, route: chat}}
            exp_annotations:
              summary: "Shadow of route chat disagrees on 100% of requests"
              description: "{description}"
"""


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_shadow_mismatch_rate_counts_requests_so_it_stays_at_most_100(tmp_path):
    assert PROMTOOL is not None
    (rule,) = [r for r in rules() if r["alert"] == "FlipbackShadowMismatchRate"]
    description = " ".join(str(rule["annotations"]["description"]).split())  # type: ignore[index]
    tests = tmp_path / "mismatch_test.yaml"
    tests.write_text(MISMATCH_TESTS.format(rules=ALERTS, description=description))
    unit = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True,
                          text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr
