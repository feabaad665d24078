"""What ``flipback demo`` shows while it runs: the live frame (TTY) and plain progress
lines (pipes, logs, tests). The closing summary is ``report``'s.

Times are event-loop seconds (``loop.time()``); ``Scene.t0`` turns them into "seconds since
the demo started" for display."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.cli.admin_client import Key
from proxy.cli.status_table import render_status
from proxy.demo.models import Sample, ToyModel
from proxy.demo.probes import ShadowFigures
from proxy.demo.report import ActRecord
from proxy.units import Seconds

BUCKET: Seconds = 0.5  # one sparkline column...
SPAN: Seconds = 1.0  # ...shows req/s over the second before it (smooths 0.5 s noise)
BARS = " ▁▂▃▄▅▆▇█"
TIMELINE_ROWS = 6  # at most; fewer on a short terminal
AGREEMENT_BAR = 16
KIND_COLORS = {"fault": "33", "rollback": "31", "resume": "32", "verb": "36", "verified": "32",
               "verify_failed": "31", "webhook": "35"}
MARKS = {"fault": "x", "rollback": "R", "verified": "v", "verify_failed": "!", "resume": ">"}
BOLD, DIM, RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the timeline: a demo action, an event from the admin API or a webhook
    notification."""

    at: float
    kind: str
    actor: str
    text: str


@dataclass(slots=True)
class Scene:
    """Everything the live view shows. The demo script writes it; the view only reads."""

    t0: float
    rate: float
    url: str
    slow_after: Seconds
    models: Sequence[ToyModel]
    samples: list[Sample]
    acts: list[ActRecord] = field(default_factory=list)
    doing: str = "starting"
    why: str = ""  # what the view shows and why (e.g. a flipped canary's window emptying)
    routes: list[dict[str, Any]] = field(default_factory=list)
    rates: dict[Key, float] | None = None
    admin_error: str = ""
    timeline: list[Entry] = field(default_factory=list)
    in_flight: int = 0
    planned: Seconds = 0.0
    shadow_name: str = ""
    shadow_sample: float = 0.0
    shadow: ShadowFigures | None = None  # None until GET /metrics was read

    def since(self, t: float) -> float:
        return t - self.t0


def render_frame(scene: Scene, now: float, width: int, *, color: bool, height: int = 24) -> str:
    """One full screen of the live view: each line at most ``width`` wide, and fewer than
    ``height`` lines (the timeline gives way), so that the cursor stays on the screen."""
    act = scene.acts[-1] if scene.acts else None
    title = f"flipback demo · {scene.since(now):4.1f}s of ~{scene.planned:.0f}s"
    if act is not None:
        title += f" · Act {act.number} of 2: {act.title}"
    now_lines = textwrap.wrap(scene.doing, width - 5, max_lines=2, placeholder=" …") or [""]
    why_lines = textwrap.wrap(scene.why, width - 5, max_lines=2, placeholder=" …")
    lines = [_bold(_spread(title, "Ctrl-C stops", width), color),
             *(("now: " if i == 0 else "     ") + text for i, text in enumerate(now_lines)),
             *(_dim(("why: " if i == 0 else "     ") + text, color)
               for i, text in enumerate(why_lines)),
             ""]
    if scene.routes:
        # The shadow has a panel of its own below: the table leaves it out.
        routes = [{k: v for k, v in r.items() if k != "shadow"} for r in scene.routes]
        lines += render_status(routes, scene.rates, width, color=color).splitlines()
    else:
        lines.append(scene.admin_error or "waiting for the admin API…")
    lines += ["", *_traffic(scene, now, width), _clip(_clients(scene), width)]
    if scene.shadow_name:
        lines.append(_shadow(scene, width))
    lines += ["", _dim("timeline: demo actions, GET /events, webhook deliveries", color)]
    rows = max(min(TIMELINE_ROWS, height - 1 - len(lines)), 2)
    for entry in scene.timeline[-rows:]:
        lines.append(_entry(entry, scene.t0, width, color))
    return "\n".join(_clip(line, width) if not color else line for line in lines) + "\n"


def _traffic(scene: Scene, now: float, width: int) -> list[str]:
    label = max(len(m.name) for m in scene.models) + 4
    columns = max(width - label - 1, 10)
    done = int(scene.since(now) / BUCKET)  # complete columns only
    first = max(done - columns, 0)
    per = round(SPAN / BUCKET)
    head = (f"req/s per model ({scene.rate:g} offered, open loop) · 1 col = {BUCKET:g}s · "
            "x fault  R rollback  v verified  > resume")
    rows = [_clip(head, width)]
    for model in scene.models:
        counts = [0] * (done - first + per - 1)  # a column sums itself and per - 1 before it
        for t in model.arrivals:
            i = int(scene.since(t) / BUCKET) - first + per - 1
            if 0 <= i < len(counts):
                counts[i] += 1
        rates = [sum(counts[i:i + per]) / SPAN for i in range(done - first)]
        bars = "".join(BARS[max(min(round(r / scene.rate * 8), 8), 1)] if r else " "
                       for r in rates)
        rows.append(f"  {model.name:<{label - 2}}{bars}")
    marks = [" "] * (done - first)
    for entry in scene.timeline:
        mark = MARKS.get(entry.kind)
        i = int(scene.since(entry.at) / BUCKET) - first
        while mark and 0 <= i < len(marks) and marks[i] != " ":
            i += 1  # fault and flip often share a column: show both, side by side
        if mark and 0 <= i < len(marks):
            marks[i] = mark
    rows.append((" " * label + "".join(marks)).rstrip())
    return rows


def _clients(scene: Scene) -> str:
    samples = scene.samples
    errors = sum(s.is_error for s in samples)
    slow = sum(s.latency > scene.slow_after for s in samples)
    per_act = ", ".join(
        f"act {a.number}: {sum(s.is_error for s in samples if _in_act(s.scheduled, a))}"
        for a in scene.acts)
    return (f"clients: {len(samples):,} answered · {errors} errors ({per_act}) · "
            f"{slow} slower than {scene.slow_after * 1000:g} ms · {scene.in_flight} in flight")


def _shadow(scene: Scene, width: int) -> str:
    """The shadow panel: how often the shadow model agrees with the primary answer."""
    shadow = scene.shadow
    rate = (scene.rates or {}).get((_route(scene), scene.shadow_name))
    head = (f"shadow {scene.shadow_name} · {scene.shadow_sample:g}% mirrored · "
            + (f"{rate:.0f} req/s · " if rate is not None else ""))
    if shadow is None or shadow.agreement is None:
        return _clip(head + "agreement: nothing compared yet", width)
    full = round(shadow.agreement / 100 * AGREEMENT_BAR)
    bar = "█" * full + "░" * (AGREEMENT_BAR - full)
    text = (f"{head}agreement {bar} {shadow.agreement:4.1f}% of {shadow.compared:,}"
            + (f" · {shadow.dropped} dropped" if shadow.dropped else ""))
    return _clip(text, width)


def _route(scene: Scene) -> str:
    return str(scene.routes[0].get("name", "")) if scene.routes else ""


def _in_act(t: float, act: ActRecord) -> bool:
    return act.start <= t and (act.end is None or t < act.end)


def _entry(entry: Entry, t0: float, width: int, color: bool) -> str:
    line = _clip(f"  {entry.at - t0:+7.2f}s  {entry.kind:<9} {entry.actor:<6} {entry.text}",
                 width)
    code = KIND_COLORS.get(entry.kind)
    if color and code:
        start = line.index(entry.kind)
        line = f"{line[:start]}\x1b[{code}m{entry.kind}{RESET}{line[start + len(entry.kind):]}"
    return line


def plain_entry(entry: Entry, t0: float) -> str:
    """A timeline entry as one plain line (no ANSI), printed as it happens."""
    return f"[{entry.at - t0:+6.2f}s] {entry.kind:<9} {entry.actor:<6} {entry.text}"


def status_line(scene: Scene, now: float) -> str:
    """The once-a-second plain progress line: route state and per-upstream window figures."""
    parts = []
    for route in scene.routes:
        name = str(route.get("name"))
        weight = route.get("effective_weight")
        parts.append(f"{name} {route.get('state')}"
                     + (f" {weight:g}%" if isinstance(weight, int | float) else ""))
        for up_name, up in (route.get("upstreams") or {}).items():
            rate = (scene.rates or {}).get((name, up_name), 0.0)
            text = f"{up_name} {rate:2.0f}/s"
            if up.get("requests"):
                text += f" err {100 * up.get('failures', 0) / up['requests']:.0f}%"
            if isinstance(p99 := up.get("p99_ms"), int | float):
                text += f" p99 {p99:.0f}ms"
            parts.append(text)
    if scene.shadow is not None and (agreement := scene.shadow.agreement) is not None:
        parts.append(f"shadow {scene.shadow_name} agrees {agreement:.0f}%")
    errors = sum(s.is_error for s in scene.samples)
    parts.append(f"clients {len(scene.samples)} answered, {errors} errors")
    return f"[{scene.since(now):+6.2f}s] " + " | ".join(parts)


def _spread(left: str, right: str, width: int) -> str:
    gap = width - len(left) - len(right)
    return left + " " * gap + right if gap >= 2 else _clip(left, width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _bold(text: str, color: bool) -> str:
    return f"{BOLD}{text}{RESET}" if color else text


def _dim(text: str, color: bool) -> str:
    return f"{DIM}{text}{RESET}" if color else text
