"""What ``flipback demo`` shows: the live frame (TTY), plain progress lines (pipes, logs,
tests) and the closing summary, plus the measurements behind it (``Report``).

Times are event-loop seconds (``loop.time()``); ``Scene.t0`` / ``Report.t0`` turn them into
"seconds since the demo started" for display."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.admin_client import Key, render_status
from proxy.demo_models import Sample, ToyModel
from proxy.units import Seconds

BUCKET: Seconds = 0.5  # one sparkline column...
SPAN: Seconds = 1.0  # ...shows req/s over the second before it (smooths 0.5 s noise)
BARS = " ▁▂▃▄▅▆▇█"
TIMELINE_ROWS = 6
KIND_COLORS = {"fault": "33", "rollback": "31", "resume": "32", "verb": "36"}
MARKS = {"fault": "x", "rollback": "R", "resume": ">"}
BOLD, DIM, RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the timeline: a demo action or an event from the admin API."""

    at: float
    kind: str
    actor: str
    text: str


@dataclass(slots=True)
class ActRecord:
    """One act of the script, filled in as it plays (loop times, None until it happens)."""

    number: int
    title: str
    fault: str
    start: float
    end: float | None = None
    fault_at: float | None = None
    flip_at: float | None = None  # the rollback event's own timestamp
    flip_reason: str = ""


@dataclass(frozen=True, slots=True)
class ActFigures:
    """An act measured from the request log, the canary's own log and the event time."""

    flip_event: Seconds | None  # fault -> rollback event
    flip_traffic: Seconds | None  # fault -> last request that reached the canary
    canary_hits: int  # requests that reached the faulty canary
    requests: int
    errors: int
    slow: int
    split: dict[str, float]  # upstream -> % of answers between act start and fault
    split_n: int


@dataclass(slots=True)
class Report:
    """The whole run, measured; ``exit_code`` is what ``flipback demo`` returns."""

    t0: float
    acts: list[ActRecord]
    samples: list[Sample]
    canary_arrivals: list[float]
    slow_after: Seconds
    duration: Seconds = 0.0
    dropped: int = 0
    interrupted: bool = False

    def figures(self, act: ActRecord) -> ActFigures:
        end = act.end if act.end is not None else float("inf")
        mine = [s for s in self.samples if act.start <= s.scheduled < end]
        fault = act.fault_at
        before = [s for s in mine if fault is None or s.scheduled < fault]
        answered = [s.upstream for s in before if s.status == 200]
        split = {name: 100 * answered.count(name) / len(answered)
                 for name in sorted(set(answered))} if answered else {}
        hits = [t for t in self.canary_arrivals if fault is not None and fault <= t < end]
        flip_event = flip_traffic = None
        if fault is not None and act.flip_at is not None:
            flip_event = act.flip_at - fault
            flip_traffic = max(hits) - fault if hits else None
        return ActFigures(
            flip_event=flip_event,
            flip_traffic=flip_traffic,
            canary_hits=len(hits),
            requests=len(mine),
            errors=sum(s.is_error for s in mine),
            slow=sum(s.latency > self.slow_after for s in mine),
            split=split,
            split_n=len(answered),
        )

    def problems(self) -> list[str]:
        """Why the demo failed; empty when every act was flipped back automatically."""
        found = [f"act {a.number} ({a.title}): no automatic rollback after the fault"
                 for a in self.acts if a.flip_at is None]
        if len(self.acts) < 2:
            found.append(f"the script stopped after act {len(self.acts)}")
        return found

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.problems() else 0


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
    routes: list[dict[str, Any]] = field(default_factory=list)
    rates: dict[Key, float] | None = None
    admin_error: str = ""
    timeline: list[Entry] = field(default_factory=list)
    in_flight: int = 0
    planned: Seconds = 0.0

    def since(self, t: float) -> float:
        return t - self.t0


def render_frame(scene: Scene, now: float, width: int, *, color: bool) -> str:
    """One full screen of the live view (about 22 lines, each at most ``width`` wide)."""
    act = scene.acts[-1] if scene.acts else None
    title = f"flipback demo · {scene.since(now):4.1f}s of ~{scene.planned:.0f}s"
    if act is not None:
        title += f" · Act {act.number} of 2: {act.title}"
    now_lines = textwrap.wrap(scene.doing, width - 5, max_lines=2, placeholder=" …") or [""]
    lines = [_bold(_spread(title, "Ctrl-C stops", width), color),
             *(("now: " if i == 0 else "     ") + text for i, text in enumerate(now_lines)),
             ""]
    if scene.routes:
        lines += render_status(scene.routes, scene.rates, width, color=color).splitlines()
    else:
        lines.append(scene.admin_error or "waiting for the admin API…")
    lines += ["", *_traffic(scene, now, width), _clip(_clients(scene), width), ""]
    # Shadow panel goes here once shadow traffic exists: sent / dropped / mismatches from
    # flipback_shadow_total and flipback_shadow_mismatch_total, under a third toy model.
    lines.append(_dim("timeline: demo actions and GET /events", color))
    for entry in scene.timeline[-TIMELINE_ROWS:]:
        lines.append(_entry(entry, scene.t0, width, color))
    return "\n".join(_clip(line, width) if not color else line for line in lines) + "\n"


def _traffic(scene: Scene, now: float, width: int) -> list[str]:
    label = max(len(m.name) for m in scene.models) + 4
    columns = max(width - label - 1, 10)
    done = int(scene.since(now) / BUCKET)  # complete columns only
    first = max(done - columns, 0)
    per = round(SPAN / BUCKET)
    head = (f"req/s reaching each model ({scene.rate:g} offered, open loop) · "
            f"1 col = {BUCKET:g}s · x fault  R rollback  > resume")
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
    errors = sum(s.is_error for s in scene.samples)
    parts.append(f"clients {len(scene.samples)} answered, {errors} errors")
    return f"[{scene.since(now):+6.2f}s] " + " | ".join(parts)


def render_summary(report: Report) -> str:
    """The closing summary: per act flip times, errors, split; then the verdict."""
    lines = ["", "summary"]
    for act in report.acts:
        fig = report.figures(act)
        split = " / ".join(f"{name} {pct:.0f}%" for name, pct in fig.split.items())
        lines.append(f"  act {act.number}: {act.title} ({act.fault})")
        lines.append(f"    split before the fault    {split or '-'} (n={fig.split_n})")
        if fig.flip_event is not None:
            lines.append(f"    fault -> rollback event   {fig.flip_event:.2f}s")
            lines.append(f"      reason: {act.flip_reason}")
        else:
            lines.append("    fault -> rollback event   never: the canary was not flipped back")
        if fig.flip_traffic is not None:
            lines.append(f"    fault -> last canary req  {fig.flip_traffic:.2f}s  "
                         f"({fig.canary_hits} requests reached the bad canary)")
        lines.append(f"    client-visible errors     {fig.errors} of {fig.requests} requests"
                     + (f"; {fig.slow} answers slower than {report.slow_after * 1000:g} ms"
                        if fig.slow else ""))
    served = sum(s.status == 200 for s in report.samples)
    errors = sum(s.is_error for s in report.samples)
    lines.append(f"  total: {len(report.samples):,} requests, {served:,} served, "
                 f"{errors} client-visible errors, {report.duration:.1f}s"
                 + (f", {report.dropped} not sent (client cap)" if report.dropped else ""))
    if report.interrupted:
        lines.append("  interrupted (Ctrl-C): stopped early")
    elif problems := report.problems():
        lines += [f"  FAILED: {p}" for p in problems]
    else:
        lines.append("  ok: both bad canaries were flipped back automatically, "
                     "clients were answered by stable")
    return "\n".join(lines) + "\n"


def _spread(left: str, right: str, width: int) -> str:
    gap = width - len(left) - len(right)
    return left + " " * gap + right if gap >= 2 else _clip(left, width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _bold(text: str, color: bool) -> str:
    return f"{BOLD}{text}{RESET}" if color else text


def _dim(text: str, color: bool) -> str:
    return f"{DIM}{text}{RESET}" if color else text
