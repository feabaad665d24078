"""Real model servers for the interop suite: each runs from its own virtualenv (made by
``tests/interop/setup_venvs.sh``) as a subprocess on a free 127.0.0.1 port, in a process
group of its own so that killing it kills its workers too.

Used by the pytest fixtures (``conftest.py``) and by the latency measurement
(``latency.py``); imports nothing from flipback and no pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STAMP = ".flipback-installed"  # written by setup_venvs.sh once every package is in


def venvs_dir() -> Path:
    return Path(os.environ.get("FLIPBACK_INTEROP_VENVS", REPO / ".venv-interop"))


@dataclass(frozen=True)
class Kind:
    """One kind of model server: the venv it lives in and how to tell it is installed."""

    name: str
    exe: str  # the server's console script (or python) in the venv's bin/
    ready_path: str

    @property
    def bin(self) -> Path:
        return venvs_dir() / self.name / "bin"

    def missing(self) -> str | None:
        """None when installed, else a one-line reason to skip."""
        if (self.bin.parent / STAMP).exists() and (self.bin / self.exe).exists():
            return None
        return (f"{self.name} is not installed in {self.bin.parent} "
                f"(bash tests/interop/setup_venvs.sh {self.name})")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"  # mlflow runs `uvicorn`
        env["VIRTUAL_ENV"] = str(self.bin.parent)
        env.pop("PYTHONPATH", None)
        return env


MLFLOW = Kind("mlflow", "mlflow", "/ping")
MLSERVER = Kind("mlserver", "mlserver", "/v2/health/ready")
# llama-cpp-python's server has no /health (llama.cpp's C++ server does): /v1/models
# answers 200 once the model is loaded.
LLAMA = Kind("llama", "python", "/v1/models")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pause(seconds: float) -> None:
    time.sleep(seconds)  # noqa: TID251 -- fixtures and scripts here have no event loop


def run_helper(kind: Kind, *args: str | Path, cwd: Path) -> None:
    """Run one of this folder's helper scripts with the server venv's python."""
    proc = subprocess.run([str(kind.bin / "python"), *map(str, args)], cwd=cwd, env=kind.env(),
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")


@dataclass
class ServerProcess:
    """A model server subprocess; ``start`` then ``wait_ready``; ``kill`` always."""

    kind: Kind
    argv: list[str]
    port: int
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        log = self.log_path.open("wb")
        self._log = log
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.kind.env(), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.kind.ready_path, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind.name} on :{self.port} exited "
                                   f"({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind.name} on :{self.port} not ready on "
                                   f"{self.kind.ready_path}:\n{self.log_tail()}")
            pause(0.1)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (by its id) and reap it."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None


def start_all(servers: list[ServerProcess], timeout: float = 120.0) -> None:
    """Start every server at once, then wait until each answers its readiness path; on
    failure every one is killed and the error (with the server's log) raised."""
    try:
        for server in servers:
            server.start()
        deadline = time.monotonic() + timeout
        for server in servers:
            server.wait_ready(deadline)
    except BaseException:
        for server in servers:
            server.kill()
        raise


# -- the three servers ----------------------------------------------------------------


def mlflow_models(workdir: Path, thresholds: list[float | str]) -> list[Path]:
    """Train and save one MLflow sklearn model per threshold (one python start); the
    threshold "crash" makes a model whose predict raises (MLflow answers it with 400)."""
    outs = [workdir / f"mlflow-model-{i}" for i in range(len(thresholds))]
    run_helper(MLFLOW, HERE / "make_sklearn.py", "mlflow",
               *[f"{out}={t}" for out, t in zip(outs, thresholds, strict=True)], cwd=workdir)
    return outs


def mlflow_server(model: Path, workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [str(MLFLOW.bin / "mlflow"), "models", "serve", "-m", str(model),
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    return ServerProcess(MLFLOW, argv, port, workdir, workdir / f"mlflow-{port}.log")


def mlserver_models(workdir: Path, thresholds: list[float], name: str) -> list[Path]:
    """One MLServer model repository per threshold, each holding model ``name``."""
    repos = [workdir / f"mlserver-repo-{i}" for i in range(len(thresholds))]
    run_helper(MLSERVER, HERE / "make_sklearn.py", "mlserver", "--name", name,
               *[f"{repo / name}={t}" for repo, t in zip(repos, thresholds, strict=True)],
               cwd=workdir)
    return repos


def mlserver_server(repo: Path, workdir: Path) -> ServerProcess:
    port, grpc = free_port(), free_port()
    # settings.json in the repository: the metrics endpoint off (it would need a third
    # port), inference in the server process (no worker pool to start or to outlive a kill).
    argv = [str(MLSERVER.bin / "mlserver"), "start", str(repo)]
    settings = {"http_port": port, "grpc_port": grpc, "host": "127.0.0.1",
                "parallel_workers": 0, "metrics_endpoint": None, "debug": False}
    (repo / "settings.json").write_text(json.dumps(settings))
    return ServerProcess(MLSERVER, argv, port, repo, workdir / f"mlserver-{port}.log")


def llama_models(workdir: Path, seeds: list[int]) -> list[Path]:
    """One tiny random-weight GGUF per seed (different seeds answer differently)."""
    outs = [workdir / f"tiny-{seed}.gguf" for seed in seeds]
    for out, seed in zip(outs, seeds, strict=True):
        run_helper(LLAMA, HERE / "make_gguf.py", out, "--seed", str(seed), cwd=workdir)
    return outs


def llama_server(model: Path, workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [str(LLAMA.bin / "python"), "-m", "llama_cpp.server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
            "--n_threads", "1", "--seed", "1",
            # By default a new request ends the stream under way with a clean "[DONE]"
            # (no finish_reason): a shadow copy or a second client would cut streams.
            "--interrupt_requests", "False"]
    return ServerProcess(LLAMA, argv, port, workdir, workdir / f"llama-{port}.log")
