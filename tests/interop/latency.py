"""Added latency of flipback in front of real model servers: the same requests sent
directly and through a real ``flipback run`` process, interleaved one by one (so drift on
the shared 2-core machine hits both alike), sequential, after a warm-up. For the LLM
server also the time to first token of a streamed completion (TTFT: request sent to the
first ``data:`` event carrying text).

    python -m tests.interop.latency [--requests 200] [--streams 100] [--only mlflow,llama]

Run from the repository root with the project's venv active; servers come from
``.venv-interop/`` (``bash tests/interop/setup_venvs.sh``); the ones not installed are
skipped. Prints a Markdown table and writes raw figures to loadtests/out/interop-*.json.
Everything is on 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from tests.interop import servers as srv

ROWS = [[5.0, 0.0], [0.5, 0.0], [-5.0, 0.0]]
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlflow": ("/invocations", {"inputs": ROWS}),
    "mlserver": ("/v2/models/clf/infer",
                 {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP64",
                              "data": [v for row in ROWS for v in row]}]}),
    "llama": ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
}
STREAM = ("/v1/completions", {"prompt": "Hello", "max_tokens": 64, "temperature": 0,
                              "stream": True})


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": quantile(values, 0.50) * 1000,
            "p99_ms": quantile(values, 0.99) * 1000,
            "mean_ms": sum(values) / len(values) * 1000}


def summary_rate(values: list[float]) -> dict[str, float]:
    """Median and p10 (the slow end) of per-stream tokens/s."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": 0.0, "p10": 0.0}
    return {"n": len(ordered), "p50": round(quantile(ordered, 0.5), 1),
            "p10": round(quantile(ordered, 0.1), 1)}


def start_model(kind: str, work: Path) -> srv.ServerProcess:
    if kind == "mlflow":
        (model,) = srv.mlflow_models(work, [0.0])
        server = srv.mlflow_server(model, work)
    elif kind == "mlserver":
        (repo,) = srv.mlserver_models(work, [0.0], "clf")
        server = srv.mlserver_server(repo, work)
    else:
        (model,) = srv.llama_models(work, [1])
        server = srv.llama_server(model, work)
    srv.start_all([server])
    return server


def start_flipback(upstream: str, work: Path,
                   llm: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """flipback in front of ``upstream``; ``llm``: the route reads answers as LLM output
    (llm.telemetry), so the figures include what that costs."""
    port, admin = srv.free_port(), srv.free_port()
    cfg = work / "flipback.yaml"
    cfg.write_text(f"""
server: {{listen: "127.0.0.1:{port}"}}
admin: {{listen: "127.0.0.1:{admin}"}}
state: {{file: {work}/state.json}}
upstreams:
  model: {{url: "{upstream}"}}
routes:
  - {{name: r, match: {{path_prefix: /}}, stable: model, llm: {{telemetry: {str(llm).lower()}}}}}
""")
    env = {**os.environ, "FLIPBACK_LOG_LEVEL": "WARNING"}
    env.pop("FLIPBACK_ADMIN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(cfg)],
                            cwd=srv.REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with (contextlib.suppress(OSError),
              urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1)):
            return proc, port
        srv.pause(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("flipback did not become ready")


async def timed_json(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    async with session.post(url, data=body,
                            headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")
    return time.perf_counter() - t0


async def timed_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                       rates: list[float] | None = None) -> float:
    """Seconds to the first SSE event whose text is not empty (the first token out);
    appends the stream's tokens per second (text events after the first, over the time
    from the first to the last) to ``rates``."""
    t0 = time.perf_counter()
    ttft = None
    buf = b""
    events, last = 0, 0.0
    async with session.post(url, data=body,
                            headers={"Content-Type": "application/json"}) as resp:
        async for chunk in resp.content.iter_any():
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            now = time.perf_counter()
            for line in lines:
                if line.startswith(b"data: {") and b'"text": ""' not in line:
                    events += 1
                    last = now
                    if ttft is None:
                        ttft = now - t0
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")
    if rates is not None and ttft is not None and events > 1 and last > t0 + ttft:
        rates.append((events - 1) / (last - t0 - ttft))
    return ttft if ttft is not None else time.perf_counter() - t0


async def interleaved(n: int, warmup: int, direct: Callable[[], Awaitable[float]],
                      proxied: Callable[[], Awaitable[float]]) -> dict[str, Any]:
    for _ in range(warmup):
        await direct()
        await proxied()
    d: list[float] = []
    p: list[float] = []
    for i in range(n):  # alternate which goes first
        if i % 2:
            d.append(await direct())
            p.append(await proxied())
        else:
            p.append(await proxied())
            d.append(await direct())
    out: dict[str, Any] = {"direct": summary(d), "flipback": summary(p),
                           "raw_ms": {"direct": [round(v * 1000, 3) for v in d],
                                      "flipback": [round(v * 1000, 3) for v in p]}}
    out["added_p50_ms"] = out["flipback"]["p50_ms"] - out["direct"]["p50_ms"]
    out["added_p99_ms"] = out["flipback"]["p99_ms"] - out["direct"]["p99_ms"]
    return out


async def measure(kind: str, model_url: str, proxy_url: str, n: int,
                  streams: int) -> dict[str, Any]:
    path, doc = REQUESTS[kind]
    body = json.dumps(doc).encode()
    async with aiohttp.ClientSession() as session:
        result: dict[str, Any] = {"json": await interleaved(
            n, 20, lambda: timed_json(session, model_url + path, body),
            lambda: timed_json(session, proxy_url + path, body))}
        if kind == "llama":
            spath, sbody = STREAM[0], json.dumps(STREAM[1]).encode()
            direct_rates: list[float] = []
            proxied_rates: list[float] = []
            result["ttft"] = await interleaved(
                streams, 5,
                lambda: timed_stream(session, model_url + spath, sbody, direct_rates),
                lambda: timed_stream(session, proxy_url + spath, sbody, proxied_rates))
            result["tokens_per_s"] = {"direct": summary_rate(direct_rates),
                                      "flipback": summary_rate(proxied_rates)}
    return result


def run_one(kind: str, n: int, streams: int) -> dict[str, Any]:
    """Start the model server and a flipback in front of it, measure, stop both."""
    with tempfile.TemporaryDirectory(prefix=f"interop-{kind}-") as tmp:
        work = Path(tmp)
        server = start_model(kind, work)
        try:
            fb, port = start_flipback(server.url, work, llm=kind == "llama")
            try:
                return uvloop.run(measure(kind, server.url, f"http://127.0.0.1:{port}", n,
                                          streams))
            finally:
                fb.terminate()
                try:
                    fb.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    fb.kill()
                    fb.wait()
        finally:
            server.kill()


def table(results: dict[str, Any]) -> str:
    lines = ["| server, request | n | direct p50 / p99 ms | through flipback p50 / p99 ms "
             "| added p50 / p99 ms |", "|---|---:|---:|---:|---:|"]
    names = {"mlflow": "MLflow `/invocations` (3 rows)",
             "mlserver": "MLServer V2 `infer` (3 rows)",
             "llama": "llama-cpp-python `/v1/completions`, 4 tokens"}
    for kind, res in results.items():
        rows = [(names[kind], res["json"])]
        if "ttft" in res:
            rows.append(("llama-cpp-python TTFT, streamed, 64 tokens", res["ttft"]))
        for label, r in rows:
            d, p = r["direct"], r["flipback"]
            lines.append(f"| {label} | {d['n']} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | "
                         f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} | "
                         f"{r['added_p50_ms']:+.2f} / {r['added_p99_ms']:+.2f} |")
    for kind, res in results.items():
        rates = res.get("tokens_per_s")
        if rates:
            d, p = rates["direct"], rates["flipback"]
            lines.append(f"\n{kind} tokens/s per stream (p50 / p10, n={d['n']}): direct "
                         f"{d['p50']:.0f} / {d['p10']:.0f}, through flipback with "
                         f"llm.telemetry {p['p50']:.0f} / {p['p10']:.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--only", default="mlflow,mlserver,llama")
    args = parser.parse_args()
    kinds = {"mlflow": srv.MLFLOW, "mlserver": srv.MLSERVER, "llama": srv.LLAMA}
    results: dict[str, Any] = {}
    for name in args.only.split(","):
        reason = kinds[name].missing()
        if reason:
            print(f"skip: {reason}", file=sys.stderr)
            continue
        t0 = time.monotonic()
        results[name] = run_one(name, args.requests, args.streams)
        results[name]["loadavg_1m_after"] = os.getloadavg()[0]
        print(f"{name}: measured in {time.monotonic() - t0:.0f} s, load average "
              f"{os.getloadavg()[0]:.2f} after", file=sys.stderr)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = srv.REPO / "loadtests" / "out" / f"interop-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from loadtests.procs import machine_info
        machine: dict[str, object] = machine_info()
    except ImportError:
        machine = {"nproc": os.cpu_count()}
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    print(table(results))
    print(f"\nraw: {out.relative_to(srv.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
