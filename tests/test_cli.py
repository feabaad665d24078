"""The ``flipback`` command: exit codes, one-line errors, and a real process end to end."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cli import main
from tests.conftest import config_text
from tests.fakes import Behaviour
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_check_example_config_ok(capsys):
    assert main(["check", "-c", str(ROOT / "config/flipback.yaml")]) == 0
    out = capsys.readouterr().out
    assert "chat" in out and "llm-v1" in out


def test_check_bad_config_exits_2_with_file_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams:\n  a: {url: 'http://127.0.0.1:1'}\nroutes:\n"
                   "  - name: r\n    match: {path_prefix: /}\n    stable: b\n    weigth: 3\n")
    assert main(["check", "-c", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith(f"{bad}:") for line in err)
    assert any("routes[0].stable" in line for line in err)
    assert any("routes[0].weigth" in line for line in err)


def test_check_refuses_what_run_would_refuse_and_names_the_env(tmp_path, capsys,
                                                               monkeypatch):
    """A config that checks must start: a non-loopback admin listener needs its token
    (the shipped Kubernetes config passed check, then run exited 1)."""
    cfg = tmp_path / "exposed.yaml"
    cfg.write_text("server: {listen: '0.0.0.0:8080'}\nadmin:\n  token_env: FB_TOKEN\n"
                   "  listen: '0.0.0.0:9901'\nupstreams:\n  a: {url: 'http://127.0.0.1:1'}\n"
                   "routes:\n  - {name: r, match: {path_prefix: /}, stable: a}\n")
    monkeypatch.delenv("FB_TOKEN", raising=False)
    assert main(["check", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{cfg}:4: admin.listen: ")
    assert "$FB_TOKEN is not set" in err[0]
    monkeypatch.setenv("FB_TOKEN", "s3cret")
    assert main(["check", "-c", str(cfg)]) == 0


def test_check_a_reader_bug_is_still_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Whatever goes wrong inside the reader, ``check`` never shows a bare traceback."""
    import proxy.config.parser

    def broken(*args: Any) -> Any:
        raise RuntimeError("reader bug\nsecond line")

    monkeypatch.setattr(proxy.config.parser.NodeReader, "read", broken)
    assert main(["check", "-c", "config/flipback.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config/flipback.yaml:1: (root): cannot read this config: "
                   "RuntimeError: reader bug"]


def test_check_missing_file_exits_2(tmp_path, capsys):
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["weight", "chat", "150"])
    assert info.value.code == 2
    assert "between 0 and 100" in capsys.readouterr().err


def test_admin_verb_unreachable_is_one_line_exit_1(capsys, unused_tcp_port):
    code = main(["rollback", "chat", "--admin", f"http://127.0.0.1:{unused_tcp_port}"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _spawn(tmp_path: Path, upstream: str, drain: str) -> tuple[Any, int, int]:
    """A real ``python -m proxy run`` process, ready to serve: (process, port, admin)."""
    port, admin = _free_port(), _free_port()
    cfg = tmp_path / "fb.yaml"
    cfg.write_text(config_text("""
server: {{listen: "127.0.0.1:{port}", drain_timeout: {drain}}}
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  v1: {{url: "{upstream}"}}
routes:
  - {{name: plain, match: {{path_prefix: /}}, stable: v1}}
""", tmp_path, port=port, admin=admin, drain=drain, upstream=upstream))
    env = {**os.environ, "FLIPBACK_LOG_LEVEL": "WARNING"}
    env.pop("FLIPBACK_ADMIN_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env)
    try:
        await wait_until(lambda: _readyz_is(admin, 200), interval=0.05,
                         what="flipback to become ready")
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, port, admin


async def _readyz_is(admin: int, status: int) -> bool:
    """Whether the admin's /readyz answers ``status`` (False while it does not answer)."""
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/readyz") as r:
            return r.status == status
    except aiohttp.ClientError:
        return False


async def test_run_serves_and_drains_on_sigterm(model, tmp_path):
    v1 = await model("v1")
    v1.behaviour = Behaviour(delay=0.5)
    proc, port, _ = await _spawn(tmp_path, v1.url, "5s")
    try:
        async with aiohttp.ClientSession() as s:
            slow = asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/slow"))
            await asyncio.wait_for(v1.started.wait(), 5)
            proc.send_signal(signal.SIGTERM)
            resp = await slow
            assert resp.status == 200  # the in-flight request finished during the drain
            assert (await resp.json())["model"] == "v1"
            resp.release()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_drain_timeout_cuts_long_streams_and_exits(model, tmp_path):
    """drain_timeout is a deadline: 20 s streams are cut at 1 s and the process exits
    (aiohttp's own shutdown wait used to run after ours and let every stream finish)."""
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="sse", events=40, event_gap=0.5)
    proc, port, _ = await _spawn(tmp_path, v1.url, "1s")
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as s:
            async def stream() -> tuple[bool, int]:
                got = 0
                try:
                    async with s.get(f"http://127.0.0.1:{port}/sse") as resp:
                        async for _ in resp.content.iter_any():
                            got += 1
                    return True, got
                except aiohttp.ClientError:
                    return False, got

            streams = [asyncio.ensure_future(stream()) for _ in range(5)]
            await wait_until(lambda: v1.in_handler == 5, what="5 streams under way")
            t0 = loop.time()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 8) == 0
            exited = loop.time() - t0
            results = await asyncio.gather(*streams)
        assert exited < 4, exited  # 1 s drain, then the cut: not the streams' 20 s
        assert all(not complete and got > 0 for complete, got in results), results
        # The cut reached the upstream: its handlers were cancelled.
        await wait_until(lambda: v1.in_handler == 0, what="the upstream's handlers to end")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_status_and_verbs_against_a_running_proxy(model, flipback, capsys):
    v1, v2 = await model("v1"), await model("v2")
    fb = await flipback("""
upstreams:
  v1: {{url: "{v1}"}}
  v2: {{url: "{v2}"}}
routes:
  - name: chat
    match: {{path_prefix: "/"}}
    stable: v1
    canary: {{upstream: v2, weight: 10}}
""", v1=v1.url, v2=v2.url)
    from proxy.cli import commands

    assert await commands.status(fb.admin, None, watch=False) == 0
    out = capsys.readouterr().out
    assert "chat" in out and "canary" in out and "v2" in out
    assert await commands.run_verb(fb.admin, None, "rollback", "chat", "bad") == 0
    assert "rolled_back" in capsys.readouterr().out
    assert fb.runtime.rollout("chat").state == "rolled_back"
    assert await commands.run_verb(fb.admin, None, "resume", "chat") == 0
    assert await commands.run_verb(fb.admin, None, "weight", "chat", 40.0) == 0
    assert fb.runtime.rollout("chat").effective_weight == 40
    assert await commands.run_verb(fb.admin, None, "promote", "ghost") == 2


async def test_second_signal_exits_at_once(model, tmp_path):
    v1 = await model("v1")
    v1.behaviour = Behaviour(mode="hang")
    proc, port, admin = await _spawn(tmp_path, v1.url, "30s")
    try:
        async with aiohttp.ClientSession() as s:
            hung = asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/hang"))
            await asyncio.wait_for(v1.started.wait(), 5)
            proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: _readyz_is(admin, 503), what="the drain SIGTERM starts")
            assert proc.returncode is None  # draining: waits for the hung request
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 5)
            assert loop.time() - t0 < 3
            hung.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
