"""Paired disagreement (issue 17, guard 3): the same request answered by the canary and
by stable, compared.

On a sample of canary-served requests (``guard.compare.sample`` percent) a detached copy
goes to stable (the shadow machinery: it never touches the client's answer); the two
answers are compared on ``json_paths`` (and status) by ``proxy.shadow.compare``, and
``observe_pair("canary", differs)`` records the pair. LLM answers vary between two calls
to the same version, so with ``noise_floor`` a matching number of stable-served requests
also go to stable a second time (``observe_pair("noise", differs)``; ``pair_kind`` draws
both samples), and the canary is judged against that measured stable-vs-stable rate.

The tests are ``evidence.BettingTest``s on the allowed rate ``delta`` =
``max_disagreement``/100. Without a noise floor, each canary pair's ``x`` (1 when they
differ) is a bet ``d = x - delta``: under H0 (the canary's disagreement rate is at most
``delta``) the wealth is a supermartingale. With one, canary and noise pairs are matched
in arrival order and ``d = x - y - delta``: H0 is "the canary disagrees with stable at
most ``delta`` more often than stable disagrees with itself". Trips at ``1/alpha``. The
gate (``not_worse``) is the opposite bet, ``d = delta - x`` (or ``y + delta - x``):
evidence that the canary's (excess) rate is below ``delta``.
"""

from __future__ import annotations

from proxy.config.model import CompareConfig
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
from proxy.shadow.compare import compare
from proxy.units import Percent

NOISE = "noise"
_LOW = 1e-3  # the smallest loss a bet is sized for (delta 0: any disagreement is proof)


def pair_kind(role: str, *, share: float, sample: Percent, noise_floor: bool,
              draw: float) -> str | None:
    """Whether a request gets a paired copy to stable: ``"canary"`` for a sampled
    canary-served request, ``"noise"`` (with ``noise_floor``) for a stable-served one
    drawn so that as many noise pairs as canary pairs are expected (``sample`` x
    ``share / (1 - share)`` of stable's requests), else None. ``draw`` is uniform in
    [0, 1) (the caller's RNG, so tests can seed it); ``share`` the canary's, 0 to 1."""
    p = sample / 100.0
    if role == CANARY:
        return CANARY if draw < p else None
    if noise_floor and role == "stable" and 0.0 < share < 1.0:
        return NOISE if draw < p * share / (1.0 - share) else None
    return None


class Disagreement:
    """The paired disagreement guard of one rollout (see the module docstring)."""

    reason = GuardReason.DISAGREEMENT

    __slots__ = ("alpha", "max_disagreement", "noise_floor", "json_paths", "pairs", "differ",
                 "noise_pairs", "noise_differ", "unjudged", "tripped", "_trip", "_gate",
                 "_queue", "_compare")

    def __init__(self, *, alpha: float = DEFAULT_ALPHA, max_disagreement: Percent = 10.0,
                 noise_floor: bool = False, json_paths: tuple[str, ...] = ()) -> None:
        if not 0 <= max_disagreement <= 100:
            raise ValueError(f"max_disagreement must be 0-100, got {max_disagreement!r}")
        self.alpha = alpha
        self.max_disagreement = max_disagreement
        self.noise_floor = noise_floor
        self.json_paths = json_paths
        self.pairs = self.differ = 0  # canary vs stable
        self.noise_pairs = self.noise_differ = 0  # stable vs stable
        self.unjudged = 0  # pairs whose bodies could not be compared
        self.tripped = False
        delta = max_disagreement / 100.0
        # d = x - y - delta >= -(1 + delta) with a noise floor, x - delta >= -delta without.
        self._trip = BettingTest(low=max(1.0 + delta if noise_floor else delta, _LOW),
                                 alpha=alpha)
        self._gate = BettingTest(low=max(1.0 - delta, _LOW), alpha=alpha)
        self._queue = PairQueue() if noise_floor else None
        self._compare = CompareConfig(status=True, json_paths=json_paths, record=None)

    @property
    def failing(self) -> bool:
        return self.tripped

    def judge_pair(self, kind: str, *, primary_status: int, copy_status: int,
                   primary_body: bytes | None, copy_body: bytes | None) -> bool | None:
        """Compare a finished pair (bodies whole, None when cut by ``inspect_body``) and
        ``observe_pair`` it; returns whether it differs, None when it could not be judged
        (a body missing with json_paths to compare: not counted either way)."""
        verdict = compare(self._compare, primary_status=primary_status,
                          shadow_status=copy_status, primary_body=primary_body,
                          shadow_body=copy_body)
        if self.json_paths and not verdict.paths_compared and not verdict.status_differs:
            self.unjudged += 1
            return None
        differs = verdict.status_differs or bool(verdict.paths)
        self.observe_pair(kind, differs)
        return differs

    def observe_pair(self, kind: str, differs: bool) -> None:
        """One compared pair: ``kind`` ``"canary"`` (canary vs stable) or ``"noise"``
        (stable vs stable)."""
        x = 1.0 if differs else 0.0
        delta = self.max_disagreement / 100.0
        if kind == CANARY:
            self.pairs += 1
            self.differ += differs
        else:
            self.noise_pairs += 1
            self.noise_differ += differs
        queue = self._queue
        if queue is None:
            if kind != CANARY:
                return
            d = x - delta
        else:
            pair = queue.push(kind == CANARY, x)
            if pair is None:
                return
            d = pair[0] - pair[1] - delta
        if self._trip.add(d):
            self.tripped = True
        self._gate.add(-d)

    def not_worse(self, tolerance: Percent | None = None) -> bool:
        """Evidence that the canary's disagreement (over the noise floor) is below
        ``max_disagreement`` (the argument is taken for the judge's shape)."""
        return not self.tripped and self._gate.reached

    def verdict(self) -> Verdict:
        if self.tripped:
            state = JudgeState.FAILING
        elif self.not_worse():
            state = JudgeState.PASSING
        else:
            state = JudgeState.INCONCLUSIVE
        rate, noise = pct(self.differ, self.pairs), pct(self.noise_differ, self.noise_pairs)
        allowed = f"{self.max_disagreement:g}%"
        if self.noise_floor:
            seen = (f"canary differs from stable on {rate:.1f}% of {self.pairs} pairs, stable "
                    f"from itself on {noise:.1f}% of {self.noise_pairs}")
            allowed += " over the noise floor"
        else:
            seen = f"canary differs from stable on {rate:.1f}% of {self.pairs} pairs"
        if state is JudgeState.FAILING:
            reason: str | None = self.reason.value
            detail = f"{seen}: above {allowed} (anytime-valid, alpha {self.alpha:g})"
        elif state is JudgeState.PASSING:
            reason = None
            detail = f"{seen}: below {allowed}"
        else:
            reason = None
            detail = f"not enough pairs yet ({seen}; allowed {allowed})"
        figures: dict[str, object] = {
            "guard": self.reason.value, "alpha": self.alpha,
            "max_disagreement": self.max_disagreement, "noise_floor": self.noise_floor,
            "json_paths": list(self.json_paths),
            "pairs": self.pairs, "differ": self.differ, "rate": round(rate, 3),
            "noise_pairs": self.noise_pairs, "noise_differ": self.noise_differ,
            "noise_rate": round(noise, 3) if self.noise_floor else None,
            "unjudged": self.unjudged,
            "e_value": evalue(self._trip.log_evalue()), "trip_at": round(1 / self.alpha, 3),
        }
        return Verdict(state=state, reason=reason, detail=detail, figures=figures)

    def __repr__(self) -> str:
        return (f"<Disagreement max={self.max_disagreement:g}% noise_floor={self.noise_floor} "
                f"{'failing' if self.tripped else 'open'}: {self.differ}/{self.pairs} canary "
                f"pairs differ, {self.noise_differ}/{self.noise_pairs} noise>")
