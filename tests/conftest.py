"""Fixtures: real fake model servers and real flipback instances, all on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.model import ProxyConfig
from proxy.config.parser import parse_config
from proxy.server import App
from tests.fakes import FakeModel

StartModel = Callable[[str], Awaitable[FakeModel]]


@pytest.fixture
async def model(aiohttp_server: Any) -> StartModel:
    """``await model("v1")`` starts a fake model server and returns it."""

    async def start(name: str) -> FakeModel:
        fake = FakeModel(name)
        # auto_decompress off: the fake sees a request body exactly as it was sent.
        fake.server = await aiohttp_server(fake.app(), auto_decompress=False)
        return fake

    return start


def config_text(text: str, tmp_path: Path, **subst: Any) -> str:
    """The one place test configs get their defaults: ``text`` with its ``{name}``
    placeholders filled from ``subst`` (so YAML braces are written ``{{ }}``), and each
    section it leaves out added: both listeners on ephemeral loopback ports, the state
    file in ``tmp_path``. For a test that writes the file itself (a reload)."""
    body = textwrap.dedent(text).format(**subst)
    if "server:" not in body:
        body = 'server: {listen: "127.0.0.1:0"}\n' + body
    if "admin:" not in body:
        body = 'admin: {listen: "127.0.0.1:0"}\n' + body
    if "state:" not in body:
        body = f"state: {{file: {tmp_path / 'state.json'}}}\n" + body
    return body


def make_config(text: str, tmp_path: Path, **subst: Any) -> ProxyConfig:
    """``config_text``, written to ``tmp_path/flipback.yaml`` and parsed as that file:
    how every test builds the config of an App it starts."""
    body = config_text(text, tmp_path, **subst)
    path = tmp_path / "flipback.yaml"
    path.write_text(body)
    return parse_config(body, str(path))


class Running:
    """A flipback App serving on real sockets, with a client session for tests."""

    def __init__(self, app: App, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.data_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"

    @property
    def runtime(self) -> Any:
        return self.app.runtime

    async def get_json(self, path: str) -> Any:
        async with self.session.get(self.admin + path) as resp:
            return await resp.json()

    async def post_admin(self, path: str, body: Any = None,
                         headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST ``body`` (``{}`` when None: the admin takes actions only as JSON)."""
        body = {} if body is None else body
        async with self.session.post(self.admin + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def flipback(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """``await flipback(yaml_text, **subst)`` starts a proxy; all are stopped after the test."""
    started: list[Running] = []
    session = aiohttp.ClientSession(auto_decompress=False,
                                    timeout=aiohttp.ClientTimeout(total=30))

    async def start(text: str, **subst: Any) -> Running:
        app = App(make_config(text, tmp_path, **subst))
        await app.start()
        running = Running(app, session)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.app.aclose()
    await session.close()
    await asyncio.sleep(0)  # not a wait: one loop step lets the closed transports go


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Tests run on uvloop, the loop flipback runs on in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
