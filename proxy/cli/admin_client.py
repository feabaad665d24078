"""Client side of the admin API (SPEC §8): one admin endpoint, every call raising
:class:`AdminError` as one printable line. Used by the CLI verbs, ``flipback status`` and
the demo."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import ProxyError
from proxy.units import Percent, Seconds

TIMEOUT: Seconds = 5.0
TOKEN_ENV = "FLIPBACK_ADMIN_TOKEN"

Key = tuple[str, str]  # (route, upstream)


def request_counts_in(families: Iterable[Metric]) -> dict[Key, float]:
    """``flipback_requests_total`` summed per (route, upstream); ValueError on bad text."""
    counts: dict[Key, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "flipback_requests_total":
                key = (sample.labels.get("route", ""), sample.labels.get("upstream", ""))
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


class AdminError(ProxyError):
    """A failed admin call, as one printable line; ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def exit_code(self) -> int:
        """2 when the admin refused the request as bad input (4xx), else 1."""
        return 2 if self.status is not None and 400 <= self.status < 500 else 1


class AdminClient:
    """One admin endpoint: ``async with AdminClient(url, token) as admin: await admin.routes()``.

    Every method raises :class:`AdminError`; the POSTs return the updated ROUTE.
    """

    def __init__(self, base_url: str, token: str | None = None, *,
                 timeout: Seconds = TIMEOUT) -> None:
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def routes(self) -> list[dict[str, Any]]:
        return _list(await self._json("GET", "/routes"), "routes")

    async def route(self, name: str) -> dict[str, Any]:
        return await self._json("GET", _route_path(name))

    async def events(self, limit: int = 20, route: str | None = None,
                     kinds: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Newest first, optionally of one route only, or only of some ``kinds`` (the
        newest of those however old; filtered here too, should the admin not know how)."""
        wanted = frozenset(kinds)
        params = ({"limit": str(limit)} | ({"route": route} if route else {})
                  | ({"kind": ",".join(sorted(wanted))} if wanted else {}))
        found = _list(await self._json("GET", "/events", params=params), "events")
        return [e for e in found if e.get("kind") in wanted] if wanted else found

    async def readyz(self) -> dict[str, Any]:
        """The readiness body; a 503 (draining) is an answer, not an error."""
        return await self._json("GET", "/readyz", accept=(200, 503))

    async def rollback(self, route: str, reason: str | None = None) -> dict[str, Any]:
        body = {} if reason is None else {"reason": reason}
        return await self._json("POST", _route_path(route, "rollback"), body=body)

    async def promote(self, route: str) -> dict[str, Any]:
        return await self._json("POST", _route_path(route, "promote"), body={})

    async def weight(self, route: str, pct: Percent) -> dict[str, Any]:
        return await self._json("POST", _route_path(route, "weight"), body={"weight": pct})

    async def resume(self, route: str) -> dict[str, Any]:
        return await self._json("POST", _route_path(route, "resume"), body={})

    async def kill(self, route: str, enabled: bool) -> dict[str, Any]:
        return await self._json("POST", _route_path(route, "kill"), body={"enabled": enabled})

    async def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        status, reason, raw = await self._fetch("GET", "/metrics")
        if status != 200:
            raise AdminError(f"GET /metrics: HTTP {status} {reason}".rstrip(), status)
        return raw.decode("utf-8", "replace")

    async def request_counts(self) -> dict[Key, float]:
        """``flipback_requests_total`` summed per (route, upstream), from ``GET /metrics``."""
        text = await self.metrics()
        try:
            return request_counts_in(text_string_to_metric_families(text))
        except ValueError as exc:
            raise AdminError(f"GET /metrics: unreadable: {exc}") from None

    async def _json(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                    params: dict[str, str] | None = None,
                    accept: tuple[int, ...] = (200,)) -> dict[str, Any]:
        status, reason, raw = await self._fetch(method, path, body=body, params=params)
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        if status in accept and isinstance(data, dict):
            return data
        if status == 401:
            hint = f"{TOKEN_ENV} was rejected" if self._token else f"set {TOKEN_ENV}"
            raise AdminError(f"unauthorized: {hint}", status)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            raise AdminError(data["error"], status)
        if status in accept:
            raise AdminError(f"{method} {path}: answer is not a JSON object", status)
        text = " ".join(raw.decode("utf-8", "replace").split())[:120]
        raise AdminError(f"HTTP {status} {reason}" + (f": {text}" if text else ""), status)

    async def _fetch(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                     params: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout, connect=self._timeout / 2)
            self._session = aiohttp.ClientSession(timeout=timeout)
        headers = {"Accept": "application/json"}
        if method != "GET" and body is None:
            body = {}  # the admin takes actions only with a JSON body (its CSRF guard)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        unreachable = f"cannot reach flipback admin at {self.base_url}"
        try:
            async with self._session.request(method, self.base_url + path, json=body,
                                             params=params, headers=headers) as resp:
                return resp.status, resp.reason or "", await resp.read()
        except aiohttp.ClientConnectorError as exc:
            err = exc.os_error
            why = "connection refused" if err.errno == errno.ECONNREFUSED else err.strerror or exc
            raise AdminError(f"{unreachable}: {why}") from None
        except TimeoutError:
            raise AdminError(f"{unreachable}: no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise AdminError(f"{unreachable}: {exc or type(exc).__name__}") from None


def _route_path(name: str, action: str = "") -> str:
    return "/routes/" + quote(name, safe="") + (f"/{action}" if action else "")


def _list(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    if isinstance(value := data.get(key), list):
        return value
    raise AdminError(f"unexpected answer from flipback admin: no {key!r} list")
