"""Feedback (issue 17, guard 2): labels and ratings that arrive after the answer.

Two owners. ``FeedbackStore`` remembers, per request id the client got back
(``x-request-id``), which arm answered, under which rollout (its fingerprint) and the
answer's value at ``guard.feedback.json_path``, bounded by ``max_pending`` ids for
``ttl`` (dropped ids are counted: ``expired`` by age, ``evicted`` by the bound; without a
json_path it is built with ``labels=False`` and a label is malformed). Its
``submit`` reads a ``POST /feedback`` body, one of::

    {"request_id": "...", "correct": true}
    {"request_id": "...", "score": 0.75}          # 0.0-1.0
    {"request_id": "...", "label": "malignant"}   # compared with the answer's value

and returns a ``FeedbackResult`` whose ``outcome`` the HTTP layer maps to a status with
``HTTP_STATUS``. ``FeedbackGuard`` judges the scores (correct is 1, wrong 0) of one
rollout with two anytime-valid betting tests (``evidence.BettingTest``), ``alpha/2``
each: the canary's mean score is below ``min_accuracy`` (``d = min_accuracy - s``), and,
on ratings paired canary-with-stable in arrival order, the canary is worse than stable by
more than ``tolerance`` (``d = s_stable - s_canary - tolerance``). Either trips the
route. The gate (``not_worse``) is the same pair of tests with the sign turned: evidence
that the canary's accuracy is at least ``min_accuracy`` and that it is no more than
``tolerance`` worse than stable.

Assumption, for whoever wires it: ratings of the two arms are equally likely to arrive
(a client that rates only wrong answers of one version biases any such comparison).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from proxy.answer import MISSING
from proxy.guard.evidence import (
    CANARY,
    DEFAULT_ALPHA,
    BettingTest,
    GuardReason,
    PairQueue,
    evalue,
    pct,
)
from proxy.rollout.judge import JudgeState, Verdict
from proxy.units import Percent, Seconds

ID_MAX = 256  # characters of a request id
_SHAPES = ("correct", "score", "label")
_SMALL = 256  # answer strings up to this are kept as they are, longer ones as a digest
_TRUE, _FALSE = object(), object()


class FeedbackOutcome(StrEnum):
    """What became of one ``POST /feedback``; values are metric labels."""

    RECORDED = "recorded"  # judged by the route's current rollout
    STALE = "stale"  # a known id, answered under an earlier rollout: accepted, not judged
    UNKNOWN = "unknown"  # never answered here (or forgotten long ago)
    EXPIRED = "expired"  # answered, then dropped: past ttl, or evicted by max_pending
    ALREADY_RATED = "already_rated"
    MALFORMED = "malformed"  # not one of the three shapes


HTTP_STATUS: dict[FeedbackOutcome, int] = {
    FeedbackOutcome.RECORDED: 202,
    FeedbackOutcome.STALE: 202,
    FeedbackOutcome.UNKNOWN: 404,
    FeedbackOutcome.EXPIRED: 410,
    FeedbackOutcome.ALREADY_RATED: 409,
    FeedbackOutcome.MALFORMED: 400,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackResult:
    """One submission's outcome; ``role`` and ``score`` only when it was recorded (or
    stale); ``message`` is the error's text for the 4xx body."""

    outcome: FeedbackOutcome
    request_id: str | None = None
    role: str | None = None
    score: float | None = None
    message: str = ""

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.outcome]


def value_key(value: Any) -> object:
    """A small hashable stand-in for an answer value or a label, equal exactly when the
    two are equal JSON (``1`` and ``1.0`` are, ``true`` and ``1`` are not); long texts
    and structures are kept as a 16-byte digest."""
    kind = type(value)
    if kind is bool:
        return _TRUE if value else _FALSE  # True == 1.0 in Python, not in JSON
    if kind is int or kind is float:
        return float(value)
    if kind is str:
        if len(value) <= _SMALL:
            return value
        data = value.encode("utf-8", "surrogatepass")
    elif value is None or value is MISSING:
        return None if value is None else MISSING
    else:
        try:
            data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            return MISSING
    return hashlib.blake2b(data, digest_size=16).digest()


def parse_feedback(body: bytes) -> tuple[str, str, Any] | str:
    """``(request_id, shape, value)`` from a body, or the reason it is malformed."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "the body is not JSON"
    if not isinstance(doc, dict):
        return "expected a JSON object"
    rid = doc.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > ID_MAX:
        return f"request_id must be a string of 1-{ID_MAX} characters"
    extra = sorted(set(doc) - {"request_id", *_SHAPES})
    shapes = [s for s in _SHAPES if s in doc]
    if extra or len(shapes) != 1:
        why = f"unknown keys {extra}" if extra else f"got {len(shapes)}"
        return f"expected request_id and exactly one of correct, score or label ({why})"
    shape, value = shapes[0], doc[shapes[0]]
    if shape == "correct" and not isinstance(value, bool):
        return "correct must be true or false"
    if shape == "score" and (isinstance(value, bool) or not isinstance(value, int | float)
                             or not 0.0 <= value <= 1.0):
        return "score must be a number from 0.0 to 1.0"
    if shape == "label" and isinstance(value, dict | list):
        return "label must be a string, number, boolean or null"
    return rid, shape, value


class FeedbackStore:
    """Answers awaiting feedback, for one route (see the module docstring). ``remember``
    runs on the request path (a dict insert, O(1) amortized expiry); ``submit`` on
    ``POST /feedback``. ``clock`` is monotonic seconds."""

    __slots__ = ("max_pending", "ttl", "labels", "dropped", "outcomes", "_clock", "_pending",
                 "_gone")

    def __init__(self, *, max_pending: int, ttl: Seconds, clock: Callable[[], float],
                 labels: bool = True) -> None:
        if max_pending < 1 or not ttl > 0:
            raise ValueError("max_pending must be >= 1 and ttl > 0")
        self.max_pending = max_pending
        self.ttl = ttl
        self.labels = labels  # False without guard.feedback.json_path: a label is a 400
        self.dropped = {"expired": 0, "evicted": 0}
        self.outcomes = dict.fromkeys(FeedbackOutcome, 0)
        self._clock = clock
        # Ordered dicts, not dicts: a dict emptied from the front keeps its dead slots
        # until it resizes, so finding its oldest entry costs a scan over them.
        # request id -> (role, fingerprint, value key, time), oldest first
        self._pending: OrderedDict[str, tuple[str, str, object, float]] = OrderedDict()
        # ids rated or dropped lately -> (outcome a repeat gets, time), oldest first
        self._gone: OrderedDict[str, tuple[FeedbackOutcome, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def knows(self, request_id: str) -> bool:
        """Does this store hold (or remember rating or dropping) the answer to this id?
        Which route's store to hand a feedback body to, when the body names no route."""
        return request_id in self._pending or request_id in self._gone

    def remember(self, request_id: str, *, role: str, fingerprint: str, value: Any) -> None:
        """An answer went to the client: ``value`` is its value at the guard's json_path
        (``proxy.answer.value_at``; MISSING when absent)."""
        now = self._clock()
        pending = self._pending
        self._expire(now)
        if request_id in pending:  # a client reusing its id: the latest answer counts
            del pending[request_id]
        elif len(pending) >= self.max_pending:
            oldest, _ = pending.popitem(last=False)
            self.dropped["evicted"] += 1
            self._bury(oldest, FeedbackOutcome.EXPIRED, now)
        pending[request_id] = (role, fingerprint, value_key(value), now)

    def submit(self, body: bytes, *, fingerprint: str) -> FeedbackResult:
        """Judge one ``POST /feedback`` body against the rollout now in place
        (``fingerprint``); the caller passes a RECORDED result's role and score to the
        rollout's ``FeedbackGuard.observe``."""
        result = self._submit(body, fingerprint)
        self.outcomes[result.outcome] += 1
        return result

    def _submit(self, body: bytes, fingerprint: str) -> FeedbackResult:
        parsed = parse_feedback(body)
        if isinstance(parsed, str):
            return FeedbackResult(outcome=FeedbackOutcome.MALFORMED, message=parsed)
        rid, shape, value = parsed
        if shape == "label" and not self.labels:
            return FeedbackResult(outcome=FeedbackOutcome.MALFORMED, request_id=rid,
                                  message="this route reads no answer value to compare a "
                                  "label with (guard.feedback.json_path); send correct or "
                                  "score")
        now = self._clock()
        self._expire(now)
        entry = self._pending.pop(rid, None)
        if entry is None:
            gone = self._gone.get(rid)
            outcome = gone[0] if gone is not None else FeedbackOutcome.UNKNOWN
            message = {FeedbackOutcome.UNKNOWN: "no answer with this request id is awaiting "
                       "feedback", FeedbackOutcome.EXPIRED: "this answer was forgotten "
                       "(ttl or max_pending)"}.get(outcome, "this answer was rated already")
            return FeedbackResult(outcome=outcome, request_id=rid, message=message)
        role, served_by, answer, _ = entry
        self._bury(rid, FeedbackOutcome.ALREADY_RATED, now)
        if shape == "correct":
            score = 1.0 if value else 0.0
        elif shape == "score":
            score = float(value)
        else:
            score = 1.0 if answer is not MISSING and value_key(value) == answer else 0.0
        outcome = FeedbackOutcome.RECORDED if served_by == fingerprint else FeedbackOutcome.STALE
        return FeedbackResult(outcome=outcome, request_id=rid, role=role, score=score)

    def _expire(self, now: float) -> None:
        pending, cutoff = self._pending, now - self.ttl
        while pending:
            oldest = next(iter(pending))
            at = pending[oldest][3]
            if at > cutoff:
                break
            del pending[oldest]
            self.dropped["expired"] += 1
            self._bury(oldest, FeedbackOutcome.EXPIRED, now)
        gone = self._gone
        while gone:  # a tombstone lasts another ttl, then the id is simply unknown
            oldest = next(iter(gone))
            if gone[oldest][1] > cutoff:
                break
            del gone[oldest]

    def _bury(self, rid: str, outcome: FeedbackOutcome, at: float) -> None:
        gone = self._gone
        gone.pop(rid, None)
        if len(gone) >= self.max_pending:
            gone.popitem(last=False)
        gone[rid] = (outcome, at)

    def __repr__(self) -> str:
        return (f"<FeedbackStore {len(self._pending)}/{self.max_pending} pending, "
                f"ttl={self.ttl:g}s, dropped={self.dropped}>")


class FeedbackGuard:
    """The feedback guard of one rollout (see the module docstring): ``observe(arm,
    score)`` for each RECORDED submission (``arm`` ``"canary"`` or anything else for the
    base); ``failing`` turns True on the rating that trips."""

    reason = GuardReason.FEEDBACK

    __slots__ = ("alpha", "min_accuracy", "tolerance", "canary", "stable", "tripped",
                 "_below", "_worse", "_above", "_close", "_pairs")

    def __init__(self, *, alpha: float = DEFAULT_ALPHA, min_accuracy: float | None = None,
                 tolerance: Percent = 5.0) -> None:
        if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1], got {min_accuracy!r}")
        if not 0 <= tolerance < 100:
            raise ValueError(f"tolerance must be in [0, 100), got {tolerance!r}")
        self.alpha = alpha
        self.min_accuracy = min_accuracy
        self.tolerance = tolerance
        self.canary = [0, 0.0]  # ratings, sum of scores
        self.stable = [0, 0.0]
        self.tripped: str | None = None  # "min_accuracy" or "worse_than_stable"
        half, tol = alpha / 2, tolerance / 100.0
        lo = 1e-3
        # Trips: accuracy below min_accuracy; canary worse than stable past the tolerance.
        self._below = (None if min_accuracy is None
                       else BettingTest(low=max(1.0 - min_accuracy, lo), alpha=half))
        self._worse = BettingTest(low=1.0 + tol, alpha=half)
        # The gate: accuracy at least min_accuracy; canary within the tolerance of stable.
        self._above = (None if min_accuracy is None
                       else BettingTest(low=max(min_accuracy, lo), alpha=half))
        self._close = BettingTest(low=max(1.0 - tol, lo), alpha=half)
        self._pairs = PairQueue()

    @property
    def failing(self) -> bool:
        return self.tripped is not None

    def observe(self, arm: str, score: float) -> None:
        canary = arm == CANARY
        tally = self.canary if canary else self.stable
        tally[0] += 1
        tally[1] += score
        if canary and self.min_accuracy is not None:
            assert self._below is not None and self._above is not None
            if self._below.add(self.min_accuracy - score) and self.tripped is None:
                self.tripped = "min_accuracy"
            self._above.add(score - self.min_accuracy)
        pair = self._pairs.push(canary, score)
        if pair is not None:
            c, s = pair
            tol = self.tolerance / 100.0
            if self._worse.add(s - c - tol) and self.tripped is None:
                self.tripped = "worse_than_stable"
            self._close.add(c - s + tol)

    def not_worse(self, tolerance: Percent | None = None) -> bool:
        """Evidence that the canary meets ``min_accuracy`` and is within the tolerance
        of stable (the guard's own: the tests are built with it; the argument is taken
        for the judge's shape)?"""
        if self.tripped is not None:
            return False
        return self._close.reached and (self._above is None or self._above.reached)

    def verdict(self) -> Verdict:
        if self.tripped is not None:
            state = JudgeState.FAILING
        elif self.not_worse():
            state = JudgeState.PASSING
        else:
            state = JudgeState.INCONCLUSIVE
        (nc, sc), (ns, ss) = self.canary, self.stable
        acc_c, acc_s = pct(sc, nc), pct(ss, ns)
        figures: dict[str, object] = {
            "guard": self.reason.value, "alpha": self.alpha, "min_accuracy": self.min_accuracy,
            "tolerance": self.tolerance,
            "canary": {"ratings": nc, "accuracy": round(acc_c / 100, 4)},
            "stable": {"ratings": ns, "accuracy": round(acc_s / 100, 4)},
            "pairs": self._worse.n,
            "e_values": {"below_min_accuracy": None if self._below is None
                         else evalue(self._below.log_evalue()),
                         "worse_than_stable": evalue(self._worse.log_evalue())},
            "trip_at": round(2 / self.alpha, 3),
        }
        rates = f"canary accuracy {acc_c:.1f}% over {nc} ratings vs stable {acc_s:.1f}% over {ns}"
        if state is JudgeState.FAILING:
            reason: str | None = self.reason.value
            if self.tripped == "min_accuracy":
                detail = f"{rates}: below min_accuracy {self.min_accuracy:g}"
            else:
                detail = f"{rates}: worse than stable by more than {self.tolerance:g}pp"
            detail += f" (anytime-valid, alpha {self.alpha:g})"
        elif state is JudgeState.PASSING:
            reason = None
            detail = f"{rates}: no worse than stable within {self.tolerance:g}pp"
            if self.min_accuracy is not None:
                detail += f" and at least {self.min_accuracy:g}"
        else:
            reason = None
            detail = f"not enough ratings yet ({rates})"
        return Verdict(state=state, reason=reason, detail=detail, figures=figures)

    def __repr__(self) -> str:
        return (f"<FeedbackGuard min_accuracy={self.min_accuracy} "
                f"{'failing' if self.tripped else 'open'}: {self.canary[0]} canary / "
                f"{self.stable[0]} stable ratings>")
