"""Automatic rollback end to end (SPEC §5): real upstreams whose failure mode changes while
traffic flows; the proxy must flip, latch, persist, and keep clients error-free."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from proxy.server import App
from tests.conftest import make_config
from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}"{up_extra}}}
  v2: {{url: "{v2}"{up_extra}}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    canary: {{upstream: v2, weight: {weight}}}
    retry_canary_on_stable: {retry}
    rollback: {{window: 5s, min_requests: {min_requests}, max_error_rate: 5, max_p99: {max_p99},
               consecutive_failures: {consecutive}{rb_extra}}}
    {extra}
"""


def _cfg(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(weight=50, retry="true", min_requests=10, max_p99="500ms",
                                   consecutive=5, rb_extra="", extra="", up_extra="")
    base.update(kw)
    return base


class Load:
    """Closed-loop clients hammering the route; records (time, upstream|status|error)."""

    def __init__(self, fb, path: str = "/v1/chat", concurrency: int = 8) -> None:
        self.fb = fb
        self.path = path
        self.results: list[tuple[float, str, int]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._client()) for _ in range(concurrency)]
        self._loop = asyncio.get_running_loop()

    async def _client(self) -> None:
        while not self._stop.is_set():
            t = asyncio.get_running_loop().time()
            try:
                async with self.fb.session.post(self.fb.url + self.path, data=b"{}") as resp:
                    await resp.read()
                    self.results.append((t, resp.headers.get("x-flipback-upstream", "-"),
                                         resp.status))
            except aiohttp.ClientError:
                self.results.append((t, "error", 0))

    async def answered(self, n: int, since: float = float("-inf")) -> None:
        """Wait until ``n`` requests sent after ``since`` have been answered."""
        await wait_until(lambda: sum(t > since for t, _, _ in self.results) >= n,
                         what=f"{n} answers")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def client_errors(self) -> list[tuple[float, str, int]]:
        return [r for r in self.results if r[2] != 200]


async def _wait_state(fb, state: str) -> float:
    """The loop time the route was seen in ``state`` (polled often: tests time flips)."""
    await wait_until(lambda: fb.runtime.rollout("chat").state == state, interval=0.005,
                     what=lambda: f"route to become {state}: {fb.runtime.rollout('chat')!r}")
    return asyncio.get_running_loop().time()


async def _events(fb) -> list[dict]:
    return (await fb.get_json("/events?limit=50"))["events"]


async def test_error_rate_trip_flips_within_a_second_without_client_errors(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, **_cfg(consecutive="null"))
    load = Load(fb)
    await load.answered(100)
    assert fb.runtime.rollout("chat").state == "canary"
    loop = asyncio.get_running_loop()
    v2.behaviour = Behaviour(mode="status", status=500)
    fault = loop.time()
    flipped = await _wait_state(fb, "rolled_back")
    await load.answered(40, since=flipped + 0.05)
    await load.stop()
    assert flipped - fault < 1.0, flipped - fault  # the claim: a flip within a second
    assert load.client_errors() == []  # retried on stable before any byte reached the client
    after = [name for t, name, _ in load.results if t > flipped + 0.05]
    assert after and set(after) == {"v1"}
    event = (await _events(fb))[0]
    assert event["kind"] == "rollback" and event["actor"] == "auto"
    assert event["figures"]["trip"] == "error_rate"
    assert event["figures"]["canary"]["failures"] > 0
    assert "error rate" in event["reason"]
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'flipback_rollbacks_total{reason="error_rate",route="chat"} 1.0' in text
    assert 'role="canary"' in text and 'outcome="5xx"' in text


async def test_consecutive_failures_trip_on_refused_canary(model, flipback, unused_tcp_port):
    v1 = await model("v1")
    text = ROUTE.replace('v2: {{url: "{v2}"{up_extra}}}', 'v2: {{url: "http://127.0.0.1:{dead}"}}')
    fb = await flipback(text, v1=v1.url, dead=unused_tcp_port,
                        **_cfg(min_requests=3, consecutive=3))
    load = Load(fb, concurrency=2)
    await _wait_state(fb, "rolled_back")
    await load.stop()
    assert load.client_errors() == []
    event = (await _events(fb))[0]
    assert event["figures"]["trip"] in ("consecutive_failures", "error_rate")


async def test_reset_canary_trips(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, **_cfg())
    load = Load(fb)
    await load.answered(50)
    v2.behaviour = Behaviour(mode="reset")
    await _wait_state(fb, "rolled_back")
    await load.stop()
    assert load.client_errors() == []


async def test_hung_canary_trips_within_max_p99_plus_half_a_second(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(max_p99="300ms", min_requests=5, consecutive="null"))
    load = Load(fb, concurrency=16)
    await load.answered(100)
    loop = asyncio.get_running_loop()
    v2.behaviour = Behaviour(mode="hang")
    fault = loop.time()
    flipped = await _wait_state(fb, "rolled_back")
    assert flipped - fault < 0.3 + 0.5, flipped - fault  # the claim: max_p99 + 0.5 s
    event = (await _events(fb))[0]
    assert event["figures"]["trip"] == "latency"
    # The hung requests are still waiting on v2; stop the load by failing the canary fast.
    v2.behaviour = Behaviour(mode="status", status=500)
    await fb.app.runtime.snapshot.pools["v2"].aclose(0)
    await load.stop()


async def test_slow_first_byte_trips_latency(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(max_p99="100ms", consecutive="null", min_requests=5))
    load = Load(fb)
    await load.answered(50)
    v2.behaviour = Behaviour(delay=0.25)
    await _wait_state(fb, "rolled_back")
    await load.stop()
    assert load.client_errors() == []
    assert (await _events(fb))[0]["figures"]["trip"] == "latency"


async def test_stream_cut_midway_counts_as_failure(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(weight=100, min_requests=3, consecutive=3))
    v2.behaviour = Behaviour(mode="cut", events=4)
    broken = 0
    for _ in range(3):
        try:
            async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
                await resp.read()
        except aiohttp.ClientPayloadError:
            broken += 1
    assert broken == 3  # after the first byte there is nothing to retry: the client sees it
    await _wait_state(fb, "rolled_back")
    assert (await _events(fb))[0]["figures"]["trip"] == "consecutive_failures"


async def test_ratio_trip_compares_to_stable(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(max_p99="null", consecutive="null", min_requests=5,
                               rb_extra=", max_p99_ratio: 3"))
    v2.behaviour = Behaviour(delay=0.1)
    load = Load(fb)
    await _wait_state(fb, "rolled_back")
    await load.stop()
    assert (await _events(fb))[0]["figures"]["trip"] == "latency_ratio"


async def test_no_trip_below_min_requests(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(weight=100, min_requests=50, consecutive=5))
    v2.behaviour = Behaviour(mode="status", status=500)
    for _ in range(20):
        async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
            assert resp.status == 200  # retried on stable
    assert fb.runtime.rollout("chat").state == "promoted"


async def test_no_trip_when_stable_fails_as_badly(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(weight=20, consecutive="null", retry="false", min_requests=10))
    v1.behaviour = Behaviour(mode="status", status=500)
    v2.behaviour = Behaviour(mode="status", status=500)
    statuses: Counter[int] = Counter()
    for _ in range(150):
        async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
            statuses[resp.status] += 1
    assert statuses[500] == 150
    canary = fb.runtime.rollout("chat").canary.window.stats()
    assert canary.requests >= 10  # enough canary evidence: a trip was possible
    assert fb.runtime.rollout("chat").state == "canary"
    # The same canary failures with a healthy stable do trip.
    v1.behaviour = Behaviour()
    fb.runtime.rollout("chat").stable.window.reset()
    for _ in range(200):
        async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
            await resp.read()
        if fb.runtime.rollout("chat").state == "rolled_back":
            break
    assert fb.runtime.rollout("chat").state == "rolled_back"


async def test_4xx_counts_when_configured(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(weight=100, min_requests=5, consecutive=5,
                               rb_extra=', failure_statuses: [5xx, "400"]'))
    v2.behaviour = Behaviour(mode="status", status=400)
    for _ in range(5):
        async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
            assert resp.status == 200 and resp.headers["x-flipback-upstream"] == "v1"
    assert fb.runtime.rollout("chat").state == "rolled_back"


async def test_fallback_takes_failed_stable_requests(model, flipback, unused_tcp_port):
    v1, small = await model("v1"), await model("small")
    text = """
upstreams:
  v1: {{url: "{v1}"}}
  small: {{url: "{small}"}}
routes:
  - name: predict
    match: {{path_prefix: "/"}}
    stable: v1
    fallback: small
"""
    fb = await flipback(text, v1=v1.url, small=small.url)
    v1.behaviour = Behaviour(mode="status", status=503)
    async with fb.session.post(fb.url + "/p", data=b'{"x": 1}') as resp:
        assert resp.status == 200 and resp.headers["x-flipback-upstream"] == "small"
    assert small.seen[-1].body == b'{"x": 1}'
    v1.behaviour = Behaviour(mode="reset")
    async with fb.session.get(fb.url + "/p") as resp:
        assert resp.status == 200 and resp.headers["x-flipback-upstream"] == "small"
    async with fb.session.get(fb.admin + "/metrics") as resp:
        assert 'role="fallback"' in await resp.text()


async def test_latch_survives_restart_and_resume_clears_it(model, tmp_path: Path):
    v1, v2 = await model("v1"), await model("v2")
    cfg = make_config(ROUTE, tmp_path, v1=v1.url, v2=v2.url, **_cfg(weight=100))
    app = App(cfg)
    await app.start()
    rollout = app.runtime.rollout("chat")
    rollout.rollback("bad model")
    await app.runtime.flush_state()
    await app.aclose()
    saved = orjson.loads((tmp_path / "state.json").read_bytes())
    assert saved["routes"]["chat"]["latch"]["detail"] == "bad model"

    app = App(cfg)
    await app.start()
    try:
        assert app.runtime.rollout("chat").state == "rolled_back"
        url = f"http://127.0.0.1:{app.data_port}/v1/x"
        async with aiohttp.ClientSession() as s, s.post(url, data=b"{}") as resp:
            assert resp.headers["x-flipback-upstream"] == "v1"
        app.runtime.rollout("chat").resume()
        assert app.runtime.rollout("chat").state == "promoted"
    finally:
        await app.aclose()

    # A weight change in the config is the same rollout: the latch stays.
    app = App(cfg)
    await app.start()
    app.runtime.rollout("chat").rollback("again")
    await app.runtime.flush_state()
    await app.aclose()
    app = App(make_config(ROUTE, tmp_path, v1=v1.url, v2=v2.url, **_cfg(weight=20)))
    await app.start()
    try:
        assert app.runtime.rollout("chat").state == "rolled_back"
    finally:
        await app.aclose()
    # A new canary version (another upstream URL) is a new rollout: the latch goes.
    v3 = await model("v3")
    app = App(make_config(ROUTE, tmp_path, v1=v1.url, v2=v3.url, **_cfg(weight=20)))
    await app.start()
    try:
        assert app.runtime.rollout("chat").state == "canary"
    finally:
        await app.aclose()


async def test_progressive_steps_to_promoted_then_trips_back(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        **_cfg(weight=0, min_requests=3, consecutive=3,
                               rb_extra=", judge: threshold",
                               extra="progressive: {steps: [10, 50, 100], interval: 200ms}"))
    load = Load(fb, concurrency=4)
    await _wait_state(fb, "promoted")
    kinds = [e["kind"] for e in reversed(await _events(fb))]
    assert kinds == ["step", "promote"], kinds
    assert fb.runtime.rollout("chat").effective_weight == 100
    v2.behaviour = Behaviour(mode="status", status=500)
    flipped = await _wait_state(fb, "rolled_back")
    await load.answered(20, since=flipped)
    await load.stop()
    assert load.client_errors() == []
    assert fb.runtime.rollout("chat").effective_weight == 0
