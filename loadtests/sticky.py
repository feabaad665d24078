"""The `sticky` scenario: what sticky sessions cost in throughput and in memory.

throughput  two flipbacks on the same two fast upstreams, a 90/10 canary route with
            `sticky: {header: x-session-id, ttl: 1h, max_sessions: 1000000}` ("on") and the
            same route without a sticky section ("off"), measured interleaved (the order
            alternates per round), 3 rounds each: `wrk -t1 -c32 -d5s` after a 1 s warm-up,
            with a Lua script that sets `x-session-id` to one of 100,000 ids per request
            (math.random, a new seed per run, the same scripts for both), plus each
            flipback's CPU µs per request from /proc/PID/stat. Reports on/off req/s and CPU
            ratios (target: cost <= 10%). Before that: a check that "on" keeps each session
            on one upstream, and a prefill that pins all 100,000 ids in "on" (one request
            each), so the measured runs see a full table (steady state, mostly lookups).
memory (a)  a fresh `python` subprocess builds `PinTable(ttl=3600, max_sessions=1_000_000)`
            and puts `key_hash(f"session-{i}")` -> STABLE or canary (by bucket, 10%) 1M
            times: RSS delta / 1M (target <= 200 bytes), and the dicts' and keys' own sizes.
memory (b)  a fresh flipback (sticky on), warmed up without a session header, then fed
            distinct ids `e2e-1`, `e2e-2`, ... by wrk (a Lua counter that stops at N=1M)
            until `sticky_sessions` in `/routes/{name}` stops growing (bounded at 120 s):
            flipback's RSS after - before, divided by the sessions pinned.
Before each measurement the run waits (up to 4 s) for other programs to go quiet and
records how much CPU they took meanwhile. Prints markdown tables; raw results go to
loadtests/out/sticky-*.json.

    python loadtests/sticky.py                 # ~2.5 min
    python loadtests/sticky.py --quick         # 1 round, 200k e2e sessions, ~50 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import orjson

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
    wait_quiet,
)

ROUTE = "chat"
PATH = "/v1/chat/completions"
STICKY_HEADER = "x-session-id"

CONFIG = """\
server: {{listen: "127.0.0.1:{port}"}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
state: {{file: "{state}"}}
upstreams:
  stable: {{url: "{stable}"}}
  canary: {{url: "{canary}"}}
routes:
  - name: {route}
    match: {{path_prefix: "/"}}
    stable: stable
    canary: {{upstream: canary, weight: {weight:g}}}
{extra}"""


def sticky_section(max_sessions: int = 1_000_000) -> str:
    """The route's sticky section (header key), indented for `CONFIG`'s `extra`."""
    return f"    sticky: {{header: {STICKY_HEADER}, ttl: 1h, max_sessions: {max_sessions}}}\n"


# One of N ids per request, uniformly at random (a new seed per run).
RANDOM_LUA = """\
math.randomseed({seed})
local n = {sessions}
request = function()
  return wrk.format(nil, nil, {{["{header}"] = "s-" .. math.random(1, n)}})
end
"""

# Distinct ids prefix-1, prefix-2, ... up to `limit`, then the thread stops.
COUNTER_LUA = """\
local counter = 0
local limit = {limit}
request = function()
  counter = counter + 1
  if counter > limit then wrk.thread:stop() end
  return wrk.format(nil, nil, {{["{header}"] = "{prefix}-" .. counter}})
end
"""

# Runs in a fresh interpreter: only the table and what it holds move RSS.
PINTABLE_PROBE = """\
import gc, sys, time
import orjson
from proxy.rollout.pins import STABLE, PinTable
from proxy.rollout.sticky import BUCKETS, bucket, key_hash

def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

n, weight = int(sys.argv[1]), float(sys.argv[2])
gc.collect()
table = PinTable(ttl=3600, max_sessions=1_000_000, clock=time.monotonic)
before = rss()
t0 = time.perf_counter()
canary = 0
for i in range(n):
    h = key_hash(f"session-{i}")
    if bucket(h) < weight * 100:
        table.put(h, table.canary_code)
        canary += 1
    else:
        table.put(h, STABLE)
build_s = time.perf_counter() - t0
gc.collect()
after = rss()
gens = table._gens
dict_bytes = sum(sys.getsizeof(g) for g in gens)
key_bytes = sum(sys.getsizeof(k) for g in gens for k in g)
print(orjson.dumps({
    "sessions": len(table), "canary": canary, "rss_before": before, "rss_after": after,
    "rss_delta": after - before, "build_s": build_s, "dict_bytes": dict_bytes,
    "key_bytes_getsizeof": key_bytes, "repr": repr(table),
}).decode())
"""


@dataclass(kw_only=True)
class Settings:
    """Knobs of one run (all bounded; see `parse_args`)."""

    rounds: int = 3
    sat_seconds: int = 5
    sat_warmup: int = 1
    connections: int = 32
    sessions: int = 100_000
    weight: float = 10.0
    table_sessions: int = 1_000_000
    e2e_sessions: int = 1_000_000
    e2e_bound: float = 120.0  # seconds of feeding at most
    e2e_warmup: int = 5
    settle: float = 4.0
    noise_limit: float = 0.25
    skip_e2e: bool = False


@dataclass
class Flipback:
    """One started flipback: proxy URL, admin URL, process."""

    name: str
    url: str
    admin: str
    child: Child
    config: str  # the config file's text


def flipback_config(
    *,
    port: int,
    admin_port: int,
    state: Path,
    stable: str,
    canary: str,
    weight: float,
    extra: str = "",
) -> str:
    """The 90/10 route `ROUTE` on `stable`/`canary`, plus `extra` route keys (indented)."""
    return CONFIG.format(
        port=port,
        admin_port=admin_port,
        state=state,
        stable=stable,
        canary=canary,
        weight=weight,
        route=ROUTE,
        extra=extra,
    )


async def start_flipback_text(
    group: ChildGroup, name: str, make_config: Any, *, ready_within: float = 15.0
) -> Flipback:
    """Write `make_config(port, admin_port, workdir)` to a file and run flipback on it;
    ready when admin /readyz and one proxied request answer 200."""
    port, admin_port = free_port(), free_port()
    work = group.logs / name
    work.mkdir(exist_ok=True)
    config = work / "flipback.yaml"
    text = make_config(port, admin_port, work)
    config.write_text(text)
    child = group.start_python(name, ["-m", "proxy", "run", "-c", str(config)], cwd=REPO)
    admin = f"http://127.0.0.1:{admin_port}"
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        await wait_http(f"{admin}/readyz", child=child, within=ready_within)
        await wait_http(url, child=child, within=5.0)
    except NotReady as exc:
        raise NotReady(f"{name} did not come up: {exc} (log: {child.log})") from exc
    return Flipback(name, url, admin, child, text)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def get_json(url: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as resp,
    ):
        return await resp.json()


async def sticky_sessions(fb: Flipback) -> int:
    return int((await get_json(f"{fb.admin}/routes/{ROUTE}"))["sticky_sessions"])


async def run_wrk_script(
    url: str, seconds: int, connections: int, script: Path | None
) -> dict[str, Any]:
    """One `wrk -t1` run with an optional Lua script, killed by PID if it overruns by 15 s."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    argv += ["-s", str(script)] if script else []
    proc = await asyncio.create_subprocess_exec(
        *argv, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 15)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return parse_wrk(stdout.decode(errors="replace"))


async def check_sticky(fb: Flipback, sessions: int = 200, repeats: int = 5) -> dict[str, Any]:
    """Each of `sessions` ids `repeats` times in turn: does every id stay on one upstream?"""
    seen: dict[str, set[str]] = {}
    first: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(repeats):
            for i in range(sessions):
                sid = f"check-{i}"
                async with session.get(fb.url, headers={STICKY_HEADER: sid}) as resp:
                    await resp.read()
                    up = resp.headers.get("x-upstream", f"status {resp.status}")
                if sid not in seen:
                    first[up] += 1
                seen.setdefault(sid, set()).add(up)
    moved = sum(1 for ups in seen.values() if len(ups) > 1)
    return {"sessions": sessions, "repeats": repeats, "moved": moved, "first_pick": dict(first)}


async def feed_distinct(
    fb: Flipback, script: Path, count: int, connections: int, bound: float
) -> dict[str, Any]:
    """Run wrk with a COUNTER_LUA `script` (`count` distinct ids) until flipback has pinned
    `count` more sessions, the pins stop growing, or `bound` s pass; then SIGINT wrk.
    Samples pins and RSS every second."""
    pid = fb.child.pid
    pins0 = await sticky_sessions(fb)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(bound) + 5}s", "--latency"]
    argv += ["-s", str(script), fb.url]
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    stop_reason = "deadline"
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        last = -1
        while time.monotonic() - t0 < bound:
            await asyncio.sleep(1.0)
            pins = await sticky_sessions(fb)
            samples.append({"t": time.monotonic() - t0, "pins": pins, "rss": rss_bytes(pid)})
            if pins - pins0 >= count:
                stop_reason = "all sessions pinned"
                break
            if pins == last and pins > pins0:
                stop_reason = "pins stopped growing"
                break
            last = pins
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # wrk stops and prints its report
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
        except TimeoutError:
            proc.kill()
            stdout, _ = await proc.communicate()
    return {
        "samples": samples,
        "stop_reason": stop_reason,
        "feed_s": time.monotonic() - t0,
        "wrk": parse_wrk(stdout.decode(errors="replace")),
    }


def _quiet(runs: list[dict[str, Any]], limit: float) -> tuple[list[dict[str, Any]], bool]:
    quiet = [r for r in runs if r["noise"]["foreign_cores"] <= limit]
    return (quiet, True) if quiet else (runs, False)


async def throughput(
    s: Settings, group: ChildGroup, stable: str, canary: str, upstream_pids: list[int]
) -> dict[str, Any]:
    """Interleaved saturation runs through the sticky-on and sticky-off flipbacks."""
    scripts = []
    for i in range(s.rounds * 2 * 2):  # warm-up and measured run, per target and round
        scripts.append(group.logs / f"random-sessions-{i}.lua")
        scripts[-1].write_text(
            RANDOM_LUA.format(seed=1000 + i, sessions=s.sessions, header=STICKY_HEADER)
        )
    prefill = group.logs / "prefill-sessions.lua"
    prefill.write_text(COUNTER_LUA.format(limit=s.sessions, header=STICKY_HEADER, prefix="s"))
    targets: dict[str, Flipback] = {}
    for name, extra in (
        ("on", sticky_section()),
        ("off", ""),
    ):
        targets[name] = await start_flipback_text(
            group,
            f"flipback-{name}",
            lambda port, admin_port, work, extra=extra: flipback_config(
                port=port,
                admin_port=admin_port,
                state=work / "state.json",
                stable=stable,
                canary=canary,
                weight=s.weight,
                extra=extra,
            ),
        )
        print(f"# sticky {name}: pid {targets[name].child.pid} at {targets[name].url}", flush=True)
    check = await check_sticky(targets["on"])
    print(f"# sticky check: {check}", flush=True)
    # Pin every one of the ids first, so the measured runs see a table of `s.sessions`.
    fill = await feed_distinct(targets["on"], prefill, s.sessions, s.connections, 60.0)
    prefilled = await sticky_sessions(targets["on"])
    print(
        f"# prefill: {fill['wrk']['requests']:,} requests in {fill['feed_s']:.1f} s, "
        f"{prefilled:,} pins ({fill['stop_reason']})",
        flush=True,
    )
    records: list[dict[str, Any]] = []
    for rnd in range(s.rounds):
        for name in ("on", "off") if rnd % 2 == 0 else ("off", "on"):
            fb = targets[name]
            all_pids = [c.pid for c in group.children]
            settle = await wait_quiet(all_pids, max_wait=s.settle)
            warm_script, script = scripts.pop(), scripts.pop()
            if s.sat_warmup:
                await run_wrk_script(fb.url, s.sat_warmup, s.connections, warm_script)
            with (
                cpu_meter([fb.child.pid]) as cpu,
                cpu_meter(upstream_pids) as up_cpu,
                noise_meter(all_pids) as noise,
            ):
                res = await run_wrk_script(fb.url, s.sat_seconds, s.connections, script)
            n = max(res["requests"], 1)
            res.update(
                round=rnd,
                target=name,
                settle=settle,
                noise=noise,
                cpu_s=cpu["seconds"],
                cpu_us_per_req=cpu["seconds"] * 1e6 / n,
                upstreams_cpu_us_per_req=up_cpu["seconds"] * 1e6 / n,
                sticky_sessions=await sticky_sessions(fb),
            )
            records.append(res)
            print(
                f"# round {rnd + 1}/{s.rounds} sticky {name:3s} {res['rps']:>9,.0f} req/s "
                f"cpu {res['cpu_us_per_req']:5.1f} µs/req errors {sum(res['errors'].values())} "
                f"pins {res['sticky_sessions']:,} | other programs "
                f"{noise['foreign_cores']:.2f} cores",
                flush=True,
            )
    summary: dict[str, Any] = {}
    for name in ("on", "off"):
        runs, quiet = _quiet([r for r in records if r["target"] == name], s.noise_limit)
        rps = [r["rps"] for r in runs]
        summary[name] = {
            "runs_used": len(runs),
            "all_noisy": not quiet,
            "rps": statistics.median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] for r in runs),
            "p50_ms": statistics.median(r["latency_ms"].get("p50", 0.0) for r in runs),
            "p99_ms": statistics.median(r["latency_ms"].get("p99", 0.0) for r in runs),
            "errors": sum(sum(r["errors"].values()) for r in records if r["target"] == name),
            "foreign_cores_max": max(
                r["noise"]["foreign_cores"] for r in records if r["target"] == name
            ),
        }
    on, off = summary["on"], summary["off"]
    # Per round (adjacent runs), so slow drift in machine load cancels out.
    pairs = [
        (
            a["rps"] / b["rps"],
            a["cpu_us_per_req"] / b["cpu_us_per_req"],
            max(a["noise"]["foreign_cores"], b["noise"]["foreign_cores"]) <= s.noise_limit,
        )
        for a in records
        if a["target"] == "on"
        for b in records
        if b["target"] == "off" and b["round"] == a["round"]
    ]
    summary["rps_ratio"] = on["rps"] / off["rps"]
    summary["cpu_ratio"] = on["cpu_us_per_req"] / off["cpu_us_per_req"]
    summary["rps_ratio_per_round"] = [p[0] for p in pairs]
    summary["cpu_ratio_per_round"] = [p[1] for p in pairs]
    summary["rps_ratio_per_round_quiet"] = [p[2] for p in pairs]
    quiet_pairs = [p[0] for p in pairs if p[2]]
    # The figure to quote: rounds where neither run was disturbed, else all of them.
    summary["rps_ratio_quiet_rounds"] = statistics.median(quiet_pairs) if quiet_pairs else None
    summary["throughput_cost_pct"] = (1 - summary["rps_ratio"]) * 100
    summary["pins_at_end"] = max(r["sticky_sessions"] for r in records if r["target"] == "on")
    for fb in targets.values():
        group.stop(fb.child)
    return {
        "check": check,
        "prefill": {**fill, "pins": prefilled},
        "records": records,
        "summary": summary,
        "configs": {n: fb.config for n, fb in targets.items()},
    }


def pintable_memory(n: int, weight: float) -> dict[str, Any]:
    """Memory (a): a bare PinTable of `n` pins built in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PINTABLE_PROBE, str(n), f"{weight:g}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    out["rss_bytes_per_session"] = out["rss_delta"] / max(out["sessions"], 1)
    out["own_bytes_per_session"] = (out["dict_bytes"] + out["key_bytes_getsizeof"]) / max(
        out["sessions"], 1
    )
    return out


async def e2e_memory(s: Settings, group: ChildGroup, stable: str, canary: str) -> dict[str, Any]:
    """Memory (b): flipback RSS growth per pinned session over `s.e2e_sessions` ids."""
    fb = await start_flipback_text(
        group,
        "flipback-e2e",
        lambda port, admin_port, work: flipback_config(
            port=port,
            admin_port=admin_port,
            state=work / "state.json",
            stable=stable,
            canary=canary,
            weight=s.weight,
            extra=sticky_section(),
        ),
    )
    pid = fb.child.pid
    script = group.logs / "counter-sessions.lua"
    script.write_text(COUNTER_LUA.format(limit=s.e2e_sessions, header=STICKY_HEADER, prefix="e2e"))
    all_pids = [c.pid for c in group.children]
    # Warm-up without a session header: buffers, pools and windows reach steady state.
    await run_wrk_script(fb.url, s.e2e_warmup, s.connections, None)
    await asyncio.sleep(1.0)
    settle = await wait_quiet(all_pids, max_wait=s.settle)
    rss0, pins0 = rss_bytes(pid), await sticky_sessions(fb)
    with cpu_meter([pid]) as cpu, noise_meter(all_pids) as noise:
        feed = await feed_distinct(fb, script, s.e2e_sessions, s.connections, s.e2e_bound)
    samples, wrk, feed_s = feed["samples"], feed["wrk"], feed["feed_s"]
    stop_reason = feed["stop_reason"]
    await asyncio.sleep(1.0)
    rss1, pins1 = rss_bytes(pid), await sticky_sessions(fb)
    added = pins1 - pins0
    per = (rss1 - rss0) / added if added > 0 else None
    # Slope of RSS over pins in the samples: fixed costs (e.g. a wrk warm-up buffer) drop out.
    slope = None
    xs = [p["pins"] for p in samples]
    if len(samples) >= 3 and max(xs) > min(xs):
        slope = statistics.linear_regression(xs, [p["rss"] for p in samples]).slope
    group.stop(fb.child)
    return {
        "target_sessions": s.e2e_sessions,
        "stop_reason": stop_reason,
        "feed_s": feed_s,
        "wrk": wrk,
        "settle": settle,
        "noise": noise,
        "cpu_s": cpu["seconds"],
        "rss_before": rss0,
        "rss_after": rss1,
        "pins_before": pins0,
        "pins_after": pins1,
        "bytes_per_session": per,
        "slope_bytes_per_session": slope,
        "extrapolated_1m_mib": (per * 1_000_000 / 2**20) if per else None,
        "samples": samples,
    }


def render(result: dict[str, Any], s: Settings) -> str:
    lines: list[str] = []
    tp = result.get("throughput")
    if tp:
        sm = tp["summary"]
        lines += [
            "| sticky | req/s (min–max) | CPU µs/req | wrk p50 / p99 ms | errors "
            "| quiet runs used |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in ("off", "on"):
            m = sm[name]
            lines.append(
                f"| {name} | {m['rps']:,.0f} ({m['rps_min']:,.0f}–{m['rps_max']:,.0f}) "
                f"| {m['cpu_us_per_req']:.1f} | {m['p50_ms']:.2f} / {m['p99_ms']:.2f} "
                f"| {m['errors']} | {m['runs_used']} of {s.rounds}"
                f"{' (none quiet: all used)' if m['all_noisy'] else ''} |"
            )
        per_round = ", ".join(
            f"{x:.3f}{'' if q else '*'}"
            for x, q in zip(sm["rps_ratio_per_round"], sm["rps_ratio_per_round_quiet"], strict=True)
        )
        quiet_ratio = sm["rps_ratio_quiet_rounds"]
        quiet_text = "n/a" if quiet_ratio is None else f"{quiet_ratio:.3f}"
        cpu_rounds = ", ".join(f"{x:.3f}" for x in sm["cpu_ratio_per_round"])
        noisiest = max(sm["on"]["foreign_cores_max"], sm["off"]["foreign_cores_max"])
        lines += [
            "",
            f"on/off req/s (medians) {sm['rps_ratio']:.3f} "
            f"(cost {sm['throughput_cost_pct']:+.1f}%); per round {per_round} "
            "(* = a run of the pair was disturbed); median of the "
            f"undisturbed rounds {quiet_text}. on/off CPU µs/req {sm['cpu_ratio']:.3f} (per round "
            f"{cpu_rounds}). Pins in `on` after its runs {sm['pins_at_end']:,}; other programs "
            f"used at most {noisiest:.2f} cores.",
            f"prefill: {tp['prefill']['pins']:,} pins before the measured runs "
            f"({tp['prefill']['wrk']['requests']:,} requests, one per id).",
            f"stickiness check: {tp['check']['sessions']} ids x {tp['check']['repeats']}: "
            f"{tp['check']['moved']} moved, first picks {tp['check']['first_pick']}",
            "",
        ]
    mem = result.get("pintable")
    e2e = result.get("e2e")
    lines += [
        "| memory | sessions | RSS before → after | bytes / session |",
        "|---|---:|---:|---:|",
    ]
    if mem:
        lines.append(
            f"| (a) bare `PinTable`, fresh interpreter | {mem['sessions']:,} "
            f"| {mem['rss_before'] / 2**20:.1f} → {mem['rss_after'] / 2**20:.1f} MiB "
            f"| {mem['rss_bytes_per_session']:.0f} (own sizes: dicts "
            f"{mem['dict_bytes'] / mem['sessions']:.0f} + keys "
            f"{mem['key_bytes_getsizeof'] / mem['sessions']:.0f}) |"
        )
    if e2e:
        per = e2e["bytes_per_session"]
        slope = e2e["slope_bytes_per_session"]
        lines.append(
            f"| (b) flipback process, wrk-fed ids | {e2e['pins_after'] - e2e['pins_before']:,} "
            f"| {e2e['rss_before'] / 2**20:.1f} → {e2e['rss_after'] / 2**20:.1f} MiB "
            f"| {'n/a' if per is None else format(per, '.0f')}"
            f"{'' if slope is None else f' (slope over samples {slope:.0f})'} |"
        )
        lines += [
            "",
            f"e2e feed: {e2e['wrk']['requests']:,} requests in {e2e['feed_s']:.0f} s "
            f"({e2e['wrk']['rps']:,.0f} req/s, {sum(e2e['wrk']['errors'].values())} errors), "
            f"stopped: {e2e['stop_reason']}; other programs "
            f"{e2e['noise']['foreign_cores']:.2f} cores."
            + (
                f" Extrapolated to 1M sessions: {e2e['extrapolated_1m_mib']:.0f} MiB."
                if e2e["pins_after"] - e2e["pins_before"] < 1_000_000 and per
                else ""
            ),
        ]
    return "\n".join(lines)


async def run(s: Settings, stamp: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log_dir = OUT_DIR / "logs" / f"sticky-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "scenario": "sticky",
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "settings": asdict(s),
        "logs": str(log_dir),
    }
    print("# memory (a): bare PinTable in a fresh interpreter ...", flush=True)
    result["pintable"] = await asyncio.to_thread(pintable_memory, s.table_sessions, s.weight)
    print(
        f"# memory (a): {result['pintable']['rss_bytes_per_session']:.1f} bytes/session "
        f"(RSS delta {result['pintable']['rss_delta'] / 2**20:.1f} MiB)",
        flush=True,
    )
    with ChildGroup(log_dir=log_dir) as group:
        stable, stable_url, canary, canary_url = await start_upstreams(group)
        upstream_pids = [stable.pid, canary.pid]
        try:
            result["throughput"] = await throughput(s, group, stable_url, canary_url, upstream_pids)
            if not s.skip_e2e:
                print(f"# memory (b): feeding up to {s.e2e_sessions:,} ids ...", flush=True)
                result["e2e"] = await e2e_memory(s, group, stable_url, canary_url)
                e = result["e2e"]
                print(
                    f"# memory (b): {e['pins_after']:,} pins, RSS "
                    f"{e['rss_before'] / 2**20:.1f} -> {e['rss_after'] / 2**20:.1f} MiB",
                    flush=True,
                )
        finally:
            group.stop_all()
    result["loadavg_end"] = os.getloadavg()
    result["table"] = render(result, s)
    return result


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 3 s, 200k e2e sessions (~50 s)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds per config, default 3")
    parser.add_argument("--sat-seconds", type=int, help="wrk seconds per run, default 5")
    parser.add_argument(
        "--sessions",
        type=int,
        default=100_000,
        help="distinct random session ids in the throughput runs",
    )
    parser.add_argument(
        "--e2e-sessions",
        type=int,
        help="distinct ids fed to the e2e flipback, default 1M (200k quick)",
    )
    parser.add_argument("--no-e2e", action="store_true", help="skip memory (b)")
    parser.add_argument(
        "--settle",
        type=float,
        default=4.0,
        help="wait up to this many s for other programs to go quiet",
    )
    args = parser.parse_args(argv)
    s = Settings(sessions=args.sessions, settle=args.settle, skip_e2e=args.no_e2e)
    if args.quick:
        s.rounds, s.sat_seconds, s.e2e_sessions, s.e2e_warmup = 1, 3, 200_000, 2
    s.rounds = args.rounds or s.rounds
    s.sat_seconds = args.sat_seconds or s.sat_seconds
    s.e2e_sessions = args.e2e_sessions or s.e2e_sessions
    if (
        not 1 <= s.rounds <= 6
        or not 1 <= s.sat_seconds <= 15
        or not (1 <= s.e2e_sessions <= 1_000_000)
    ):
        parser.error("out of range: rounds 1-6, sat-seconds 1-15, e2e-sessions <= 1M")
    if shutil.which("wrk") is None:
        parser.error("this scenario needs wrk (Lua scripts set the session header)")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    run_scenario("sticky", run, parse_args(argv), lambda r: [r["table"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
