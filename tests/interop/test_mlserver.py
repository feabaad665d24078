"""flipback in front of Seldon's MLServer (V2 inference protocol, ``mlserver_sklearn``
serving a scikit-learn model trained at test time): JSON and SSE (``infer_stream``) byte
for byte, /v2/health/ready probes, a killed canary, shadow compare on
``outputs.0.data``, keep-alive, a gzip body (MLServer decodes it), 10 MiB bodies (and
MLServer's gzip-compressed answer passing through compressed)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.interop import common
from tests.interop.common import MIB, Answer, Case, Req
from tests.interop.servers import MLSERVER, mlserver_models, mlserver_server, start_all

pytestmark = pytest.mark.skipif(MLSERVER.missing() is not None,
                                reason=str(MLSERVER.missing()))

INFER = "/v2/models/clf/infer"
STREAM = "/v2/models/clf/infer_stream"


def v2(rows: list[list[float]], request_id: str = "interop") -> dict[str, Any]:
    return {"id": request_id, "inputs": [{"name": "x", "shape": [len(rows), 2],
                                          "datatype": "FP64",
                                          "data": [v for row in rows for v in row]}]}


def big(size: int) -> Req:
    """A V2 request of [5, 0], [-5, 0], ... rows filled to ``size`` bytes."""
    head = b'{"id": "big", "inputs": [{"name": "x", "datatype": "FP64", "shape": [%d, 2], '
    pair = b"5.0, 0.0, -5.0, 0.0"
    n = (size - 120) // (len(pair) + 2)
    body = (head % (2 * n) + b'"data": [' + b", ".join([pair] * n) + b"]}]}")
    return Req(INFER, body + b" " * (size - len(body)))


def decoded(answer: Answer) -> Any:
    body = answer.body
    if answer.header("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return json.loads(body)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    work = tmp_path_factory.mktemp("mlserver")
    # stable answers 1 above x0 > 0, the canary above x0 > 1: they differ at x0 = 0.5;
    # the spare serves stable's model from a repository of its own
    repos = mlserver_models(work, [0.0, 1.0, 0.0], "clf")
    servers = [mlserver_server(repo, work) for repo in repos]
    start_all(servers)
    try:
        yield Case(
            stable=servers[0], canary=servers[1], spare=servers[2],
            json_req=Req.json(INFER, v2([[5.0, 0.0], [0.5, 0.0], [-5.0, 0.0]])),
            sse_req=Req.json(STREAM, v2([[5.0, 0.0], [0.5, 0.0], [-5.0, 0.0]])),
            shadow_agree=Req.json(INFER, v2([[5.0, 0.0], [-5.0, 0.0]])),
            shadow_differ=Req.json(STREAM, v2([[0.5, 0.0], [-5.0, 0.0]])),
            json_paths=["outputs.0.data.0", "outputs.0.data.-1", "model_name"],
            big_req=big,
            ready_path=MLSERVER.ready_path)
    finally:
        for server in servers:
            server.kill()


async def test_json_byte_for_byte(flipback, tap, case: Case) -> None:
    answer = await common.json_byte_for_byte(flipback, tap, case)
    assert decoded(answer)["outputs"][0]["data"] == [1, 1, 0]
    assert answer.header("ce-requestid") == "interop"


async def test_sse_byte_for_byte(flipback, tap, case: Case) -> None:
    answer, _ = await common.sse_byte_for_byte(flipback, tap, case)
    events = [line for line in answer.body.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == 1
    assert json.loads(events[0][6:])["outputs"][0]["data"] == [1, 1, 0]


async def test_health_probes_on_v2_health_ready(flipback, case: Case) -> None:
    await common.health_on_readiness_path(flipback, case)


async def test_canary_killed_mid_run_flips_with_no_client_errors(flipback, case: Case) -> None:
    figures = await common.canary_killed_mid_run(flipback, case, case.json_req)
    assert figures["route"]["last_event"]["kind"] == "rollback"


async def test_shadow_compare_on_outputs(flipback, case: Case, tmp_path: Path) -> None:
    """The differing request is an SSE stream (infer_stream): folded, then compared."""
    records = await common.shadow_compare(flipback, case, tmp_path)
    for rec in records:
        assert rec["paths"] == [{"path": "outputs.0.data.0", "primary": 1, "shadow": 0}]


async def test_keepalive_reuse(flipback, tap, case: Case) -> None:
    await common.keepalive_reuse(flipback, tap, case)


async def test_connection_closed_idle_by_the_server(flipback, tap, case: Case) -> None:
    await common.server_closed_idle_connection(flipback, tap, case)


async def test_gzip_request_body_is_decoded_by_mlserver(flipback, tap, case: Case) -> None:
    through, direct = await common.gzip_body(flipback, tap, case)
    assert through.status == 200
    assert decoded(through)["outputs"][0]["data"] == [1, 1, 0]
    assert through.body == direct.body


async def test_large_bodies(flipback, tap, case: Case) -> None:
    answer = await common.large_bodies(flipback, tap, case, 10 * MIB)
    assert answer.header("content-encoding") == "gzip"  # MLServer compresses big answers
    data = decoded(answer)["outputs"][0]["data"]
    assert len(data) > 400_000 and data[:4] == [1, 0, 1, 0]


@pytest.mark.parametrize("accept", [
    "identity",
    "gzip, deflate",  # compressed answers are decoded for the comparison
])
async def test_shadow_compare_on_big_answers(flipback, case: Case, tmp_path: Path,
                                             accept: str) -> None:
    """MLServer gzips answers of 500 bytes and more when the client accepts gzip (as
    aiohttp, httpx and requests do by default); the shadow copy carries the same
    Accept-Encoding. The comparison must read the JSON inside the compressed bytes."""
    rows = [[5.0, 0.0]] * 200
    differ = Req.json(INFER, v2([[0.5, 0.0], *rows]))
    agree = Req.json(INFER, v2([[5.0, 0.0], *rows]))
    for req in (differ, agree):
        req.headers["Accept-Encoding"] = accept
    big = replace(case, shadow_agree=agree, shadow_differ=differ,
                  json_paths=["outputs.0.data.0", "outputs.0.data.-1"])
    records = await common.shadow_compare(flipback, big, tmp_path)
    for rec in records:
        assert rec["paths"] == [{"path": "outputs.0.data.0", "primary": 1, "shadow": 0}]
