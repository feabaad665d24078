"""The `overhead` scenario: what a proxy hop costs over calling the upstream directly.

Two fast toy upstreams (stable, canary) serve every target; the targets are
  direct    the stable upstream itself (the floor),
  flipback  `python -m proxy run` with a 90/10 canary split (skipped if it does not come up);
            with `--workers 1,2` also `flipback-w2` (`run --workers 2`), in the same rounds,
  minimal   loadtests/minimal_proxy.py: aiohttp + uvloop with no features (Python's floor),
  nginx     one worker, split_clients 90/10, keep-alive upstreams (skipped if not installed).
Each round measures every target, in an order rotated per round, twice:
  saturation  `wrk -t1 -c32 -d5s` (or the closed-loop generator without wrk): req/s, and
              the target's CPU microseconds per request from /proc/PID/stat
              (for direct, the upstream's own);
  latency     open loop at a fixed rate (1,000 req/s for 10 s): p50/p99 from the scheduled
              send, and the same minus direct's in the same round ("added").
Before each target the run waits (up to 4 s) for other programs to go quiet, and every
measurement records how much CPU other programs took meanwhile ("other programs ... cores").
Prints a markdown table; raw results go to loadtests/out/overhead-*.json.

    python loadtests/overhead.py                      # 3 rounds, ~4 minutes
    python loadtests/overhead.py --quick --only direct,minimal
    python loadtests/overhead.py --workers 1,2        # flipback with 1 and 2 workers
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from loadtests.loadgen import run_closed_loop, run_open_loop
from loadtests.nginx_proxy import find_nginx, start_nginx, stop_nginx
from loadtests.procs import (
    OUT_DIR,
    REPO,
    Child,
    ChildGroup,
    NotReady,
    cpu_meter,
    free_port,
    machine_info,
    noise_meter,
    run_scenario,
    wait_http,
    wait_port,
    wait_quiet,
)

TARGETS = ("direct", "flipback", "minimal", "nginx")
PATH = "/v1/bench"

FLIPBACK_CONFIG = """\
server: {{listen: "127.0.0.1:{port}"}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
state: {{file: "{state}"}}
upstreams:
  stable: {{url: "{stable}"}}
  canary: {{url: "{canary}"}}
routes:
  - name: bench
    match: {{path_prefix: "/"}}
    stable: stable
    canary: {{upstream: canary, weight: {weight:g}}}
    rollback: {{judge: {judge}}}
{guard}"""

# --guard: a quality guard on the route, reading the toy upstreams' "choices.0.text"
GUARDS = {
    "none": "",
    "output": '    guard: {output: {json_path: "choices.0.text"}}\n',
    "compare": '    guard: {compare: {sample: 10, json_paths: ["choices.0.text"]}}\n',
}


class Skip(Exception):
    """A target cannot run here; the message says why."""


@dataclass(kw_only=True)
class Settings:
    """Knobs of one run (all bounded; see `parse_args`)."""

    only: list[str]
    rounds: int = 3
    sat_seconds: int = 5
    sat_connections: int = 32
    sat_warmup: int = 1
    rate: float = 1000.0
    duration: float = 10.0
    warmup: float = 1.0
    open_connections: int = 64
    weight: float = 10.0
    judge: str = "sequential"  # flipback's rollback.judge
    guard: str = "none"  # a key of GUARDS
    pause: float = 0.5
    settle: float = 4.0  # at most this long, wait for other programs to go quiet
    noise_limit: float = 0.25  # cores other programs may use for a run to count as quiet
    ready_timeout: float = 15.0
    use_wrk: bool = True
    workers: list[int] = field(default_factory=lambda: [1])  # flipback run --workers


def flipback_name(workers: int) -> str:
    return "flipback" if workers == 1 else f"flipback-w{workers}"


def target_names(s: Settings) -> list[str]:
    """TARGETS with flipback once per ``--workers`` value, in that order."""
    out: list[str] = []
    for name in TARGETS:
        out += [flipback_name(n) for n in s.workers] if name == "flipback" else [name]
    return out


@dataclass
class Target:
    """One thing under test: where to send, and whose CPU counts."""

    name: str
    url: str
    cpu_pids: list[int]
    child: Child | None = None
    info: dict[str, Any] = field(default_factory=dict)


async def start_upstreams(group: ChildGroup) -> tuple[Child, str, Child, str]:
    urls: list[str] = []
    children: list[Child] = []
    for name in ("stable", "canary"):
        port = free_port()
        child = group.start_python(
            f"upstream-{name}", ["loadtests/upstream_fast.py", "--port", str(port), "--name", name]
        )
        await wait_port(port, child=child)
        children.append(child)
        urls.append(f"http://127.0.0.1:{port}")
    return children[0], urls[0], children[1], urls[1]


async def start_minimal(group: ChildGroup, stable: str, canary: str, weight: float) -> Target:
    port = free_port()
    child = group.start_python(
        "minimal",
        [
            "loadtests/minimal_proxy.py",
            "--port",
            str(port),
            "--upstream",
            stable,
            "--canary",
            canary,
            "--weight",
            f"{weight:g}",
        ],
    )
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        await wait_http(url, child=child)
    except NotReady as exc:
        group.stop(child)
        raise Skip(str(exc)) from exc
    return Target("minimal", url, [child.pid], child)


async def start_nginx_target(group: ChildGroup, stable: str, canary: str, weight: float) -> Target:
    if find_nginx() is None:
        raise Skip("nginx is not installed")
    port = free_port()
    child = start_nginx(group, port=port, stable=stable, canary=canary, weight=weight)
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        await wait_http(url, child=child)
    except NotReady as exc:
        stop_nginx(group, child)
        raise Skip(str(exc)) from exc
    return Target("nginx", url, [child.pid], child, {"workers": 1})


async def start_flipback(
    group: ChildGroup, stable: str, canary: str, weight: float, ready_within: float,
    judge: str = "sequential", workers: int = 1,
    guard: str = "none",
) -> Target:
    """`python -m proxy run -c CONFIG [--workers N]`, ready when the admin /readyz answers
    200 (with workers: every worker serving). The CPU counted is the process tree's."""
    port, admin_port = free_port(), free_port()
    name = flipback_name(workers)
    work = group.logs / name
    work.mkdir(exist_ok=True)
    config = work / "flipback.yaml"
    config.write_text(
        FLIPBACK_CONFIG.format(
            port=port,
            admin_port=admin_port,
            state=work / "state.json",
            stable=stable,
            canary=canary,
            weight=weight,
            judge=judge,
            guard=GUARDS[guard],
        )
    )
    child = group.start_python(name, ["-m", "proxy", "run", "-c", str(config),
                                      "--workers", str(workers)], cwd=REPO)
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        await wait_http(f"http://127.0.0.1:{admin_port}/readyz", child=child, within=ready_within)
        await wait_http(url, child=child, within=5.0)
    except NotReady as exc:
        group.stop(child)
        raise Skip(f"`python -m proxy run` did not come up: {exc} (log: {child.log})") from exc
    return Target(name, url, [child.pid], child,
                  {"config": config.read_text(), "workers": workers})


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    for unit in ("us", "ms", "s", "m"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    return float(text)


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, seconds, req/s, errors and latency percentiles from wrk's report."""
    out: dict[str, Any] = {"errors": {}, "latency_ms": {}}
    in_dist = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Latency Distribution"):
            in_dist = True
            continue
        if in_dist and line[:3].rstrip("%").replace(".", "").isdigit() and "%" in line:
            pct, value = line.split()
            out["latency_ms"][f"p{float(pct.rstrip('%')):g}"] = _ms(value)
            continue
        in_dist = False
        if " requests in " in line:
            parts = line.split()
            out["requests"] = int(parts[0])
            out["seconds"] = _ms(parts[3].rstrip(",")) / 1000
        elif line.startswith("Requests/sec:"):
            out["rps"] = float(line.split()[1])
        elif line.startswith("Non-2xx or 3xx responses:"):
            out["errors"]["non_2xx_3xx"] = int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            for item in line.split(":", 1)[1].split(","):
                kind, count = item.split()
                if int(count):
                    out["errors"][kind] = int(count)
    if "requests" not in out or "rps" not in out:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    return out


async def run_wrk(url: str, seconds: int, connections: int) -> dict[str, Any]:
    """One `wrk -t1` run, killed by PID if it overruns its time by 15 s."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 15)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return parse_wrk(stdout.decode(errors="replace"))


async def saturate(
    target: Target, upstream_pids: list[int], all_pids: list[int], s: Settings
) -> dict[str, Any]:
    """Saturation throughput and the target's CPU per request."""
    if s.use_wrk:
        if s.sat_warmup:
            await run_wrk(target.url, s.sat_warmup, s.sat_connections)
        with (
            cpu_meter(target.cpu_pids) as cpu,
            cpu_meter(upstream_pids) as up_cpu,
            noise_meter(all_pids) as noise,
        ):
            result = await run_wrk(target.url, s.sat_seconds, s.sat_connections)
        result["tool"] = f"wrk -t1 -c{s.sat_connections} -d{s.sat_seconds}s"
    else:
        with (
            cpu_meter(target.cpu_pids) as cpu,
            cpu_meter(upstream_pids) as up_cpu,
            noise_meter(all_pids) as noise,
        ):
            lr = await run_closed_loop(
                target.url, s.sat_connections, s.sat_seconds, warmup=s.sat_warmup
            )
        result = {
            "tool": f"loadgen closed loop x{s.sat_connections} {s.sat_seconds}s",
            "requests": lr.completed,
            "seconds": lr.elapsed,
            "rps": lr.achieved_rate,
            "errors": {
                **lr.errors,
                **({"non_2xx_3xx": lr.completed - lr.ok} if lr.completed - lr.ok else {}),
            },
            "latency_ms": lr.latency_ms,
        }
    n = max(result["requests"], 1)
    result["cpu_s"] = cpu["seconds"]
    result["cpu_us_per_req"] = cpu["seconds"] * 1e6 / n
    result["upstreams_cpu_us_per_req"] = up_cpu["seconds"] * 1e6 / n
    result["noise"] = noise
    return result


async def latency_at_rate(
    target: Target, upstream_pids: list[int], all_pids: list[int], s: Settings
) -> dict[str, Any]:
    """Open loop at `s.rate` for `s.duration`: latency, errors, and CPU per request."""
    with (
        cpu_meter(target.cpu_pids) as cpu,
        cpu_meter(upstream_pids) as up_cpu,
        noise_meter(all_pids) as noise,
    ):
        lr = await run_open_loop(
            target.url,
            s.rate,
            s.duration,
            warmup=s.warmup,
            connections=s.open_connections,
            request_timeout=10.0,
        )
    out = lr.to_dict()
    n = max(lr.completed, 1)
    out["errors_total"] = lr.error_count
    out["cpu_us_per_req"] = cpu["seconds"] * 1e6 / n
    out["upstreams_cpu_us_per_req"] = up_cpu["seconds"] * 1e6 / n
    out["noise"] = noise
    return out


async def check_split(url: str, n: int = 400) -> dict[str, int]:
    """Which upstream answered `n` sequential requests (upstream_fast's x-upstream header)."""
    counts: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(url) as resp:
                await resp.read()
                key = resp.headers.get("x-upstream", f"status {resp.status}")
                counts[key] = counts.get(key, 0) + 1
    return counts


def _med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _quiet(runs: list[dict[str, Any]], limit: float) -> tuple[list[dict[str, Any]], bool]:
    """The runs during which other programs took at most `limit` cores; all if none."""
    quiet = [r for r in runs if r["noise"]["foreign_cores"] <= limit]
    return (quiet, True) if quiet else (runs, False)


def summarize(
    records: list[dict[str, Any]], names: Sequence[str], noise_limit: float
) -> dict[str, dict[str, Any]]:
    """Medians over the quiet rounds of each measurement (all rounds if none was quiet).

    A run counts as quiet when other programs used at most `noise_limit` cores meanwhile;
    'added' is this target's median minus direct's median.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in records if r["target"] == name]
        if not mine:
            continue
        sat, sat_quiet = _quiet([r["saturation"] for r in mine], noise_limit)
        lat, lat_quiet = _quiet([r["latency"] for r in mine], noise_limit)
        rps = [x["rps"] for x in sat]
        summary[name] = {
            "rounds": len(mine),
            "saturation_runs_used": len(sat),
            "latency_runs_used": len(lat),
            "all_noisy": not (sat_quiet and lat_quiet),
            "rps": _med(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "cpu_us_per_req": _med([x["cpu_us_per_req"] for x in sat]),
            "cpu_us_per_req_at_rate": _med([x["cpu_us_per_req"] for x in lat]),
            "p50_ms": _med([x["latency_ms"]["p50"] for x in lat]),
            "p99_ms": _med([x["latency_ms"]["p99"] for x in lat]),
            "foreign_cores_max": max(
                max(
                    r["saturation"]["noise"]["foreign_cores"],
                    r["latency"]["noise"]["foreign_cores"],
                )
                for r in mine
            ),
            "errors": sum(
                sum(r["saturation"]["errors"].values()) + r["latency"]["errors_total"] for r in mine
            ),
        }
    direct = summary.get("direct")
    for name, m in summary.items():
        for q in ("p50", "p99"):
            m[f"added_{q}_ms"] = (
                m[f"{q}_ms"] - direct[f"{q}_ms"] if direct and name != "direct" else None
            )
    return summary


def render_table(summary: dict[str, dict[str, Any]], skipped: dict[str, str], s: Settings) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    rate = f"{s.rate:,.0f}/s"
    lines = [
        f"| target | req/s at saturation (min–max) | CPU µs/req (sat.) | CPU µs/req @{rate} "
        f"| p50 ms @{rate} | p99 ms @{rate} | added p50 ms | added p99 ms | errors "
        "| quiet runs used (sat. / lat.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in target_names(s):
        if name in summary:
            m = summary[name]
            added = (
                ("—", "—")
                if name == "direct"
                else (num(m["added_p50_ms"], "+.2f"), num(m["added_p99_ms"], "+.2f"))
            )
            lines.append(
                f"| {name} | {m['rps']:,.0f} ({m['rps_min']:,.0f}–{m['rps_max']:,.0f}) "
                f"| {num(m['cpu_us_per_req'], '.0f')} | {num(m['cpu_us_per_req_at_rate'], '.0f')} "
                f"| {num(m['p50_ms'], '.2f')} | {num(m['p99_ms'], '.2f')} "
                f"| {added[0]} | {added[1]} | {m['errors']} "
                f"| {m['saturation_runs_used']} / {m['latency_runs_used']} of {m['rounds']}"
                f"{' (none quiet: all used)' if m['all_noisy'] else ''} |"
            )
        elif name in skipped:
            lines.append(
                f"| {name} | skipped: {skipped[name].splitlines()[0][:90]} | | | | | | | | |"
            )
    if summary:
        worst = max(m["foreign_cores_max"] for m in summary.values())
        lines.append("")
        lines.append(
            f"Medians over rounds. Other programs used at most {worst:.2f} of a core during "
            f"any measurement; runs where they used more than {s.noise_limit:g} are left out "
            "of the medians (all are in the JSON)."
        )
    return "\n".join(lines)


async def run(s: Settings, stamp: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    records: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    targets: dict[str, Target] = {}
    log_dir = OUT_DIR / "logs" / f"overhead-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ChildGroup(log_dir=log_dir) as group:
        stable, stable_url, canary, canary_url = await start_upstreams(group)
        upstream_pids = [stable.pid, canary.pid]
        if "direct" in s.only:
            targets["direct"] = Target("direct", stable_url + PATH, [stable.pid], stable)
        starters: dict[str, Callable[[], Awaitable[Target]]] = {
            **{flipback_name(n): (lambda n=n: start_flipback(
                group, stable_url, canary_url, s.weight, s.ready_timeout, s.judge, n,
                s.guard))
               for n in s.workers},
            "minimal": lambda: start_minimal(group, stable_url, canary_url, s.weight),
            "nginx": lambda: start_nginx_target(group, stable_url, canary_url, s.weight),
        }
        for name, start in starters.items():
            if name.split("-w")[0] not in s.only:
                continue
            try:
                target = targets[name] = await start()
                print(f"# {name}: pid {target.cpu_pids} at {target.url}", flush=True)
            except Skip as exc:
                skipped[name] = str(exc)
                print(f"# {name}: SKIPPED: {exc}", file=sys.stderr, flush=True)
        names = [n for n in target_names(s) if n in targets]
        for name in names:
            split = targets[name].info["split_check"] = await check_split(targets[name].url)
            print(f"# {name}: split over 400 requests {split}", flush=True)
        try:
            for rnd in range(s.rounds if names else 0):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    target = targets[name]
                    all_pids = [c.pid for c in group.children]
                    settle = await wait_quiet(all_pids, max_wait=s.settle)
                    sat = await saturate(target, upstream_pids, all_pids, s)
                    await asyncio.sleep(s.pause)
                    lat = await latency_at_rate(target, upstream_pids, all_pids, s)
                    await asyncio.sleep(s.pause)
                    records.append(
                        {
                            "round": rnd,
                            "target": name,
                            "settle": settle,
                            "saturation": sat,
                            "latency": lat,
                        }
                    )
                    print(
                        f"# round {rnd + 1}/{s.rounds} {name:8s} {sat['rps']:>9,.0f} req/s "
                        f"cpu {sat['cpu_us_per_req']:5.0f} µs/req | @{s.rate:,.0f}/s "
                        f"p50 {lat['latency_ms']['p50']:.2f} p99 {lat['latency_ms']['p99']:.2f} ms "
                        f"errors {sum(sat['errors'].values()) + lat['errors_total']} | other "
                        f"programs {sat['noise']['foreign_cores']:.2f}"
                        f"/{lat['noise']['foreign_cores']:.2f} cores",
                        flush=True,
                    )
        finally:
            nginx = targets.get("nginx")
            if nginx is not None and nginx.child is not None:
                stop_nginx(group, nginx.child)
            group.stop_all()
    summary = summarize(records, names, s.noise_limit)
    return {
        "scenario": "overhead",
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "loadavg_end": os.getloadavg(),
        "settings": asdict(s),
        "targets": {n: {"url": t.url, **t.info} for n, t in targets.items()},
        "skipped": skipped,
        "logs": str(log_dir),
        "records": records,
        "summary": summary,
        "table": render_table(summary, skipped, s),
    }


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, 2 s saturation, 3 s latency (a smoke run, ~20 s/target)",
    )
    parser.add_argument("--rounds", type=int, help="default 3 (1 with --quick)")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s")
    parser.add_argument("--duration", type=float, help="open-loop seconds, default 10 (3 quick)")
    parser.add_argument("--sat-seconds", type=int, help="saturation seconds, default 5 (2 quick)")
    parser.add_argument("--connections", type=int, default=32, help="saturation connections")
    parser.add_argument("--weight", type=float, default=10.0, help="canary percent")
    parser.add_argument("--judge", choices=("sequential", "threshold"), default="sequential",
                        help="flipback's rollback.judge")
    parser.add_argument("--workers", default="1",
                        help="flipback run --workers, one target per value: e.g. 1,2")
    parser.add_argument("--guard", choices=tuple(GUARDS), default="none",
                        help="a quality guard on flipback's route (output drift, or paired "
                        "copies of 10%% of canary requests)")
    parser.add_argument("--no-wrk", action="store_true", help="use the closed-loop generator")
    parser.add_argument(
        "--settle",
        type=float,
        help="before each target, wait up to this many s for other programs to go quiet "
        "(default 4, 2 with --quick; 0: don't)",
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=0.25,
        help="leave runs out of the medians when other programs used more cores than this",
    )
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(only) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    try:
        workers = sorted({int(n) for n in args.workers.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--workers: not a list of numbers: {args.workers!r}")
    if not workers or not all(1 <= n <= 64 for n in workers):
        parser.error("--workers: numbers from 1 to 64")
    s = Settings(
        workers=workers,
        only=only,
        rate=args.rate,
        sat_connections=args.connections,
        weight=args.weight,
        judge=args.judge,
        guard=args.guard,
        noise_limit=args.noise_limit,
    )
    if args.quick:
        s.rounds, s.sat_seconds, s.duration, s.warmup, s.sat_warmup = 1, 2, 3.0, 0.5, 1
    s.rounds = args.rounds or s.rounds
    s.duration = args.duration or s.duration
    s.sat_seconds = args.sat_seconds or s.sat_seconds
    s.settle = (2.0 if args.quick else s.settle) if args.settle is None else args.settle
    # Keep every target at about a minute (the default is ~58 s at worst).
    per_target = s.rounds * (
        s.settle + s.sat_warmup + s.sat_seconds + s.warmup + s.duration + 2 * s.pause
    )
    if per_target > 90 or not 1 <= s.rounds <= 10 or not 0 < s.rate <= 20_000:
        parser.error(
            f"too long or out of range: {per_target:.0f}s per target "
            "(keep rounds x (sat-seconds + duration) under ~60 s; rate <= 20000)"
        )
    s.use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    return s


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    if not s.use_wrk:
        print("# wrk not used: saturation by the closed-loop generator", file=sys.stderr)

    def report(r: dict[str, Any]) -> list[str]:
        skipped = [f"{name} skipped: {why.splitlines()[0]}" for name, why in r["skipped"].items()]
        return [r["table"], "\n".join(skipped)]

    result = run_scenario("overhead", run, s, report)
    return 0 if result["records"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
