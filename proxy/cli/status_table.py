"""The ``flipback status`` table and its watch view: pure rendering of what the admin
API answered, one row per route and upstream, then a few lines per route.

Per upstream req/s comes from two successive scrapes of the monotonic counter
``flipback_requests_total`` (``GET /metrics``), not from ROUTE's ``requests``: that is a
sliding-window count, which stays flat under steady load, so its difference is not a rate.
"""

from __future__ import annotations

import datetime
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from proxy.cli.admin_client import Key
from proxy.units import Seconds

HEADERS = ["ROUTE", "STATE", "WEIGHT", "UPSTREAM", "VERSION", "ROLE", "HEALTHY", "REQ/S", "ERR%",
           "P50ms", "P99ms", "INFL", "TTFT50", "TTFT99", "TOK/REQ"]
VERSION_COLUMN = 4  # shown only when some upstream says its version
LLM_COLUMNS = 3  # the last three, shown only when some route reads LLM answers
SHRINKABLE = (0, 3)  # route and upstream names give way first on a narrow terminal
MIN_NAME = 5
ROLE_ORDER = {"stable": 0, "canary": 1, "fallback": 2, "shadow": 3}
STATE_COLORS = dict(rolled_back="31", killed="31", waiting="33", canary="32", promoted="32")
HEALTHY: dict[object, str] = {True: "yes", False: "no"}
CLEAR, HOME, CLEAR_EOL, CLEAR_BELOW = "\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J"

def compute_rates(before: Mapping[Key, float], after: Mapping[Key, float],
                  elapsed: Seconds) -> dict[Key, float]:
    """req/s per key between two counter snapshots. A key new in ``after`` counts from 0
    (flipback exports no zero series); one that went down (restart) is left out."""
    return {k: (v - before.get(k, 0.0)) / elapsed for k, v in after.items()
            if elapsed > 0 and v >= before.get(k, 0.0)}


def render_status(routes: Sequence[Mapping[str, Any]], rates: Mapping[Key, float] | None = None,
                  width: int = 100, *, color: bool = False,
                  now: datetime.datetime | None = None,
                  reload: Mapping[str, Any] | None = None) -> str:
    """The ``flipback status`` table: one row per route and upstream (its shadow last),
    then the route's ``ROUTE_NOTES`` lines; last, a refused config reload, if ``reload``
    (the newest reload or reload_refused event) is one. ``rates`` maps (route, upstream)
    to req/s (None: "-"; a missing key: 0). Error % is failures / requests of the current
    window."""
    if not routes:
        return "no routes\n"
    now = now or datetime.datetime.now(datetime.UTC)
    blocks: list[tuple[list[list[str]], list[str]]] = []
    for route in routes:
        name = str(route.get("name", "?"))
        head = [name, str(route.get("state", "?")), weight_text(route)]
        upstreams: Mapping[str, Mapping[str, Any]] = route.get("upstreams") or {}
        rows: list[list[str]] = []
        for up_name, up in sorted(upstreams.items(), key=_role_order):
            rate = None if rates is None else rates.get((name, up_name), 0.0)
            rows.append([*head, up_name, _text(up.get("version")), str(up.get("role", "-")),
                         HEALTHY.get(up.get("healthy"), "-"), _number(rate), _error_pct(up),
                         _number(up.get("p50_ms")), _number(up.get("p99_ms")),
                         str(up.get("in_flight", "-")), *_llm_cells(up.get("llm"))])
            head = ["", "", ""]
        shadow = route.get("shadow")
        if isinstance(shadow, Mapping):  # copies have no window: rate and in flight only
            up_name = str(shadow.get("upstream", "?"))
            rate = None if rates is None else rates.get((name, up_name), 0.0)
            rows.append([*head, up_name, _text(shadow.get("version")), "shadow",
                         HEALTHY.get(shadow.get("healthy"), "-"), _number(rate), "-", "-", "-",
                         str(shadow.get("in_flight", "-")), *_llm_cells(None)])
        if not rows:
            rows.append([*head, "-", "", *["-"] * (len(HEADERS) - 5)])
        notes = [f"  {text}" for note in ROUTE_NOTES if (text := note(route, now)) is not None]
        blocks.append((rows, notes))
    headers = list(HEADERS)
    if not any(isinstance(up, Mapping) and up.get("llm") is not None for route in routes
               for up in (route.get("upstreams") or {}).values()):
        for rows, _ in blocks:
            for row in rows:
                del row[-LLM_COLUMNS:]
        del headers[-LLM_COLUMNS:]
    if not any(row[VERSION_COLUMN] for rows, _ in blocks for row in rows):
        for rows, _ in blocks:
            for row in rows:
                del row[VERSION_COLUMN]
        del headers[VERSION_COLUMN]
    right = frozenset(range(headers.index("REQ/S"), len(headers)))
    widths = [max(len(h), *(len(row[i]) for rows, _ in blocks for row in rows))
              for i, h in enumerate(headers)]
    # Too wide: single-space columns first, then shorten the longest of the name columns.
    sep = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1
    excess = sum(widths) + sep * (len(widths) - 1) - width
    while excess > 0 and max(widths[i] for i in SHRINKABLE) > MIN_NAME:
        widths[max(SHRINKABLE, key=lambda i: widths[i])] -= 1
        excess -= 1
    lines = [_row(headers, widths, width, sep, right, color=False)]
    for rows, notes in blocks:
        lines += [_row(row, widths, width, sep, right, color) for row in rows]
        for note in notes:  # at most two lines each
            lines += textwrap.wrap(note, width, subsequent_indent="    ", max_lines=2,
                                   placeholder=" …") or [""]
    if isinstance(reload, Mapping) and reload.get("kind") == "reload_refused":
        # Wrapped, not clipped: the FILE:LINE: path: message is the point.
        lines += textwrap.wrap(f"config: reload refused {_age(reload.get('time'), now)}, the "
                               f"previous config still serves: {reload.get('reason', '')}",
                               width, subsequent_indent="  ", break_long_words=True,
                               break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def _last_note(route: Mapping[str, Any], now: datetime.datetime) -> str:
    return "last: " + _event(route.get("last_event"), now)


def _shadow_note(route: Mapping[str, Any], now: datetime.datetime) -> str | None:
    """The shadow's agreement since flipback started (ROUTE's counts are cumulative)."""
    shadow = route.get("shadow")
    if not isinstance(shadow, Mapping):
        return None
    text = f"shadow: {shadow.get('upstream', '?')}, {_pct(shadow.get('sample', 0))} mirrored"
    copies: Mapping[str, Any] = shadow.get("copies") or {}
    compared, mismatches = shadow.get("compared"), shadow.get("mismatches")
    if not isinstance(compared, int) or not isinstance(mismatches, Mapping):
        text += f", {copies.get('sent', 0):,} answered (not compared)"
    elif compared == 0:
        text += ", nothing compared yet"
    else:
        kinds = ", ".join(f"{kind} {100 * n / compared:.1f}%" for kind, n in mismatches.items()
                          if isinstance(n, int))
        text += f": mismatches {kinds} of {compared:,} compared since start"
    failed = sum(n for k, n in copies.items() if k in ("error", "timeout") and isinstance(n, int))
    for label, n in (("dropped", copies.get("dropped", 0)), ("failed", failed),
                     ("too large", copies.get("skipped_body", 0))):
        if isinstance(n, int) and n:
            text += f", {n:,} {label}"
    return text


def _judge_note(route: Mapping[str, Any], now: datetime.datetime) -> str | None:
    """The canary's judge: its state and the line it gives (see the judge in /routes)."""
    judge = route.get("judge")
    if not isinstance(judge, Mapping):
        return None
    return f"judge ({judge.get('kind', '?')}): {judge.get('state', '?')}: {judge.get('detail', '')}"


def _guards_note(route: Mapping[str, Any], now: datetime.datetime) -> str | None:
    """The quality guards' states, and the line of any that is not passing."""
    guards = route.get("guards")
    if not isinstance(guards, Mapping) or not guards:
        return None
    parts = []
    for name, g in guards.items():
        state = g.get("state", "?") if isinstance(g, Mapping) else "?"
        detail = g.get("detail", "") if isinstance(g, Mapping) else ""
        figures = g.get("figures") if isinstance(g, Mapping) else None
        js = figures.get("js_divergence") if isinstance(figures, Mapping) else None
        text = f"{name} {state}" + (f" (JS divergence {js:g})" if js is not None else "")
        parts.append(text + (f": {detail}" if state != "passing" else ""))
    return "guards: " + "; ".join(parts)


def _progressive_note(route: Mapping[str, Any], now: datetime.datetime) -> str | None:
    """A plan held at a step for want of evidence (see the step_stalled event)."""
    prog = route.get("progressive")
    if not isinstance(prog, Mapping) or not prog.get("stalled"):
        return None
    steps = prog.get("steps") or []
    step = prog.get("step", 0)
    weight = steps[step] if isinstance(step, int) and 0 <= step < len(steps) else "?"
    judge = route.get("judge")
    if isinstance(judge, Mapping) and judge.get("kind") == "sequential":
        wanting = "the judge has no proof yet that the canary is no worse than stable"
    else:
        wanting = f"fewer than {prog.get('min_requests')} canary requests in the window"
    return (f"progressive: held at step {step + 1 if isinstance(step, int) else '?'} of "
            f"{len(steps)} ({weight}%): {wanting} (see README: sizing steps and interval)")


# The lines under a route's rows, in order; each says None when it has nothing to show.
RouteNote = Callable[[Mapping[str, Any], datetime.datetime], str | None]
ROUTE_NOTES: tuple[RouteNote, ...] = (_last_note, _judge_note, _guards_note, _shadow_note,
                                      _progressive_note)


def _row(cells: list[str], widths: list[int], width: int, sep: int, right: frozenset[int],
         color: bool) -> str:
    parts = [_clip(c, w).rjust(w) if i in right else _clip(c, w).ljust(w)
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


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _pct(value: Any) -> str:
    return f"{round(float(value), 2):g}%"


def weight_text(route: Mapping[str, Any]) -> str:
    """The canary weight, effective (configured when it differs); "-" with no canary."""
    effective, configured = route.get("effective_weight"), route.get("configured_weight")
    upstreams = route.get("upstreams")
    if isinstance(upstreams, Mapping) and upstreams and not any(
            isinstance(up, Mapping) and up.get("role") == "canary" for up in upstreams.values()):
        return "-"
    if effective is None:
        return "-"
    if configured is None or configured == effective:
        return _pct(effective)
    return f"{_pct(effective)} (cfg {_pct(configured)})"


def _number(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _llm_cells(llm: Any) -> list[str]:
    """TTFT p50 and p99 (ms) and tokens per request, from an upstream's ``llm`` figures."""
    if not isinstance(llm, Mapping):
        return ["-"] * LLM_COLUMNS
    tokens = _number(llm.get("tokens_per_request"))
    if llm.get("tokens_estimated") and tokens != "-":
        tokens = "~" + tokens  # counted chunks: the server sent no usage
    return [_number(llm.get("ttft_p50_ms")), _number(llm.get("ttft_p99_ms")), tokens]


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


def watch_frame(table: str, base_url: str, clock: str, *, first: bool, tty: bool) -> str:
    """One ``flipback status --watch`` frame: a title line over ``table``. On a TTY it is
    drawn in place (home, rewrite each line, clear what the last frame left); otherwise
    frames after the first are separated by a blank line."""
    text = f"flipback status  {base_url}  {clock}\n\n{table}"
    if not tty:
        return text if first else "\n" + text
    lines = "".join(line + CLEAR_EOL + "\n" for line in text.splitlines())
    return (CLEAR if first else "") + HOME + lines + CLEAR_BELOW
