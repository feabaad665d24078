"""Run nginx as a foreground child, configured like the bench proxies (90/10 split, keep-alive).

Everything nginx writes (config, pid, logs, temp dirs) lives in one prefix folder; nginx
runs with `daemon off`, so the PID we started is its master, and stopping that PID stops
its workers.

    python loadtests/nginx_proxy.py --port 8082 --upstream 127.0.0.1:9001 \
        --canary 127.0.0.1:9002 --weight 10 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.procs import Child, ChildGroup, descendants, free_port, wait_http

TEMPLATE = Path(__file__).with_name("nginx.conf.template")


def find_nginx() -> str | None:
    """Path of the nginx binary (also looks in sbin dirs, often missing from PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(path, os.X_OK):
            return path
    return None


def _hostport(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def render_config(
    prefix: Path, *, port: int, stable: str, canary: str, weight: float, workers: int = 1
) -> str:
    """The template filled in; `stable`/`canary` are URLs or host:port."""
    canary_line = f"{weight:g}% canary;" if weight > 0 else "# canary weight 0"
    values = {
        "PREFIX": str(prefix),
        "PORT": str(port),
        "STABLE": _hostport(stable),
        "CANARY": _hostport(canary),
        "CANARY_LINE": canary_line,
        "WORKERS": str(workers),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def start_nginx(
    group: ChildGroup,
    *,
    port: int,
    stable: str,
    canary: str,
    weight: float = 10.0,
    workers: int = 1,
    name: str = "nginx",
) -> Child:
    """Write the config under a fresh prefix in `group.logs` and start nginx on it."""
    binary = find_nginx()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir=group.logs))
    (prefix / "tmp").mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_config(
            prefix, port=port, stable=stable, canary=canary, weight=weight, workers=workers
        )
    )
    argv = [
        binary,
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]
    return group.start(name, argv, cwd=prefix)


def stop_nginx(group: ChildGroup, child: Child, timeout: float = 5.0) -> None:
    """Stop the master by PID; then any worker still alive, by its own PID."""
    workers = descendants(child.pid)
    group.stop(child, timeout)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _demo(args: argparse.Namespace) -> None:
    port = args.port or free_port()
    with ChildGroup() as group:
        child = start_nginx(
            group,
            port=port,
            stable=args.upstream,
            canary=args.canary,
            weight=args.weight,
            workers=args.workers,
        )
        try:
            await wait_http(f"http://127.0.0.1:{port}/", child=child, within=10)
            print(
                f"nginx pid {child.pid} on http://127.0.0.1:{port} for {args.seconds:g}s "
                f"(prefix {group.logs})",
                flush=True,
            )
            await asyncio.sleep(args.seconds)
        finally:
            stop_nginx(group, child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="stable URL or host:port")
    parser.add_argument("--canary", required=True, help="canary URL or host:port")
    parser.add_argument("--weight", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0, help="run this long, then stop")
    args = parser.parse_args(argv)
    if find_nginx() is None:
        print("nginx is not installed", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_demo(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
