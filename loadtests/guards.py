"""Simulation and microbenchmark of the quality guards (issue 17, items 1 and 4).

No network and no event loop: answers, ratings and pairs are drawn at random and fed to
the guards the proxy will use (``proxy.guard``), exactly as the request path will call
them. Each request goes to the canary with probability ``--weight`` (20%).

* **output drift** (``OutputDrift``, alpha 0.01, reading the answers ``wants`` picks):
  the issue's broken classifier (canary answers "malignant" for 90% of inputs, stable
  50/50) and a milder one (70/30), canary answers until the flip; healthy canaries (both
  50/50) over 2,000 requests each: false flips; and canary answers until ``not_worse``
  (10 percentage points per category) on a healthy canary.
* **feedback** (``FeedbackGuard``, alpha 0.01, min_accuracy 0.85): canary accuracy 0.34
  against stable's 0.98 (the issue's MLflow measurement), canary ratings until the flip,
  with and without min_accuracy; healthy (0.98 both) and edge (0.85 both) false flips over
  2,000 ratings; canary ratings until ``not_worse``.
* **disagreement** (``Disagreement``, alpha 0.01, max_disagreement 10): canary pairs
  differing 50%, with no noise floor and over a 20% noise floor, canary pairs until the
  flip; a canary differing 30% over a 30% floor, and 5% without one: false flips.

``--bench`` times one call of each guard entry point instead (best of 7 repeats).

Run: ``python loadtests/guards.py [--runs N]`` (defaults: 1,000 runs per scenario, about a
minute on one core); ``python loadtests/guards.py --bench``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.answer import split_path, value_at  # noqa: E402
from proxy.config.model import GuardConfig, OutputGuardConfig  # noqa: E402
from proxy.guard.disagreement import NOISE, Disagreement  # noqa: E402
from proxy.guard.drift import OutputDrift  # noqa: E402
from proxy.guard.feedback import FeedbackGuard, FeedbackStore  # noqa: E402
from proxy.guard.route import RouteGuards  # noqa: E402

CANARY = "canary"


def drift_run(seed: int, *, weight: float, canary_p: float, stable_p: float = 0.5,
              requests: int = 20_000, gate: bool = False) -> int | None:
    """Canary answers at the flip (or, with ``gate``, when not_worse first held)."""
    rng = random.Random(seed)
    rnd = rng.random
    guard = OutputDrift(alpha=0.01, share=weight)
    canary = 0
    for i in range(requests):
        if rnd() < weight:
            canary += 1
            guard.observe(CANARY, "malignant" if rnd() < canary_p else "benign")
        elif guard.wants("stable", rnd()):
            guard.observe("stable", "malignant" if rnd() < stable_p else "benign")
        if gate:
            if i % 200 == 0 and guard.not_worse():
                return canary
        elif guard.failing:
            return canary
    return None


def feedback_run(seed: int, *, weight: float, canary_acc: float, stable_acc: float,
                 min_accuracy: float | None, ratings: int = 20_000,
                 gate: bool = False) -> int | None:
    rng = random.Random(seed)
    rnd = rng.random
    guard = FeedbackGuard(alpha=0.01, min_accuracy=min_accuracy)
    canary = 0
    for i in range(ratings):
        if rnd() < weight:
            canary += 1
            guard.observe(CANARY, 1.0 if rnd() < canary_acc else 0.0)
        else:
            guard.observe("stable", 1.0 if rnd() < stable_acc else 0.0)
        if gate:
            if i % 50 == 0 and guard.not_worse():
                return canary
        elif guard.failing:
            return canary
    return None


def disagreement_run(seed: int, *, rate: float, noise: float | None,
                     pairs: int = 4_000) -> int | None:
    """Canary pairs at the flip; with ``noise`` a noise pair per canary pair on average."""
    rng = random.Random(seed)
    rnd = rng.random
    guard = Disagreement(alpha=0.01, max_disagreement=10, noise_floor=noise is not None)
    for _ in range(pairs):
        if noise is not None and rnd() < 0.5:
            guard.observe_pair(NOISE, rnd() < noise)
        else:
            guard.observe_pair(CANARY, rnd() < rate)
        if guard.failing:
            return guard.pairs
    return None


def quantile(values: Sequence[int | None], q: float) -> float:
    """Nearest rank, None counted as infinity."""
    ranked = sorted(math.inf if v is None else float(v) for v in values)
    return ranked[max(0, math.ceil(q * len(ranked)) - 1)]


def row(name: str, values: Sequence[int | None], cap: str) -> str:
    def n(x: float) -> str:
        return f"> {cap}" if math.isinf(x) else f"{x:,.0f}"
    flipped = sum(v is not None for v in values)
    return (f"| {name} | {len(values):,} | {n(quantile(values, 0.5))} | "
            f"{n(quantile(values, 0.9))} | {n(quantile(values, 0.99))} | "
            f"{n(quantile(values, 1.0))} | {100 * flipped / len(values):.1f}% |")


def false_row(name: str, values: Sequence[int | None]) -> str:
    flips = sum(v is not None for v in values)
    return f"| {name} | {len(values):,} | {100 * flips / len(values):.2f}% ({flips}) |"


def simulate(runs: int) -> None:
    t0 = time.perf_counter()
    w = 0.2
    print("| to a flip | runs | median | p90 | p99 | max | flipped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(row("drift: canary 90/10, stable 50/50 (canary answers)",
              [drift_run(s, weight=w, canary_p=0.9) for s in range(runs)], "4,000"))
    print(row("drift: canary 70/30 (canary answers)",
              [drift_run(s, weight=w, canary_p=0.7) for s in range(runs)], "4,000"))
    print(row("drift: canary 90/10 at 5% weight (canary answers)",
              [drift_run(s, weight=0.05, canary_p=0.9) for s in range(runs)], "1,000"))
    print(row("feedback: accuracy 0.34 vs 0.98, min_accuracy 0.85 (canary ratings)",
              [feedback_run(s, weight=w, canary_acc=0.34, stable_acc=0.98, min_accuracy=0.85)
               for s in range(runs)], "4,000"))
    print(row("feedback: the same, no min_accuracy (canary ratings)",
              [feedback_run(s, weight=w, canary_acc=0.34, stable_acc=0.98, min_accuracy=None)
               for s in range(runs)], "4,000"))
    print(row("feedback: accuracy 0.90 vs 0.98, no min_accuracy (canary ratings)",
              [feedback_run(s, weight=w, canary_acc=0.90, stable_acc=0.98, min_accuracy=None)
               for s in range(runs)], "4,000"))
    print(row("disagreement: 50% of pairs, no noise floor (canary pairs)",
              [disagreement_run(s, rate=0.5, noise=None) for s in range(runs)], "4,000"))
    print(row("disagreement: 50% over a 20% noise floor (canary pairs)",
              [disagreement_run(s, rate=0.5, noise=0.2) for s in range(runs)], "2,000"))
    print()
    print("| false flips | runs | flipped |")
    print("|---|---:|---:|")
    print(false_row("drift: healthy (50/50 both), 2,000 requests",
                    [drift_run(10_000 + s, weight=w, canary_p=0.5, requests=2_000)
                     for s in range(runs)]))
    print(false_row("feedback: 0.98 both, min_accuracy 0.85, 2,000 ratings",
                    [feedback_run(10_000 + s, weight=w, canary_acc=0.98, stable_acc=0.98,
                                  min_accuracy=0.85, ratings=2_000) for s in range(runs)]))
    print(false_row("feedback: 0.85 both (the edge), min_accuracy 0.85, 2,000 ratings",
                    [feedback_run(10_000 + s, weight=w, canary_acc=0.85, stable_acc=0.85,
                                  min_accuracy=0.85, ratings=2_000) for s in range(runs)]))
    print(false_row("disagreement: 30% over a 30% noise floor, 4,000 pairs",
                    [disagreement_run(10_000 + s, rate=0.3, noise=0.3) for s in range(runs)]))
    print(false_row("disagreement: 10% (the edge), no noise floor, 4,000 pairs",
                    [disagreement_run(10_000 + s, rate=0.1, noise=None) for s in range(runs)]))
    print()
    gates = max(20, runs // 10)
    print("| to passing (`not_worse`), healthy canary | runs | median | p90 | p99 | max | "
          "passed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(row("drift: 50/50 both, 10pp per category (canary answers)",
              [drift_run(s, weight=w, canary_p=0.5, requests=100_000, gate=True)
               for s in range(gates)], "20,000"))
    print(row("feedback: 0.98 both, 5pp, min_accuracy 0.85 (canary ratings)",
              [feedback_run(s, weight=w, canary_acc=0.98, stable_acc=0.98, min_accuracy=0.85,
                            gate=True) for s in range(gates)], "4,000"))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def best(fn: Callable[[], object], number: int) -> float:
    """µs per call, best of 7 repeats."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def bench() -> None:
    rng = random.Random(1)
    answers = [orjson.dumps({"predictions": ["malignant" if rng.random() < 0.5 else "benign"]})
               for _ in range(1000)]
    chat = orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 50},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60}})
    sse = b"".join(b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {
        "content": "tok "}}]}) + b"\n\n" for _ in range(50)) + b"data: " + orjson.dumps(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\ndata: [DONE]\n\n"
    pred, finish = split_path("predictions.0"), split_path("choices.0.finish_reason")
    arms = [CANARY if rng.random() < 0.1 else "stable" for _ in range(1000)]
    values = [value_at(a, pred) for a in answers]
    del values[-3:]  # 997 values against 1,000 arms: no arm sees the same value twice running
    print(f"answer bodies: {len(answers[0])} B (MLflow-style), {len(chat)} B (OpenAI chat), "
          f"{len(sse)} B (an SSE stream of 51 chunks)")

    def warm_drift() -> OutputDrift:
        guard = OutputDrift(share=0.1, json_path="predictions.0")
        for i in range(20_000):
            guard.observe(arms[i % 1000], values[i % 997])
        return guard

    it = iter(range(10**9))
    drift = warm_drift()
    costs: list[tuple[str, float]] = []
    costs.append(("answer.value_at, MLflow answer", best(
        lambda: value_at(answers[next(it) % 1000], pred), 20_000)))
    costs.append(("answer.value_at, OpenAI chat answer", best(
        lambda: value_at(chat, finish), 20_000)))
    costs.append(("answer.value_at, SSE stream (51 chunks)", best(
        lambda: value_at(sse, finish), 2_000)))
    costs.append(("OutputDrift.wants, 90/10 mix", best(
        lambda: drift.wants(arms[next(it) % 1000], 0.5), 50_000)))
    costs.append(("OutputDrift.observe, 90/10 mix", best(
        lambda: (i := next(it), drift.observe(arms[i % 1000], values[i % 997])), 20_000)))
    costs.append(("OutputDrift.observe_body, MLflow answer", best(
        lambda: (i := next(it), drift.observe_body(arms[i % 1000], answers[i % 997])), 20_000)))
    assert not drift.failing, drift
    costs.append(("OutputDrift.verdict()", best(drift.verdict, 50)))
    route = RouteGuards(GuardConfig(output=OutputGuardConfig(json_path="predictions.0")),
                        share=0.1, clock=time.monotonic)
    route.drift = warm_drift()

    def per_request() -> None:
        i = next(it)
        arm, draw = arms[i % 1000], rng.random()
        body = answers[i % 997] if route.wants_answer(arm, draw) else None
        route.answered(arm, body, draw=draw, request_id=None, fingerprint="f")

    costs.append(("RouteGuards, output drift only: wants_answer + answered, per request "
                  "(90/10, MLflow answers)", best(per_request, 20_000)))
    costs.append(("OutputDrift.not_worse()", best(drift.not_worse, 50)))
    clock_now = [0.0]

    def clock() -> float:
        return clock_now[0]

    store = FeedbackStore(max_pending=100_000, ttl=3600.0, clock=clock)
    for i in range(100_000):  # full: every remember also evicts
        store.remember(f"warm-{i}", role="stable", fingerprint="f", value="malignant")

    def remember() -> None:
        i = next(it)
        clock_now[0] += 0.0001
        store.remember(f"id-{i}", role=arms[i % 1000], fingerprint="f", value=values[i % 997])

    costs.append(("FeedbackStore.remember (full store: evicts one)", best(remember, 20_000)))
    bodies = [orjson.dumps({"request_id": f"id-{i}", "label": "malignant"})
              for i in range(10**6 - 200_000, 10**6)]
    for i in range(10**6 - 200_000, 10**6):
        store.remember(f"id-{i}", role="canary", fingerprint="f", value="benign")
    sub = iter(bodies)
    costs.append(("FeedbackStore.submit (label)", best(
        lambda: store.submit(next(sub), fingerprint="f"), 10_000)))
    fb = FeedbackGuard(min_accuracy=0.85)
    costs.append(("FeedbackGuard.observe, 90/10 mix", best(
        lambda: fb.observe(arms[next(it) % 1000], 1.0), 20_000)))
    dis = Disagreement(noise_floor=True, json_paths=("predictions.0",))
    costs.append(("Disagreement.observe_pair", best(
        lambda: dis.observe_pair(CANARY if next(it) % 2 else NOISE, False), 20_000)))
    costs.append(("Disagreement.judge_pair, MLflow answers", best(
        lambda: dis.judge_pair(CANARY, primary_status=200, copy_status=200,
                               primary_body=answers[next(it) % 1000], copy_body=answers[7]),
        20_000)))
    costs.append(("Disagreement.verdict()", best(dis.verdict, 2_000)))
    print("| call | µs |\n|---|---:|")
    for name, us in costs:
        print(f"| {name} | {us:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=1000, help="runs per scenario")
    parser.add_argument("--bench", action="store_true", help="time the calls instead")
    args = parser.parse_args(argv)
    if args.bench:
        bench()
    else:
        simulate(args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
