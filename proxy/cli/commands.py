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
SWITCH = {"on": True, "true": True, "off": False, "false": False}

VerbCall = Callable[[AdminClient], Awaitable[dict[str, Any]]]


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
                    text = watch_frame(text, client.base_url, clock, first=frames == 0, tty=tty)
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
    line = f"{route.get('name', '?')}: {route.get('state', '?')}, weight {weight_text(route)}"
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
