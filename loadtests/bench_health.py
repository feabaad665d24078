"""What an active health probe costs flipback: CPU per probe against a fast upstream.

Runs ``upstream_fast`` in a child process and calls the real probe (``proxy.upstream.health``) N
times back to back on uvloop, measuring this process's CPU time. A probe every 5 s per
upstream (the default interval) then costs (CPU per probe / 5 s) of one core.

    python loadtests/bench_health.py [--n 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.procs import ChildGroup, free_port, wait_port  # noqa: E402
from proxy.config.model import HealthConfig, UpstreamConfig  # noqa: E402
from proxy.upstream.health import _Probe  # noqa: E402
from proxy.upstream.pool import UpstreamPool  # noqa: E402


async def measure(port: int, n: int) -> tuple[float, float]:
    await wait_port(port)
    cfg = UpstreamConfig(name="u", url=f"http://127.0.0.1:{port}", port=port,
                         health=HealthConfig(path="/health", timeout=1.0))
    pool = UpstreamPool(cfg)
    probe = _Probe("u", pool, cfg.health, lambda name, ok: None)
    for _ in range(200):  # warm up: connection, code paths
        assert await probe.probe()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await probe.probe()
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    await pool.aclose(1.0)
    return cpu / n * 1e6, wall / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    port = free_port()
    root = Path(__file__).resolve().parent
    with ChildGroup() as children:
        children.start_python("upstream", [str(root / "upstream_fast.py"), "--port", str(port)])
        cpu_us, wall_us = uvloop.run(measure(port, args.n))
    print(f"health probe: {cpu_us:.1f} us CPU, {wall_us:.1f} us wall per probe (n={args.n})")
    print(f"at the default 5 s interval: {cpu_us / 5e6 * 100:.5f}% of one core per upstream")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
