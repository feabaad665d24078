"""Readiness gates and post-rollback verification end to end (SPEC §5 Health, Verify)."""

from __future__ import annotations

import asyncio

from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}", health: {{path: {stable_health}, interval: 50ms, timeout: 200ms,
                              unhealthy_after: 2, healthy_after: 2}}}}
  v2: {{url: "{v2}", health: {{path: /health, interval: 50ms, timeout: 200ms,
                              unhealthy_after: 2, healthy_after: 2}}}}
  small: {{url: "{small}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    fallback: small
    rollback: {{window: 5s, min_requests: 5, consecutive_failures: 5, verify: {verify}}}
"""


async def _ask(fb) -> str:
    async with fb.session.post(fb.url + "/x", data=b"{}") as resp:
        await resp.read()
        return resp.headers.get("x-flipback-upstream", str(resp.status))


async def _trip(fb, rollout) -> None:
    """Traffic until the failing canary trips."""

    async def tripped() -> bool:
        if rollout.state == "rolled_back":
            return True
        await _ask(fb)
        return False

    await wait_until(tripped, interval=0, what="the canary to trip")


async def _start(model, flipback, *, weight=100, verify="null", stable_health="null",
                 canary_health=200):
    v1, v2, small = await model("v1"), await model("v2"), await model("small")
    v2.health_status = canary_health
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, small=small.url, weight=weight,
                        verify=verify, stable_health=stable_health)
    fb.v1, fb.v2, fb.small = v1, v2, small
    return fb


async def test_unhealthy_canary_waits_then_gets_its_weight_back(model, flipback):
    fb = await _start(model, flipback)
    rollout = fb.runtime.rollout("chat")
    await wait_until(lambda: rollout.state == "promoted")
    assert await _ask(fb) == "v2"
    fb.v2.health_status = 503
    await wait_until(lambda: rollout.state == "waiting")
    assert rollout.effective_weight == 0 and rollout.latch is None  # not a latch
    assert {await _ask(fb) for _ in range(10)} == {"v1"}
    view = await fb.get_json("/routes/chat")
    assert view["state"] == "waiting" and view["upstreams"]["v2"]["healthy"] is False
    ready = await fb.get_json("/readyz")
    assert ready["status"] == "ready" and ready["upstreams"]["v2"]["healthy"] is False
    text = fb.runtime.metrics.render().decode()
    assert 'flipback_upstream_healthy{upstream="v2"} 0.0' in text
    assert 'flipback_route_state{route="chat",state="waiting"} 1.0' in text
    fb.v2.health_status = 200
    await wait_until(lambda: rollout.state == "promoted")
    assert await _ask(fb) == "v2"
    kinds = [e["kind"] for e in (await fb.get_json("/events"))["events"]]
    assert kinds[:2] == ["canary_healthy", "canary_unhealthy"]


async def test_never_ready_canary_takes_no_request_and_cannot_be_promoted(model, flipback):
    fb = await _start(model, flipback, weight=50, canary_health=503)
    rollout = fb.runtime.rollout("chat")
    await wait_until(lambda: fb.v2.health_probes >= 3)
    assert rollout.state == "waiting"
    for _ in range(20):
        assert await _ask(fb) == "v1"
    assert fb.v2.count == 0
    status, body = await fb.post_admin("/routes/chat/promote")
    assert status == 409 and "not ready" in body["error"]


async def test_unhealthy_stable_sends_traffic_to_fallback(model, flipback):
    fb = await _start(model, flipback, weight=0, stable_health="/health")
    rollout = fb.runtime.rollout("chat")
    await wait_until(lambda: fb.runtime.health.healthy("v1") is True)
    assert await _ask(fb) == "v1"
    fb.v1.health_status = 500
    await wait_until(lambda: rollout.stable_down)
    assert {await _ask(fb) for _ in range(5)} == {"small"}
    fb.v1.health_status = 200
    await wait_until(lambda: not rollout.stable_down)
    assert await _ask(fb) == "v1"


async def test_verify_confirms_a_healthy_stable(model, flipback):
    fb = await _start(model, flipback, weight=50, verify="300ms")
    rollout = fb.runtime.rollout("chat")
    await wait_until(lambda: rollout.state == "canary")
    fb.v2.behaviour = Behaviour(mode="status", status=500)
    await _trip(fb, rollout)
    for _ in range(20):
        await _ask(fb)
    await wait_until(lambda: rollout.latch is not None and rollout.latch.verify is not None)
    event = (await fb.get_json("/events"))["events"][0]
    assert event["kind"] == "verified" and event["actor"] == "auto"
    assert event["figures"]["stable"]["requests"] > 0
    assert 'flipback_verifications_total{result="verified",route="chat"} 1.0' in (
        fb.runtime.metrics.render().decode())
    view = await fb.get_json("/routes/chat")
    assert view["latch"]["verify"] == "verified"


async def test_verify_fails_when_stable_is_bad_too(model, flipback):
    fb = await _start(model, flipback, weight=50, verify="1s")
    rollout = fb.runtime.rollout("chat")
    await wait_until(lambda: rollout.state == "canary")
    fb.v2.behaviour = Behaviour(mode="status", status=500)
    await _trip(fb, rollout)
    fb.v1.behaviour = Behaviour(delay=0.6)  # stable slow: p99 over max_p99 (500 ms)
    await asyncio.gather(*(_ask(fb) for _ in range(8)))
    await wait_until(lambda: rollout.latch is not None and rollout.latch.verify is not None)
    event = (await fb.get_json("/events"))["events"][0]
    assert event["kind"] == "verify_failed"
    assert "look elsewhere" in event["reason"]
    assert 'flipback_verifications_total{result="failed",route="chat"} 1.0' in (
        fb.runtime.metrics.render().decode())
