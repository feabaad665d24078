"""The paired disagreement guard (issue 17, guard 3): the pair sampling, the comparison it
shares with the shadow, and the tests with and without a noise floor, checked by seeded
simulation; plus the betting test and pair queue underneath (``guard.evidence``)."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from proxy.guard.disagreement import NOISE, Disagreement, pair_kind
from proxy.guard.evidence import BettingTest, PairQueue
from proxy.rollout.judge import JudgeState


def pairs(seed: int, *, rate: float, noise: float = 0.0, noise_floor: bool = False,
          n: int = 2000, max_disagreement: float = 10.0,
          alpha: float = 0.01) -> tuple[int | None, Disagreement]:
    """Canary pairs seen when the guard flipped (None: never), and the guard."""
    rng = random.Random(seed)
    guard = Disagreement(alpha=alpha, max_disagreement=max_disagreement,
                         noise_floor=noise_floor)
    for _ in range(n):
        if noise_floor and rng.random() < 0.5:
            guard.observe_pair(NOISE, rng.random() < noise)
        else:
            guard.observe_pair("canary", rng.random() < rate)
        if guard.failing:
            return guard.pairs, guard
    return None, guard


def test_guard_disagreement_trips_on_half_the_pairs_differing() -> None:
    for seed in range(40):
        n, guard = pairs(seed, rate=0.5)
        assert n is not None and n <= 40, n
        n, guard = pairs(seed, rate=0.5, noise=0.1, noise_floor=True)
        assert n is not None and n <= 200, n


def test_guard_disagreement_leaves_a_canary_as_noisy_as_stable_alone() -> None:
    # Issue 17: an LLM canary that differs from stable only as much as stable from itself.
    for seed in range(40):
        assert pairs(seed, rate=0.3, noise=0.3, noise_floor=True)[0] is None
        assert pairs(seed, rate=0.03)[0] is None  # under max_disagreement, no floor
    # Without the floor, the same canary would be flipped: 30% is over 10%.
    assert pairs(1, rate=0.3)[0] is not None


def test_guard_disagreement_false_flip_rate_is_at_most_alpha_at_the_edge() -> None:
    runs, alpha = 200, 0.2
    bound = runs * alpha + 3 * math.sqrt(runs * alpha * (1 - alpha))
    edge = sum(pairs(100 + s, rate=0.1, n=1000, alpha=alpha)[0] is not None
               for s in range(runs))
    floor = sum(pairs(100 + s, rate=0.35, noise=0.25, noise_floor=True, n=1000,
                      alpha=alpha)[0] is not None for s in range(runs))
    assert edge <= bound and floor <= bound, (edge, floor)


def test_guard_disagreement_with_no_allowance_trips_on_the_first_difference() -> None:
    guard = Disagreement(max_disagreement=0)
    for _ in range(50):
        guard.observe_pair("canary", False)
    assert not guard.failing
    guard.observe_pair("canary", True)
    assert guard.failing


def test_guard_disagreement_judges_pairs_like_the_shadow_compare() -> None:
    guard = Disagreement(json_paths=("predictions.0",))
    a = orjson.dumps({"predictions": ["benign"]})
    b = orjson.dumps({"predictions": ["malignant"]})
    judge = guard.judge_pair
    assert judge("canary", primary_status=200, copy_status=200, primary_body=a,
                 copy_body=a) is False
    assert judge("canary", primary_status=200, copy_status=200, primary_body=a,
                 copy_body=b) is True
    assert judge("canary", primary_status=200, copy_status=503, primary_body=a,
                 copy_body=a) is True
    # A body cut by inspect_body: no verdict on the paths, not counted.
    assert judge("canary", primary_status=200, copy_status=200, primary_body=None,
                 copy_body=a) is None
    assert (guard.pairs, guard.differ, guard.unjudged) == (3, 2, 1)


def test_guard_disagreement_pair_kind_draws_matching_samples() -> None:
    rng = random.Random(2)
    share, kinds = 0.2, {"canary": 0, NOISE: 0, None: 0}
    for _ in range(100_000):
        role = "canary" if rng.random() < share else "stable"
        kinds[pair_kind(role, share=share, sample=10, noise_floor=True,
                        draw=rng.random())] += 1
    assert abs(kinds["canary"] - 2000) < 200 and abs(kinds[NOISE] - 2000) < 200
    assert pair_kind("stable", share=0.2, sample=10, noise_floor=False, draw=0.0) is None
    assert pair_kind("fallback", share=0.2, sample=100, noise_floor=True, draw=0.0) is None
    assert pair_kind("stable", share=0.0, sample=100, noise_floor=True, draw=0.0) is None


def test_guard_disagreement_states_and_figures() -> None:
    _, good = pairs(3, rate=0.0, n=200)
    verdict = good.verdict()
    assert verdict.state is JudgeState.PASSING and good.not_worse(), verdict.detail
    _, fresh = pairs(3, rate=0.0, n=3)
    assert fresh.verdict().state is JudgeState.INCONCLUSIVE
    _, bad = pairs(3, rate=0.5, noise=0.1, noise_floor=True)
    verdict = bad.verdict()
    assert verdict.state is JudgeState.FAILING and verdict.reason == "disagreement"
    assert "over the noise floor" in verdict.detail
    assert verdict.figures["noise_rate"] is not None and orjson.dumps(verdict.figures)
    assert repr(bad).startswith("<Disagreement max=10% noise_floor=True failing: ")
    with pytest.raises(ValueError):
        Disagreement(max_disagreement=101)


def test_guard_betting_test_is_valid_at_the_null_edge_and_powerful_past_it() -> None:
    runs, alpha = 300, 0.2
    bound = runs * alpha + 3 * math.sqrt(runs * alpha * (1 - alpha))
    rejections = 0
    for seed in range(runs):
        rng = random.Random(seed)
        test = BettingTest(low=1.0, alpha=alpha)
        for _ in range(300):  # mean exactly 0, the worst case of H0
            if test.add(rng.choice((-1.0, 1.0))):
                rejections += 1
                break
    assert rejections <= bound, rejections
    rng = random.Random(1)
    test = BettingTest(low=1.0, alpha=0.01)
    n = 0
    while not test.add(rng.choice((-1.0, 1.0, 1.0))):  # mean 1/3
        n += 1
    assert n < 150 and test.reached and test.add(-1.0)  # latched
    assert test.log_evalue() >= math.log(100) - 1.0
    assert "reached" in repr(test)
    test = BettingTest(low=0.5, alpha=0.01)
    test.add(-7.0)  # past the bound: clipped, the wealth never goes negative
    assert math.isfinite(test.log_evalue())
    with pytest.raises(ValueError):
        BettingTest(low=0.0, alpha=0.01)


def test_guard_pair_queue_pairs_in_arrival_order_and_stays_bounded() -> None:
    q = PairQueue(cap=3)
    assert q.push(True, 1.0) is None and q.push(True, 2.0) is None
    assert q.push(False, 10.0) == (1.0, 10.0)
    assert q.push(False, 20.0) == (2.0, 20.0)
    for x in range(5):
        q.push(False, float(x))
    assert q.waiting() == (0, 3) and q.dropped == 2
    assert q.push(True, 9.0) == (9.0, 2.0)  # the oldest left waiting
