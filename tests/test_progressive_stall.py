"""A progressive plan that cannot collect its evidence says so: one step_stalled event,
and the route's progressive view and status show it held. The evidence is min_requests
canary requests in the window with the threshold judge, and proof that the canary is no
worse than stable with the sequential judge."""

from __future__ import annotations

import asyncio

import pytest

from tests.waiting import wait_until

CONFIG = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 1}}
    progressive: {{steps: [1, 50, 100], interval: 200ms}}
    rollback: {{judge: {judge}, window: 10s, min_requests: 20}}
"""

WAITING_FOR = {"threshold": "20 needed", "sequential": "no proof yet that the canary is no worse"}


@pytest.mark.parametrize("judge", ["threshold", "sequential"])
async def test_a_stalled_plan_says_so_once_in_events_routes_and_status(model, flipback, judge):
    from proxy.cli.status_table import ROUTE_NOTES

    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(CONFIG, v1=v1.url, v2=v2.url, judge=judge)

    async def stalled() -> bool:
        events = (await fb.get_json("/events?limit=20"))["events"]
        return any(e["kind"] == "step_stalled" for e in events)

    await wait_until(stalled, what="a step_stalled event")
    await asyncio.sleep(0.6)  # not a wait: more ticks pass, and it is still said only once
    events = (await fb.get_json("/events?limit=20"))["events"]
    stalled = [e for e in events if e["kind"] == "step_stalled"]
    assert len(stalled) == 1 and WAITING_FOR[judge] in stalled[0]["reason"]
    route = await fb.get_json("/routes/chat")
    assert route["progressive"]["stalled"] is True and route["progressive"]["step"] == 0
    notes = [n(route, None) for n in ROUTE_NOTES]
    assert any(n and n.startswith("progressive: held at step 1 of 3 (1.0%)") for n in notes)
