"""The admin API (SPEC §8) on its own listener: health, metrics, routes, events, actions."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from proxy.config.preflight import is_loopback
from proxy.metrics import MISMATCH_KINDS, SHADOW_OUTCOMES
from proxy.rollout.machine import Rollout, RolloutConflict
from proxy.rollout.rules import figures_of
from proxy.runtime import Runtime
from proxy.units import Bytes

RUNTIME = web.AppKey("runtime", Runtime)
TOKEN = web.AppKey("token", str)  # "" when no token is set
LOOPBACK_ONLY = web.AppKey("loopback_only", bool)
ReloadFn = Callable[[], Awaitable[dict[str, Any]]]
RELOAD: web.AppKey[ReloadFn] = web.AppKey("reload")

# Reads answer under any Host (probes and Prometheus come by pod IP, dashboards by name);
# every other method is an action and must pass _refusal.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON = "application/json"
REASON_LIMIT: Bytes = 1024
TRUNCATED = "…[truncated]"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_token(token_env: str) -> str:
    return os.environ.get(token_env, "")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _bearer_matches(header: str, token: str) -> bool:
    """Compare as bytes: aiohttp hands over a header that is not UTF-8 with its bytes
    escaped as surrogates, which ``str.encode()`` refuses (a 500 and a traceback)."""
    scheme, _, given = header.encode("utf-8", "surrogateescape").strip().partition(b" ")
    expected = token.encode("utf-8", "surrogateescape")  # os.environ escapes the same way
    return hmac.compare_digest(given.strip(), expected) and scheme.lower() == b"bearer"


def _loopback_authority(authority: str) -> bool:
    """``host[:port]`` (a Host header, an Origin's netloc) names a loopback address."""
    try:
        host = urlsplit("//" + authority).hostname
    except ValueError:  # "[::1" and the like
        return False
    return host is not None and is_loopback(host)


def _own_origin(origin: str, port: int | None) -> bool:
    """``origin`` is this admin's: http, a loopback name, the port the request came in on."""
    try:
        parts = urlsplit(origin)
        return (parts.scheme == "http" and _loopback_authority(parts.netloc)
                and (parts.port or 80) == port)
    except ValueError:  # a port out of range
        return False


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if isinstance(sockname, tuple) else None


def _refusal(request: web.Request) -> web.Response | None:
    """Why an action (any method but a read) is refused, or None.

    A browser can be made to POST here by any page: a form, or ``fetch`` to a name the page
    rebinds to 127.0.0.1. Without a token, the loopback listener is the only protection,
    so the Host must be a loopback name (else 421: DNS rebinding) and an Origin, when
    sent, this admin's own (else 403: a cross-site request). With a token, which no
    browser attaches by itself, the admin may be reached by any name (a gateway behind a
    Kubernetes service). Either way the body must be declared JSON (else 415): a form
    cannot, and ``fetch`` cannot without a CORS preflight, which is never granted.
    """
    token = request.app[TOKEN]
    if token:
        if not any(_bearer_matches(h, token) for h in request.headers.getall("Authorization", ())):
            return _error(401, "unauthorized: a valid 'Authorization: Bearer <token>' is needed")
    elif not request.app[LOOPBACK_ONLY]:
        return _error(401, "unauthorized: no admin token is set and the listener is not loopback")
    else:
        for host in request.headers.getall("Host", ()):
            if not _loopback_authority(host):
                return _error(421, f"misdirected: Host {host!r} is not a loopback name; with no "
                                   "admin token set, actions are taken only at localhost, "
                                   "127.0.0.0/8 or [::1]")
        port = _local_port(request)
        for origin in request.headers.getall("Origin", ()):
            if not _own_origin(origin, port):
                return _error(403, f"forbidden: Origin {origin!r} is not this admin's own "
                                   f"(http://localhost:{port}); cross-site actions are refused")
    if request.content_type.lower() != JSON:
        return _error(415, f"admin actions need 'Content-Type: {JSON}', even with no body")
    return None


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in READ_METHODS:
        return await handler(request)
    refusal = _refusal(request)
    return refusal if refusal is not None else await handler(request)


def cap_reason(reason: str) -> tuple[str, bool]:
    """``reason`` cut to REASON_LIMIT bytes of UTF-8 on a character boundary, marked, and
    whether it was cut: it is kept in the latch, the state file, events, webhooks and logs."""
    raw = reason.encode()
    if len(raw) <= REASON_LIMIT:
        return reason, False
    keep = raw[: REASON_LIMIT - len(TRUNCATED.encode())]
    return keep.decode("utf-8", "ignore") + TRUNCATED, True


def route_view(rollout: Rollout, runtime: Runtime) -> dict[str, Any]:
    """The ROUTE object of SPEC §8."""
    upstreams: dict[str, Any] = {}
    for lane in rollout.lanes.values():
        stats = rollout.window_stats(lane)
        figures = figures_of(stats) if stats is not None else {}
        upstreams[lane.upstream] = {
            "role": lane.role,
            "healthy": runtime.health.healthy(lane.upstream),
            "requests": figures.get("requests", 0),
            "failures": figures.get("failures", 0),
            "error_rate": figures.get("error_rate", 0.0),
            "p50_ms": figures.get("p50_ms"),
            "p99_ms": figures.get("p99_ms"),
            "in_flight": lane.in_flight.value,
            "version": lane.version,
        }
        llm = rollout.llm_figures(lane)
        if llm is not None:  # the route reads LLM answers (llm.telemetry)
            upstreams[lane.upstream]["llm"] = llm
    last = runtime.events.last_for(rollout.name)
    return {
        "name": rollout.name,
        "state": rollout.state,
        "configured_weight": rollout.configured_weight,
        "effective_weight": rollout.effective_weight,
        "upstreams": upstreams,
        "sticky_sessions": rollout.sticky_sessions,
        "last_event": last.as_json() if last is not None else None,
        "latch": rollout.latch.as_dict() if rollout.latch is not None else None,
        "shadow": _shadow_view(rollout, runtime),
        "progressive": _progressive_view(rollout),
        "judge": _judge_view(rollout),
        "guards": {name: {"state": v.state.value, "reason": v.reason, "detail": v.detail,
                          "figures": v.figures}
                   for name, v in rollout.guard_verdicts().items()} or None,
    }


def _judge_view(rollout: Rollout) -> dict[str, Any] | None:
    """The canary's judge: which, its state (passing, failing, inconclusive), one line and
    the figures it decided on (None for a route without a canary or a rollback policy)."""
    verdict = rollout.judge_verdict()
    if verdict is None:
        return None
    return {"kind": rollout.judgement.kind, "state": verdict.state.value,
            "reason": verdict.reason, "detail": verdict.detail, "figures": verdict.figures}


def _progressive_view(rollout: Rollout) -> dict[str, Any] | None:
    """The plan's position, and whether it waits for evidence (a step_stalled event)."""
    prog = rollout.route.progressive
    if prog is None or rollout.step is None:
        return None
    return {"step": rollout.step, "steps": list(prog.steps),
            "interval_s": prog.interval, "stalled": rollout.stalled_at == rollout.step,
            "min_requests": rollout.route.rollback.min_requests}


def _shadow_view(rollout: Rollout, runtime: Runtime) -> dict[str, Any] | None:
    """The route's shadow: where copies go and their counts since the process started
    (the figures of ``flipback_shadow_total`` and ``flipback_shadow_mismatch_total``);
    ``compared`` and ``mismatches`` are None when the shadow is not compared."""
    mirror = rollout.shadow
    if mirror is None:
        return None
    cfg = mirror.cfg
    compares = cfg.compare is not None
    stats = runtime.metrics.shadow(rollout.name, compares=compares)
    totals = stats.totals()
    return {
        "upstream": mirror.upstream,
        "version": mirror.pool.cfg.version,
        "healthy": runtime.health.healthy(mirror.upstream),
        "sample": cfg.sample,
        "by": cfg.by,
        "in_flight": mirror.in_flight,
        "copies": dict(zip(SHADOW_OUTCOMES, stats.outcomes, strict=True)),
        "compared": sum(stats.delta.counts) if compares else None,
        "mismatches": dict(zip(MISMATCH_KINDS, totals, strict=False)) if compares else None,
        # requests with any mismatch (status and body together count once)
        "mismatched": totals[-1] if compares else None,
    }


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _rollout(request: web.Request) -> Rollout:
    name = request.match_info["name"]
    rollout = request.app[RUNTIME].rollout(name)
    if rollout is None:
        raise _BadRequest(404, f"unknown route {name!r}")
    return rollout


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _BadRequest(400, "body must be a JSON object")
    return data


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    body = {
        "status": "draining" if runtime.draining else "ready",
        "upstreams": {name: {"healthy": runtime.health.healthy(name)}
                      for name in runtime.snapshot.pools},
        "redis": runtime.fleet.readiness() if runtime.fleet is not None else None,
    }
    return _json(body, 503 if runtime.draining else 200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def list_routes(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return _json({"routes": [route_view(r, runtime) for r in runtime.snapshot.rollouts.values()]})


async def get_route(request: web.Request) -> web.Response:
    try:
        return _json(route_view(_rollout(request), request.app[RUNTIME]))
    except _BadRequest as exc:
        return _error(exc.status, str(exc))


async def events(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return _error(400, "limit must be a whole number")
    if limit < 1:
        return _error(400, "limit must be 1 or more")
    runtime = request.app[RUNTIME]
    route = request.query.get("route")
    kinds = {k for k in request.query.get("kind", "").split(",") if k}
    if not kinds:
        found = runtime.events.recent(limit, route)
    else:  # ?kind=reload,reload_refused: the newest of those kinds, however old
        found = [e for e in runtime.events.recent(len(runtime.events), route)
                 if e.kind in kinds][:limit]
    return _json({"events": [e.as_json() for e in found]})


Action = Callable[[Rollout, dict[str, Any]], dict[str, Any] | None]


def _action(apply: Action) -> Handler:
    """A POST on one route: ``apply`` it, answer the new ROUTE (plus what ``apply`` adds)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            rollout = _rollout(request)
            extra = apply(rollout, await _body(request))
        except (RolloutConflict, _BadRequest) as exc:
            return _error(exc.status, str(exc))
        return _json(route_view(rollout, request.app[RUNTIME]) | (extra or {}))

    return handler


def _do_rollback(rollout: Rollout, data: dict[str, Any]) -> dict[str, Any]:
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise RolloutConflict("reason must be a string", status=400)
    truncated = False
    if reason is not None:
        reason, truncated = cap_reason(reason)
    rollout.rollback(reason)
    return {"reason_truncated": truncated}


def _do_weight(rollout: Rollout, data: dict[str, Any]) -> None:
    weight = data.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise RolloutConflict("body must be {\"weight\": 0-100}", status=400)
    rollout.set_weight(float(weight))


def _do_kill(rollout: Rollout, data: dict[str, Any]) -> None:
    enabled = data.get("enabled")
    if not isinstance(enabled, bool):
        raise RolloutConflict("body must be {\"enabled\": true|false}", status=400)
    rollout.kill(enabled)


async def feedback(request: web.Request) -> web.Response:
    """A rating or label for an answer, by its request id (the guard.feedback guard)."""
    status, answer = request.app[RUNTIME].feedback(await request.read())
    return _json(answer, status)


async def reload(request: web.Request) -> web.Response:
    if RELOAD not in request.app:
        return _error(503, "reload is not available")
    result = await request.app[RELOAD]()
    return _json(result, 200 if result.get("ok") else 400)


def guarded_app(*, token: str, loopback_only: bool) -> web.Application:
    """An admin application whose actions pass ``_refusal`` (also the parent's of
    ``run --workers``)."""
    app = web.Application(middlewares=[_guard])
    app[TOKEN] = token
    app[LOOPBACK_ONLY] = loopback_only
    return app


def create_admin_app(runtime: Runtime, *, token: str, loopback_only: bool) -> web.Application:
    app = guarded_app(token=token, loopback_only=loopback_only)
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", list_routes)
    app.router.add_get("/routes/{name}", get_route)
    app.router.add_get("/events", events)
    app.router.add_post("/routes/{name}/rollback", _action(_do_rollback))
    app.router.add_post("/routes/{name}/promote", _action(lambda r, d: r.promote()))
    app.router.add_post("/routes/{name}/weight", _action(_do_weight))
    app.router.add_post("/routes/{name}/resume", _action(lambda r, d: r.resume()))
    app.router.add_post("/routes/{name}/kill", _action(_do_kill))
    app.router.add_post("/reload", reload)
    app.router.add_post("/feedback", feedback)
    return app
