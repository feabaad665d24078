"""The pure parts of ``run --workers``: the hub's store (as Redis keeps fleet state),
the admin merges, the channel's frames."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.fleet import state as fs
from proxy.workers.channel import ChannelError, read_frame, write_frame
from proxy.workers.hub import HubState, PinStore
from proxy.workers.merge import merge_events, merge_metrics, merge_route


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pins_expire_renew_on_read_and_the_first_writer_wins() -> None:
    clock = Clock()
    pins = PinStore(clock)
    assert pins.set_pin("k", "cE1", "sE1", 1000) is None  # stored
    assert pins.set_pin("k", "sE1", "cE1", 1000) == "cE1"  # same epochs: the first stays
    clock.now += 0.9
    assert pins.getex("k", 1000) == "cE1"  # renewed for another second
    clock.now += 0.9
    assert pins.getex("k", 1000) == "cE1"
    clock.now += 1.1
    assert pins.getex("k", 1000) is None  # expired
    assert pins.set_pin("k", "cE1", "sE1", 1000) is None
    assert pins.set_pin("k", "sE2", "cE2", 1000) is None  # new epochs: replaced
    assert pins.getex("k", 1000) == "sE2"


def test_pins_beyond_the_limit_drop_the_least_recently_used() -> None:
    pins = PinStore(Clock(), limit=2)
    pins.set_pin("a", "s", "c", 1000)
    pins.set_pin("b", "s", "c", 1000)
    pins.getex("a", 1000)  # a is now the most recently used
    pins.set_pin("c", "s", "c", 1000)
    assert (pins.getex("a", 1000), pins.getex("b", 1000), pins.getex("c", 1000)) == (
        "s", None, "s")


def test_hub_state_seeds_once_and_applies_actions_like_the_fleet_link() -> None:
    hub = HubState()
    key = fs.route_key("chat")
    fields = fs.state_fields("fp", latch=None, manual_weight=None, configured_weight=5.0,
                             step=None, step_weight=None, cepoch="c0", sepoch="s0", seed="t")
    args = [fs.marker_fields("fp")[0], ""]
    for name, value in fields.items():
        args += [name, value.decode()]
    assert hub.call("seed", [key, args]) == 1
    assert hub.call("seed", [key, args]) == 0  # known: the hub's state wins from now on
    sets, dels = fs.op_fields("fp", "weight", {"weight": 40.0}, configured_weight=5.0,
                              kill_configured=False, cepoch="", sepoch="")
    hub.action(key, {k: v.decode() for k, v in sets.items()}, dels)
    flat = {k.encode(): v.encode() for k, v in hub.call("hgetall", [key]).items()}
    state = fs.decode_state(flat, "fp", 5.0, kill_configured=False)
    assert (state.present, state.manual_weight, state.cepoch, state.sepoch) == (
        True, 40.0, "c0", "s0")


WORKER_0 = """\
# HELP flipback_requests_total Proxied requests
# TYPE flipback_requests_total counter
flipback_requests_total{route="chat",upstream="v1",role="stable",outcome="2xx"} 3.0
# HELP flipback_request_duration_seconds Whole request duration
# TYPE flipback_request_duration_seconds histogram
flipback_request_duration_seconds_bucket{route="chat",le="0.1"} 2.0
flipback_request_duration_seconds_bucket{route="chat",le="+Inf"} 3.0
flipback_request_duration_seconds_count{route="chat"} 3.0
flipback_request_duration_seconds_sum{route="chat"} 0.5
# HELP flipback_in_flight Requests under way
# TYPE flipback_in_flight gauge
flipback_in_flight{route="chat",upstream="v1"} 2.0
# HELP flipback_canary_weight Effective canary weight (percent)
# TYPE flipback_canary_weight gauge
flipback_canary_weight{route="chat"} 5.0
# HELP flipback_config_reloads_total Config reloads
# TYPE flipback_config_reloads_total counter
flipback_config_reloads_total{result="ok"} 1.0
# HELP flipback_config_reloads_created Config reloads
# TYPE flipback_config_reloads_created gauge
flipback_config_reloads_created{result="ok"} 1.7e+09
"""
WORKER_1 = WORKER_0.replace("} 3.0", "} 4.0").replace("} 2.0", "} 1.0")


def test_metrics_sum_counters_and_histograms_and_keep_one_reading_of_shared_gauges() -> None:
    text = merge_metrics([WORKER_0, WORKER_1]).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert got[("flipback_requests_total", (("outcome", "2xx"), ("role", "stable"),
                                            ("route", "chat"), ("upstream", "v1")))] == 7
    assert got[("flipback_request_duration_seconds_bucket", (("le", "0.1"),
                                                             ("route", "chat")))] == 3
    assert got[("flipback_request_duration_seconds_count", (("route", "chat"),))] == 7
    assert got[("flipback_in_flight", (("route", "chat"), ("upstream", "v1")))] == 3
    assert got[("flipback_canary_weight", (("route", "chat"),))] == 5  # not 10
    assert not any(name.startswith("flipback_config_reloads") for name, _ in got)  # parent's


def _view(state: str, requests: int, failures: int, p99: float | None) -> dict[str, object]:
    return {"name": "chat", "state": state, "effective_weight": 5.0, "sticky_sessions": 3,
            "upstreams": {"v2": {"role": "canary", "requests": requests, "failures": failures,
                                 "error_rate": 0.0, "p50_ms": 1.0, "p99_ms": p99,
                                 "in_flight": 1}}}


def test_route_windows_add_up_and_the_error_rate_is_recomputed() -> None:
    merged = merge_route([_view("canary", 10, 1, 5.0), _view("rolled_back", 30, 9, None)])
    up = merged["upstreams"]["v2"]
    assert (up["requests"], up["failures"], up["in_flight"]) == (40, 10, 2)
    assert up["error_rate"] == 25.0
    assert up["p99_ms"] == 5.0
    assert merged["state"] == "canary"
    assert [w["state"] for w in merged["workers"]] == ["canary", "rolled_back"]


def test_events_leave_out_copies_and_workers_reloads() -> None:
    parent = [{"time": "2026-01-01T00:00:03.000Z", "kind": "reload", "figures": {}}]
    w0 = [{"time": "2026-01-01T00:00:02.000Z", "kind": "rollback", "figures": {}},
          {"time": "2026-01-01T00:00:01.000Z", "kind": "reload", "figures": {}}]
    w1 = [{"time": "2026-01-01T00:00:02.001Z", "kind": "rollback",
           "figures": {"via": "redis", "replica": "worker-0"}}]
    assert [e["kind"] for e in merge_events(parent, [w0, w1], 10)] == ["reload", "rollback"]
    assert len(merge_events(parent, [w0, w1], 1)) == 1


async def test_frames_round_trip_and_garbage_is_refused() -> None:
    reader = asyncio.StreamReader()

    class Sink:
        def write(self, data: bytes) -> None:
            reader.feed_data(data)

    write_frame(Sink(), {"t": "msg", "m": "é"})  # type: ignore[arg-type]
    assert await read_frame(reader) == {"t": "msg", "m": "é"}
    reader.feed_data(b"\x00\x00\x00\x02[]")
    with pytest.raises(ChannelError):
        await read_frame(reader)
    reader.feed_eof()
    assert await read_frame(reader) is None
