"""The `reload` scenario: 1,000 hot reloads at one per 100 ms under steady load.

One flipback (a 90/10 canary route on two fast upstreams) takes open-loop load at
500 req/s in three back-to-back phases, in the same run:
  before   no reloads, half as long as `during`;
  during   a task rewrites the config file (temp file + rename) every 100 ms with a changed
           canary weight (5..15, never the same twice in a row; every 10th reload also
           toggles the rollback window between 10s and 12s) and POSTs admin /reload right
           after, 1,000 times (~100 s);
  after    no reloads, half as long as `during`.
For each phase: failed requests (non-2xx and exceptions; the target is 0), latency
p50/p99/p99.9/max from the scheduled send, and flipback's CPU (cores and µs per request).
Also: `flipback_config_reloads_total{result="ok"}` and `{result="refused"}` from /metrics
before and after `during`, how /reload answered and how long it took, the configured
weight in `/routes/{name}` after the last reload, and flipback's RSS and open fds before
and after (a leak check). Before each phase the run waits (up to 4 s) for other programs
to go quiet and records how much CPU they took meanwhile. Raw results go to
loadtests/out/reload-*.json.

    python loadtests/reload.py            # 1,000 reloads, ~3.7 min
    python loadtests/reload.py --quick    # 100 reloads, ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
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

from loadtests.loadgen import percentile, run_open_loop
from loadtests.overhead import start_upstreams
from loadtests.procs import (
    OUT_DIR,
    ChildGroup,
    cpu_meter,
    machine_info,
    noise_meter,
    run_scenario,
    wait_quiet,
)
from loadtests.sticky import ROUTE, Flipback, flipback_config, rss_bytes, start_flipback_text

WINDOWS = ("10s", "12s")
_RELOADS = re.compile(r'^flipback_config_reloads_total\{result="(\w+)"\}\s+([0-9.e+]+)', re.M)


@dataclass(kw_only=True)
class Settings:
    """Knobs of one run (all bounded; see `parse_args`)."""

    reloads: int = 1000
    interval: float = 0.1
    rate: float = 500.0
    connections: int = 64
    warmup: float = 2.0
    settle: float = 4.0
    noise_limit: float = 0.25


def weight_for(i: int) -> float:
    """Canary weight of the i-th reload: 5..15, never equal to the previous one."""
    return float(5 + i % 11)


def window_for(i: int) -> str:
    """Rollback window of the i-th reload: toggles on every 10th reload (0, 10, 20...)."""
    return WINDOWS[(i // 10 + 1) % 2]


def config_text(fb_port: int, admin_port: int, work: Path, urls: tuple[str, str], i: int) -> str:
    """The config the i-th reload writes (i = -1: the one flipback starts with)."""
    weight = 10.0 if i < 0 else weight_for(i)
    window = WINDOWS[0] if i < 0 else window_for(i)
    return flipback_config(
        port=fb_port,
        admin_port=admin_port,
        state=work / "state.json",
        stable=urls[0],
        canary=urls[1],
        weight=weight,
        extra=f"    rollback: {{window: {window}}}\n",
    )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def reload_counts(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    """`flipback_config_reloads_total` by result, from /metrics."""
    async with session.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    return {m.group(1): float(m.group(2)) for m in _RELOADS.finditer(text)}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def reloader(
    s: Settings,
    session: aiohttp.ClientSession,
    fb: Flipback,
    path: Path,
    make: Any,
) -> dict[str, Any]:
    """Rewrite `path` and POST /reload every `s.interval` s, `s.reloads` times."""
    answers: Counter[str] = Counter()
    took: list[float] = []
    late = 0
    t0 = time.perf_counter()
    for i in range(s.reloads):
        delay = t0 + i * s.interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late += 1
        await asyncio.to_thread(_write_atomically, path, make(i))
        start = time.perf_counter()
        try:
            async with session.post(f"{fb.admin}/reload") as resp:
                body = await resp.json()
                if resp.status == 200 and body.get("ok"):
                    answers["ok, changed" if body.get("changed") else "ok, unchanged"] += 1
                else:
                    answers[f"{resp.status} {body.get('reason', '')[:60]}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            answers[type(exc).__name__] += 1
        took.append(time.perf_counter() - start)
    values = sorted(took)
    return {
        "reloads": s.reloads,
        "wall_s": time.perf_counter() - t0,
        "answers": dict(answers),
        "late_starts": late,
        "post_ms": {
            "p50": percentile(values, 50) * 1000,
            "p99": percentile(values, 99) * 1000,
            "max": values[-1] * 1000 if values else 0.0,
        },
        "last_weight": weight_for(s.reloads - 1),
    }


async def phase(
    name: str,
    s: Settings,
    group: ChildGroup,
    fb: Flipback,
    duration: float,
    *,
    warmup: float = 0.0,
    reload_with: tuple[aiohttp.ClientSession, Path, Any] | None = None,
) -> dict[str, Any]:
    """Open-loop load for `duration` s; with `reload_with`, the reloader runs alongside."""
    all_pids = [c.pid for c in group.children]
    settle = await wait_quiet(all_pids, max_wait=s.settle)
    pid = fb.child.pid
    rss0, fds0, threads0 = rss_bytes(pid), open_fds(pid), threads(pid)
    reloads: dict[str, Any] | None = None
    with cpu_meter([pid]) as cpu, noise_meter(all_pids) as noise:
        load = run_open_loop(
            fb.url,
            s.rate,
            duration,
            warmup=warmup,
            connections=s.connections,
            request_timeout=10.0,
        )
        if reload_with is None:
            lr = await load
        else:
            session, path, make = reload_with

            async def delayed_reloader() -> dict[str, Any]:
                await asyncio.sleep(warmup)  # start with the recorded part of the load
                return await reloader(s, session, fb, path, make)

            lr, reloads = await asyncio.gather(load, delayed_reloader())
    out = lr.to_dict()
    n = max(lr.completed, 1)
    out.update(
        phase=name,
        failed=lr.error_count,
        settle=settle,
        noise=noise,
        cpu_s=cpu["seconds"],
        cpu_cores=cpu["seconds"] / noise["wall_s"] if noise["wall_s"] else 0.0,
        cpu_us_per_req=cpu["seconds"] * 1e6 / n,
        rss_before=rss0,
        rss_after=rss_bytes(pid),
        fds_before=fds0,
        fds_after=open_fds(pid),
        threads_before=threads0,
        threads_after=threads(pid),
        reloader=reloads,
    )
    lat = out["latency_ms"]
    print(
        f"# {name:6s} {lr.completed:,} requests, failed {out['failed']}, p50 {lat['p50']:.2f} "
        f"p99 {lat['p99']:.2f} max {lat['max']:.1f} ms, flipback {out['cpu_cores']:.2f} cores "
        f"({out['cpu_us_per_req']:.0f} µs/req) | other programs {noise['foreign_cores']:.2f} "
        "cores" + (f" | reloads {reloads['answers']}" if reloads else ""),
        flush=True,
    )
    return out


def render(r: dict[str, Any], s: Settings) -> str:
    lines = [
        "| phase | seconds | reloads | requests | failed | p50 ms | p99 ms | p99.9 ms | max ms "
        "| flipback cores | CPU µs/req | other programs (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["phases"]:
        lat = p["latency_ms"]
        n = p["reloader"]["reloads"] if p["reloader"] else 0
        lines.append(
            f"| {p['phase']} | {p['duration']:.0f} | {n:,} | {p['completed']:,} | {p['failed']} "
            f"| {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p99.9']:.2f} | {lat['max']:.1f} "
            f"| {p['cpu_cores']:.3f} | {p['cpu_us_per_req']:.0f} "
            f"| {p['noise']['foreign_cores']:.2f} |"
        )
    during = next(p for p in r["phases"] if p["phase"] == "during")
    rl = during["reloader"]
    others = [p for p in r["phases"] if p["phase"] != "during"]
    base = max(p["latency_ms"]["p99"] for p in others)
    m0, m1 = r["metrics_before"], r["metrics_after"]
    first, last = r["phases"][0], r["phases"][-1]
    # CPU a reload costs: during's CPU minus what the no-reload phases' rate would have used.
    base_cores = sum(p["cpu_s"] for p in others) / sum(p["noise"]["wall_s"] for p in others)
    per_reload_ms = (
        (during["cpu_s"] - base_cores * during["noise"]["wall_s"]) / max(rl["reloads"], 1) * 1000
    )
    r["cpu_ms_per_reload"] = per_reload_ms
    lines += [
        "",
        f"Open loop at {s.rate:,.0f} req/s ({s.connections} connections), latency from the "
        f"scheduled send. p99 during / worst p99 without: "
        f"{during['latency_ms']['p99'] / base:.2f}x.",
        f"`flipback_config_reloads_total`: ok {m0.get('ok', 0):.0f} → {m1.get('ok', 0):.0f} "
        f"(+{m1.get('ok', 0) - m0.get('ok', 0):.0f}), refused {m0.get('refused', 0):.0f} → "
        f"{m1.get('refused', 0):.0f}. /reload answered {rl['answers']} in "
        f"{rl['wall_s']:.1f} s; POST /reload took p50 {rl['post_ms']['p50']:.1f} / p99 "
        f"{rl['post_ms']['p99']:.1f} / max {rl['post_ms']['max']:.1f} ms. Configured weight "
        f"after the last reload: {r['final_weight']} (expected {rl['last_weight']:g}).",
        f"flipback RSS {first['rss_before'] / 2**20:.1f} → {during['rss_before'] / 2**20:.1f} "
        f"(start of during) → {during['rss_after'] / 2**20:.1f} (end of during) → "
        f"{last['rss_after'] / 2**20:.1f} MiB (end); open fds {first['fds_before']} → "
        f"{during['fds_after']} → {last['fds_after']}; threads {first['threads_before']} → "
        f"{during['threads_after']} → {last['threads_after']}. flipback CPU per reload "
        f"(during minus the no-reload rate): {per_reload_ms:.2f} ms.",
    ]
    return "\n".join(lines)


async def run(s: Settings, stamp: str) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log_dir = OUT_DIR / "logs" / f"reload-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    during_s = s.reloads * s.interval
    phases: list[dict[str, Any]] = []
    with ChildGroup(log_dir=log_dir) as group:
        _, stable_url, _, canary_url = await start_upstreams(group)
        urls = (stable_url, canary_url)
        ports: dict[str, Any] = {}

        def initial(port: int, admin_port: int, work: Path) -> str:
            ports.update(port=port, admin_port=admin_port, work=work)
            return config_text(port, admin_port, work, urls, -1)

        fb = await start_flipback_text(group, "flipback", initial)
        print(f"# flipback: pid {fb.child.pid} at {fb.url}", flush=True)
        path = Path(ports["work"]) / "flipback.yaml"

        def make(i: int) -> str:
            return config_text(ports["port"], ports["admin_port"], ports["work"], urls, i)

        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            phases.append(await phase("before", s, group, fb, during_s / 2, warmup=s.warmup))
            m0 = await reload_counts(session, fb.admin)
            phases.append(
                await phase(
                    "during", s, group, fb, during_s, warmup=0.5, reload_with=(session, path, make)
                )
            )
            await asyncio.sleep(1.5)  # let the 1 s file watch look once more
            m1 = await reload_counts(session, fb.admin)
            async with session.get(f"{fb.admin}/routes/{ROUTE}") as resp:
                route = await resp.json()
            async with session.get(f"{fb.admin}/events?limit=2000") as resp:
                events = (await resp.json())["events"]
            phases.append(await phase("after", s, group, fb, during_s / 2))
        group.stop_all()
    kinds = Counter(e["kind"] for e in events)
    result: dict[str, Any] = {
        "scenario": "reload",
        "started": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "loadavg_end": os.getloadavg(),
        "settings": asdict(s),
        "logs": str(log_dir),
        "phases": phases,
        "metrics_before": m0,
        "metrics_after": m1,
        "final_weight": route.get("configured_weight"),
        "route_after": route,
        "event_kinds_last_2000": dict(kinds),
        "failed_total": sum(p["failed"] for p in phases),
    }
    result["table"] = render(result, s)
    return result


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 reloads (~30 s in all)")
    parser.add_argument("--reloads", type=int, help="reloads in the `during` phase, default 1000")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between reloads")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop req/s")
    parser.add_argument(
        "--settle",
        type=float,
        default=4.0,
        help="before each phase, wait up to this many s for other programs to go quiet",
    )
    args = parser.parse_args(argv)
    s = Settings(interval=args.interval, rate=args.rate, settle=args.settle)
    s.reloads = args.reloads or (100 if args.quick else s.reloads)
    if not 1 <= s.reloads <= 2000 or not 0.02 <= s.interval <= 1 or not 0 < s.rate <= 5000:
        parser.error("out of range: reloads 1-2000, interval 0.02-1 s, rate <= 5000")
    if s.reloads * s.interval > 150:
        parser.error("keep reloads x interval under 150 s (the run is about twice that)")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    result = run_scenario("reload", run, parse_args(argv), lambda r: [r["table"]])
    return 0 if result["failed_total"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
