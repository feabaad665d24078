"""flipback in front of MLflow's scoring server (``mlflow models serve`` of a
scikit-learn model trained at test time): JSON byte for byte, /ping probes, a killed
canary, shadow compare on ``predictions``, keep-alive, a gzip body, 10 MiB bodies.
MLflow's server does not stream, so there is no SSE check here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop import common
from tests.interop.common import MIB, Case, Req, send, upstreams
from tests.interop.servers import (
    MLFLOW,
    ServerProcess,
    mlflow_models,
    mlflow_server,
    start_all,
)

pytestmark = pytest.mark.skipif(MLFLOW.missing() is not None, reason=str(MLFLOW.missing()))


def big(size: int) -> Req:
    """{"inputs": [[5.0, 0.0], [-5.0, 0.0], ...]} filled to ``size`` bytes (whitespace
    pads the last few)."""
    row_a, row_b = b"[5.0, 0.0]", b"[-5.0, 0.0]"
    n = (size - 16) // (len(row_a) + len(row_b) + 4) * 2
    rows = b", ".join(row_a if i % 2 == 0 else row_b for i in range(n))
    body = b'{"inputs": [' + rows + b"]}"
    return Req("/invocations", body + b" " * (size - len(body)))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """stable, canary, spare (a copy of stable), crash: started at once, killed at the end.
    stable answers 1 for x0 > 0, the canary for x0 > 1 (they differ at x0 = 0.5); crash
    raises in predict."""
    work = tmp_path_factory.mktemp("mlflow")
    stable_model, canary_model, crash_model = mlflow_models(work, [0.0, 1.0, "crash"])
    started = [mlflow_server(model, work)
               for model in (stable_model, canary_model, stable_model, crash_model)]
    start_all(started)
    try:
        yield started
    finally:
        for server in started:
            server.kill()


@pytest.fixture(scope="module")
def case(servers: list[ServerProcess]) -> Case:
    return Case(
        stable=servers[0], canary=servers[1], spare=servers[2],
        json_req=Req.json("/invocations", {"inputs": [[5.0, 0.0], [0.5, 0.0], [-5.0, 0.0]]}),
        sse_req=None,
        shadow_agree=Req.json("/invocations", {"inputs": [[5.0, 0.0], [-5.0, 0.0]]}),
        shadow_differ=Req.json("/invocations",
                               {"dataframe_split": {"data": [[0.5, 0.0], [-5.0, 0.0]]}}),
        json_paths=["predictions.0", "predictions.-1"],
        big_req=big,
        ready_path=MLFLOW.ready_path)


async def test_json_byte_for_byte(flipback, tap, case: Case) -> None:
    answer = await common.json_byte_for_byte(flipback, tap, case)
    assert json.loads(answer.body) == {"predictions": [1, 1, 0]}


async def test_health_probes_on_ping(flipback, case: Case) -> None:
    await common.health_on_readiness_path(flipback, case)


async def test_canary_killed_mid_run_flips_with_no_client_errors(flipback, case: Case) -> None:
    figures = await common.canary_killed_mid_run(flipback, case, case.json_req)
    assert figures["route"]["last_event"]["kind"] == "rollback"


async def test_shadow_compare_on_predictions(flipback, case: Case, tmp_path: Path) -> None:
    records = await common.shadow_compare(flipback, case, tmp_path)
    for rec in records:
        assert rec["paths"] == [{"path": "predictions.0", "primary": 1, "shadow": 0}]


async def test_keepalive_reuse(flipback, tap, case: Case) -> None:
    await common.keepalive_reuse(flipback, tap, case)


async def test_gzip_request_body_passes_as_sent(flipback, tap, case: Case) -> None:
    """MLflow's server does not decode Content-Encoding: gzip: it answers 400 (its own
    JSON error about the bytes it could not read), the same through flipback as direct."""
    through, direct = await common.gzip_body(flipback, tap, case)
    assert through.status == 400
    assert json.loads(through.body)["error_code"] == "BAD_REQUEST"
    assert through.body == direct.body


async def test_large_bodies(flipback, tap, case: Case) -> None:
    answer = await common.large_bodies(flipback, tap, case, 10 * MIB)
    predictions = json.loads(answer.body)["predictions"]
    assert len(predictions) > 400_000 and predictions[:4] == [1, 0, 1, 0]


async def test_crashing_canary_answers_400_and_needs_4xx_counted(flipback, servers,
                                                                 case: Case) -> None:
    """MLflow answers a model that raises with 400 BAD_REQUEST (and its stack trace). With
    the default failure_statuses [5xx] and the threshold rules those 400s reach the
    clients and the canary is never judged; the sequential judge (the default) flips it
    on its client-error test after a few of them; with [5xx, 4xx] each one is also
    retried on stable, so clients see none."""
    crash = servers[3]
    route: dict[str, Any] = {"name": "r", "match": {"path_prefix": "/"}, "stable": "stable",
                             "canary": {"upstream": "canary", "weight": 50},
                             "rollback": {"min_requests": 5, "judge": "threshold"}}
    cfg = {"upstreams": upstreams(stable=case.stable.url, canary=crash.url),
           "routes": [route]}
    fb = await flipback(cfg)
    answers = [await send(fb.session, fb.url, case.json_req) for _ in range(30)]
    on_canary = [a for a in answers if a.header("x-flipback-upstream") == "canary"]
    assert on_canary and {a.status for a in on_canary} == {400}
    assert json.loads(on_canary[0].body)["error_code"] == "BAD_REQUEST"
    assert (await fb.route())["state"] == "canary"

    route["rollback"] = {"min_requests": 5}  # the sequential judge, default statuses
    cfg["state"] = {"file": None}  # the next two start afresh, not from a saved latch
    fb = await flipback(cfg)
    answers = [await send(fb.session, fb.url, case.json_req) for _ in range(60)]
    state = await fb.route()
    assert state["state"] == "rolled_back", state
    assert state["latch"]["reason"] == "client_error_rate", state["latch"]
    failed = [a for a in answers if a.status == 400]
    assert 0 < len(failed) < 15, len(failed)  # a few, then none: stable answers the rest
    assert all(a.status == 200 for a in answers[-10:])

    route["rollback"] = {"min_requests": 5, "failure_statuses": ["5xx", "4xx"]}
    fb = await flipback(cfg)
    answers = [await send(fb.session, fb.url, case.json_req) for _ in range(30)]
    assert {a.status for a in answers} == {200}
    assert {a.header("x-flipback-upstream") for a in answers} == {"stable"}
    assert any(a.header("x-flipback-retried-from") == "canary" for a in answers)
    state = await fb.route()
    assert state["state"] == "rolled_back", state
