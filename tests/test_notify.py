"""Webhook notifications (SPEC §5 Notify) against real receivers on 127.0.0.1: delivery
within a second of a flip, kinds, retries, a hanging or absent receiver that changes
nothing for traffic, a bounded queue, redaction and hot reload."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy import __version__
from proxy.config.model import NotifyConfig
from proxy.events import EventLog
from proxy.metrics import Metrics
from proxy.notify import REDACTED, Notifier, redact
from tests.conftest import make_config
from tests.waiting import wait_until

ROUTE = """
{head}
notify: {{webhook: "{hook}", timeout: {timeout}, kinds: {kinds}}}
upstreams:
  v1: {{url: "{v1}", headers: {{authorization: "Bearer sk-upstream-secret-123"}}}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/v1/"}}
    stable: v1
    canary: {{upstream: v2, weight: 100}}
"""
FAST = (0.01, 0.02, 0.03)


@dataclass
class Hit:
    at: float
    headers: CIMultiDictProxy[str]
    event: dict[str, Any]


class Receiver:
    """A webhook endpoint: ``mode`` is ok, fail (500) or hang (until the test ends);
    ``fail_first`` answers the first N posts with 500."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.fail_first = 0
        self.hits: list[Hit] = []
        self.release = asyncio.Event()
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/hooks/flipback"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hooks/flipback", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        event = orjson.loads(await request.read())
        self.hits.append(Hit(asyncio.get_running_loop().time(), request.headers, event))
        if self.mode == "hang":
            await self.release.wait()
        failing = self.mode == "fail" or len(self.hits) <= self.fail_first
        return web.json_response({}, status=500 if failing else 200)

    async def wait(self, n: int) -> list[Hit]:
        """The hits, once there are ``n``; the test claiming a delivery time checks
        ``Hit.at`` itself."""
        await wait_until(lambda: len(self.hits) >= n, what=f"{n} webhook posts")
        return self.hits

    @property
    def kinds(self) -> list[str]:
        return [h.event["kind"] for h in self.hits]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Any:
    made: list[Receiver] = []

    async def start(mode: str = "ok") -> Receiver:
        rec = Receiver()
        rec.mode = mode
        rec.server = await aiohttp_server(rec.app())
        made.append(rec)
        return rec

    yield start
    for rec in made:  # let hanging handlers end before the servers close
        rec.release.set()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks"


def count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("flipback_notifications_total",
                                              {"result": result})
    return value or 0.0


async def until_count(metrics: Metrics, result: str, n: float) -> None:
    await wait_until(lambda: count(metrics, result) >= n, what=f"{n:g} notifications {result}")


async def start_proxy(flipback, model, hook: str, *, timeout: str = "2s",
                      kinds: str = "[rollback, promote, verify_failed, kill, reload_refused]",
                      head: str = ""):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, hook=hook, timeout=timeout,
                        kinds=kinds, head=head)
    return fb, v1, v2


async def proxied(fb) -> tuple[int, str]:
    async with fb.session.post(fb.url + "/v1/chat", data=b"{}") as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-flipback-upstream", "")


def make_notifier(hook: str, **kw: Any) -> tuple[Notifier, EventLog, Metrics]:
    metrics, events = Metrics(), EventLog()
    kinds = kw.pop("kinds", ("rollback",))
    notifier = Notifier(NotifyConfig(webhook=hook, timeout=kw.pop("timeout", 1.0),
                                     kinds=kinds), metrics, **kw)
    events.subscribe(notifier.offer)  # Runtime subscribes through its fleet filter
    notifier.start()
    return notifier, events, metrics


def emit_rollback(events: EventLog, reason: str = "error_rate", **figures: Any) -> None:
    events.emit(route="chat", kind="rollback", actor="auto", reason=reason, figures=figures)


async def test_notify_webhook_gets_rollback_event_within_a_second(flipback, model, receiver):
    rec = await receiver()
    fb, _, _ = await start_proxy(flipback, model, rec.url)
    assert await proxied(fb) == (200, "v2")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, _ = await fb.post_admin("/routes/chat/rollback", {"reason": "bad answers"})
    assert status == 200
    (hit,) = await rec.wait(1)
    assert hit.at - t0 < 1.0  # the claim: the webhook hears of a flip within a second
    event = hit.event
    assert set(event) == {"time", "route", "kind", "actor", "reason", "figures"}
    assert (event["route"], event["kind"], event["actor"], event["reason"]) == (
        "chat", "rollback", "admin", "bad answers")
    assert event["time"].endswith("Z") and isinstance(event["figures"], dict)
    assert event == (await fb.get_json("/events?limit=1"))["events"][0]
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["User-Agent"] == f"flipback/{__version__}"
    await until_count(fb.runtime.metrics, "sent", 1)
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'flipback_notifications_total{result="sent"} 1.0' in text
    assert 'flipback_notifications_total{result="dropped"} 0.0' in text


async def test_notify_sends_only_the_listed_kinds(flipback, model, receiver):
    rec = await receiver()
    fb, _, _ = await start_proxy(flipback, model, rec.url, kinds="[rollback]")
    assert (await fb.post_admin("/routes/chat/weight", {"weight": 25}))[0] == 200
    assert (await fb.post_admin("/routes/chat/rollback", {"reason": "r"}))[0] == 200
    await rec.wait(1)
    assert (await fb.post_admin("/routes/chat/resume"))[0] == 200
    assert (await fb.post_admin("/routes/chat/rollback", {"reason": "again"}))[0] == 200
    await rec.wait(2)
    # FIFO: had the weight or resume event been sent, it would have arrived first.
    assert rec.kinds == ["rollback", "rollback"]
    kinds = [e["kind"] for e in (await fb.get_json("/events?limit=10"))["events"]]
    assert "weight" in kinds and "resume" in kinds


async def test_notify_retries_a_failing_receiver_three_times_then_counts_failed(receiver):
    rec = await receiver("fail")
    notifier, events, metrics = make_notifier(rec.url, backoff=FAST)
    emit_rollback(events)
    await until_count(metrics, "failed", 1)
    assert len(rec.hits) == 4  # one attempt and 3 retries
    assert count(metrics, "sent") == 0
    await notifier.aclose(1.0)


async def test_notify_retry_that_succeeds_counts_sent(receiver):
    rec = await receiver()
    rec.fail_first = 2
    notifier, events, metrics = make_notifier(rec.url, backoff=FAST)
    emit_rollback(events)
    await until_count(metrics, "sent", 1)
    assert len(rec.hits) == 3 and count(metrics, "failed") == 0
    assert rec.hits[0].event == rec.hits[2].event
    # One delivery id across the attempts, so a receiver can drop repeats.
    ids = {h.headers["X-Flipback-Delivery"] for h in rec.hits}
    assert len(ids) == 1 and len(ids.pop()) == 16
    assert [h.headers["X-Flipback-Attempt"] for h in rec.hits] == ["1", "2", "3"]
    emit_rollback(events)
    await until_count(metrics, "sent", 2)
    assert rec.hits[3].headers["X-Flipback-Delivery"] != rec.hits[0].headers[
        "X-Flipback-Delivery"]  # a new event, a new id
    await notifier.aclose(1.0)


async def test_notify_hanging_receiver_delays_neither_admin_nor_traffic(
        flipback, model, receiver):
    rec = await receiver("hang")
    fb, _, _ = await start_proxy(flipback, model, rec.url, timeout="500ms",
                                 kinds="[rollback, resume, weight]")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, _ = await fb.post_admin("/routes/chat/rollback", {"reason": "r"})
    assert status == 200 and loop.time() - t0 < 0.2
    await rec.wait(1)  # the receiver now holds the notifier's request
    t0 = loop.time()
    for _ in range(3):
        assert (await fb.post_admin("/routes/chat/resume"))[0] == 200
        assert (await fb.post_admin("/routes/chat/rollback", {"reason": "r"}))[0] == 200
    for _ in range(20):
        assert await proxied(fb) == (200, "v1")
    assert loop.time() - t0 < 1.0
    assert fb.runtime.notifier.pending() == 6  # the worker is still on the first


async def test_notify_queue_stays_bounded_under_a_flood(receiver):
    rec = await receiver("hang")
    notifier, events, metrics = make_notifier(rec.url, queue_size=10, timeout=30.0)
    emit_rollback(events)
    await rec.wait(1)  # the worker is stuck on the first event
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(2000):
        emit_rollback(events, reason=f"flood {i}", filler="x" * 1000)
    assert loop.time() - t0 < 0.5
    assert notifier.pending() == 10
    assert count(metrics, "dropped") == 1990
    await notifier.aclose(0.05)
    # The 10 still queued and the one cut mid-delivery: every event is accounted for.
    assert count(metrics, "dropped") == 2001
    assert count(metrics, "sent") + count(metrics, "failed") == 0
    emit_rollback(events)  # after close: counted, never queued
    assert notifier.pending() == 0 and count(metrics, "dropped") == 2002


async def test_notify_cancelled_close_still_stops_the_worker(receiver):
    rec = await receiver("hang")
    notifier, events, metrics = make_notifier(rec.url, timeout=30.0)
    assert len(notifier._worker) == 1
    emit_rollback(events)
    emit_rollback(events)
    await rec.wait(1)
    closing = asyncio.ensure_future(notifier.aclose(30.0))
    await wait_until(lambda: notifier._closed, what="aclose to be waiting on the worker")
    closing.cancel()  # what the runtime's shutdown does to a notifier retired by a reload
    await asyncio.wait([closing])
    assert len(notifier._worker) == 0  # the worker task is done
    assert notifier._session is None
    assert count(metrics, "dropped") == 2


async def test_notify_absent_receiver_counts_failed_and_traffic_is_fine(flipback, model):
    fb, _, _ = await start_proxy(flipback, model, refused_url(), kinds="[rollback, resume]")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert (await fb.post_admin("/routes/chat/rollback", {"reason": "r"}))[0] == 200
    for _ in range(10):
        assert await proxied(fb) == (200, "v1")
    assert loop.time() - t0 < 0.5
    await until_count(fb.runtime.metrics, "failed", 1)  # after backoff 0.2+0.5+1s
    assert count(fb.runtime.metrics, "sent") == 0


async def test_notify_redacts_admin_token_and_upstream_header_values(
        flipback, model, receiver, monkeypatch):
    monkeypatch.setenv("FB_NOTIFY_TEST_TOKEN", "admin-token-0123456789")
    rec = await receiver()
    head = 'admin: {listen: "127.0.0.1:0", token_env: FB_NOTIFY_TEST_TOKEN}'
    fb, _, _ = await start_proxy(flipback, model, rec.url, head=head)
    auth = {"Authorization": "Bearer admin-token-0123456789"}
    reason = "pasted admin-token-0123456789 and Bearer sk-upstream-secret-123 by mistake"
    status, _ = await fb.post_admin("/routes/chat/rollback", {"reason": reason}, headers=auth)
    assert status == 200
    fb.runtime.events.emit(route="chat", kind="rollback", actor="auto", reason="x",
                           figures={"echo": {"header": "Bearer sk-upstream-secret-123",
                                             "list": ["sk-upstream-secret-123", 1.5]}})
    hits = await rec.wait(2)
    body = b"".join(orjson.dumps(h.event) for h in hits)
    assert b"admin-token-0123456789" not in body and b"sk-upstream-secret-123" not in body
    assert hits[0].event["reason"] == f"pasted {REDACTED} and {REDACTED} by mistake"
    assert hits[1].event["figures"] == {"echo": {"header": REDACTED,
                                                 "list": [REDACTED, 1.5]}}


def test_redact_walks_figures_and_spares_short_secrets_inside_words() -> None:
    secrets = ["Bearer sk-live-abcdefgh", "on", ""]
    value = {"reason": "on", "note": "turned on by sk-live-abcdefgh",
             "figures": {"sk-live-abcdefgh": [("on", 2), None, True]}}
    assert redact(value, secrets) == {
        "reason": REDACTED,
        "note": f"turned on by {REDACTED}",
        "figures": {REDACTED: [[REDACTED, 2], None, True]},
    }
    assert redact(value, []) is value


async def test_notify_hot_reload_moves_webhook_and_kinds_then_turns_off(
        flipback, model, receiver, tmp_path):
    first, second = await receiver(), await receiver()
    fb, v1, v2 = await start_proxy(flipback, model, first.url, kinds="[rollback]")
    notifier = fb.runtime.notifier

    def config(hook: str | None, kinds: str) -> Any:
        text = ROUTE.replace('notify: {{webhook: "{hook}", timeout: {timeout}, kinds: {kinds}}}',
                             "" if hook is None else
                             f'notify: {{{{webhook: "{hook}", kinds: {kinds}}}}}')
        return make_config(text, tmp_path, v1=v1.url, v2=v2.url, head="")

    assert fb.runtime.apply(config(second.url, "[rollback, resume]")).ok
    assert fb.runtime.notifier is notifier  # reconfigured in place
    await fb.post_admin("/routes/chat/rollback", {"reason": "r"})
    await fb.post_admin("/routes/chat/resume")
    await second.wait(2)
    assert second.kinds == ["rollback", "resume"] and first.hits == []
    assert fb.runtime.apply(config(None, "")).ok
    assert fb.runtime.notifier is None
    await fb.post_admin("/routes/chat/rollback", {"reason": "r"})
    await asyncio.sleep(0.1)  # not a wait: time for a wrong post to arrive, were it sent
    assert len(second.hits) == 2
    assert fb.runtime.apply(config(first.url, "[rollback]")).ok
    assert fb.runtime.notifier is not None and fb.runtime.notifier is not notifier
    await fb.post_admin("/routes/chat/resume")
    await fb.post_admin("/routes/chat/rollback", {"reason": "back"})
    (hit,) = await first.wait(1)
    assert hit.event["reason"] == "back"


async def test_runtime_without_webhook_has_no_notifier(flipback, model):
    fb, _, _ = await start_proxy(flipback, model, "http://127.0.0.1:9/x")
    assert fb.runtime.notifier is not None
    v1, v2 = await model("a"), await model("b")
    plain = await flipback(ROUTE.replace('"{hook}"', "null"), v1=v1.url, v2=v2.url,
                           timeout="1s", kinds="[rollback]", head="")
    assert plain.runtime.notifier is None
