"""The `rollback` scenario: how fast a bad canary is flipped back, and what clients see.

For each fault (error: the canary answers 500; hang: it never answers; slow: it answers
after 1 s) and canary rate (5, 20, 100 req/s), a fresh stable + canary pair of
`upstream_ctl.py` servers and a fresh flipback (canary weight 20, retry on stable,
rollback {window 10s, min_requests 20, max_error_rate 5, max_p99 500ms,
consecutive_failures 5}, canary `timeout: 2s`) take open-loop load at canary rate / 0.2.
After a warm-up that fills the 10 s window, the fault is switched on through the canary's
`POST /_fault`; its answer is the switch instant (`time.time()`, the *onset*). Load goes on
for 3 s more, then:

  routed away  every request carries `x-request-id: lt-<i>` and the canary logs the ids it
               receives, so "sent to the canary" is known per request even when a retry
               on stable answered it. Routed away = the earliest scheduled send time t
               after onset such that no request scheduled at or after t reached the
               canary, minus onset. (Precision: one inter-arrival, 40 ms at 25 req/s.)
  event        the first `rollback` event's RFC 3339 `time` from admin `/events`
               (millisecond resolution), minus onset; `latch_s` in the JSON is the
               latch's own time.time() stamp from `/routes`.
  client errors  non-2xx answers and exceptions over the whole run (warm-up included).
  hung         canary arrivals while the fault was a hang/slow: the clients that waited
               on the canary; the JSON has what they finally got and after how long.

`--windows-cost`: saturation throughput (`wrk -t1 -c32 -d5s`, or the closed-loop
generator without wrk) through two flipbacks on the same fast upstreams, a 90/10 route
with rollback on and one with `rollback: {enabled: false}`, interleaved, 3 rounds each,
plus each flipback's CPU µs per request (`--cost-weight 100`: a promoted route, where
every request is judged; `--cost-only`: skip the fault matrix). Every lane keeps its
window either way (the admin API shows the figures): `enabled: false` only skips the
per-request judgement (two window readings and the rules), so that is what this measures.

    python loadtests/rollback.py                       # whole matrix, ~2 min
    python loadtests/rollback.py --windows-cost        # plus the on/off throughput, ~1 min more
    python loadtests/rollback.py --quick --only error --rates 20
    python loadtests/rollback.py --cost-only --cost-weight 100
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import orjson

from loadtests.loadgen import Traced, percentile, run_open_loop
from loadtests.overhead import Settings as OverheadSettings
from loadtests.overhead import Target, saturate
from loadtests.procs import (
    OUT_DIR,
    REPO,
    Child,
    ChildGroup,
    free_port,
    machine_info,
    noise_meter,
    run_scenario,
    wait_http,
    wait_port,
    wait_quiet,
)

FAULTS = {
    "error": {"mode": "error", "status": 500},
    "hang": {"mode": "hang"},
    "slow": {"mode": "slow", "delay": 1.0},
}
DEFAULT_FAULTS = ("error", "hang")
ROUTE = "rb"
PATH = "/v1/completions"
ROLLBACK_ON = (
    "{window: 10s, min_requests: 20, max_error_rate: 5, max_p99: 500ms, consecutive_failures: 5}"
)
ROLLBACK_OFF = "{enabled: false}"
MAX_P99_S = 0.5
TARGET_S = {"error": 1.0, "hang": MAX_P99_S + 0.5, "slow": MAX_P99_S + 0.5}

CONFIG = """\
server: {{listen: "127.0.0.1:{port}"}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
state: {{file: "{state}"}}
upstreams:
  stable: {{url: "{stable}"}}
  canary: {{url: "{canary}", timeout: {canary_timeout:g}s}}
routes:
  - name: {route}
    match: {{path_prefix: "/"}}
    stable: stable
    canary: {{upstream: canary, weight: {weight:g}}}
    retry_canary_on_stable: true
    rollback: {rollback}
"""


@dataclass(kw_only=True)
class Settings:
    """Knobs of one run (bounded; see `parse_args`)."""

    faults: list[str]
    rates: list[float]
    trials: int = 1
    weight: float = 20.0
    warmup: float = 10.0  # fills the 10 s window: the worst case for the rate and p99 rules
    after: float = 3.0
    canary_timeout: float = 2.0
    settle: float = 4.0
    windows_cost: bool = False
    wc_rounds: int = 3
    wc_seconds: int = 5
    wc_connections: int = 32
    wc_weight: float = 10.0
    use_wrk: bool = True


@dataclass
class Flipback:
    """One started flipback: its child, proxy URL and admin URL."""

    child: Child
    url: str
    admin: str
    config: str = field(repr=False)


def proxy_digests() -> dict[str, str]:
    """sha256 of each proxy/*.py, to notice the code under test changing during a run."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in sorted((REPO / "proxy").glob("*.py"))
    }


def changed_files(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


async def start_upstream(group: ChildGroup, name: str, script: str) -> tuple[Child, str]:
    port = free_port()
    child = group.start_python(name, [f"loadtests/{script}", "--port", str(port), "--name", name])
    await wait_port(port, child=child)
    return child, f"http://127.0.0.1:{port}"


async def start_flipback(
    group: ChildGroup,
    name: str,
    *,
    stable: str,
    canary: str,
    weight: float,
    rollback: str,
    canary_timeout: float,
) -> Flipback:
    """`python -m proxy run -c CONFIG`, ready when /readyz and a proxied request answer."""
    port, admin_port = free_port(), free_port()
    work = group.logs / name
    work.mkdir(parents=True, exist_ok=True)
    config = CONFIG.format(
        port=port,
        admin_port=admin_port,
        state=work / "state.json",
        stable=stable,
        canary=canary,
        canary_timeout=canary_timeout,
        route=ROUTE,
        weight=weight,
        rollback=rollback,
    )
    path = work / "flipback.yaml"
    path.write_text(config)
    child = group.start_python(name, ["-m", "proxy", "run", "-c", str(path)], cwd=REPO)
    admin = f"http://127.0.0.1:{admin_port}"
    await wait_http(f"{admin}/readyz", child=child, within=15.0)
    await wait_http(f"http://127.0.0.1:{port}{PATH}", child=child, within=5.0)
    return Flipback(child, f"http://127.0.0.1:{port}{PATH}", admin, config)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return orjson.loads(await resp.read())


async def post_json(session: aiohttp.ClientSession, url: str, data: Any) -> Any:
    async with session.post(url, data=orjson.dumps(data)) as resp:
        return orjson.loads(await resp.read())


def clock_offset() -> float:
    """time.time() - time.perf_counter(), from the tightest of a few paired reads."""
    best: tuple[float, float] = (float("inf"), 0.0)
    for _ in range(20):
        a = time.perf_counter()
        wall = time.time()
        b = time.perf_counter()
        best = min(best, (b - a, wall - (a + b) / 2))
    return best[1]


def rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def analyse(
    trace: list[Traced],
    offset: float,
    onset: float,
    canary_log: dict[str, Any],
    events: list[dict[str, Any]],
    route_after: dict[str, Any],
) -> dict[str, Any]:
    """Flip times, client-visible errors and the fate of the canary's victims."""
    reqs = sorted(trace, key=lambda r: r.index)
    wall = {r.request_id: r.scheduled + offset for r in reqs}
    by_id = {r.request_id: r for r in reqs}
    arrivals = {rid: (t, mode) for rid, t, mode in canary_log["arrivals"] if rid in by_id}
    after = [r for r in reqs if wall[r.request_id] >= onset]
    hits = [r for r in after if r.request_id in arrivals]
    routed_away: float | None
    last_canary: float | None = None
    if hits:
        last = max(hits, key=lambda r: r.index)
        last_canary = wall[last.request_id] - onset
        later = [r for r in after if r.index > last.index]
        routed_away = (wall[later[0].request_id] - onset) if later else None
    else:
        routed_away = (wall[after[0].request_id] - onset) if after else None
    rollbacks = sorted(
        (e for e in events if e.get("kind") == "rollback" and e.get("actor") == "auto"),
        key=lambda e: e["time"],
    )
    event = rollbacks[0] if rollbacks else None
    latch = route_after.get("latch") or {}

    def visible(r: Traced) -> bool:
        return r.status is None or not 200 <= r.status < 300

    errors = [r for r in reqs if visible(r)]
    faulted = [by_id[rid] for rid, (_t, mode) in arrivals.items() if mode != "ok"]
    faulted_at = [t for t, mode in arrivals.values() if mode != "ok"]
    fate = Counter(
        f"{r.status or r.error} from {r.header or '-'}" for r in faulted if r.done or r.error
    )
    waits = sorted(r.done - r.scheduled for r in faulted if r.done)
    pre = [r for r in reqs if wall[r.request_id] < onset]
    return {
        "requests": len(reqs),
        "requests_before_onset": len(pre),
        "canary_share_before_onset": (
            sum(r.request_id in arrivals for r in pre) / len(pre) if pre else None
        ),
        "canary_hits_after_onset": len(hits),
        "faulted_at_canary": len(faulted),  # got the fault (incl. in flight at onset)
        # when the first request met the fault, by the canary's clock (a hang cannot be
        # judged before a request has been in flight for max_p99)
        "first_faulted_s": min(faulted_at) - onset if faulted_at else None,
        "faulted_fate": dict(fate),
        "faulted_wait_s": {
            "min": waits[0] if waits else None,
            "max": waits[-1] if waits else None,
        },
        "last_canary_s": last_canary,
        "routed_away_s": routed_away,
        "event_s": rfc3339(event["time"]) - onset if event else None,
        "latch_s": latch["time"] - onset if "time" in latch else None,
        "trip": (event or {}).get("figures", {}).get("trip"),
        "event_reason": (event or {}).get("reason"),
        "event_figures": (event or {}).get("figures"),
        "client_errors": len(errors),
        "client_errors_after_onset": sum(wall[r.request_id] >= onset for r in errors),
        "client_error_kinds": dict(Counter(str(r.status or r.error) for r in errors)),
        "answered_by": dict(Counter(r.header or "-" for r in after)),
        "latency_after_onset_ms": _quantiles([r.done - r.scheduled for r in after if r.done]),
        "state_after": route_after.get("state"),
        "effective_weight_after": route_after.get("effective_weight"),
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {
        "p50": percentile(v, 50) * 1000,
        "p99": percentile(v, 99) * 1000,
        "max": v[-1] * 1000,
    }


async def run_case(
    s: Settings, fault: str, canary_rate: float, trial: int, log_dir: Path
) -> dict[str, Any]:
    """One fault at one canary rate, with fresh processes."""
    total_rate = canary_rate * 100.0 / s.weight
    case_dir = log_dir / f"{fault}-{canary_rate:g}-t{trial}"
    case_dir.mkdir(parents=True, exist_ok=True)
    code = proxy_digests()
    with ChildGroup(log_dir=case_dir) as group:
        stable, stable_url = await start_upstream(group, "stable", "upstream_ctl.py")
        canary, canary_url = await start_upstream(group, "canary", "upstream_ctl.py")
        fb = await start_flipback(
            group,
            "flipback",
            stable=stable_url,
            canary=canary_url,
            weight=s.weight,
            rollback=ROLLBACK_ON,
            canary_timeout=s.canary_timeout,
        )
        pids = [c.pid for c in group.children]
        settle = await wait_quiet(pids, max_wait=s.settle)
        trace: list[Traced] = []
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as admin:

            async def inject() -> tuple[dict[str, Any], dict[str, Any]]:
                await asyncio.sleep(max(s.warmup - 0.3, 0.0))
                before = await get_json(admin, f"{fb.admin}/routes/{ROUTE}")
                await asyncio.sleep(max(s.warmup - (time.perf_counter() - t_start), 0.0))
                switched = await post_json(admin, f"{canary_url}/_fault", FAULTS[fault])
                return before, switched

            offset = clock_offset()
            t_start = time.perf_counter()
            with noise_meter(pids) as noise:
                (before, switched), load = await asyncio.gather(
                    inject(),
                    run_open_loop(
                        fb.url,
                        total_rate,
                        s.warmup + s.after,
                        connections=1024,
                        request_timeout=10.0,
                        trace=trace,
                    ),
                )
            route_after = await get_json(admin, f"{fb.admin}/routes/{ROUTE}")
            events = (await get_json(admin, f"{fb.admin}/events?limit=50"))["events"]
            canary_log = await get_json(admin, f"{canary_url}/_log")
        group.stop_all()
    result = analyse(trace, offset, switched["time"], canary_log, events, route_after)
    result.update(
        fault=fault,
        fault_body=FAULTS[fault],
        trial=trial,
        canary_rate=canary_rate,
        total_rate=total_rate,
        onset=switched["time"],
        proxy_files=code,
        window_before_onset=before,
        settle=settle,
        noise=noise,
        load=load.to_dict(),
        logs=str(case_dir),
    )
    return result


async def windows_cost(s: Settings, log_dir: Path) -> dict[str, Any]:
    """Saturation req/s and CPU µs/req of flipback with rollback on vs off, interleaved."""
    wc_dir = log_dir / "windows-cost"
    wc_dir.mkdir(parents=True, exist_ok=True)
    osettings = OverheadSettings(
        only=[],
        sat_seconds=s.wc_seconds,
        sat_connections=s.wc_connections,
        sat_warmup=1,
        use_wrk=s.use_wrk,
    )
    records: list[dict[str, Any]] = []
    with ChildGroup(log_dir=wc_dir) as group:
        stable, stable_url = await start_upstream(group, "stable", "upstream_fast.py")
        canary, canary_url = await start_upstream(group, "canary", "upstream_fast.py")
        targets: dict[str, Target] = {}
        for name, rollback in (("on", ROLLBACK_ON), ("off", ROLLBACK_OFF)):
            fb = await start_flipback(
                group,
                f"flipback-{name}",
                stable=stable_url,
                canary=canary_url,
                weight=s.wc_weight,
                rollback=rollback,
                canary_timeout=s.canary_timeout,
            )
            targets[name] = Target(name, fb.url, [fb.child.pid], fb.child, {"admin": fb.admin})
        up_pids = [stable.pid, canary.pid]
        for rnd in range(s.wc_rounds):
            for name in ("on", "off") if rnd % 2 == 0 else ("off", "on"):
                all_pids = [c.pid for c in group.children]
                settle = await wait_quiet(all_pids, max_wait=s.settle)
                sat = await saturate(targets[name], up_pids, all_pids, osettings)
                records.append({"round": rnd, "rollback": name, "settle": settle, **sat})
                print(
                    f"# windows-cost round {rnd + 1}/{s.wc_rounds} rollback {name:3s} "
                    f"{sat['rps']:>8,.0f} req/s  cpu {sat['cpu_us_per_req']:4.0f} µs/req  "
                    f"other programs {sat['noise']['foreign_cores']:.2f} cores",
                    flush=True,
                )
                await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as session:
            states = {
                n: (await get_json(session, f"{t.info['admin']}/routes/{ROUTE}"))["state"]
                for n, t in targets.items()
            }
        group.stop_all()
    summary: dict[str, Any] = {"states_after": states, "weight": s.wc_weight}
    for name in ("on", "off"):
        mine = [r for r in records if r["rollback"] == name]
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in mine),
            "rps_all": [round(r["rps"]) for r in mine],
            "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] for r in mine),
            "errors": sum(sum(r["errors"].values()) for r in mine),
            "foreign_cores_max": max(r["noise"]["foreign_cores"] for r in mine),
        }
    summary["rps_ratio_on_off"] = summary["on"]["rps"] / summary["off"]["rps"]
    summary["cpu_ratio_on_off"] = summary["on"]["cpu_us_per_req"] / summary["off"]["cpu_us_per_req"]
    tool = records[0]["tool"] if records else "-"
    return {"tool": tool, "records": records, "summary": summary}


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}"


def verdict(r: dict[str, Any]) -> str:
    """Against the issue's targets: flip within 1 s (error, ≥ 20 canary req/s) or
    max_p99 + 0.5 s (hang), zero client errors with retry on."""
    flip = [v for v in (r["routed_away_s"], r["event_s"]) if v is not None]
    if len(flip) < 2:
        return "✗ no flip"
    limit = TARGET_S[r["fault"]]
    if r["fault"] == "error" and r["canary_rate"] < 20:
        timing = "(no time target < 20/s)"
    else:
        timing = "✓" if max(flip) <= limit else f"✗ > {limit:g} s"
    errs = "✓ 0 errors" if r["client_errors"] == 0 else "✗ errors"
    return f"{timing}, {errs}"


def matrix_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| fault | canary req/s | trip | 1st faulted req s | routed away s | event s "
        "| canary hits after onset | client errors | hung before flip (what they got) | target "
        "| other progs |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        hung = "—"
        if r["fault"] != "error":
            wait = r["faulted_wait_s"]
            fate = ", ".join(f"{n}× {k}" for k, n in r["faulted_fate"].items())
            span = (
                f" after {wait['min']:.1f}–{wait['max']:.1f} s" if wait["max"] is not None else ""
            )
            hung = f"{r['faulted_at_canary']} ({fate}{span})"
        lines.append(
            f"| {r['fault']} | {r['canary_rate']:g} | {r['trip'] or '-'} "
            f"| {_s(r['first_faulted_s'])} | {_s(r['routed_away_s'])} | {_s(r['event_s'])} "
            f"| {r['canary_hits_after_onset']} "
            f"| {r['client_errors']} | {hung} | {verdict(r)} "
            f"| {r['noise']['foreign_cores']:.2f} |"
        )
    return "\n".join(lines)


def cost_table(wc: dict[str, Any]) -> str:
    s = wc["summary"]
    lines = [
        f"| rollback | req/s, median of {len(s['on']['rps_all'])} ({wc['tool']}) | rounds "
        "| flipback CPU µs/req | errors | other progs (max) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name in ("on", "off"):
        m = s[name]
        rounds = ", ".join(f"{v:,}" for v in m["rps_all"])
        lines.append(
            f"| {name} ({s['weight']:g}% canary) | {m['rps']:,.0f} | {rounds} "
            f"| {m['cpu_us_per_req']:.0f} | {m['errors']} | {m['foreign_cores_max']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"on/off: throughput {s['rps_ratio_on_off']:.3f} "
        f"({(s['rps_ratio_on_off'] - 1) * 100:+.1f}%), CPU per request "
        f"{s['cpu_ratio_on_off']:.3f}; route states after: {s['states_after']}"
    )
    return "\n".join(lines)


async def run(s: Settings, stamp: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    code = proxy_digests()
    log_dir = OUT_DIR / "logs" / f"rollback-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for trial in range(s.trials):
        for fault in s.faults:
            for rate in s.rates:
                r = await run_case(s, fault, rate, trial, log_dir)
                results.append(r)
                print(
                    f"# {fault:5s} canary {rate:5g}/s trial {trial + 1}: trip {r['trip']}, "
                    f"routed away {_s(r['routed_away_s'])} s, event {_s(r['event_s'])} s, "
                    f"client errors {r['client_errors']} {r['client_error_kinds']}, "
                    f"faulted {r['faulted_at_canary']} {r['faulted_fate']}, other programs "
                    f"{r['noise']['foreign_cores']:.2f} cores",
                    flush=True,
                )
    wc = await windows_cost(s, log_dir) if s.windows_cost else None
    changed = changed_files(code, proxy_digests())
    for r in results:
        changed = sorted(set(changed) | set(changed_files(code, r["proxy_files"])))
    return {
        "scenario": "rollback",
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "settings": asdict(s),
        "rollback_config": ROLLBACK_ON,
        "proxy_files": code,
        "proxy_changed_during_run": changed,
        "logs": str(log_dir),
        "results": results,
        "windows_cost": wc,
        "table": matrix_table(results) if results else "",
        "cost_table": cost_table(wc) if wc else "",
    }


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 s warm-up, 2 s after onset")
    parser.add_argument(
        "--only", help=f"comma-separated faults of {','.join(FAULTS)} (default error,hang)"
    )
    parser.add_argument("--rates", default="5,20,100", help="canary req/s, comma-separated")
    parser.add_argument("--trials", type=int, default=1, help="repeat the matrix (max 5)")
    parser.add_argument("--windows-cost", action="store_true", help="also rollback on vs off")
    parser.add_argument("--cost-only", action="store_true", help="only the on/off comparison")
    parser.add_argument("--cost-rounds", type=int, default=3, help="on/off rounds (max 6)")
    parser.add_argument("--cost-weight", type=float, default=10.0, help="canary %% for on/off")
    parser.add_argument("--no-wrk", action="store_true", help="closed-loop generator, not wrk")
    parser.add_argument("--settle", type=float, default=4.0, help="max wait for a quiet machine")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in (args.only or ",".join(DEFAULT_FAULTS)).split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    try:
        rates = _floats(args.rates)
    except ValueError:
        parser.error("--rates must be numbers, e.g. 5,20,100")
    if any(not 1 <= r <= 400 for r in rates) or not 1 <= args.trials <= 5:
        parser.error("canary rates must be 1-400 req/s and trials 1-5")
    if not 1 <= args.cost_rounds <= 6 or not 0 < args.cost_weight <= 100:
        parser.error("--cost-rounds must be 1-6 and --cost-weight in (0, 100]")
    s = Settings(
        faults=faults,
        rates=[] if args.cost_only else rates,
        trials=args.trials,
        windows_cost=args.windows_cost or args.cost_only,
        wc_rounds=args.cost_rounds,
        wc_weight=args.cost_weight,
    )
    if args.quick:
        s.warmup, s.after, s.wc_rounds, s.wc_seconds = 6.0, 2.0, 1, 2
    s.settle = args.settle
    s.use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    return s


def main(argv: Sequence[str] | None = None) -> int:
    def report(r: dict[str, Any]) -> list[str]:
        changed = r["proxy_changed_during_run"]
        return [r["table"], r["cost_table"],
                "WARNING: changed during the run (cases may mix versions): proxy/"
                + ", proxy/".join(changed) if changed else ""]

    run_scenario("rollback", run, parse_args(argv), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
