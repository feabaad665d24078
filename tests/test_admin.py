"""Admin API end to end (SPEC §8): views, actions that land on the next request, tokens."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_deployment import SPEC_METRICS
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    {extra}
"""


async def _upstream_of(fb, path: str = "/v1/x", **kw) -> str:
    async with fb.session.post(fb.url + path, data=b"{}", **kw) as resp:
        await resp.read()
        return resp.headers.get("x-flipback-upstream", f"status {resp.status}")


async def test_admin_health_ready_metrics(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=50, extra="")
    async with fb.session.get(fb.admin + "/healthz") as resp:
        assert resp.status == 200
    ready = await fb.get_json("/readyz")
    assert ready["status"] == "ready" and set(ready["upstreams"]) == {"v1", "v2"}
    for _ in range(10):
        await _upstream_of(fb)
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'flipback_canary_weight{route="chat"} 50.0' in text
    assert 'flipback_route_state{route="chat",state="canary"} 1.0' in text
    assert 'flipback_in_flight{route="chat",upstream="v1"} 0.0' in text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("flipback_requests_total{"):
            assert 'outcome="2xx"' in line
            total += float(line.rsplit(" ", 1)[1])
    assert total == 10
    assert "flipback_request_duration_seconds_bucket" in text
    assert "flipback_upstream_ttfb_seconds_count" in text
    assert "flipback_config_info{sha256=" in text


async def test_admin_routes_view(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, extra="")
    for _ in range(5):
        await _upstream_of(fb)
    routes = (await fb.get_json("/routes"))["routes"]
    assert [r["name"] for r in routes] == ["chat"]
    chat = await fb.get_json("/routes/chat")
    assert chat["state"] == "stable" and chat["effective_weight"] == 0
    assert chat["upstreams"]["v1"]["role"] == "stable"
    assert chat["upstreams"]["v1"]["requests"] == 5
    assert chat["upstreams"]["v2"]["requests"] == 0
    assert chat["upstreams"]["v1"]["p50_ms"] is not None
    async with fb.session.get(fb.admin + "/routes/nope") as resp:
        assert resp.status == 404
        assert "nope" in (await resp.json())["error"]


async def test_manual_rollback_lands_on_next_request(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=100, extra="")
    assert await _upstream_of(fb) == "v2"
    status, body = await fb.post_admin("/routes/chat/rollback", {"reason": "bad answers"})
    assert status == 200 and body["state"] == "rolled_back"
    assert await _upstream_of(fb) == "v1"
    # Idempotent: a second rollback changes nothing and adds no event.
    status, _ = await fb.post_admin("/routes/chat/rollback", {"reason": "again"})
    events = (await fb.get_json("/events?limit=10"))["events"]
    assert [e["kind"] for e in events] == ["rollback"]
    assert events[0]["actor"] == "admin" and events[0]["reason"] == "bad answers"
    # Weight changes are refused while latched; resume brings back the configured weight.
    status, body = await fb.post_admin("/routes/chat/weight", {"weight": 10})
    assert status == 409 and "resume" in body["error"]
    status, body = await fb.post_admin("/routes/chat/resume", {})
    assert status == 200 and body["state"] == "promoted"
    assert await _upstream_of(fb) == "v2"
    async with fb.session.get(fb.admin + "/metrics") as resp:
        assert 'flipback_rollbacks_total{reason="manual",route="chat"} 1.0' in await resp.text()


async def test_weight_and_promote(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, extra="")
    status, body = await fb.post_admin("/routes/chat/weight", {"weight": 100})
    assert status == 200 and body["effective_weight"] == 100
    assert await _upstream_of(fb) == "v2"
    status, body = await fb.post_admin("/routes/chat/weight", {"weight": 0})
    assert await _upstream_of(fb) == "v1"
    status, body = await fb.post_admin("/routes/chat/promote", {})
    assert status == 200 and body["state"] == "promoted"
    assert await _upstream_of(fb) == "v2"
    for bad in ({"weight": 101}, {"weight": "x"}, {}, {"weight": -1}):
        status, body = await fb.post_admin("/routes/chat/weight", bad)
        assert status == 400 and body["error"]
    async with fb.session.post(fb.admin + "/routes/chat/weight", data=b"{nope",
                               headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400 and "JSON" in (await resp.json())["error"]
    status, _ = await fb.post_admin("/routes/ghost/promote", {})
    assert status == 404


async def test_kill_switch_from_admin_and_config(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, extra="")
    status, body = await fb.post_admin("/routes/chat/kill", {"enabled": True})
    assert status == 200 and body["state"] == "killed"
    before = v1.count
    async with fb.session.post(fb.url + "/v1/x", data=b"{}") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "model temporarily disabled"
    assert v1.count == before
    await fb.post_admin("/routes/chat/kill", {"enabled": False})
    assert await _upstream_of(fb) == "v1"
    status, _ = await fb.post_admin("/routes/chat/kill", {"enabled": "yes"})
    assert status == 400


async def test_kill_switch_openai_answers(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    extra = "kill_switch: {enabled: true, openai_message: \"We are upgrading the model.\"}"
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=0, extra=extra)
    req = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}
    async with fb.session.post(fb.url + "/v1/chat/completions", json=req) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "chat.completion" and data["model"] == "gpt-x"
    assert data["choices"][0]["message"] == {"role": "assistant",
                                             "content": "We are upgrading the model."}
    async with fb.session.post(fb.url + "/v1/chat/completions",
                               json={**req, "stream": True}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["content"] == "We are upgrading the model."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert v1.count == 0 and v2.count == 0


async def test_token_required_when_set(model, flipback, monkeypatch):
    monkeypatch.setenv("FB_TEST_TOKEN", "s3cret")
    v1, v2 = await model("v1"), await model("v2")
    text = 'admin: {{listen: "127.0.0.1:0", token_env: FB_TEST_TOKEN}}\n' + ROUTE
    fb = await flipback(text, v1=v1.url, v2=v2.url, weight=0, extra="")
    status, body = await fb.post_admin("/routes/chat/promote", {})
    assert status == 401
    status, _ = await fb.post_admin("/routes/chat/promote", {},
                                    headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = await fb.post_admin("/routes/chat/promote", {},
                                       headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and body["state"] == "promoted"
    # Reads stay open (probes and dashboards do not carry the token).
    async with fb.session.get(fb.admin + "/routes") as resp:
        assert resp.status == 200


async def test_run_refuses_public_admin_without_token(model, tmp_path, monkeypatch):
    from proxy.errors import ProxyError
    from proxy.server import App
    from tests.conftest import make_config

    monkeypatch.delenv("FLIPBACK_ADMIN_TOKEN", raising=False)
    v1 = await model("v1")
    text = 'admin: {{listen: "0.0.0.0:0"}}\nupstreams:\n  v1: {{url: "{v1}"}}\n' \
           'routes:\n  - {{name: r, match: {{path_prefix: /}}, stable: v1}}\n'
    app = App(make_config(text, tmp_path, v1=v1.url))
    with pytest.raises(ProxyError, match="not loopback"):
        await app.start()
    await app.aclose()


async def test_manual_rollback_under_load_has_no_errors(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, weight=50, extra="")
    stop = asyncio.Event()
    seen: list[tuple[float, str]] = []
    loop = asyncio.get_running_loop()

    async def client() -> None:
        while not stop.is_set():
            try:
                seen.append((loop.time(), await _upstream_of(fb)))
            except aiohttp.ClientError as exc:  # pragma: no cover - the assertion below
                seen.append((loop.time(), f"error {exc}"))

    def answered_after(t: float) -> int:
        return sum(at > t for at, _ in seen)

    tasks = [asyncio.ensure_future(client()) for _ in range(4)]
    await wait_until(lambda: {"v1", "v2"} <= {name for _, name in seen}, what="both sides")
    status, _ = await fb.post_admin("/routes/chat/rollback", {"reason": "blue-green switch"})
    flipped = loop.time()
    await wait_until(lambda: answered_after(flipped + 0.05) >= 40, what="traffic after the flip")
    stop.set()
    await asyncio.gather(*tasks)
    assert status == 200
    assert all(name in ("v1", "v2") for _, name in seen), seen
    # Requests started after the flip (allow those already in flight) all went to v1.
    late = [name for t, name in seen if t > flipped + 0.05]
    assert late and set(late) == {"v1"}


EVERY_FEATURE = """
    sticky: {header: x-session-id}
    shadow: {upstream: v3, sample: 100, compare: {status: true}}
    rollback: {verify: 10s}"""


async def test_metrics_expose_every_spec_name_with_its_labels(model, flipback):
    v1, v2, v3 = await model("v1"), await model("v2"), await model("v3")
    text = ROUTE.replace("upstreams:", 'notify: {{webhook: "http://127.0.0.1:9/h"}}\nupstreams:')
    text = text.replace('  v2: {{url: "{v2}"}}',
                        '  v2: {{url: "{v2}", health: {{path: /health}}}}\n  v3: {{url: "{v3}"}}')
    fb = await flipback(text, v1=v1.url, v2=v2.url, v3=v3.url, weight=50,
                        extra=EVERY_FEATURE.strip())
    await _upstream_of(fb, headers={"x-session-id": "s1"})
    await fb.runtime.rollout("chat").shadow.flush()
    async with fb.session.get(fb.admin + "/metrics") as resp:
        families = list(text_string_to_metric_families(await resp.text()))
    labels: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            name = sample.name.removesuffix("_bucket").removesuffix("_count").removesuffix(
                "_sum").removesuffix("_created")
            if family.type == "counter" and not name.endswith("_total"):
                name += "_total"
            labels.setdefault(name, set()).update(set(sample.labels) - {"le"})
    for name, (_, spec) in SPEC_METRICS.items():
        assert labels.get(name) == spec, (name, labels.get(name))
