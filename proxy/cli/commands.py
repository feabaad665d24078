"""The bodies of the admin verbs of the ``flipback`` command (SPEC §2, §8): ``status``
and ``rollback``/``promote``/``weight``/``resume``/``kill``, each returning an exit code
(0 ok, 1 unreachable or 5xx, 2 bad input) after at most one line on stderr."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

from proxy.cli.admin_client import AdminClient, AdminError, Key
from proxy.cli.status_table import compute_rates, render_status, watch_frame, weight_text
from proxy.units import Seconds

VERBS = ("rollback", "promote", "weight", "resume", "kill")
RELOAD_KINDS = ("reload", "reload_refused")
SWITCH = {"on": True, "true": True, "off": False, "false": False}

VerbCall = Callable[[AdminClient], Awaitable[dict[str, Any]]]


async def status(base_url: str, token: str | None, watch: bool, interval: Seconds = 1.0,
                 out: TextIO | None = None, max_frames: int | None = None,
                 wait: Seconds | None = None) -> int:
    """``flipback status [--watch] [--wait SECONDS]``: print the table once, or redraw it
    every ``interval`` (in place on a TTY, else frames separated by a blank line) until
    Ctrl-C or ``max_frames``. Rates need two readings of the request counters, so the
    first table comes ``interval`` after the first reading. With ``wait``, first wait up
    to that long for flipback to answer ready. Returns 0, or the exit code of a failed
    first fetch; later failures show in the frame. Ctrl-C under ``asyncio.run`` surfaces
    from ``asyncio.run`` itself: the CLI catches it."""
    out = out or sys.stdout
    tty = out.isatty()
    width = shutil.get_terminal_size((100, 24)).columns if tty else 100
    loop = asyncio.get_running_loop()
    frames = 0
    async with AdminClient(base_url, token) as client:
        try:
            if wait is not None and (problem := await wait_ready(client, wait)) is not None:
                print(f"flipback status: {problem}", file=sys.stderr)
                return 1
            try:
                last: tuple[float, dict[Key, float]] | None = (loop.time(),
                                                                await client.request_counts())
            except AdminError as exc:
                if exc.status is None:  # unreachable: say so now, not after a wait
                    print(f"flipback status: {exc}", file=sys.stderr)
                    return exc.exit_code
                last = None  # no readable counters: the table stands without rates
            if last is not None:
                await asyncio.sleep(interval)
            while True:
                try:
                    routes = await client.routes()
                except AdminError as exc:
                    if frames == 0:
                        print(f"flipback status: {exc}", file=sys.stderr)
                        return exc.exit_code
                    text = f"{exc} (retrying every {interval:g}s)\n"
                else:
                    rates, last = await _rates(client, last, loop.time)
                    reload = await _last_reload(client)
                    text = render_status(routes, rates, width, color=tty, reload=reload)
                if watch:
                    clock = datetime.datetime.now().strftime("%H:%M:%S")
                    text = watch_frame(text, client.base_url, clock, first=frames == 0, tty=tty)
                out.write(text)
                out.flush()
                frames += 1
                if not watch or (max_frames is not None and frames >= max_frames):
                    return 0
                await asyncio.sleep(interval)
        except KeyboardInterrupt:
            return 0


async def wait_ready(client: AdminClient, timeout: Seconds, poll: Seconds = 0.1) -> str | None:
    """Wait up to ``timeout`` for ``GET /readyz`` to say ready: None once it does, else
    what was last seen (flipback is another process: polling is all there is)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            ready = await client.readyz()
        except AdminError as exc:
            seen = str(exc)
        else:
            if ready.get("status") == "ready":
                return None
            seen = f"flipback is {ready.get('status', 'not ready')}"
        left = deadline - loop.time()
        if left <= 0:
            return f"not ready within {timeout:g}s: {seen}"
        await asyncio.sleep(min(poll, left))


async def _rates(client: AdminClient, last: tuple[float, dict[Key, float]] | None,
                 now: Callable[[], float]) -> tuple[dict[Key, float] | None,
                                                    tuple[float, dict[Key, float]] | None]:
    """req/s since ``last`` (None without two readings) and the new reading."""
    try:
        counts = await client.request_counts()
    except AdminError:
        return None, last  # rates are a bonus: the table stands without them
    t = now()
    rates = compute_rates(last[1], counts, t - last[0]) if last is not None else None
    return rates, (t, counts)


async def _last_reload(client: AdminClient) -> dict[str, Any] | None:
    """The newest reload or reload_refused event, if any is still in the event log."""
    try:
        found = await client.events(limit=1, kinds=RELOAD_KINDS)
    except AdminError:
        return None
    return found[0] if found else None


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
    """One line for a ROUTE: ``chat: rolled_back, weight 0% (cfg 25%) (admin: bad answers)``.
    A killed route calls no upstream, so its weight is beside the point."""
    name, state = route.get("name", "?"), route.get("state", "?")
    if state == "killed":
        line = f"{name}: killed: answers its kill_switch response, calls no upstream"
    elif (weight := weight_text(route)) == "-":  # no canary
        line = f"{name}: {state}"
    else:
        line = f"{name}: {state}, weight {weight}"
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
