"""Quality guards end to end (issue 17): real upstreams answering 200 OK, some wrongly,
behind a real flipback; output drift and feedback trip the route, a healthy canary is
left alone, and feedback is taken on the data listener and the admin API."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tests.conftest import make_config
from tests.fakes import Behaviour
from tests.waiting import wait_until

ROUTE = """
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: predict
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 20}}
    rollback: {{judge: threshold}}
    guard: {guard}
"""


def predictions(*labels: str) -> list[bytes]:
    return [orjson.dumps({"predictions": [label]}) for label in labels]


BALANCED = predictions("benign", "malignant")
BROKEN = predictions(*(["malignant"] * 9 + ["benign"]))  # one class for 90% of inputs


async def post_many(fb: Any, n: int, concurrency: int = 8) -> list[tuple[int, str, str]]:
    """``n`` requests; (status, upstream, request id) of each."""
    out: list[tuple[int, str, str]] = []

    async def client(count: int) -> None:
        for _ in range(count):
            async with fb.session.post(fb.url + "/invocations", data=b"{}") as resp:
                await resp.read()
                out.append((resp.status, resp.headers.get("x-flipback-upstream", "-"),
                            resp.headers.get("x-request-id", "")))

    await asyncio.gather(*(client(n // concurrency + (i < n % concurrency))
                           for i in range(concurrency)))
    return out


async def test_output_drift_flips_a_broken_classifier_within_100_canary_answers(
        model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(bodies=BALANCED)
    v2.behaviour = Behaviour(bodies=BROKEN)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        guard='{output: {json_path: "predictions.0"}}')
    rollout = fb.runtime.rollout("predict")

    async def flipped() -> bool:
        await post_many(fb, 40)
        return rollout.latch is not None

    await wait_until(flipped, timeout=30, what="an output_drift trip")
    assert rollout.latch.reason == "output_drift", rollout.latch
    assert v2.count <= 100 + 8, v2.count  # canary answers before the flip (+ in flight)
    route = await fb.get_json("/routes/predict")
    assert route["guards"]["output_drift"]["state"] == "failing"


async def test_a_healthy_canary_with_the_same_answers_is_not_flipped(model, flipback):
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(bodies=BALANCED)
    v2.behaviour = Behaviour(bodies=BALANCED)
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url,
                        guard='{output: {json_path: "predictions.0"}}')
    await post_many(fb, 2000)
    assert fb.runtime.rollout("predict").latch is None
    assert v2.count > 300
    route = await fb.get_json("/routes/predict")
    assert route["guards"]["output_drift"]["state"] in ("passing", "inconclusive")
    from proxy.cli.status_table import render_status
    assert "guards: output_drift " in render_status([route], width=200)
    assert "JS divergence" in render_status([route], width=200)
    async with fb.session.get(fb.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'flipback_guard_state{guard="output_drift",route="predict",state="failing"} 0.0' \
        in text


async def test_feedback_posted_after_the_answers_trips_on_accuracy(model, flipback):
    """Labels arrive later, by request id, on the data listener: the canary is right a
    third of the time, stable always; min_accuracy 0.85 flips it. Each body gets its
    status: unknown 404, malformed 400, repeated 409."""
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(bodies=predictions("benign"))
    v2.behaviour = Behaviour(bodies=predictions("benign", "malignant", "malignant"))
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, guard=(
        '{feedback: {json_path: "predictions.0", min_accuracy: 0.85}}'))
    answers = await post_many(fb, 300)
    assert all(status == 200 for status, _, _ in answers)

    async def post(body: Any, where: str) -> int:
        async with fb.session.post(where + "/feedback", json=body) as resp:
            await resp.read()
            return resp.status

    assert await post({"request_id": "no-such-id", "label": "benign"}, fb.url) == 404
    assert await post({"request_id": answers[0][2]}, fb.url) == 400
    first = answers[0][2]
    assert await post({"request_id": first, "label": "benign"}, fb.url) == 202
    assert await post({"request_id": first, "label": "benign"}, fb.admin) == 409
    for _, _, rid in answers[1:]:
        await post({"request_id": rid, "label": "benign"}, fb.url)  # the truth: benign
        if fb.runtime.rollout("predict").latch is not None:
            break
    latch = fb.runtime.rollout("predict").latch
    assert latch is not None and latch.reason == "feedback", latch


COMPARE = ('{compare: {sample: 100, json_paths: ["predictions.0"], max_disagreement: 10, '
           'noise_floor: true}}')


async def test_paired_disagreement_trips_a_canary_that_differs_in_half_the_pairs(
        model, flipback):
    """Canary answers also sent to stable (detached copies): half of them disagree, so
    the route flips; clients never wait for the copies."""
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(bodies=predictions("benign"))
    v2.behaviour = Behaviour(bodies=predictions("benign", "malignant"))
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, guard=COMPARE)
    rollout = fb.runtime.rollout("predict")

    async def flipped() -> bool:
        await post_many(fb, 40)
        return rollout.latch is not None

    await wait_until(flipped, timeout=30, what="a disagreement trip")
    assert rollout.latch.reason == "disagreement", rollout.latch
    pairs = [s for s in v1.seen if s.headers.get("x-flipback-shadow") == "1"]
    assert pairs, "no paired copy reached stable"


async def test_a_canary_that_differs_only_as_much_as_stable_itself_does_not_trip(
        model, flipback):
    """An LLM-like route: both versions answer one of two labels at random, so stable
    disagrees with itself as often as with the canary; the noise floor absorbs it."""
    v1, v2 = await model("v1"), await model("v2")
    # Deterministic cycles of different lengths: pairs disagree ~half the time on both
    # kinds (canary vs stable copy, stable vs stable copy).
    v1.behaviour = Behaviour(bodies=predictions("a", "b", "b"))
    v2.behaviour = Behaviour(bodies=predictions("a", "b", "a", "b", "b"))
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, guard=COMPARE)
    await post_many(fb, 1200)
    await asyncio.sleep(0.2)  # not a wait: the last copies come back
    assert fb.runtime.rollout("predict").latch is None
    route = await fb.get_json("/routes/predict")
    figures = route["guards"]["disagreement"]["figures"]
    # both kinds of pairs were judged, and disagree alike (about half the time)
    assert figures["pairs"] > 100 and figures["noise_pairs"] > 100, figures
    assert figures["rate"] > 30 and figures["noise_rate"] > 30, figures


async def test_a_guard_trip_survives_reload_and_restart_like_any_latch(
        model, flipback, tmp_path):
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(bodies=BALANCED)
    v2.behaviour = Behaviour(bodies=BROKEN)
    guard = '{output: {json_path: "predictions.0"}}'
    fb = await flipback(ROUTE, v1=v1.url, v2=v2.url, guard=guard)

    async def flipped() -> bool:
        await post_many(fb, 40)
        return fb.runtime.rollout("predict").latch is not None

    await wait_until(flipped, timeout=30, what="an output_drift trip")
    # a reload (a weight change: the same rollout) keeps the latch and the guard
    drift = fb.runtime.rollout("predict").guards.drift
    fb.runtime.apply(make_config(ROUTE.replace("weight: 20", "weight: 30"), tmp_path,
                                 v1=v1.url, v2=v2.url, guard=guard))
    reloaded = fb.runtime.rollout("predict")
    assert reloaded.latch.reason == "output_drift" and reloaded.guards.drift is drift
    state = tmp_path / "state.json"
    await wait_until(lambda: state.exists() and b"output_drift" in state.read_bytes(),
                     what="the latch in the state file")
    again = await flipback(ROUTE, v1=v1.url, v2=v2.url, guard=guard)  # a restart
    route = await again.get_json("/routes/predict")
    assert route["state"] == "rolled_back" and route["latch"]["reason"] == "output_drift"


async def test_progressive_steps_wait_while_a_guard_is_inconclusive(model, flipback):
    """The threshold judge would step at once; output drift has not seen enough answers
    to clear the canary, so the plan holds and says which guard it waits for."""
    v1, v2 = await model("v1"), await model("v2")
    v1.behaviour = Behaviour(bodies=BALANCED)
    v2.behaviour = Behaviour(bodies=BALANCED)
    text = ROUTE.replace("rollback: {{judge: threshold}}",
                         "rollback: {{judge: threshold, min_requests: 5}}\n"
                         "    progressive: {{steps: [20, 50, 100], interval: 200ms}}")
    fb = await flipback(text, v1=v1.url, v2=v2.url,
                        guard='{output: {json_path: "predictions.0"}}')
    await post_many(fb, 100)
    rollout = fb.runtime.rollout("predict")
    await wait_until(lambda: rollout.stalled_at == 0, what="a held step")
    assert rollout.step == 0
    event = next(e for e in fb.runtime.events.recent(20) if e.kind == "step_stalled")
    assert "output_drift" in event.reason
