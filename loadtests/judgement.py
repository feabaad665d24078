"""Simulation: today's threshold rules against the sequential judge (issue 16, item 4).

No network and no event loop: requests are drawn at random and fed, one by one, to the
judges the proxy uses (``proxy.rollout.judge``, ``proxy.rollout.judge_threshold``), on a
simulated clock. Each request goes to the canary with probability ``--share``; it fails
with its arm's failure rate, else is a 4xx with its arm's client-error rate; its latency
is lognormal (median 70 ms, sigma 0.6, so p99 ~280 ms against max_p99 500 ms) times the
arm's slowdown. Requests arrive every 1/``--rate`` s and end at once.

Judges, all on the same requests:

* ``threshold``: ``rules.evaluate`` with today's defaults (10 s window, min_requests 20,
  max_error_rate 5%, max_p99 500 ms, consecutive_failures 5, compare_to_stable), asked
  after a canary failure or slow request and on every 100 ms tick, as the machine does.
* ``sequential``: ``SequentialJudge`` (alpha 0.01), after every request.
* ``rails``: the guard rails that run beside the sequential judge (the rules with
  ``judge: sequential``: no max_error_rate, consecutive_failures, max_p99 read over at
  least three requests); "sequential + rails" is the first of the two to trip: what a
  route with the default config does.

Reports: false rollbacks over healthy canaries (canary = stable), the canary requests
until a flip for each regression (median and p90 over the runs; runs that never flip
within ``--cap`` canary requests count as infinite), and the canary requests until the
sequential judge's progressive gate (``not_worse``) first holds on a healthy canary.

Run: ``python loadtests/judgement.py [--quick] [--healthy N] [--runs N] [--workers N]``
(the full run takes several minutes on two cores); ``--bench`` times ``observe()`` instead.
Raw results: ``loadtests/out/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config.model import RollbackConfig  # noqa: E402
from proxy.rollout.judge import CANARY, Judge, SequentialJudge  # noqa: E402
from proxy.rollout.judge_threshold import ThresholdJudge  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
MEDIAN = 0.07
SIGMA = 0.6
CLIENT_ERRORS = 0.02
HEALTHY_RATES = (0.001, 0.005, 0.01, 0.02, 0.05)
JUDGES = ("threshold", "sequential", "rails")
GATE_EVERY = 1.0  # seconds of simulated time between two not_worse() readings


@dataclass(frozen=True, slots=True)
class Arm:
    failure: float
    client_error: float = CLIENT_ERRORS
    slowdown: float = 1.0


@dataclass(frozen=True, slots=True)
class Burst:
    """From ``start`` to ``end`` (simulated seconds) both arms fail and 4xx at these rates:
    a shared outage, or a client sending bad requests, hitting both versions alike."""

    start: float
    end: float
    failure: float
    client_error: float


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    stable: Arm
    canary: Arm
    burst: Burst | None = None


@dataclass(frozen=True, slots=True)
class Run:
    """One simulated canary: per judge, the canary requests at its flip (None: never)
    and why; the canary requests when the sequential gate first held (None: never)."""

    scenario: str
    seed: int
    canary_requests: int
    flips: dict[str, int | None]
    reasons: dict[str, str | None]
    gate: int | None


class SimClock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_judges(clock: SimClock, share: float) -> list[Judge]:
    # threshold: today's rules; rails: what runs beside the sequential judge (no
    # max_error_rate, max_p99 read over at least three requests).
    return [ThresholdJudge(policy=RollbackConfig(judge="threshold"), clock=clock),
            SequentialJudge(share=share),
            ThresholdJudge(policy=RollbackConfig(max_error_rate=None), clock=clock)]


def simulate(scenario: Scenario, seed: int, share: float, rate: float, max_requests: int,
             cap: int, gate: bool) -> Run:
    """Feed one canary's requests to the judges until all flipped, ``cap`` canary
    requests or ``max_requests`` requests (and, with ``gate``, the gate held)."""
    rng = random.Random(seed)
    rnd, gauss, exp = rng.random, rng.gauss, math.exp
    clock = SimClock()
    judges = make_judges(clock, share)
    sequential = judges[1]
    assert isinstance(sequential, SequentialJudge)
    flips: list[int | None] = [None] * len(judges)
    # The gate runs watch only the sequential judge (the others' gate is min_requests).
    open_ = [1] if gate else list(range(len(judges)))
    gate_at: int | None = None
    gate_every = max(1, round(GATE_EVERY * rate))
    stable, canary = scenario.stable, scenario.canary
    s_median, c_median = MEDIAN * stable.slowdown, MEDIAN * canary.slowdown
    dt = 1.0 / rate
    burst = scenario.burst or Burst(-1.0, -1.0, 0.0, 0.0)
    n_canary = 0
    for i in range(max_requests):
        now = clock.now = i * dt
        if rnd() < share:
            arm, a, median = CANARY, canary, c_median
            n_canary += 1
        else:
            arm, a, median = "stable", stable, s_median
        if burst.start <= now < burst.end:
            failed = rnd() < burst.failure
            client_error = not failed and rnd() < burst.client_error
        else:
            failed = rnd() < a.failure
            client_error = not failed and rnd() < a.client_error
        latency = median * exp(SIGMA * gauss())
        flipped = False
        for j in open_:
            judge = judges[j]
            judge.observe(arm, failed, client_error, latency)
            if judge.failing:
                flips[j] = n_canary
                flipped = True
        if flipped:
            open_ = [j for j in open_ if flips[j] is None]
        if n_canary >= cap or not open_:
            break
        if gate and i % gate_every == 0 and sequential.not_worse():
            gate_at = n_canary
            break
    reasons: dict[str, str | None] = {}
    for name, judge in zip(JUDGES, judges, strict=True):
        reasons[name] = judge.verdict().reason if judge.failing else None
    return Run(scenario=scenario.name, seed=seed, canary_requests=n_canary,
               flips=dict(zip(JUDGES, flips, strict=True)), reasons=reasons, gate=gate_at)


def _job(args: tuple[Scenario, int, float, float, int, int, bool]) -> Run:
    return simulate(*args)


def run_all(jobs: Sequence[tuple[Scenario, int, float, float, int, int, bool]],
            workers: int) -> list[Run]:
    if workers <= 1:
        return [_job(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_job, jobs, chunksize=max(1, len(jobs) // (workers * 8))))


def combined(run: Run) -> int | None:
    """Canary requests until "sequential + rails" flips: the first of the two."""
    found = [x for x in (run.flips["sequential"], run.flips["rails"]) if x is not None]
    return min(found) if found else None


def quantile(values: Sequence[int | None], q: float) -> float:
    """Nearest-rank quantile, None counted as infinity."""
    ranked = sorted(math.inf if v is None else float(v) for v in values)
    return ranked[max(0, math.ceil(q * len(ranked)) - 1)]


def _n(x: float, cap: int) -> str:
    return f"> {cap:,}" if math.isinf(x) else f"{x:,.0f}"


def healthy_table(runs: list[Run], alpha: float, title: str) -> str:
    lines = [f"| {title} | runs | threshold | sequential | rails | "
             "sequential + rails |", "|---|---:|---:|---:|---:|---:|"]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.scenario, []).append(run)
    for name, group in [*groups.items(), ("all", runs)]:
        n = len(group)

        def rate(pick: Callable[[Run], int | None], group: list[Run] = group) -> str:
            k = sum(1 for r in group if pick(r) is not None)
            return f"{k * 100.0 / len(group):.2f}% ({k})"

        lines.append(f"| {name} | {n:,} | {rate(lambda r: r.flips['threshold'])} | "
                     f"{rate(lambda r: r.flips['sequential'])} | "
                     f"{rate(lambda r: r.flips['rails'])} | {rate(combined)} |")
    reasons: dict[str, dict[str, int]] = {}
    for run in runs:
        for judge, reason in run.reasons.items():
            if reason is not None:
                counts = reasons.setdefault(judge, {})
                counts[reason] = counts.get(reason, 0) + 1
    lines.append("")
    lines.append("False rollbacks by reason: " + "; ".join(
        f"{judge}: " + ", ".join(f"{r} {c}" for r, c in sorted(counts.items()))
        for judge, counts in sorted(reasons.items())) + f" (alpha {alpha:g})")
    return "\n".join(lines)


def detection_table(runs: list[Run], cap: int) -> str:
    lines = ["| regression | runs | threshold median / p90 | sequential median / p90 | "
             "sequential + rails median / p90 | flipped within the cap (thr / seq) | "
             "threshold's trip reasons |", "|---|---:|---:|---:|---:|---:|---|"]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.scenario, []).append(run)
    for name, group in groups.items():
        cells = []
        for pick in (lambda r: r.flips["threshold"], lambda r: r.flips["sequential"], combined):
            values = [pick(r) for r in group]
            cells.append(f"{_n(quantile(values, 0.5), cap)} / {_n(quantile(values, 0.9), cap)}")
        thr = sum(1 for r in group if r.flips["threshold"] is not None) * 100 // len(group)
        seq = sum(1 for r in group if r.flips["sequential"] is not None) * 100 // len(group)
        why: dict[str, int] = {}
        for r in group:
            reason = r.reasons["threshold"]
            if reason is not None:
                why[reason] = why.get(reason, 0) + 1
        thr_why = ", ".join(f"{k} {v}" for k, v in sorted(why.items())) or "-"
        lines.append(f"| {name} | {len(group)} | {' | '.join(cells)} | {thr}% / {seq}% "
                     f"| {thr_why} |")
    return "\n".join(lines)


def gate_table(runs: list[Run], cap: int) -> str:
    lines = ["| stable = canary error rate | runs | canary requests to `passing`, "
             "median / p90 | passed within the cap |", "|---|---:|---:|---:|"]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.scenario, []).append(run)
    for name, group in groups.items():
        values = [r.gate for r in group]
        passed = sum(1 for v in values if v is not None) * 100 // len(group)
        lines.append(f"| {name} | {len(group)} | {_n(quantile(values, 0.5), cap)} / "
                     f"{_n(quantile(values, 0.9), cap)} | {passed}% |")
    return "\n".join(lines)


def bench() -> None:
    """Cost of one observe() (canary, stable, mixed), verdict() and not_worse(), timeit."""
    rng = random.Random(1)
    sample = [(CANARY if rng.random() < 0.1 else "stable", rng.random() < 0.01,
               rng.random() < 0.02, MEDIAN * math.exp(SIGMA * rng.gauss()))
              for _ in range(100_000)]
    clock = SimClock()
    sequential = SequentialJudge(share=0.1)
    threshold = ThresholdJudge(policy=RollbackConfig(), clock=clock)
    for i, (arm, failed, client_error, latency) in enumerate(sample):  # warm: 100,000
        clock.now = i * 0.005
        sequential.observe(arm, failed, client_error, latency)
        threshold.observe(arm, failed, client_error, latency)
    # Batches as the warm judges would see them next (500 canary requests are what 5,000
    # mixed ones hold), each timed on a fresh copy so that no state drifts (a canary-only
    # stream would soon trip the judge, and a tripped judge has nothing left to do).
    batches = {"canary": [o for o in sample if o[0] == CANARY][:500],
               "stable": [o for o in sample if o[0] != CANARY][:4500], "mixed": sample[:5000]}

    def per_call(judge: Judge, batch: list[tuple[str, bool, bool, float]]) -> float:
        times = []
        for _ in range(40):
            observe = copy.deepcopy(judge).observe
            t0 = time.perf_counter()
            for arm, failed, client_error, latency in batch:
                observe(arm, failed, client_error, latency)
            t1 = time.perf_counter()
            for _arm, _failed, _client_error, _latency in batch:
                pass
            times.append((t1 - t0) - (time.perf_counter() - t1))
        return min(times) / len(batch) * 1e6

    assert not sequential.failing and not threshold.failing
    for name, batch in batches.items():
        print(f"SequentialJudge.observe, {name:6}: {per_call(sequential, batch):.2f} us"
              f"   ThresholdJudge.observe: {per_call(threshold, batch):.2f} us")
    print(f"(the sequential judge after warm-up: {sequential.verdict().state.value})")
    for name, fn in (("verdict()", sequential.verdict), ("not_worse()", sequential.not_worse)):
        cost = min(timeit.repeat(fn, number=200, repeat=5)) / 200 * 1e6
        print(f"SequentialJudge.{name}: {cost:.1f} us")


def regressions() -> list[Scenario]:
    out = [Scenario("failures 1% -> 100% (dead canary)", Arm(0.01), Arm(1.0))]
    for base in (0.01, 0.001):
        for factor in (1.5, 2.0, 5.0, 20.0):
            out.append(Scenario(f"failures {base:.1%} -> {base * factor:.2%} ({factor:g}x)",
                                Arm(base), Arm(base * factor)))
    out.append(Scenario("4xx 2% -> 10% (5x), failures 1%", Arm(0.01), Arm(0.01, 0.10)))
    out.append(Scenario("4xx 2% -> 4% (2x), failures 1%", Arm(0.01), Arm(0.01, 0.04)))
    for slowdown in (1.2, 2.0):
        out.append(Scenario(f"latency x{slowdown:g}, failures 1%", Arm(0.01),
                            Arm(0.01, slowdown=slowdown)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="small counts, ~1 min")
    parser.add_argument("--healthy", type=int, default=10_000, help="healthy canaries")
    parser.add_argument("--requests", type=int, default=10_000,
                        help="requests (both arms) per healthy canary")
    parser.add_argument("--runs", type=int, default=200, help="runs per regression")
    parser.add_argument("--gate-runs", type=int, default=60, help="runs per gate rate")
    parser.add_argument("--bursts", type=int, default=2000, help="healthy canaries with a burst")
    parser.add_argument("--cap", type=int, default=10_000, help="canary requests per run")
    parser.add_argument("--share", type=float, default=0.1, help="canary share of traffic")
    parser.add_argument("--rate", type=float, default=200.0, help="route requests per second")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="healthy,bursts,detect,gate")
    parser.add_argument("--bench", action="store_true", help="only time observe() etc.")
    args = parser.parse_args(argv)
    if args.bench:
        print(f"CPython {sys.version.split()[0]}")
        bench()
        return 0
    if args.quick:
        args.healthy, args.runs, args.gate_runs, args.bursts = 500, 40, 15, 200
    only = set(args.only.split(","))
    share, rate, cap = args.share, args.rate, args.cap
    print(f"CPython {sys.version.split()[0]}, share {share:g}, {rate:g} req/s, "
          f"{args.workers} workers", flush=True)
    results: dict[str, object] = {"args": vars(args)}
    alpha = SequentialJudge(share=share).alpha
    if "healthy" in only:
        t0 = time.perf_counter()
        scenarios = [Scenario(f"{r:.1%}", Arm(r), Arm(r)) for r in HEALTHY_RATES]
        jobs = [(scenarios[i % len(scenarios)], 1_000_000 + i, share, rate, args.requests,
                 args.requests, False) for i in range(args.healthy)]
        runs = run_all(jobs, args.workers)
        print(f"\nFalse rollbacks: {args.healthy:,} healthy canaries x {args.requests:,} "
              f"requests ({time.perf_counter() - t0:.0f} s)\n")
        print(healthy_table(runs, alpha, "stable = canary error rate"), flush=True)
        results["healthy"] = [asdict(r) for r in runs]
    if "bursts" in only:
        t0 = time.perf_counter()
        scenarios = [
            Scenario("bad client: 4xx 50% on both arms, 10 s", Arm(0.01), Arm(0.01),
                     Burst(10.0, 20.0, 0.01, 0.5)),
            Scenario("shared outage: failures 30% on both arms, 5 s", Arm(0.01), Arm(0.01),
                     Burst(10.0, 15.0, 0.3, CLIENT_ERRORS)),
        ]
        jobs = [(scenarios[i % len(scenarios)], 4_000_000 + i, share, rate, args.requests,
                 args.requests, False) for i in range(args.bursts)]
        runs = run_all(jobs, args.workers)
        print(f"\nFalse rollbacks under a burst on both arms (at 10 s of {args.requests:,} "
              f"requests): {args.bursts:,} healthy canaries ({time.perf_counter() - t0:.0f} s)"
              "\n")
        print(healthy_table(runs, alpha, "burst"), flush=True)
        results["bursts"] = [asdict(r) for r in runs]
    if "detect" in only:
        t0 = time.perf_counter()
        jobs = [(s, 2_000_000 + 1000 * k + i, share, rate, int(2 * cap / share), cap, False)
                for k, s in enumerate(regressions()) for i in range(args.runs)]
        runs = run_all(jobs, args.workers)
        print(f"\nCanary requests until a flip: {args.runs} runs per regression, cap "
              f"{cap:,} canary requests ({time.perf_counter() - t0:.0f} s)\n")
        print(detection_table(runs, cap), flush=True)
        results["detect"] = [asdict(r) for r in runs]
    if "gate" in only:
        t0 = time.perf_counter()
        gate_cap = 2 * cap
        scenarios = [Scenario(f"{r:.1%}", Arm(r), Arm(r)) for r in (0.001, 0.01, 0.05)]
        jobs = [(s, 3_000_000 + 1000 * k + i, share, rate, int(2 * gate_cap / share), gate_cap,
                 True)
                for k, s in enumerate(scenarios) for i in range(args.gate_runs)]
        runs = run_all(jobs, args.workers)
        print(f"\nProgressive gate (tolerance 2pp, p75 within 1.2x): {args.gate_runs} "
              f"healthy runs per rate ({time.perf_counter() - t0:.0f} s)\n")
        print(gate_table(runs, gate_cap), flush=True)
        results["gate"] = [asdict(r) for r in runs]
    OUT.mkdir(exist_ok=True)
    path = OUT / time.strftime("judgement-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(results))
    print(f"\nraw: {path.relative_to(OUT.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
