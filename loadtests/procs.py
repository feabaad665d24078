"""Child processes for load-test scenarios: start, stop by PID, wait ready, read CPU time.

Every child is started in its own session (a Ctrl-C in the terminal reaches only the
orchestrator, which then stops the children in order) and with a parent-death signal, so
a killed orchestrator never leaves a proxy or an nginx behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from loadtests.loadgen import install_uvloop

REPO = Path(__file__).resolve().parents[1]
LOADTESTS = REPO / "loadtests"
OUT_DIR = LOADTESTS / "out"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the forked child before exec: SIGTERM it when the orchestrator dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """One started process; its stdout and stderr go to `log`."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal this PID, wait up to `timeout`, then SIGKILL it. Returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode


@dataclass
class ChildGroup:
    """Owns the children of one scenario; `stop_all` stops them newest first.

    Use as a context manager so that every exit path, Ctrl-C included, stops them. Logs go
    to `log_dir`; without one, to a temporary folder removed on a clean exit.
    """

    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    logs: Path = field(init=False)  # log_dir, or the temporary folder

    def __post_init__(self) -> None:
        self._temp = self.log_dir is None
        self.logs = self.log_dir or Path(tempfile.mkdtemp(prefix="flipback-lt-"))

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start `argv` (no shell) with output to `<log_dir>/<name>.log`."""
        log = self.logs / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd or REPO,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only a prctl call between fork and exec
            )
        child = Child(name=name, argv=list(argv), popen=popen, log=log)
        self.children.append(child)
        return child

    def start_python(self, name: str, args: Sequence[str], *, cwd: Path | None = None) -> Child:
        """Start `sys.executable ARGS` (from the repo root) with the repo on PYTHONPATH."""
        return self.start(name, [sys.executable, *args], cwd=cwd, env={"PYTHONPATH": str(REPO)})

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        child.stop(timeout)
        with contextlib.suppress(ValueError):
            self.children.remove(child)

    def stop_all(self, timeout: float = 5.0) -> None:
        while self.children:
            self.children.pop().stop(timeout)

    def __enter__(self) -> ChildGroup:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop_all()
        if self._temp and exc_type is None:
            shutil.rmtree(self.logs, ignore_errors=True)


class NotReady(RuntimeError):
    """A child did not become ready in time, or exited while we waited."""


async def wait_http(
    url: str,
    *,
    within: float = 10.0,
    child: Child | None = None,
    status: int = 200,
    interval: float = 0.05,
) -> None:
    """Poll `GET url` until it answers `status`; raise NotReady after `within` seconds."""
    deadline = time.monotonic() + within
    last = "no answer"
    client_timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        while time.monotonic() < deadline:
            if child is not None and not child.is_running():
                raise NotReady(
                    f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
                )
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status == status:
                        return
                    last = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(interval)
    name = child.name if child else url
    raise NotReady(f"{name} not ready after {within:.0f}s ({last})")


async def wait_port(
    port: int, *, host: str = "127.0.0.1", within: float = 10.0, child: Child | None = None
) -> None:
    """Poll until a TCP connect to host:port succeeds; raise NotReady after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if child is not None and not child.is_running():
            raise NotReady(
                f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
            )
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise NotReady(f"{child.name if child else port} not listening after {within:.0f}s")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/PID/stat."""
    fields = _stat_fields(pid)
    # After comm, index 0 is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (found by scanning /proc for parent PIDs)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for kid in parents.get(stack.pop(), []):
            found.append(kid)
            stack.append(kid)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` plus its live descendants (e.g. nginx master and workers)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


@contextlib.contextmanager
def cpu_meter(pids: Sequence[int]) -> Iterator[dict[str, float]]:
    """Measure CPU seconds used by process trees while the block runs: `meter["seconds"]`."""
    meter = {"seconds": 0.0}
    before = sum(tree_cpu_seconds(p) for p in pids)
    yield meter
    meter["seconds"] = sum(tree_cpu_seconds(p) for p in pids) - before


def _first_line(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_info() -> dict[str, object]:
    """What a result depends on: cores, CPU model, kernel, Python and library versions."""
    import platform

    import aiohttp as _aiohttp

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, object] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _aiohttp.__version__,
    }
    for mod in ("uvloop", "httptools", "orjson"):
        with contextlib.suppress(ImportError, AttributeError):
            info[mod] = __import__(mod).__version__
    info["wrk"] = _first_line(["wrk", "--version"])
    for path in ("nginx", "/usr/sbin/nginx"):
        version = _first_line([path, "-v"])
        if version:
            info["nginx"] = version.removeprefix("nginx version: ")
            break
    return info


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user+nice+system+irq+softirq+steal)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (e.g. finished wrk runs)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def noise_meter(pids: Sequence[int]) -> Iterator[dict[str, float]]:
    """How much CPU *other* programs used while the block ran, to flag disturbed runs.

    `foreign_cores` = (machine busy - our trees `pids` - this process and its reaped
    children) / wall time: 0.0 on a quiet machine, 0.5 when something else took half a core.
    """
    meter = {"wall_s": 0.0, "machine_busy_s": 0.0, "ours_s": 0.0, "foreign_cores": 0.0}
    t0, busy0 = time.monotonic(), machine_busy_seconds()
    ours0 = own_cpu_seconds() + sum(tree_cpu_seconds(p) for p in pids)
    yield meter
    wall = time.monotonic() - t0
    busy = machine_busy_seconds() - busy0
    ours = own_cpu_seconds() + sum(tree_cpu_seconds(p) for p in pids) - ours0
    meter.update(
        wall_s=wall,
        machine_busy_s=busy,
        ours_s=ours,
        foreign_cores=max(busy - ours, 0.0) / wall if wall > 0 else 0.0,
    )


async def wait_quiet(
    pids: Sequence[int], *, max_wait: float = 4.0, threshold: float = 0.15, sample: float = 0.5
) -> dict[str, float]:
    """Wait (at most `max_wait` s) until other programs use under `threshold` cores.

    Samples `noise_meter` over `sample`-second slices; returns the time waited and the
    last sample, so a scenario can record that it ran on a busy machine anyway.
    """
    t0 = time.monotonic()
    while True:
        with noise_meter(pids) as noise:
            await asyncio.sleep(sample)
        waited = time.monotonic() - t0
        if noise["foreign_cores"] < threshold or waited + sample > max_wait:
            return {"waited_s": waited, "foreign_cores": noise["foreign_cores"]}


def save_result(scenario: str, stamp: str, result: object) -> Path:
    """Write a scenario's raw results to ``loadtests/out/SCENARIO-STAMP.json``."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{scenario}-{stamp}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path


S = TypeVar("S")
Result = dict[str, Any]


def run_scenario(scenario: str, run: Callable[[S, str], Coroutine[Any, Any, Result]],
                 settings: S, report: Callable[[Result], Iterable[str]]) -> Result:
    """A scenario's ``main``: run it on uvloop, save its raw results, print the report's
    non-empty blocks and where the raw results went."""
    install_uvloop()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = asyncio.run(run(settings, stamp))
    path = save_result(scenario, stamp, result)
    print()
    print("\n\n".join(block for block in report(result) if block))
    print(f"\nraw results: {path.relative_to(REPO)}")
    return result
