"""The `shadow` scenario: what mirroring a sample of traffic costs the primary path.

Three flipback configurations run against the same fast upstreams (a 90/10 canary
route): one without a shadow section ("off"), one mirroring 10% and one mirroring 100% of
requests to a third `upstream_fast` with `compare: {status: true, json_paths:
["choices.0.text"]}` (so the primary body is copied and both bodies parsed) and
`max_in_flight: 32`. Each round starts one flipback process and measures all three in
it, in an order rotated per round, switching between them by hot reload (`POST /reload`):
a process's memory layout can shift its speed by several percent for its whole life, so
ratios taken within one process compare like with like, and a new process per round
spreads that bias over the rounds (pyperf spreads runs over worker processes likewise):
  saturation  `wrk -t1 -c32 -d5s` after a 1 s warm-up, POSTing a ~60-byte JSON body
              (a Lua script): req/s, and flipback's CPU µs per request (/proc/PID/stat);
  latency     open loop at 1,000 req/s for 6 s after a 1 s warm-up, same body: p50/p99
              from the scheduled send.
The flipback runs alone on the last CPU; the upstreams, wrk and the load generator get
the others (`--no-pin` turns that off). Alongside each measurement, the
shadow counters from `/metrics` (copies sent, dropped, failed). Before each measurement
the run waits (up to 4 s) for other programs to go quiet and records how much CPU they
took meanwhile; runs above `--noise-limit` cores are left out of the medians. Ratios to
"off" are taken within each round, then the median.
Prints a markdown table; raw results go to loadtests/out/shadow-*.json.

    python loadtests/shadow.py                    # 6 rounds, ~6 minutes
    python loadtests/shadow.py --rounds 4 --bare  # + 10% without compare, ~5.5 minutes
    python loadtests/shadow.py --quick            # 1 short round, ~45 s
    python loadtests/shadow.py --rounds 12 --duration 3   # throughput to about ±1%, ~8 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from loadtests.loadgen import run_closed_loop, run_open_loop
from loadtests.overhead import parse_wrk, start_upstreams
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

PATH = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
HEADERS = {"content-type": "application/json"}
TARGETS = {"off": None, "10%": 10.0, "100%": 100.0}  # name -> shadow sample
BARE = "10%-bare"  # --bare: 10% without compare (the cost of comparing, apart)

CONFIG = """\
server: {{listen: "127.0.0.1:{port}"}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
state: {{file: "{state}"}}
upstreams:
  stable: {{url: "{stable}"}}
  canary: {{url: "{canary}"}}
  shadow: {{url: "{shadow}"}}
routes:
  - name: bench
    match: {{path_prefix: "/"}}
    stable: stable
    canary: {{upstream: canary, weight: 10}}
{shadow_section}"""

SHADOW_SECTION = """\
    shadow:
      upstream: shadow
      sample: {sample:g}
      max_in_flight: {max_in_flight}
      timeout: 5s
"""
COMPARE = """      compare: {{status: true, json_paths: ["choices.0.text"], record: "{record}"}}
"""

WRK_POST = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


@dataclass(kw_only=True)
class Settings:
    rounds: int = 6
    sat_seconds: int = 5
    sat_connections: int = 32
    sat_warmup: int = 1
    rate: float = 1000.0
    duration: float = 6.0
    warmup: float = 1.0
    open_connections: int = 64
    max_in_flight: int = 32
    pause: float = 0.5
    settle: float = 4.0
    noise_limit: float = 0.25
    use_wrk: bool = True
    bare: bool = False
    pin: bool = True  # flipbacks on the last CPU, everything else on the others


@dataclass
class Flipback:
    name: str
    sample: float | None
    child: Child
    url: str
    admin: str
    config: str
    ports: tuple[int, int]
    work: Path
    checks: dict[str, Any] = field(default_factory=dict)


def target_samples(s: Settings) -> dict[str, float | None]:
    return {**TARGETS, **({BARE: 10.0} if s.bare else {})}


def config_text(name: str, sample: float | None, urls: dict[str, str], s: Settings,
                ports: tuple[int, int], work: Path) -> str:
    section = "" if sample is None else SHADOW_SECTION.format(
        sample=sample, max_in_flight=s.max_in_flight)
    if sample is not None and name != BARE:
        section += COMPARE.format(record=work / f"diffs-{name.replace('%', 'pct')}.jsonl")
    return CONFIG.format(port=ports[0], admin_port=ports[1], state=work / "state.json",
                         shadow_section=section, **urls)


async def start_flipback(group: ChildGroup, name: str, sample: float | None,
                         urls: dict[str, str], s: Settings, rnd: int) -> Flipback:
    """The round's flipback process, serving ``name`` first."""
    ports = free_port(), free_port()
    work = group.logs / f"flipback-r{rnd + 1}"
    work.mkdir(exist_ok=True)
    text = config_text(name, sample, urls, s, ports, work)
    (work / "flipback.yaml").write_text(text)
    child = group.start_python(f"flipback-r{rnd + 1}",
                               ["-m", "proxy", "run", "-c", str(work / "flipback.yaml")],
                               cwd=REPO)
    admin = f"http://127.0.0.1:{ports[1]}"
    try:
        await wait_http(f"{admin}/readyz", child=child, within=15.0)
    except NotReady as exc:
        raise SystemExit(f"flipback {name} did not come up: {exc} (log: {child.log})") from exc
    return Flipback(name, sample, child, f"http://127.0.0.1:{ports[0]}{PATH}", admin, text,
                    ports=ports, work=work)


async def switch(fb: Flipback, name: str, sample: float | None, urls: dict[str, str],
                 s: Settings) -> None:
    """Reconfigure the round's process for ``name`` by hot reload."""
    text = config_text(name, sample, urls, s, fb.ports, fb.work)
    (fb.work / "flipback.yaml").write_text(text)
    async with aiohttp.ClientSession() as session, \
            session.post(fb.admin + "/reload") as resp:
        if resp.status != 200:
            raise SystemExit(f"reload to {name} refused: {await resp.text()}")
    fb.name, fb.sample, fb.config = name, sample, text


async def shadow_counts(fb: Flipback) -> dict[str, float]:
    """flipback_shadow_total by outcome, and mismatches, from the admin /metrics."""
    async with aiohttp.ClientSession() as session, session.get(fb.admin + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("flipback_shadow_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("flipback_shadow_mismatched_requests_total{"):
            out["mismatch"] = out.get("mismatch", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}


async def check_target(fb: Flipback, n: int = 400) -> dict[str, Any]:
    """n sequential POSTs: all 200, and how many were mirrored."""
    before = await shadow_counts(fb)
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(fb.url, data=BODY, headers=HEADERS) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
    await asyncio.sleep(0.3)
    return {"requests": n, "statuses": statuses,
            "shadow": _delta(await shadow_counts(fb), before)}


async def run_wrk_post(url: str, seconds: int, connections: int, script: Path) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
            url]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 15)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return parse_wrk(stdout.decode(errors="replace"))


async def saturate(fb: Flipback, all_pids: list[int], s: Settings,
                   script: Path) -> dict[str, Any]:
    before = await shadow_counts(fb)
    warm: dict[str, Any] = {"requests": 0}
    if s.use_wrk:
        warm = await run_wrk_post(fb.url, s.sat_warmup, s.sat_connections, script)
        with cpu_meter([fb.child.pid]) as cpu, noise_meter(all_pids) as noise:
            result = await run_wrk_post(fb.url, s.sat_seconds, s.sat_connections, script)
        result["tool"] = f"wrk -t1 -c{s.sat_connections} -d{s.sat_seconds}s (POST)"
    else:
        with cpu_meter([fb.child.pid]) as cpu, noise_meter(all_pids) as noise:
            lr = await run_closed_loop(fb.url, s.sat_connections, s.sat_seconds,
                                       method="POST", body=BODY, headers=HEADERS,
                                       warmup=s.sat_warmup)
        result = {"tool": f"loadgen closed loop x{s.sat_connections}",
                  "requests": lr.completed, "seconds": lr.elapsed, "rps": lr.achieved_rate,
                  "errors": {**lr.errors, **({"non_2xx_3xx": lr.completed - lr.ok}
                                             if lr.completed - lr.ok else {})},
                  "latency_ms": lr.latency_ms}
    await asyncio.sleep(0.2)  # let the last copies finish before reading the counters
    result["cpu_us_per_req"] = cpu["seconds"] * 1e6 / max(result["requests"], 1)
    result["noise"] = noise
    result["requests_with_warmup"] = result["requests"] + warm["requests"]
    result["shadow"] = _delta(await shadow_counts(fb), before)
    return result


async def latency(fb: Flipback, all_pids: list[int], s: Settings) -> dict[str, Any]:
    before = await shadow_counts(fb)
    with cpu_meter([fb.child.pid]) as cpu, noise_meter(all_pids) as noise:
        lr = await run_open_loop(fb.url, s.rate, s.duration, method="POST", body=BODY,
                                 headers=HEADERS, warmup=s.warmup,
                                 connections=s.open_connections, request_timeout=10.0)
    await asyncio.sleep(0.2)
    out = lr.to_dict()
    out["errors_total"] = lr.error_count
    out["requests_with_warmup"] = lr.completed + round(s.rate * s.warmup)
    out["cpu_us_per_req"] = cpu["seconds"] * 1e6 / max(lr.completed, 1)
    out["noise"] = noise
    out["shadow"] = _delta(await shadow_counts(fb), before)
    return out


def pin_cpus(group: ChildGroup, proxies: list[int]) -> dict[str, list[int]]:
    """Proxies alone on the last usable CPU; upstreams, this process and the wrk it starts
    on the rest. A proxy's req/s is then bounded by its own CPU, not by what it shares.
    Proxies started later are pinned to ``result["proxies"]`` by the caller."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    mine, rest = {cpus[-1]}, set(cpus[:-1])
    for child in group.children:
        os.sched_setaffinity(child.pid, mine if child.pid in proxies else rest)
    os.sched_setaffinity(0, rest)
    return {"proxies": sorted(mine), "others": sorted(rest)}


def _med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _quiet(runs: list[dict[str, Any]], limit: float) -> list[dict[str, Any]]:
    quiet = [r for r in runs if r["noise"]["foreign_cores"] <= limit]
    return quiet or runs


Pair = tuple[dict[str, Any], dict[str, Any]]


def _quiet_pairs(pairs: list[Pair], kind: str, limit: float) -> list[Pair]:
    """(off, target) runs of the same round where neither was disturbed; all if none."""
    quiet = [(o, m) for o, m in pairs
             if max(o[kind]["noise"]["foreign_cores"], m[kind]["noise"]["foreign_cores"]) <= limit]
    return quiet or pairs


def summarize(records: list[dict[str, Any]], s: Settings) -> dict[str, dict[str, Any]]:
    """Medians over quiet runs; ratios and deltas to "off" within the same round."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_round.setdefault(r["round"], {})[r["target"]] = r
    summary: dict[str, dict[str, Any]] = {}
    for name in target_samples(s):
        mine = [r for r in records if r["target"] == name]
        if not mine:
            continue
        sat = _quiet([r["saturation"] for r in mine], s.noise_limit)
        lat = _quiet([r["latency"] for r in mine], s.noise_limit)
        pairs = [(rnd["off"], rnd[name]) for rnd in by_round.values()
                 if "off" in rnd and name in rnd]

        sat_pairs = _quiet_pairs(pairs, "saturation", s.noise_limit)
        lat_pairs = _quiet_pairs(pairs, "latency", s.noise_limit)
        ratios = [m["saturation"]["rps"] / o["saturation"]["rps"] for o, m in sat_pairs]
        cpu_ratio = [m["saturation"]["cpu_us_per_req"] / o["saturation"]["cpu_us_per_req"]
                     for o, m in sat_pairs]
        d50 = [m["latency"]["latency_ms"]["p50"] - o["latency"]["latency_ms"]["p50"]
               for o, m in lat_pairs]
        d99 = [m["latency"]["latency_ms"]["p99"] - o["latency"]["latency_ms"]["p99"]
               for o, m in lat_pairs]
        rps = [x["rps"] for x in sat]
        p50s = [x["latency_ms"]["p50"] for x in lat]
        summary[name] = {
            "rounds": len(mine),
            "saturation_runs_used": len(sat),
            "latency_runs_used": len(lat),
            "rps": _med(rps), "rps_min": min(rps), "rps_max": max(rps),
            "rps_vs_off": _med(ratios), "rps_vs_off_all": ratios,
            "cpu_us_per_req": _med([x["cpu_us_per_req"] for x in sat]),
            "cpu_vs_off": _med(cpu_ratio),
            "cpu_us_per_req_at_rate": _med([x["cpu_us_per_req"] for x in lat]),
            "p50_ms": _med(p50s), "p50_min": min(p50s), "p50_max": max(p50s),
            "p99_ms": _med([x["latency_ms"]["p99"] for x in lat]),
            "p50_vs_off_ms": _med(d50), "p50_vs_off_all": d50,
            "p99_vs_off_ms": _med(d99), "p99_vs_off_all": d99,
            "errors": sum(sum(r["saturation"]["errors"].values()) + r["latency"]["errors_total"]
                          for r in mine),
            "shadow_sat": {k: sum(r["saturation"]["shadow"].get(k, 0) for r in mine)
                           for k in ("sent", "dropped", "error", "timeout", "mismatch")},
            "shadow_lat": {k: sum(r["latency"]["shadow"].get(k, 0) for r in mine)
                           for k in ("sent", "dropped", "error", "timeout", "mismatch")},
            "requests_sat": sum(r["saturation"]["requests_with_warmup"] for r in mine),
            "requests_lat": sum(r["latency"]["requests_with_warmup"] for r in mine),
            "foreign_cores_max": max(max(r["saturation"]["noise"]["foreign_cores"],
                                         r["latency"]["noise"]["foreign_cores"]) for r in mine),
        }
    return summary


def render(summary: dict[str, dict[str, Any]], s: Settings) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{(v - 1) * 100:+.1f}%"

    rate = f"{s.rate:,.0f}/s"
    lines = [
        f"| shadow | req/s at saturation (min–max) | vs off | CPU µs/req (sat.) | vs off "
        f"| CPU µs/req @{rate} | p50 ms @{rate} | p99 ms @{rate} | p50 vs off | p99 vs off "
        "| copies sent / dropped (sat., of requests incl. warm-up) | copies sent @rate "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary.items():
        off = name == "off"
        sat, lat = m["shadow_sat"], m["shadow_lat"]
        copies_sat = "—" if off else (
            f"{sat['sent']:,} / {sat['dropped']:,} of {m['requests_sat']:,}")
        copies_lat = "—" if off else f"{lat['sent']:,} of {m['requests_lat']:,}"
        lines.append(
            f"| {name} | {m['rps']:,.0f} ({m['rps_min']:,.0f}–{m['rps_max']:,.0f}) "
            f"| {'—' if off else pct(m['rps_vs_off'])} | {num(m['cpu_us_per_req'], '.0f')} "
            f"| {'—' if off else pct(m['cpu_vs_off'])} "
            f"| {num(m['cpu_us_per_req_at_rate'], '.0f')} "
            f"| {num(m['p50_ms'], '.2f')} ({num(m['p50_min'], '.2f')}–{num(m['p50_max'], '.2f')}) "
            f"| {num(m['p99_ms'], '.2f')} "
            f"| {'—' if off else num(m['p50_vs_off_ms'], '+.2f')} "
            f"| {'—' if off else num(m['p99_vs_off_ms'], '+.2f')} "
            f"| {copies_sat} | {copies_lat} | {m['errors']} |")
    if summary:
        worst = max(m["foreign_cores_max"] for m in summary.values())
        lines += ["", f"Medians over {s.rounds} rounds (ratios and deltas to off taken within "
                  f"each round). Other programs used at most {worst:.2f} of a core during any "
                  f"measurement; runs above {s.noise_limit:g} are left out of the medians."]
    return "\n".join(lines)


async def run(s: Settings, stamp: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log_dir = OUT_DIR / "logs" / f"shadow-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with ChildGroup(log_dir=log_dir) as group:
        stable, stable_url, canary, canary_url = await start_upstreams(group)
        port = free_port()
        shadow = group.start_python(
            "upstream-shadow", ["loadtests/upstream_fast.py", "--port", str(port),
                                "--name", "shadow"])
        await wait_port(port, child=shadow)
        urls = {"stable": stable_url, "canary": canary_url,
                "shadow": f"http://127.0.0.1:{port}"}
        script = log_dir / "post.lua"
        script.write_text(WRK_POST.format(body=BODY.decode()))
        samples = target_samples(s)
        pinning = pin_cpus(group, []) if s.pin else {}
        targets: dict[str, dict[str, Any]] = {}
        names = list(samples)
        try:
            for rnd in range(s.rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                fb = await start_flipback(group, order[0], samples[order[0]], urls, s, rnd)
                if pinning:
                    os.sched_setaffinity(fb.child.pid, pinning["proxies"])
                for name in order:
                    if name != fb.name:
                        await switch(fb, name, samples[name], urls, s)
                    fb.checks = await check_target(fb, 100 if rnd else 400)
                    sent = fb.checks["shadow"].get("sent", 0)
                    if (sent > 0) if fb.sample is None else (
                            fb.sample == 100.0 and sent != fb.checks["requests"]):
                        raise SystemExit(f"{name}: {sent} copies in the check: the config "
                                         "did not take")
                    if name not in targets:
                        targets[name] = {"url": fb.url, "config": fb.config,
                                         "checks": fb.checks}
                        print(f"# {fb.name}: check {fb.checks}", flush=True)
                    all_pids = [c.pid for c in group.children]
                    settle = await wait_quiet(all_pids, max_wait=s.settle)
                    sat = await saturate(fb, all_pids, s, script)
                    await asyncio.sleep(s.pause)
                    lat = await latency(fb, all_pids, s)
                    await asyncio.sleep(s.pause)
                    records.append({"round": rnd, "target": name, "settle": settle,
                                    "pid": fb.child.pid, "checks": fb.checks,
                                    "saturation": sat, "latency": lat})
                    print(f"# round {rnd + 1}/{s.rounds} {name:5s} {sat['rps']:>8,.0f} req/s "
                          f"cpu {sat['cpu_us_per_req']:4.0f} µs/req shadow {sat['shadow']} | "
                          f"@{s.rate:,.0f}/s p50 {lat['latency_ms']['p50']:.2f} "
                          f"p99 {lat['latency_ms']['p99']:.2f} ms shadow {lat['shadow']} | "
                          f"other programs {sat['noise']['foreign_cores']:.2f}/"
                          f"{lat['noise']['foreign_cores']:.2f} cores", flush=True)
                group.stop(fb.child)
        finally:
            group.stop_all()
    summary = summarize(records, s)
    return {
        "scenario": "shadow",
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "loadavg_end": os.getloadavg(),
        "settings": asdict(s),
        "targets": targets,
        "pinning": pinning,
        "logs": str(log_dir),
        "records": records,
        "summary": summary,
        "table": render(summary, s),
    }


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s + 3 s (~45 s)")
    parser.add_argument("--rounds", type=int, help="default 6 (1 with --quick)")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop req/s")
    parser.add_argument("--duration", type=float, help="open-loop seconds (default 6)")
    parser.add_argument("--sat-seconds", type=int, help="saturation seconds (default 5)")
    parser.add_argument("--max-in-flight", type=int, default=32, help="shadow max_in_flight")
    parser.add_argument("--no-wrk", action="store_true", help="use the closed-loop generator")
    parser.add_argument("--bare", action="store_true",
                        help="also measure 10 percent sampling without compare")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the flipbacks to their own CPU")
    parser.add_argument("--settle", type=float, help="wait up to this long for quiet (4 s)")
    parser.add_argument("--noise-limit", type=float, default=0.25,
                        help="leave runs out when other programs used more cores than this")
    args = parser.parse_args(argv)
    s = Settings(rate=args.rate, max_in_flight=args.max_in_flight, noise_limit=args.noise_limit)
    if args.quick:
        s.rounds, s.sat_seconds, s.duration, s.warmup = 1, 2, 3.0, 0.5
    s.rounds = args.rounds or s.rounds
    s.duration = args.duration or s.duration
    s.sat_seconds = args.sat_seconds or s.sat_seconds
    s.settle = (2.0 if args.quick else s.settle) if args.settle is None else args.settle
    s.bare = args.bare
    total = s.rounds * len(target_samples(s)) * (s.settle + s.sat_warmup + s.sat_seconds + s.warmup
                                                 + s.duration + 2 * s.pause + 2.0)
    if total > 720 or not 1 <= s.rounds <= 16 or not 0 < s.rate <= 20_000:
        parser.error(f"too long or out of range: ~{total:.0f} s (keep it under ~12 min)")
    s.use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    s.pin = not args.no_pin
    return s


def main(argv: Sequence[str] | None = None) -> int:
    result = run_scenario("shadow", run, parse_args(argv), lambda r: [r["table"]])
    return 0 if result["records"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
