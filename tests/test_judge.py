"""The judges: the sequential judge's false-alarm bound, what it catches, its three states
and its gate; the evidence arithmetic; the threshold adapter. Pure and seeded."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest

from proxy.config.model import RollbackConfig
from proxy.rollout import judge_evidence as ev
from proxy.rollout.judge import JudgeState, SequentialJudge
from proxy.rollout.judge_threshold import ThresholdJudge


@dataclass(frozen=True)
class Arm:
    failure: float = 0.01
    client_error: float = 0.02
    slowdown: float = 1.0


def feed(judge: SequentialJudge | ThresholdJudge, rng: random.Random, requests: int, *,
         share: float, stable: Arm = Arm(), canary: Arm = Arm(),
         clock: list[float] | None = None) -> int | None:
    """Send ``requests`` requests; the request count at the trip, or None."""
    rnd, gauss = rng.random, rng.gauss
    for i in range(1, requests + 1):
        if clock is not None:
            clock[0] += 0.005
        arm, a = ("canary", canary) if rnd() < share else ("stable", stable)
        failed = rnd() < a.failure
        client_error = not failed and rnd() < a.client_error
        judge.observe(arm, failed, client_error, 0.07 * a.slowdown * math.exp(0.6 * gauss()))
        if judge.failing:
            return i
    return None


def test_judge_false_alarms_stay_within_alpha_under_continuous_monitoring() -> None:
    # 150 healthy canaries at high event rates, judged after every request: the bound
    # is alpha = 0.05 (7.5 expected at most); allow twice that for a small sample.
    rng = random.Random(16)
    alarms = 0
    for _ in range(150):
        judge = SequentialJudge(share=0.3, alpha=0.05)
        if feed(judge, rng, 1000, share=0.3, stable=Arm(0.05, 0.05),
                canary=Arm(0.05, 0.05)) is not None:
            alarms += 1
    assert alarms <= 15


def test_judge_catches_a_5x_failure_regression() -> None:
    trips = []
    for seed in range(5):
        judge = SequentialJudge(share=0.2)
        trips.append(feed(judge, random.Random(seed), 20_000, share=0.2,
                          stable=Arm(0.01), canary=Arm(0.05)))
        assert judge.verdict().reason == "failure_rate"
    assert all(t is not None and t < 6000 for t in trips), trips


def test_judge_trips_on_a_dead_canary_within_a_few_requests() -> None:
    judge = SequentialJudge(share=0.1)
    feed(judge, random.Random(3), 5000, share=0.1, canary=Arm(1.0))
    assert judge.failing and judge.canary_requests <= 6


def test_judge_catches_a_4xx_regression_but_not_4xx_on_both_arms() -> None:
    bad = SequentialJudge(share=0.2)
    assert feed(bad, random.Random(1), 20_000, share=0.2, stable=Arm(0.0, 0.02),
                canary=Arm(0.0, 0.10)) is not None
    verdict = bad.verdict()
    assert verdict.state is JudgeState.FAILING and verdict.reason == "client_error_rate"
    assert verdict.detail.startswith("canary 4xx rate ")
    both = SequentialJudge(share=0.2)
    assert feed(both, random.Random(2), 20_000, share=0.2, stable=Arm(0.0, 0.3),
                canary=Arm(0.0, 0.3)) is None


def test_judge_catches_a_latency_shift() -> None:
    judge = SequentialJudge(share=0.2)
    assert feed(judge, random.Random(4), 20_000, share=0.2,
                canary=Arm(slowdown=1.5)) is not None
    verdict = judge.verdict()
    assert verdict.reason == "latency" and verdict.detail.startswith("canary slower than stable")


def test_judge_is_inconclusive_at_the_start() -> None:
    judge = SequentialJudge(share=0.1)
    assert judge.verdict().state is JudgeState.INCONCLUSIVE
    feed(judge, random.Random(5), 200, share=0.1)
    verdict = judge.verdict()
    assert verdict.state is JudgeState.INCONCLUSIVE and verdict.reason is None
    assert verdict.detail.startswith("not enough evidence yet over ")
    assert not judge.not_worse()


def test_judge_passes_after_enough_healthy_evidence() -> None:
    judge = SequentialJudge(share=0.5)
    assert feed(judge, random.Random(6), 12_000, share=0.5, stable=Arm(0.001, 0.005),
                canary=Arm(0.001, 0.005)) is None
    assert judge.not_worse()
    assert not judge.not_worse(tolerance=0.01)  # 0.01pp needs far more traffic
    verdict = judge.verdict()
    assert verdict.state is JudgeState.PASSING
    assert verdict.detail.startswith("canary no worse than stable within 2pp")


def test_judge_gate_refuses_a_canary_worse_beyond_the_tolerance() -> None:
    # 2pp worse; an alpha this small keeps the trip away while the gate is read.
    judge = SequentialJudge(share=0.5, tolerance=1.0, latency_tolerance=1.0, alpha=1e-9)
    feed(judge, random.Random(7), 8000, share=0.5, stable=Arm(0.01, 0.0),
         canary=Arm(0.03, 0.0))
    assert not judge.failing and not judge.not_worse()
    assert judge.not_worse(tolerance=10.0)


def test_judge_figures_are_counts_and_e_values() -> None:
    judge = SequentialJudge(share=0.2)
    feed(judge, random.Random(8), 3000, share=0.2, canary=Arm(0.2))
    figures = judge.verdict().figures
    canary, stable = figures["canary"], figures["stable"]
    assert isinstance(canary, dict) and isinstance(stable, dict)
    assert canary["requests"] == judge.canary_requests and canary["failures"] > 0
    e_values = figures["e_values"]
    assert isinstance(e_values, dict) and e_values["failure_rate"] >= 250
    assert figures["trip_at"] == {"failure_rate": 250.0, "client_error_rate": 500.0,
                                  "latency_p75": 500.0, "latency_p95": 500.0}
    assert repr(judge).startswith("<SequentialJudge share=0.2 alpha=0.01 failing: ")


def test_judge_set_share_keeps_the_evidence() -> None:
    judge = SequentialJudge(share=0.1)
    feed(judge, random.Random(9), 500, share=0.1)
    before = judge.log_evalues()
    judge.set_share(0.3)
    assert judge.share == 0.3
    assert judge.log_evalues() == pytest.approx(before)
    fresh = SequentialJudge(share=0.3)
    fresh.set_share(0.3)
    assert fresh.log_evalues() == pytest.approx(SequentialJudge(share=0.3).log_evalues())
    assert feed(judge, random.Random(10), 20_000, share=0.3, canary=Arm(0.05)) is not None


def test_judge_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="share"):
        SequentialJudge(share=1.0)
    with pytest.raises(ValueError, match="alpha"):
        SequentialJudge(share=0.5, alpha=0.0)


def test_evidence_events_needed_is_a_lower_bound() -> None:
    mix = ev.Odds(0.1)
    base = ev.prior()
    threshold = math.log(250)
    for m in (0, 3, 40, 400):
        need = math.ceil(ev.canary_events_needed(base, mix, m, threshold))
        assert ev.log_evalue(base, mix, max(need - 1, 0), m) < threshold


def test_evidence_rate_bounds_bracket_the_estimate_and_shrink() -> None:
    threshold = math.log(600)
    assert ev.upper_bound(0, 0, threshold) == 1.0 and ev.lower_bound(0, 0, threshold) == 0.0
    assert ev.lower_bound(0, 500, threshold) == 0.0
    assert 0.0 < ev.upper_bound(0, 500, threshold) < 0.03
    wide = ev.upper_bound(10, 1000, threshold) - ev.lower_bound(10, 1000, threshold)
    narrow = ev.upper_bound(100, 10_000, threshold) - ev.lower_bound(100, 10_000, threshold)
    assert ev.lower_bound(10, 1000, threshold) < 0.01 < ev.upper_bound(10, 1000, threshold)
    assert narrow < wide / 2


def test_evidence_stable_quantiles_track_p75_and_p95() -> None:
    q = ev.StableQuantiles(min_samples=20)
    for i in range(19):
        q.add(0.01 * (i + 1))
    assert math.isinf(q.p75)
    rng = random.Random(11)
    q = ev.StableQuantiles(min_samples=20)
    for _ in range(20_000):
        q.add(rng.uniform(0.0, 1.0))
    step = 2 ** (1 / 16)  # one bucket
    assert 0.75 <= q.p75 <= 0.75 * step * step
    assert 0.95 <= q.p95 <= 0.95 * step * step


def test_threshold_judge_trips_as_the_rules_do_and_ignores_4xx() -> None:
    clock = [0.0]
    policy = RollbackConfig()
    judge = ThresholdJudge(policy=policy, clock=lambda: clock[0])
    assert feed(judge, random.Random(12), 4000, share=0.5, stable=Arm(0.0, 0.5),
                canary=Arm(0.0, 0.5), clock=clock) is None
    verdict = judge.verdict()
    assert verdict.state is JudgeState.PASSING and judge.not_worse()
    assert feed(judge, random.Random(13), 4000, share=0.5, canary=Arm(0.15),
                clock=clock) is not None
    verdict = judge.verdict()
    assert verdict.state is JudgeState.FAILING and verdict.reason == "error_rate"
    assert not judge.not_worse()


def test_threshold_judge_is_inconclusive_below_min_requests() -> None:
    clock = [0.0]
    judge = ThresholdJudge(policy=replace(RollbackConfig(), min_requests=50),
                           clock=lambda: clock[0])
    feed(judge, random.Random(14), 20, share=0.5, clock=clock)
    assert judge.verdict().state is JudgeState.INCONCLUSIVE
    assert repr(judge).startswith("<ThresholdJudge open: <SlidingWindow 10s: ")


def test_judge_modules_import_neither_asyncio_nor_aiohttp() -> None:
    code = ("import sys, proxy.rollout.judge, proxy.rollout.judge_threshold\n"
            "print(sorted({'asyncio', 'aiohttp'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
