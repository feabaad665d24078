"""The quality guards of one route (``guard:`` in its config), shaped like the route's
judge (``proxy.rollout.judging.RouteJudge``) so the rollout machine can hold both alike.

``RouteGuards`` builds the configured guards and feeds them what the request path and
``POST /feedback`` hand it: an answer body once it reached the client whole
(``answered``), a feedback body (``rated``), a compared pair (``paired``). Each returns
the guard that tripped on that call, if one did, so the caller trips the route with that
guard's ``verdict()`` (reason ``output_drift``, ``feedback`` or ``disagreement``, and its
figures). ``follow`` on a change of the canary's share, ``restart`` when the evidence is
spent (a resume, a new canary), ``carry`` across a reload that kept the rollout;
``gate`` is the progressive step's condition (every configured guard ``not_worse``).

The feedback store outlives ``restart``: it is keyed by request id and remembers each
answer's rollout fingerprint, so feedback for answers of an earlier rollout is answered
(``stale``) but not judged. Pure and synchronous: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.answer import MISSING, decoded, document, lookup, split_path
from proxy.config.model import GuardConfig
from proxy.guard.disagreement import Disagreement, pair_kind
from proxy.guard.drift import OutputDrift
from proxy.guard.evidence import Guard
from proxy.guard.feedback import FeedbackGuard, FeedbackOutcome, FeedbackResult, FeedbackStore
from proxy.rollout.judge import Verdict

JUDGED = ("canary", "stable")  # the arms whose answers are evidence


class RouteGuards:
    """The configured guards of one route (see the module docstring)."""

    __slots__ = ("cfg", "share", "epoch", "drift", "feedback", "disagreement", "store",
                 "_drift_path", "_feedback_path", "_stamped")

    def __init__(self, cfg: GuardConfig, *, share: float, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.share = share
        self.epoch = 0  # restarts so far: answers from before a restart are stale feedback
        # (fingerprint, its stamp at this epoch), built once, not per answer
        self._stamped: tuple[str | None, str] = (None, "")
        self.drift: OutputDrift | None = None
        self.feedback: FeedbackGuard | None = None
        self.disagreement: Disagreement | None = None
        self.store: FeedbackStore | None = None
        self._drift_path = split_path(cfg.output.json_path) if cfg.output else None
        fb = cfg.feedback
        self._feedback_path = split_path(fb.json_path) if fb and fb.json_path else None
        if fb is not None:
            self.store = FeedbackStore(max_pending=fb.max_pending, ttl=fb.ttl, clock=clock,
                                       labels=fb.json_path is not None)
        self.restart()

    def _stamp(self, fingerprint: str) -> str:
        """The rollout as the feedback store records it: fingerprint and epoch."""
        seen, stamp = self._stamped
        if seen != fingerprint:
            stamp = f"{fingerprint}#{self.epoch}"
            self._stamped = (fingerprint, stamp)
        return stamp

    @property
    def reads_answers(self) -> bool:
        """Do the guards read the answers a client gets (output drift, feedback)? Paired
        disagreement reads its pairs only."""
        return self.drift is not None or self.store is not None

    @property
    def guards(self) -> list[Guard]:
        """The configured guards, in config order."""
        return [g for g in (self.drift, self.feedback, self.disagreement) if g is not None]

    @property
    def failing(self) -> Guard | None:
        """The first guard that found the canary worse, if any."""
        return next((g for g in self.guards if g.failing), None)

    # -- over the rollout's life ---------------------------------------------------------
    def restart(self) -> None:
        """Fresh evidence: a resume, a new canary. The feedback store is kept; feedback for
        answers from before is stale."""
        self.epoch += 1
        self._stamped = (None, "")
        cfg = self.cfg
        if cfg.output is not None:
            self.drift = OutputDrift(alpha=cfg.alpha, json_path=cfg.output.json_path,
                                     share=self.share)
        if cfg.feedback is not None:
            self.feedback = FeedbackGuard(alpha=cfg.alpha,
                                          min_accuracy=cfg.feedback.min_accuracy)
        if cfg.compare is not None:
            c = cfg.compare
            self.disagreement = Disagreement(alpha=cfg.alpha, max_disagreement=c.max_disagreement,
                                             noise_floor=c.noise_floor, json_paths=c.json_paths)

    def follow(self, share: float) -> None:
        """The canary's share (0-1) changed. Feedback and pairs do not depend on it."""
        self.share = share
        if self.drift is not None:
            self.drift.set_share(share)

    def carry(self, old: RouteGuards) -> None:
        """A reload that kept the rollout: keep the evidence of guards configured alike,
        and the feedback store when its bounds are the same."""
        new, prev = self.cfg, old.cfg
        self.epoch = old.epoch
        self._stamped = (None, "")
        if new.alpha == prev.alpha:
            if new.output == prev.output and old.drift is not None:
                self.drift = old.drift
                self.drift.set_share(self.share)
            if new.feedback == prev.feedback and old.feedback is not None:
                self.feedback = old.feedback
            if new.compare == prev.compare and old.disagreement is not None:
                self.disagreement = old.disagreement
        if new.feedback == prev.feedback and old.store is not None:
            self.store = old.store

    # -- the request path ----------------------------------------------------------------
    def wants_answer(self, arm: str, draw: float) -> bool:
        """Whether the handler should keep this answer's body (up to ``inspect_body``) for
        ``answered``: for output drift's sample, or for feedback on every answer."""
        if self.store is not None and self._feedback_path is not None:
            return True
        return arm in JUDGED and self.drift is not None and self.drift.wants(arm, draw)

    def answered(self, arm: str, body: bytes | None, *, draw: float,
                 request_id: str | None, fingerprint: str) -> Guard | None:
        """After every canary or stable answer that reached the client whole (answers of
        other roles are not judged): ``body`` when ``wants_answer(arm, draw)`` said to keep
        it (None otherwise, or when cut by ``inspect_body``; a stream is folded), the same
        ``draw``, the request id the client got. Returns the guard that tripped now."""
        guard = self.drift
        # An answer not kept whole says nothing about its value (absent in a whole answer
        # does: that is a category). A replay (``arm`` "replay": stable answering what the
        # canary failed) is no random sample: it is remembered for feedback, not judged.
        sampled = (arm in JUDGED and guard is not None and not guard.failing
                   and self._drift_path is not None
                   and body is not None and guard.wants(arm, draw))
        store, path = self.store, self._feedback_path
        remember = store is not None and request_id is not None
        doc: Any = MISSING
        if body is not None and (sampled or (remember and path is not None)):
            plain = decoded(body)
            if plain is not None:
                doc = document(plain)
        if remember:
            assert store is not None and request_id is not None
            value = lookup(doc, path) if path is not None else MISSING
            store.remember(request_id, role=arm, fingerprint=self._stamp(fingerprint),
                           value=value)
        if sampled:
            assert guard is not None and self._drift_path is not None
            guard.observe(arm, lookup(doc, self._drift_path))
            if guard.failing:
                return guard
        return None

    def pair_kind(self, role: str, draw: float) -> str | None:
        """Whether this request also goes to stable as a detached copy, and as which
        kind of pair (``"canary"`` or ``"noise"``), or None."""
        c = self.cfg.compare
        if c is None:
            return None
        return pair_kind(role, share=self.share, sample=c.sample, noise_floor=c.noise_floor,
                         draw=draw)

    def paired(self, kind: str, *, primary_status: int, copy_status: int,
               primary_body: bytes | None, copy_body: bytes | None) -> Guard | None:
        """A pair finished (both bodies whole, or None). Returns the guard if it tripped
        now."""
        guard = self.disagreement
        if guard is None or guard.failing:
            return None
        guard.judge_pair(kind, primary_status=primary_status, copy_status=copy_status,
                         primary_body=primary_body, copy_body=copy_body)
        return guard if guard.failing else None

    # -- POST /feedback ------------------------------------------------------------------
    def rated(self, body: bytes, *, fingerprint: str) -> tuple[FeedbackResult, Guard | None]:
        """One feedback body: its result (``result.status`` is the HTTP status) and the
        guard if it tripped now. Without ``guard.feedback`` every body is a 404."""
        store, guard = self.store, self.feedback
        if store is None or guard is None:
            return FeedbackResult(outcome=FeedbackOutcome.UNKNOWN,
                                  message="this route takes no feedback"), None
        result = store.submit(body, fingerprint=self._stamp(fingerprint))
        if (result.outcome is FeedbackOutcome.RECORDED and result.role in ("canary", "stable")
                and result.score is not None and not guard.failing):
            guard.observe(result.role, result.score)
            if guard.failing:
                return result, guard
        return result, None

    # -- the tick ------------------------------------------------------------------------
    def gate(self) -> bool:
        """May a progressive step advance? Only when every configured guard passes."""
        return all(g.not_worse() for g in self.guards)

    def verdicts(self) -> dict[str, Verdict]:
        """Each configured guard's state, by its reason label (for /routes and status)."""
        return {g.reason.value: g.verdict() for g in self.guards}

    def __repr__(self) -> str:
        names = ", ".join(f"{g.reason.value}{' failing' if g.failing else ''}"
                          for g in self.guards)
        return f"<RouteGuards share={self.share:g}: {names}>"
