"""The one admin API of ``run --workers`` (SPEC §8), in the parent. Reads fan out to
every worker's private admin (an ephemeral loopback port) and are merged
(``proxy.workers.merge``); an action goes to one worker, which announces it like any
action, so every worker applies it; ``/reload`` is the parent's own (validated once);
``/feedback`` goes to the worker that served the rated request."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from proxy.admin import admin_token, guarded_app
from proxy.config.preflight import is_loopback, split_listen
from proxy.errors import ProxyError
from proxy.workers import merge

if TYPE_CHECKING:
    from proxy.workers.supervisor import Supervisor, WorkerProc

SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")
SESSION = web.AppKey("session", aiohttp.ClientSession)
FETCH_TIMEOUT = 5.0
JSON = "application/json"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON)


async def _fetch(request: web.Request, slot: WorkerProc, path: str,
                 method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    session = request.app[SESSION]
    headers = {"Content-Type": request.headers.get("Content-Type", JSON)}
    for value in request.headers.getall("Authorization", ()):
        headers["Authorization"] = value
    async with session.request(method, f"http://127.0.0.1:{slot.admin_port}{path}",
                               data=body or None, headers=headers) as resp:
        return resp.status, await resp.read()


async def _gather(request: web.Request, path: str) -> list[tuple[WorkerProc, int, bytes]]:
    """``GET path`` on every ready worker (one that fails to answer is left out)."""
    slots = request.app[SUPERVISOR].ready_workers()
    found = await asyncio.gather(*(_fetch(request, s, path) for s in slots),
                                 return_exceptions=True)
    return [(s, *f) for s, f in zip(slots, found, strict=True)
            if not isinstance(f, BaseException)]


def _unavailable() -> web.Response:
    return _json({"error": "no worker is serving"}, 503)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    answers = await _gather(request, "/readyz")
    first = orjson.loads(answers[0][2]) if answers else {}
    ready = bool(answers) and not sup.draining
    body = {"status": "draining" if sup.draining else ("ready" if ready else "starting"),
            "upstreams": first.get("upstreams", {}),
            "redis": first.get("redis") if sup.config.state.redis else None,
            "workers": {"serving": len(answers), "configured": len(sup.workers)}}
    return _json(body, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    answers = [(s, body.decode()) for s, status, body in await _gather(request, "/metrics")
               if status == 200]
    body = merge.merge_metrics([text for _, text in answers], _parent_families(sup, answers))
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def _parent_families(sup: Supervisor, answers: list[tuple[WorkerProc, str]]) -> list[Metric]:
    return parent_families(
        sup.reloads, serving=len(sup.ready_workers()),
        restarts={slot.index: slot.restarts for slot in sup.workers},
        requests={slot.index: merge.requests_per_worker(text) for slot, text in answers})


def parent_families(reloads: dict[str, int], *, serving: int, restarts: dict[int, int],
                    requests: dict[int, float]) -> list[Metric]:
    """The parent's own metrics: config reloads (counted once, here) and the workers."""
    reloaded = CounterMetricFamily("flipback_config_reloads", "Config reloads by result",
                                   labels=["result"])
    for result, count in reloads.items():
        reloaded.add_metric([result], count)
    workers = GaugeMetricFamily("flipback_workers", "Worker processes serving (run --workers)",
                                value=serving)
    restarted = CounterMetricFamily("flipback_worker_restarts",
                                    "Worker processes started again after they died",
                                    labels=["worker"])
    for index, count in restarts.items():
        restarted.add_metric([str(index)], count)
    served = CounterMetricFamily("flipback_worker_requests",
                                 "Proxied requests by the worker that served them",
                                 labels=["worker"])
    for index, total in requests.items():
        served.add_metric([str(index)], total)
    return [reloaded, workers, restarted, served]


async def list_routes(request: web.Request) -> web.Response:
    answers = await _gather(request, "/routes")
    if not answers:
        return _unavailable()
    routes = merge.merge_routes([orjson.loads(b)["routes"] for _, st, b in answers if st == 200])
    return _json({"routes": routes})


async def get_route(request: web.Request) -> web.Response:
    answers = await _gather(request, f"/routes/{request.match_info['name']}")
    if not answers:
        return _unavailable()
    if answers[0][1] != 200:
        return web.Response(status=answers[0][1], body=answers[0][2], content_type=JSON)
    return _json(merge.merge_route([orjson.loads(b) for _, st, b in answers if st == 200]))


async def events(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return _json({"error": "limit must be a whole number"}, 400)
    if limit < 1:
        return _json({"error": "limit must be 1 or more"}, 400)
    sup = request.app[SUPERVISOR]
    route = request.query.get("route")
    kinds = {k for k in request.query.get("kind", "").split(",") if k}
    parent = [e.as_json() for e in sup.events.recent(len(sup.events), route)
              if not kinds or e.kind in kinds]
    answers = await _gather(request, request.path_qs)
    workers = [orjson.loads(b)["events"] for _, st, b in answers if st == 200]
    return _json({"events": merge.merge_events(parent, workers, limit)})


async def action(request: web.Request) -> web.StreamResponse:
    """An action on a route: taken by the first serving worker, which announces it."""
    slots = request.app[SUPERVISOR].ready_workers()
    if not slots:
        return _unavailable()
    status, body = await _fetch(request, slots[0], request.path, "POST", await request.read())
    return web.Response(status=status, body=body, content_type=JSON)


async def feedback(request: web.Request) -> web.StreamResponse:
    """A rating for an answer: the worker that served the request knows its id; the
    others answer 404 (unknown), so the first other answer is the one."""
    slots = request.app[SUPERVISOR].ready_workers()
    if not slots:
        return _unavailable()
    body = await request.read()
    status, answer = 404, b'{"error": "unknown request id"}'
    for slot in slots:
        status, answer = await _fetch(request, slot, request.path, "POST", body)
        if status != 404:
            break
    return web.Response(status=status, body=answer, content_type=JSON)


async def reload(request: web.Request) -> web.Response:
    result = await request.app[SUPERVISOR].reload_now()
    return _json(result, 200 if result.get("ok") else 400)


async def start_admin(sup: Supervisor) -> tuple[web.AppRunner, int]:
    """Serve the parent's admin API on ``admin.listen``; returns the runner and port."""
    cfg = sup.config
    host, port = split_listen(cfg.admin.listen)
    app = guarded_app(token=admin_token(cfg.admin.token_env), loopback_only=is_loopback(host))
    app[SUPERVISOR] = sup

    async def session_ctx(app: web.Application) -> Any:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", list_routes)
    app.router.add_get("/routes/{name}", get_route)
    app.router.add_get("/events", events)
    app.router.add_post("/routes/{name}/{verb:rollback|promote|weight|resume|kill}", action)
    app.router.add_post("/reload", reload)
    app.router.add_post("/feedback", feedback)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ProxyError(f"cannot listen: {exc.strerror or exc}") from None
    bound = next((a[1] for a in runner.addresses if isinstance(a, tuple)), 0)
    return runner, int(bound)
