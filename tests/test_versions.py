"""Model versions, not just upstream names: an upstream's ``version`` comes back in
``x-flipback-version``, is exported with its connection limit, and names the versions in
a route's events. Kill-switch answers are counted under the name their header shows."""

from __future__ import annotations

CONFIG = """
upstreams:
  champion: {{url: "{v1}", version: "3", max_connections: 64}}
  challenger: {{url: "{v2}", version: "fraud-model@4"}}
routes:
  - name: score
    match: {{path_prefix: "/invocations"}}
    stable: champion
    canary: {{upstream: challenger, weight: 50}}
  - name: "off"
    match: {{path_prefix: "/stopped"}}
    stable: champion
    kill_switch: {{enabled: true}}
"""


async def test_versions_in_headers_metrics_and_events(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(CONFIG, v1=v1.url, v2=v2.url)
    seen = {}
    for _ in range(40):
        async with fb.session.post(fb.url + "/invocations", data=b"{}") as resp:
            seen[resp.headers["x-flipback-upstream"]] = resp.headers["x-flipback-version"]
    assert seen == {"champion": "3", "challenger": "fraud-model@4"}
    async with fb.session.get(fb.url + "/stopped") as resp:
        assert resp.status == 503 and resp.headers["x-flipback-upstream"] == "kill_switch"
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'flipback_upstream_info{upstream="champion",version="3"} 1.0' in text
    assert 'flipback_upstream_info{upstream="challenger",version="fraud-model@4"} 1.0' in text
    assert 'flipback_upstream_max_connections{upstream="champion"} 64.0' in text
    assert ('flipback_requests_total{outcome="5xx",role="static",route="off",'
            'upstream="kill_switch"} 1.0') in text
    status, _ = await fb.post_admin("/routes/score/rollback", {"reason": "drift"})
    assert status == 200
    events = (await fb.get_json("/events?limit=1"))["events"]
    assert events[0]["figures"]["versions"] == {"stable": "3", "canary": "fraud-model@4"}
    assert events[0]["figures"]["load"] == {"upstream": "champion", "before_pct": 50.0,
                                            "now_pct": 100.0}


async def test_a_bad_version_is_a_config_error(model, flipback):
    import pytest

    from proxy.errors import ConfigError

    v1, v2 = await model("v1"), await model("v2")
    with pytest.raises(ConfigError, match="upstreams.champion.version"):
        await flipback(CONFIG.replace('version: "3"', "version: [3]"), v1=v1.url, v2=v2.url)
