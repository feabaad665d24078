"""Fixtures for the interop suite: flipback in-process (on the test's uvloop) in front of
real model servers that run as subprocesses from their own venvs (``servers.py``), and a
recording TCP tap (``wire.py``) in between where a test needs to see the bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.parser import parse_config
from proxy.server import App
from tests.interop.wire import Flipback, StartFlipback, Tap


@pytest.fixture
async def flipback(tmp_path: Path) -> AsyncIterator[StartFlipback]:
    """``await flipback(config_dict)`` starts flipback from that config (listeners on
    ephemeral loopback ports, state in tmp_path); all are stopped after the test."""
    started: list[App] = []
    session = aiohttp.ClientSession(auto_decompress=False,
                                    timeout=aiohttp.ClientTimeout(total=120))

    async def start(cfg: dict[str, Any]) -> Flipback:
        cfg = dict(cfg)
        cfg.setdefault("server", {}).setdefault("listen", "127.0.0.1:0")
        cfg.setdefault("admin", {"listen": "127.0.0.1:0"})
        cfg.setdefault("state", {"file": str(tmp_path / "state.json")})
        path = tmp_path / f"flipback-{len(started)}.yaml"
        text = yaml.safe_dump(cfg, sort_keys=False)
        path.write_text(text)
        app = App(parse_config(text, str(path)))
        await app.start()
        started.append(app)
        return Flipback(app, session)

    yield start
    for app in started:
        await app.aclose()
    await session.close()
    await asyncio.sleep(0)


@pytest.fixture
async def tap() -> AsyncIterator[Callable[[int], Awaitable[Tap]]]:
    """``await tap(port)``: a recording relay to 127.0.0.1:port, closed after the test."""
    taps: list[Tap] = []

    async def start(port: int) -> Tap:
        t = await Tap(port).start()
        taps.append(t)
        return t

    yield start
    for t in taps:
        await t.aclose()
