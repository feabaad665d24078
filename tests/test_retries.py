"""Replays of a failed canary on stable are visible (a response header, a metric with the
cause) and can be limited to what the canary provably never received."""

from __future__ import annotations

import re
import socket

from tests.fakes import Behaviour

ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}", timeout: 300ms, connect_timeout: 1s}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 100}}
    retry_canary_on_stable: {policy}
    rollback: {{enabled: false}}
"""


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there now


async def _retries(fb) -> dict[str, float]:
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^flipback_retries_total\{[^}]*cause="(\w+)"[^}]*\} (\S+)$', text, re.M)}


async def test_a_replayed_response_names_the_upstream_it_left_and_the_cause(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    v2.behaviour = Behaviour(mode="status", status=503)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, policy="true")
    async with fb.session.post(fb.url + "/chat", data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["x-flipback-upstream"] == "v1"
        assert resp.headers["x-flipback-retried-from"] == "v2"
    v2.behaviour = Behaviour(mode="hang")
    async with fb.session.post(fb.url + "/chat", data=b"{}") as resp:
        assert resp.status == 200 and resp.headers["x-flipback-retried-from"] == "v2"
    v2.behaviour = Behaviour()
    async with fb.session.post(fb.url + "/chat", data=b"{}") as resp:
        assert resp.headers["x-flipback-upstream"] == "v2"
        assert "x-flipback-retried-from" not in resp.headers
    assert await _retries(fb) == {"status": 1.0, "timeout": 1.0}
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert ('flipback_retries_total{cause="status",from_upstream="v2",route="chat",'
            'to_upstream="v1"} 1.0') in text


async def test_unsent_replays_only_what_the_canary_never_received(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, policy="unsent")
    v2.behaviour = Behaviour(mode="hang")  # received, then no answer: not replayed
    async with fb.session.post(fb.url + "/chat", data=b"{}") as resp:
        assert resp.status == 504 and resp.headers.get("x-flipback-upstream") is None
    v2.behaviour = Behaviour(mode="status", status=500)  # received and answered: passed on
    async with fb.session.post(fb.url + "/chat", data=b"{}") as resp:
        assert resp.status == 500 and resp.headers["x-flipback-upstream"] == "v2"
    assert v1.count == 0  # nothing reached stable twice

    down = await flipback(ROUTE, v1=v1.url, v2=_closed_port_url(), policy="unsent")
    async with down.session.post(down.url + "/chat", data=b"{}") as resp:
        assert resp.status == 200  # refused at connect: provably never received
        assert resp.headers["x-flipback-retried-from"] == "v2"
    assert v1.count == 1
    assert await _retries(down) == {"connect_error": 1.0}


async def test_retry_policy_is_checked(model, flipback):
    import pytest

    from proxy.errors import ConfigError

    v1, v2 = await model("v1"), await model("v2")
    with pytest.raises(ConfigError, match="expected true, false or 'unsent'"):
        await flipback(ROUTE, v1=v1.url, v2=v2.url, policy="sometimes")


OVERFLOW = """
upstreams:
  v1: {{url: "{v1}", max_connections: 1, max_pending: 0}}
  small: {{url: "{small}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    fallback: small
"""


async def test_fallback_takes_what_stable_cannot_queue(model, flipback):
    """A stable at its connection limit with no queue left sends the overflow to the
    fallback (503 only when there is none), with the replay visible."""
    import asyncio

    v1, small = await model("v1"), await model("small")
    v1.behaviour = Behaviour(delay=0.5)
    fb = await flipback(OVERFLOW, v1=v1.url, small=small.url)

    async def ask() -> tuple[int, str, str | None]:
        async with fb.session.post(fb.url + "/x", data=b"{}") as resp:
            return (resp.status, resp.headers["x-flipback-upstream"],
                    resp.headers.get("x-flipback-retried-from"))

    results = await asyncio.gather(*(ask() for _ in range(4)))
    assert all(status == 200 for status, _, _ in results)
    assert sorted(up for _, up, _ in results) == ["small", "small", "small", "v1"]
    assert all(frm == "v1" for _, up, frm in results if up == "small")
    assert await _retries(fb) == {"saturated": 3.0}


async def test_a_replay_on_stable_is_counted_but_never_judged_as_stable(model, flipback):
    """A request the canary failed is not a random sample of stable's traffic: its replay
    is in the metrics but not in stable's window (charged to stable, it made stable look
    as bad as the canary, and compare_to_stable then kept a bad canary)."""
    v1, v2 = await model("v1"), await model("v2")
    v2.behaviour = Behaviour(mode="status", status=400)
    v1.behaviour = Behaviour(mode="status", status=400)  # stable refuses them too
    fb = await flipback(ROUTE.replace("    rollback: {{enabled: false}}\n",
                                      "    rollback: {{enabled: false, failure_statuses: "
                                      "[4xx, 5xx]}}\n"),
                        v1=v1.url, v2=v2.url, policy="true")
    for _ in range(5):
        async with fb.session.post(fb.url + "/chat", data=b"{}") as resp:
            assert resp.status == 400 and resp.headers["x-flipback-retried-from"] == "v2"
    route = await fb.get_json("/routes/chat")
    assert route["upstreams"]["v2"]["requests"] == 5
    assert route["upstreams"]["v2"]["failures"] == 5
    assert route["upstreams"]["v1"]["requests"] == 0  # replays: not stable's sample
    assert v1.count == 5
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert ('flipback_requests_total{outcome="4xx",role="stable",route="chat",'
            'upstream="v1"} 5.0') in text
