"""Client side of the admin API (SPEC §8): the CLI verbs and the ``flipback status`` table.

Per upstream req/s comes from two successive scrapes of the monotonic counter
``flipback_requests_total`` (``GET /metrics``), not from ROUTE's ``requests``: that is a
sliding-window count, which stays flat under steady load, so its difference is not a rate.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import shutil
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import ProxyError
from proxy.units import Percent, Seconds

TIMEOUT: Seconds = 5.0
TOKEN_ENV = "FLIPBACK_ADMIN_TOKEN"
VERBS = ("rollback", "promote", "weight", "resume", "kill")
HEADERS = ["ROUTE", "STATE", "WEIGHT", "UPSTREAM", "ROLE", "HEALTHY", "REQ/S", "ERR%", "P50ms",
           "P99ms", "INFL"]
RIGHT_ALIGNED = frozenset(range(6, 11))
SHRINKABLE = (0, 3)  # route and upstream names give way first on a narrow terminal
MIN_NAME = 5
ROLE_ORDER = {"stable": 0, "canary": 1, "fallback": 2, "shadow": 3}
STATE_COLORS = dict(rolled_back="31", killed="31", waiting="33", canary="32", promoted="32")
HEALTHY: dict[object, str] = {True: "yes", False: "no"}
SWITCH = {"on": True, "true": True, "off": False, "false": False}
CLEAR, HOME, CLEAR_EOL, CLEAR_BELOW = "\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J"

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


VerbCall = Callable[["AdminClient"], Awaitable[dict[str, Any]]]


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

    async def events(self, limit: int = 20, route: str | None = None) -> list[dict[str, Any]]:
        """Newest first, optionally of one route only."""
        params = {"limit": str(limit)} | ({"route": route} if route else {})
        return _list(await self._json("GET", "/events", params=params), "events")

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


def compute_rates(before: Mapping[Key, float], after: Mapping[Key, float],
                  elapsed: Seconds) -> dict[Key, float]:
    """req/s per key between two counter snapshots. A key new in ``after`` counts from 0
    (flipback exports no zero series); one that went down (restart) is left out."""
    return {k: (v - before.get(k, 0.0)) / elapsed for k, v in after.items()
            if elapsed > 0 and v >= before.get(k, 0.0)}


def render_status(routes: Sequence[Mapping[str, Any]], rates: Mapping[Key, float] | None = None,
                  width: int = 100, *, color: bool = False,
                  now: datetime.datetime | None = None) -> str:
    """The ``flipback status`` table: one row per route and upstream, then the route's last
    event. ``rates`` maps (route, upstream) to req/s (None, on the first frame: "-"; a
    missing key: 0). Error % is failures / requests of the current window."""
    if not routes:
        return "no routes\n"
    now = now or datetime.datetime.now(datetime.UTC)
    blocks: list[tuple[list[list[str]], str]] = []
    for route in routes:
        name = str(route.get("name", "?"))
        head = [name, str(route.get("state", "?")), _weight(route)]
        upstreams: Mapping[str, Mapping[str, Any]] = route.get("upstreams") or {}
        rows: list[list[str]] = []
        for up_name, up in sorted(upstreams.items(), key=_role_order):
            rate = None if rates is None else rates.get((name, up_name), 0.0)
            rows.append([*head, up_name, str(up.get("role", "-")),
                         HEALTHY.get(up.get("healthy"), "-"), _number(rate), _error_pct(up),
                         _number(up.get("p50_ms")), _number(up.get("p99_ms")),
                         str(up.get("in_flight", "-"))])
            head = ["", "", ""]
        if not rows:
            rows.append([*head, *["-"] * 8])
        blocks.append((rows, "  last: " + _event(route.get("last_event"), now)))
    widths = [max(len(h), *(len(row[i]) for rows, _ in blocks for row in rows))
              for i, h in enumerate(HEADERS)]
    # Too wide: single-space columns first, then shorten the longest of the name columns.
    sep = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1
    excess = sum(widths) + sep * (len(widths) - 1) - width
    while excess > 0 and max(widths[i] for i in SHRINKABLE) > MIN_NAME:
        widths[max(SHRINKABLE, key=lambda i: widths[i])] -= 1
        excess -= 1
    lines = [_row(HEADERS, widths, width, sep, color=False)]
    for rows, event in blocks:
        lines += [_row(row, widths, width, sep, color) for row in rows]
        lines.append(_clip(event, width))
    return "\n".join(lines) + "\n"


def _row(cells: list[str], widths: list[int], width: int, sep: int, color: bool) -> str:
    parts = [_clip(c, w).rjust(w) if i in RIGHT_ALIGNED else _clip(c, w).ljust(w)
             for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
    line = (" " * sep).join(parts).rstrip()[:width]
    code = STATE_COLORS.get(cells[1]) if color else None
    start = widths[0] + sep
    end = start + len(cells[1])
    if code and len(line) >= end:  # colour after fitting, so escapes never count as columns
        line = f"{line[:start]}\x1b[{code}m{line[start:end]}\x1b[0m{line[end:]}"
    return line


def _role_order(item: tuple[str, Mapping[str, Any]]) -> tuple[int, str]:
    return ROLE_ORDER.get(str(item[1].get("role")), len(ROLE_ORDER)), item[0]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _pct(value: Any) -> str:
    return f"{round(float(value), 2):g}%"


def _weight(route: Mapping[str, Any]) -> str:
    effective, configured = route.get("effective_weight"), route.get("configured_weight")
    if effective is None:
        return "-"
    if configured is None or configured == effective:
        return _pct(effective)
    return f"{_pct(effective)} (cfg {_pct(configured)})"


def _number(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _error_pct(up: Mapping[str, Any]) -> str:
    requests, failures = up.get("requests"), up.get("failures")
    if isinstance(requests, int | float) and isinstance(failures, int | float) and requests > 0:
        return f"{100 * failures / requests:.1f}"
    return "-"


def _event(event: Any, now: datetime.datetime) -> str:
    if not isinstance(event, Mapping):
        return "no events"
    text = f"{event.get('kind', '?')} by {event.get('actor', '?')}, {_age(event.get('time'), now)}"
    return text + (f": {event['reason']}" if event.get("reason") else "")


def _age(stamp: Any, now: datetime.datetime) -> str:
    try:
        when = datetime.datetime.fromisoformat(str(stamp))
        secs = max(int((now - when).total_seconds()), 0)
    except (ValueError, TypeError):  # unparsable, or naive vs aware
        return f"at {stamp}"
    hours, minutes, seconds = secs // 3600, secs % 3600 // 60, secs % 60
    if hours:
        return f"{hours}h{minutes:02d}m ago"
    return f"{minutes}m{seconds:02d}s ago" if minutes else f"{seconds}s ago"


async def status(base_url: str, token: str | None, watch: bool, interval: Seconds = 1.0,
                 out: TextIO | None = None, max_frames: int | None = None) -> int:
    """``flipback status [--watch]``: print the table once, or redraw it every ``interval``
    (in place on a TTY, else frames separated by a blank line) until Ctrl-C or ``max_frames``.
    Returns 0, or the exit code of a failed first fetch; later failures show in the frame.
    Ctrl-C under ``asyncio.run`` surfaces from ``asyncio.run`` itself: the CLI catches it."""
    out = out or sys.stdout
    tty = out.isatty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 100
    loop = asyncio.get_running_loop()
    last: tuple[float, dict[Key, float]] | None = None
    frames = 0
    async with AdminClient(base_url, token) as client:
        try:
            while True:
                try:
                    routes = await client.routes()
                except AdminError as exc:
                    if frames == 0:
                        print(f"flipback status: {exc}", file=sys.stderr)
                        return exc.exit_code
                    text = f"{exc} (retrying every {interval:g}s)\n"
                else:
                    rates = None
                    try:
                        counts = await client.request_counts()
                    except AdminError:
                        counts = None  # rates are a bonus: the table stands without them
                    if counts is not None:
                        if last is not None:
                            rates = compute_rates(last[1], counts, loop.time() - last[0])
                        last = (loop.time(), counts)
                    text = render_status(routes, rates, width, color=tty)
                if watch:
                    clock = datetime.datetime.now().strftime("%H:%M:%S")
                    text = f"flipback status  {client.base_url}  {clock}\n\n{text}"
                if watch and tty:  # home, rewrite each line, clear what the last frame left
                    lines = "".join(line + CLEAR_EOL + "\n" for line in text.splitlines())
                    text = (CLEAR if frames == 0 else "") + HOME + lines + CLEAR_BELOW
                elif frames:
                    text = "\n" + text
                out.write(text)
                out.flush()
                frames += 1
                if not watch or (max_frames is not None and frames >= max_frames):
                    return 0
                await asyncio.sleep(interval)
        except KeyboardInterrupt:
            return 0


async def run_verb(base_url: str, token: str | None, verb: str, route: str,
                   arg: str | float | bool | None = None, *, out: TextIO | None = None) -> int:
    """Run one of VERBS (``arg``: rollback's reason, weight's percent, kill's on/off) and
    print the route's new state in one line. Returns 0; on failure prints one line to
    stderr and returns 2 for bad input (4xx, unparsable ``arg``) or 1 (unreachable, 5xx)."""
    out = out or sys.stdout
    try:
        call = _verb_call(verb, route, arg)
    except ValueError as exc:
        print(f"flipback {verb}: {exc}", file=sys.stderr)
        return 2
    try:
        async with AdminClient(base_url, token) as client:
            result = await call(client)
            truncated = result.get("reason_truncated") is True
            if "state" not in result:  # tolerate an admin that answers {"ok": true}
                result = await client.route(route)
    except AdminError as exc:
        print(f"flipback {verb}: {exc}", file=sys.stderr)
        return exc.exit_code
    print(describe(result), file=out)
    if truncated:
        print(f"flipback {verb}: the reason was too long and was cut to 1 KiB", file=sys.stderr)
    return 0


def describe(route: Mapping[str, Any]) -> str:
    """One line for a ROUTE: ``chat: rolled_back, weight 0% (cfg 25%) (admin: bad answers)``."""
    line = f"{route.get('name', '?')}: {route.get('state', '?')}, weight {_weight(route)}"
    event = route.get("last_event")
    if isinstance(event, Mapping) and event.get("reason"):
        line += f" ({event.get('actor', '?')}: {event['reason']})"
    return line


def _verb_call(verb: str, route: str, arg: str | float | bool | None) -> VerbCall:
    """The admin call for a verb, with ``arg`` checked first (ValueError: bad input)."""
    if verb == "rollback":
        reason = None if arg is None else str(arg)
        return lambda client: client.rollback(route, reason)
    if verb == "promote":
        return lambda client: client.promote(route)
    if verb == "resume":
        return lambda client: client.resume(route)
    if verb == "weight":
        try:
            pct = float(str(arg))  # str() so that None and booleans are refused too
        except ValueError:
            raise ValueError(f"weight must be a number from 0 to 100, got {arg!r}") from None
        return lambda client: client.weight(route, pct)
    if verb == "kill":
        enabled = arg if isinstance(arg, bool) else SWITCH.get(str(arg).strip().lower())
        if enabled is None:
            raise ValueError(f"kill takes on or off, got {arg!r}")
        return lambda client: client.kill(route, enabled)
    raise ValueError(f"unknown verb {verb!r} (one of {', '.join(VERBS)})")
