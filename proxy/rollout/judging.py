"""A route's judge over the life of its rollout: which evidence still counts, and what it says.

The sequential judge (``judge.SequentialJudge``) compares one canary with one base lane
at one traffic share since it was made. ``RouteJudge`` keeps that true as the rollout
moves: ``follow`` (called whenever the machine recomputes the split) carries the
evidence across a rise of the canary's share, and starts afresh when the share drops or
the base lane changes (stable down, its fallback serving); ``restart`` on a resume.
Requests are judged only while the split is a real split (0 < share < 1).

With ``rollback.judge: threshold`` there is no sequential judge: the states are read off
the canary's window (``min_requests``) and the latch, and the progressive gate is
today's (``min_requests`` in the window).

Both report the same three states (``JudgeState``) for ``/routes``, ``flipback status``
and ``flipback_judge_state``.
"""

from __future__ import annotations

from proxy.config.model import RollbackConfig
from proxy.rollout import rules
from proxy.rollout.judge import CANARY, JudgeState, SequentialJudge, Verdict
from proxy.rollout.judge_threshold import window_verdict
from proxy.rollout.state import Latch
from proxy.rollout.windows import WindowStats

SEQUENTIAL = "sequential"
_BASE = "stable"  # the judge's name for whichever lane takes what the canary does not


class RouteJudge:
    """The judge of one route's canary (see the module docstring)."""

    __slots__ = ("policy", "kind", "judge", "active", "_base", "_client_errors")

    def __init__(self, policy: RollbackConfig, *, sticky: bool) -> None:
        self.policy = policy
        self.kind = policy.judge
        self.judge: SequentialJudge | None = None
        self.active = False  # judging now: sequential, and the split is a real split
        self._base: object | None = None
        # On a sticky route a session is one unit: one client's bad requests, all pinned
        # to the canary, would look like the canary's 4xx. Failures and latency still count.
        self._client_errors = not sticky

    def follow(self, share: float, base: object) -> None:
        """The split changed (or may have): keep the evidence that still applies."""
        self.active = self.kind == SEQUENTIAL and 0.0 < share < 1.0
        if not self.active:
            return
        judge = self.judge
        if judge is None or base is not self._base or share < judge.share:
            # A lower share would judge requests still in flight at the wrong odds.
            p = self.policy
            self.judge = SequentialJudge(share=share, alpha=p.alpha, tolerance=p.tolerance,
                                         latency_tolerance=p.latency_tolerance / 100.0)
            self._base = base
        elif share > judge.share:
            judge.set_share(share)

    def carry(self, old: RouteJudge, base: object) -> None:
        """A reload that kept the canary, the base lane and the policy keeps the evidence
        (a plan waiting for proof does not start over on every reload)."""
        if (old.judge is not None and old.policy == self.policy
                and old._client_errors == self._client_errors):
            self.judge = old.judge
            self._base = base

    def restart(self) -> None:
        """A resume (or anything that clears the latch): the old evidence is spent."""
        self.judge = None
        self.active = False

    def canary(self, failed: bool, client_error: bool, latency: float) -> bool:
        """A canary request ended; True when the judge now finds the canary worse."""
        judge = self.judge
        if judge is None or not self.active:
            return False
        judge.observe(CANARY, failed, client_error and self._client_errors, latency)
        return judge.failing

    def base(self, failed: bool, client_error: bool, latency: float) -> None:
        """A request on the base lane ended (stable, or its fallback while stable is down)."""
        judge = self.judge
        if judge is not None and self.active:
            judge.observe(_BASE, failed, client_error and self._client_errors, latency)

    def trip(self) -> rules.Trip:
        """The trip of a judge that found the canary worse."""
        assert self.judge is not None
        v = self.judge.verdict()
        assert v.reason is not None  # a failing verdict names its test
        return rules.Trip(reason=rules.TripReason(v.reason), detail=v.detail,
                          figures=dict(v.figures))

    def gate(self, canary: WindowStats) -> bool:
        """May a progressive step advance? Only on evidence that the canary is not worse."""
        if self.kind != SEQUENTIAL:
            return canary.requests >= self.policy.min_requests
        return self.judge is not None and self.active and self.judge.not_worse()

    def verdict(self, canary: WindowStats, stable: WindowStats, latch: Latch | None) -> Verdict:
        """The judge's state now, with one line and figures (tens of µs: not per request)."""
        if latch is not None and latch.actor == "auto":
            return Verdict(state=JudgeState.FAILING, reason=latch.reason, detail=latch.detail,
                           figures={"judge": self.kind})
        if self.kind == SEQUENTIAL:
            if self.judge is not None and self.active:
                return self.judge.verdict()
            return Verdict(state=JudgeState.INCONCLUSIVE, reason=None, figures={
                "judge": self.kind}, detail="no split to judge: the canary takes no traffic "
                "or all of it")
        return window_verdict(self.policy, canary, stable)
