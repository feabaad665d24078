"""``flipback demo``'s cast: toy OpenAI-style model servers whose behaviour the script
switches while traffic flows, and an open-loop load generator that records every request.

The toy servers also run on their own, for trying flipback by hand (README, "Running it
for real"): ``python -m proxy.demo.models llm-v1:9001 llm-v2:9002`` serves one toy per
``NAME:PORT`` on 127.0.0.1 until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
import orjson
from aiohttp import web

from proxy.tasks import TaskSet
from proxy.units import Seconds

Mode = Literal["ok", "error", "slow"]

ANSWER_DELAY: Seconds = 0.020  # a small model: 20 ms to the answer
ERROR_DELAY: Seconds = 0.005  # a crashing model fails fast
SLOW_DELAY: Seconds = 2.0  # the latency fault: 2 s to the first byte
REQUEST_BODY = orjson.dumps({
    "model": "llm",
    "messages": [{"role": "user", "content": "Say hi in three words."}],
    "max_tokens": 16,
})
UPSTREAM_HEADER = "x-flipback-upstream"
ANSWER = "Hi there, friend."
# What a disagreeing model says instead, in turn (say, a new prompt template).
OTHER_ANSWERS = ("Hello! Lovely to meet you.", "Hey, hi, hello.", "Greetings, dear user.")


class LocalServer:
    """One of the demo's aiohttp servers on 127.0.0.1, on a port the OS picks."""

    cancel_handlers = False  # aiohttp's handler_cancellation

    def __init__(self) -> None:
        self.port = 0
        self._runner: web.AppRunner | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1:``port`` (0: a port the OS picks, then in ``self.port``)."""
        app = web.Application()
        self.add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     handler_cancellation=self.cancel_handlers,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", port).start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class ToyModel(LocalServer):
    """One toy model server on 127.0.0.1 (port 0). ``mode`` may be switched at any time:
    ``ok`` answers a chat completion after ~20 ms, ``error`` answers HTTP 500, ``slow``
    answers after ``SLOW_DELAY``. ``arrivals`` holds the loop time of every request. With
    ``disagree_every`` N, every Nth answer says something else than ``ANSWER`` (the shadow
    model whose content a comparison should catch). Besides chat it answers ``POST
    /predict`` as a classic model would, and ``GET /health``."""

    cancel_handlers = True  # flipback gave up on a request: stop working on it

    def __init__(self, name: str, *, disagree_every: int = 0) -> None:
        super().__init__()
        self.name = name
        self.mode: Mode = "ok"
        self.arrivals: list[float] = []
        self.disagree_every = disagree_every
        self.answers = 0
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/predict", self._predict)
        app.router.add_get("/health", self._health)

    async def _chat(self, request: web.Request) -> web.Response:
        self.arrivals.append(asyncio.get_running_loop().time())
        await request.read()
        mode = self.mode
        if mode == "error":
            await asyncio.sleep(ERROR_DELAY)
            error = {"message": "CUDA error: device-side assert triggered",
                     "type": "server_error"}
            return _json({"error": error}, status=500)
        await asyncio.sleep(SLOW_DELAY if mode == "slow" else ANSWER_DELAY)
        return _json(self._completion())

    async def _predict(self, request: web.Request) -> web.Response:
        """A classic model: one score per item of ``{"instances": [...]}`` (default one)."""
        self.arrivals.append(asyncio.get_running_loop().time())
        try:
            data = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return _json({"error": "expected a JSON body"}, status=400)
        items = data.get("instances") if isinstance(data, dict) else None
        count = len(items) if isinstance(items, list) else 1
        await asyncio.sleep(ANSWER_DELAY / 4)
        return _json({"model": self.name, "predictions": [0.87] * count})

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "model": self.name})

    def _completion(self) -> dict[str, object]:
        return {
            "id": f"chatcmpl-{self.name}-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self._content()}}],
            "usage": {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19},
        }

    def _content(self) -> str:
        self.answers += 1
        every = self.disagree_every
        if every and self.answers % every == 0:
            return OTHER_ANSWERS[self.answers // every % len(OTHER_ANSWERS)]
        return ANSWER


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@dataclass(frozen=True, slots=True)
class Sample:
    """One client request: when it was due (loop time), what came back, how long it took.
    ``status`` 0 means no HTTP answer at all (connection error, timeout)."""

    scheduled: float
    status: int
    upstream: str
    latency: Seconds

    @property
    def is_error(self) -> bool:
        return self.status != 200


class LoadGen:
    """Open-loop load: requests leave at a constant ``rate`` whatever the answers do, as
    real users would (a closed loop would slow down with the server and hide latency)."""

    def __init__(self, url: str, rate: float, *, timeout: Seconds = 15.0) -> None:
        self.url = url
        self.rate = rate
        self.samples: list[Sample] = []
        self.dropped = 0  # requests that found the in-flight cap full (never at demo rates)
        self._tasks = TaskSet("demo-load", limit=4096)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        """Send forever (until cancelled), catching up at once if the loop fell behind."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in itertools.count():
            due = start + i / self.rate
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            if not self._tasks.spawn(self._one(due), name="demo-request"):
                self.dropped += 1

    async def _one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            async with self._session.post(self.url, data=REQUEST_BODY,
                                          headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                status, upstream = resp.status, resp.headers.get(UPSTREAM_HEADER, "")
        except (aiohttp.ClientError, TimeoutError):
            status, upstream = 0, ""
        self.samples.append(Sample(due, status, upstream, loop.time() - sent))

    async def aclose(self, timeout: Seconds = 3.0) -> None:
        """Let requests in flight finish (up to ``timeout``), then close the session."""
        await self._tasks.aclose(timeout)
        await self._session.close()


# -- on its own: ``python -m proxy.demo.models NAME:PORT ...`` -----------------------------
def _spec(text: str) -> tuple[str, int]:
    name, sep, port = text.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected NAME:PORT (e.g. llm-v1:9001), got {text!r}")
    return name, int(port)


async def serve_toys(specs: Sequence[tuple[str, int]]) -> None:
    """Serve one ``ToyModel`` per (name, port) on 127.0.0.1 until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models: list[ToyModel] = []
    try:
        for name, port in specs:
            model = ToyModel(name)
            try:
                await model.start(port)
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise OSError(f"cannot listen on 127.0.0.1:{port} for {name}: {why}") from None
            models.append(model)
            print(f"toy model {name} on {model.url} (POST /v1/chat/completions, "
                  "POST /predict, GET /health)", flush=True)
        await stop.wait()
    finally:
        for model in models:
            await model.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """0 after SIGTERM or Ctrl-C, 1 when a port cannot be listened on, 2 on bad arguments."""
    p = argparse.ArgumentParser(
        prog="python -m proxy.demo.models",
        description="Toy model servers on 127.0.0.1 for trying flipback by hand: each "
                    "answers an OpenAI-style chat completion in ~20 ms.")
    p.add_argument("toys", nargs="+", type=_spec, metavar="NAME:PORT")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    import uvloop

    try:
        uvloop.run(serve_toys(args.toys))
    except OSError as exc:
        print(f"toy models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
