"""Client-side CPU per request: flipback's UpstreamPool against aiohttp's ClientSession.

Starts ``upstream_fast.py`` (httptools on uvloop, a ~100-byte JSON answer) in a child
process on 127.0.0.1, then sends N GETs through each client, one at a time and with C
concurrent workers, and reports this process's CPU time per request.

    python loadtests/bench_upstream.py [-n 20000] [-c 32] [-r 3] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config.model import UpstreamConfig  # noqa: E402
from proxy.upstream.pool import UpstreamPool  # noqa: E402

Fetch = Callable[[], Awaitable[int]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    script = Path(__file__).with_name("upstream_fast.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)  # noqa: TID251 - before any event loop runs
    proc.kill()
    raise SystemExit("upstream did not start")


async def run(fetch: Fetch, n: int, concurrency: int) -> tuple[float, float]:
    """CPU µs and wall µs per request for ``n`` requests over ``concurrency`` workers."""
    for _ in range(500):  # warm up: connections, caches
        await fetch()
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await fetch()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ((time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6)


async def bench(port: int, n: int, concurrency: int, rounds: int) -> None:
    pool = UpstreamPool(UpstreamConfig(name="bench", url=f"http://127.0.0.1:{port}",
                                       host="127.0.0.1", port=port))
    headers = [(b"Accept", b"application/json"), (b"User-Agent", b"bench"),
               (b"x-request-id", b"0123456789abcdef")]

    async def via_pool() -> int:
        resp = await pool.send("GET", "/v1/models", headers, None)
        size = 0
        while chunk := await resp.read():
            size += len(chunk)
        resp.release()
        return size

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512, ttl_dns_cache=None),
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
    url = f"http://127.0.0.1:{port}/v1/models"
    plain = {k.decode(): v.decode() for k, v in headers}

    async def via_aiohttp() -> int:
        async with session.get(url, headers=plain) as resp:
            return len(await resp.read())

    clients = (("UpstreamPool", via_pool), ("aiohttp ClientSession", via_aiohttp))
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
            for name, fetch in clients:
                for conc in (1, concurrency):
                    results.setdefault((name, conc), []).append(await run(fetch, n, conc))
    finally:
        await pool.aclose(0)
        await session.close()
    for (name, conc), runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        print(f"{name:22s} concurrency {conc:3d}: {cpu:6.1f} µs CPU/request "
              f"({wall:6.1f} µs wall/request; median of {rounds})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    port = free_port()
    proc = start_upstream(port)
    try:
        coro = bench(port, args.n, args.concurrency, args.rounds)
        if args.loop == "uvloop":
            uvloop.run(coro)
        else:
            asyncio.run(coro)
    finally:
        proc.terminate()
        proc.wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
