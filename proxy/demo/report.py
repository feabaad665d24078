"""What ``flipback demo`` measured (``Report``: the acts, the client request log, the
webhook notifications, the shadow figures) and the closing summary it prints.

Times are event-loop seconds (``loop.time()``) unless named wall clock; ``Report.t0`` is
the demo's start."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.demo.models import Sample
from proxy.demo.probes import DiffSample, EventKey, Notification, ShadowFigures
from proxy.units import Seconds

VERDICTS = ("verified", "verify_failed")


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
    flip_key: EventKey | None = None
    verdict: str = ""  # "verified" or "verify_failed" once flipback said which
    verdict_at: float | None = None  # the verification event's own timestamp
    verdict_reason: str = ""
    verdict_key: EventKey | None = None
    no_verdict: str = ""  # why there is no verdict, when the demo stopped waiting for one


@dataclass(frozen=True, slots=True)
class ActFigures:
    """An act measured from the request log, the canary's own log and the event times."""

    flip_event: Seconds | None  # fault -> rollback event
    flip_traffic: Seconds | None  # fault -> last request that reached the canary
    verify_after: Seconds | None  # rollback event -> verification event
    notified: dict[str, Seconds]  # event kind -> event time to webhook receipt
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
    verify: Seconds  # the route's rollback.verify
    notifications: list[Notification] = field(default_factory=list)
    shadow: ShadowFigures | None = None  # the last reading of GET /metrics
    shadow_about: str = ""  # e.g. "llm-v3, 50% of requests mirrored, compared on ..."
    shadow_expected: float | None = None  # the agreement the toy shadow is built to show
    diffs: DiffSample = DiffSample()
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
        flip_event = flip_traffic = verify_after = None
        if fault is not None and act.flip_at is not None:
            flip_event = act.flip_at - fault
            flip_traffic = max(hits) - fault if hits else None
            if act.verdict_at is not None:
                verify_after = act.verdict_at - act.flip_at
        keys = {act.flip_key: "rollback", act.verdict_key: act.verdict}
        notified = {keys[n.key]: n.delay for n in self.notifications if n.key in keys}
        return ActFigures(
            flip_event=flip_event,
            flip_traffic=flip_traffic,
            verify_after=verify_after,
            notified=notified,
            canary_hits=len(hits),
            requests=len(mine),
            errors=sum(s.is_error for s in mine),
            slow=sum(s.latency > self.slow_after for s in mine),
            split=split,
            split_n=len(answered),
        )

    def problems(self) -> list[str]:
        """Why the demo failed; empty when every act was flipped back automatically and
        flipback then verified that stable was fine."""
        found = []
        for act in self.acts:
            name = f"act {act.number} ({act.title})"
            if act.flip_at is None:
                found.append(f"{name}: no automatic rollback after the fault")
            elif act.verdict == "verify_failed":
                found.append(f"{name}: verify_failed after the rollback: {act.verdict_reason}")
            elif act.verdict != "verified":
                found.append(f"{name}: the rollback was not verified: "
                             f"{act.no_verdict or 'the demo stopped before the verdict'}")
        if len(self.acts) < 2:
            found.append(f"the script stopped after act {len(self.acts)}")
        return found

    def missing_notifications(self) -> list[str]:
        """Events that should have reached the webhook and did not (shown, not fatal: the
        rollback itself never waits for a notification)."""
        found = []
        for act in self.acts:
            notified = self.figures(act).notified
            for kind, key in (("rollback", act.flip_key), (act.verdict, act.verdict_key)):
                if key is not None and kind not in notified:
                    found.append(f"act {act.number}: no webhook notification of the {kind}")
        return found

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.problems() else 0


def render_summary(report: Report) -> str:
    """The closing summary: per act the flip, its verification and its notifications;
    then the webhook, the shadow, the totals and the verdict."""
    lines = ["", "summary"]
    for act in report.acts:
        lines += _act_lines(report, act)
    lines += _webhook_lines(report)
    lines += _shadow_lines(report)
    served = sum(s.status == 200 for s in report.samples)
    errors = sum(s.is_error for s in report.samples)
    lines.append(f"  total: {len(report.samples):,} requests, {served:,} served, "
                 f"{errors} client-visible errors, {report.duration:.1f}s"
                 + (f", {report.dropped} not sent (client cap)" if report.dropped else ""))
    if report.interrupted:
        lines.append("  interrupted (Ctrl-C): stopped early")
        return "\n".join(lines) + "\n"
    lines += [f"  note: {text}" for text in report.missing_notifications()]
    if problems := report.problems():
        lines += [f"  FAILED: {p}" for p in problems]
    else:
        lines.append("  ok: both bad canaries were flipped back automatically, each rollback "
                     "verified")
    return "\n".join(lines) + "\n"


def _act_lines(report: Report, act: ActRecord) -> list[str]:
    fig = report.figures(act)
    split = " / ".join(f"{name} {pct:.0f}%" for name, pct in fig.split.items())
    lines = [f"  act {act.number}: {act.title} ({act.fault})",
             f"    split before the fault    {split or '-'} (n={fig.split_n})"]
    if fig.flip_event is not None:
        lines.append(f"    fault -> rollback event   {fig.flip_event:.2f}s")
        lines.append(f"      reason: {act.flip_reason}")
    else:
        lines.append("    fault -> rollback event   never: the canary was not flipped back")
    if fig.flip_traffic is not None:
        lines.append(f"    fault -> last canary req  {fig.flip_traffic:.2f}s  "
                     f"({fig.canary_hits} requests reached the bad canary)")
    if fig.verify_after is not None:
        lines.append(f"    rollback -> {act.verdict:<13} {fig.verify_after:.2f}s  "
                     f"(verify: {report.verify:g}s of watching stable)")
        lines.append(f"      {act.verdict_reason}")
    elif act.flip_at is not None:
        lines.append(f"    rollback -> verified      never: {act.no_verdict or 'stopped early'}")
    if fig.notified:
        got = ", ".join(f"{kind} {delay * 1000:.0f} ms" for kind, delay in fig.notified.items())
        lines.append(f"    webhook notifications     {got} after the event")
    lines.append(f"    client-visible errors     {fig.errors} of {fig.requests} requests"
                 + (f"; {fig.slow} answers slower than {report.slow_after * 1000:g} ms"
                    if fig.slow else ""))
    return lines


def _webhook_lines(report: Report) -> list[str]:
    notes = report.notifications
    if not notes:
        return ["  webhook: no notification received"]
    kinds: dict[str, int] = {}
    for note in notes:
        kinds[note.kind] = kinds.get(note.kind, 0) + 1
    delays = sorted(note.delay * 1000 for note in notes)
    each = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return [f"  webhook: {len(notes)} notifications received ({each})",
            f"    event -> receipt          {delays[len(delays) // 2]:.0f} ms median, "
            f"{delays[-1]:.0f} ms at most"]


def _shadow_lines(report: Report) -> list[str]:
    shadow = report.shadow
    lines = [f"  shadow: {report.shadow_about}"]
    if shadow is None or shadow.agreement is None:
        return [*lines, "    agreement                 - (nothing compared)"]
    expected = report.shadow_expected
    lines.append(f"    agreement                 {shadow.agreement:.1f}% ({shadow.differed:,} of "
                 f"{shadow.compared:,} compared answers differed"
                 + (f"; built to agree {expected:.0f}%)" if expected is not None else ")"))
    copies = f"    copies                    {shadow.sent:,} answered"
    copies += f", {shadow.dropped} dropped" if shadow.dropped else ""
    copies += f", {shadow.failed} failed" if shadow.failed else ""
    lines.append(copies)
    diffs = report.diffs
    if diffs.lines:
        lines.append(f"    recorded                  {diffs.lines:,} mismatches, e.g. {diffs.path}")
        lines.append(f"      primary {_quote(diffs.primary)} / shadow {_quote(diffs.shadow)}")
    return lines


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return f'"{text}"' if len(text) <= 40 else f'"{text[:39]}…"'
