"""The script of ``flipback demo``: start the cast, play the two acts, watch flipback through
its admin API, keep the view current, and measure everything into a ``Report``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from proxy.admin_client import (
    CLEAR,
    CLEAR_BELOW,
    CLEAR_EOL,
    HOME,
    TOKEN_ENV,
    AdminClient,
    AdminError,
    Key,
    compute_rates,
)
from proxy.config_parser import parse_config
from proxy.demo_models import SLOW_DELAY, LoadGen, Mode, ToyModel
from proxy.demo_view import (
    ActRecord,
    Entry,
    Report,
    Scene,
    plain_entry,
    render_frame,
    render_summary,
    status_line,
)
from proxy.server import App
from proxy.tasks import TaskSet
from proxy.units import Seconds

ROUTE = "chat"
RATE = 80.0  # req/s offered to flipback
WEIGHT = 25  # canary percent
MAX_P99: Seconds = 0.3
REFRESH: Seconds = 0.25  # admin poll and live redraw
FLIP_TIMEOUT: Seconds = 5.0  # not scaled: the flip itself must be fast whatever the scale
# The script, in seconds at --duration-scale 1: healthy, (fault) hold, resume, healthy, hold.
HEALTHY_1, HOLD_1, HEALTHY_2, HOLD_2 = 10.0, 6.0, 8.0, 6.0
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"

CONFIG = """\
server: {{listen: "127.0.0.1:0"}}
admin: {{listen: "127.0.0.1:0"}}
state: {{file: {state}}}
upstreams:
  llm-v1: {{url: "{stable}"}}
  llm-v2: {{url: "{canary}"}}
routes:
  - name: {route}
    match: {{path_prefix: "/v1/", methods: [POST]}}
    stable: llm-v1
    canary: {{upstream: llm-v2, weight: {weight}}}
    retry_canary_on_stable: true
    rollback: {{window: 5s, min_requests: 10, max_error_rate: 5, max_p99: {max_p99}ms,
               consecutive_failures: 5}}
"""
# Shadow traffic, once built: a third ToyModel "llm-v3", a `shadow:` section above and a
# panel in demo_view.render_frame.


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    scale: float = 1.0
    live: bool | None = None  # None: a live view when the output is a terminal


class _Interrupted(Exception):
    """Ctrl-C during the script: stop, clean up, report what was seen."""


class Demo:
    """The script, the admin watcher and the view, over the cast of ``demo_models``."""

    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.scale = options.scale
        self.out = out
        self.live = out.isatty() if options.live is None else options.live
        self.models = (ToyModel("llm-v1"), ToyModel("llm-v2"))
        self.stable, self.canary = self.models
        self._stop = asyncio.Event()
        self._flipped = asyncio.Event()
        self._seen: set[tuple[str, str, str, str]] = set()
        self._clock_offset = 0.0  # wall clock minus loop clock: reads event timestamps
        self._drain: Seconds = 3.0  # how long requests in flight may finish at the end
        self._drawn = False
        self.scene: Scene | None = None

    async def run(self) -> Report:
        loop = asyncio.get_running_loop()
        with _quiet_proxy_logs(), self._sigint(loop), self._cursor():
            async with contextlib.AsyncExitStack() as stack:
                app, admin, load = await self._start_cast(stack)
                background = TaskSet("demo")
                stack.push_async_callback(background.aclose, 0)  # closes first
                t0 = loop.time()
                self._clock_offset = time.time() - t0
                scene = self.scene = Scene(
                    t0=t0, rate=RATE, url=load.url, slow_after=MAX_P99, models=self.models,
                    samples=load.samples, planned=self._planned())
                report = Report(t0=t0, acts=scene.acts, samples=load.samples,
                                canary_arrivals=self.canary.arrivals, slow_after=MAX_P99)
                self._intro(app, load.url)
                background.spawn(load.run(), name="demo-load")
                background.spawn(self._watch(admin), name="demo-watch")
                background.spawn(self._paint(load), name="demo-paint")
                try:
                    await self._script(admin)
                except _Interrupted:
                    report.interrupted = True
                    self._drain = 0.2  # do not wait for slow answers
                scene.doing = "done: stopping the load, letting requests in flight finish"
                if scene.acts and scene.acts[-1].end is None:
                    scene.acts[-1].end = loop.time()
            report.duration = loop.time() - t0
            report.dropped = load.dropped
            scene.in_flight = 0
            scene.doing = "interrupted" if report.interrupted else "finished: summary below"
            if self.live:
                self._draw(loop.time())
            self.out.write(render_summary(report))
            self.out.flush()
        return report

    async def _start_cast(self, stack: contextlib.AsyncExitStack) -> tuple[App, AdminClient,
                                                                           LoadGen]:
        """Toy models, flipback, admin client and load generator, each closed by ``stack``
        in reverse order (load drained first, toy models last)."""
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flipback-")))
        for model in self.models:
            stack.push_async_callback(model.aclose)
            await model.start()
        app = App(parse_config(self._config(tmp), "<flipback demo>"))
        await app.start()
        stack.push_async_callback(app.aclose)
        admin = AdminClient(f"http://127.0.0.1:{app.admin_port}",
                            os.environ.get(TOKEN_ENV) or None)
        stack.push_async_callback(admin.aclose)
        load = LoadGen(f"http://127.0.0.1:{app.data_port}/v1/chat/completions", RATE)
        stack.push_async_callback(lambda: load.aclose(self._drain))
        return app, admin, load

    # -- the script -------------------------------------------------------------------
    async def _script(self, admin: AdminClient) -> None:
        s = self.scale
        act = self._begin_act(1, "error fault", "llm-v2 answers HTTP 500 to every request")
        self._doing(f"canary llm-v2 is healthy and takes {WEIGHT}% of the traffic")
        await self._pause(HEALTHY_1 * s)
        await self._fault(act, "error", "each 500 is retried on llm-v1 (the client never sees "
                          "it) and counted against the canary")
        await self._pause(HOLD_1 * s)

        self.canary.mode = "ok"
        self._say("verb", "demo", "llm-v2 is fixed; POST /routes/chat/resume "
                  "(= `flipback resume chat`)")
        act.end = self._now()
        act = self._begin_act(2, "latency fault",
                              f"llm-v2 takes {SLOW_DELAY:g}s to its first byte, max_p99 is "
                              f"{MAX_P99 * 1000:g}ms")
        try:
            route = await admin.resume(ROUTE)
            self._doing(f"resumed by the operator: {route.get('state')} at "
                        f"{route.get('effective_weight', 0):g}%, windows start afresh, llm-v2 is "
                        "healthy again")
        except AdminError as exc:
            self._say("verb", "demo", f"resume failed: {exc}")
        await self._pause(HEALTHY_2 * s)
        await self._fault(act, "slow", "a request in flight longer than max_p99 already counts "
                          "as slow, so a hanging canary trips before it answers")
        await self._pause(HOLD_2 * s)
        act.end = self._now()

    async def _fault(self, act: ActRecord, mode: Mode, why: str) -> None:
        """Break the canary, then wait (bounded) for flipback's rollback event."""
        self.canary.mode = mode
        act.fault_at = self._now()
        self._flipped.clear()
        self._say("fault", "demo", act.fault)
        self._doing(f"{act.fault}: {why}")
        if await self._until(self._flipped, FLIP_TIMEOUT):
            assert act.flip_at is not None
            self._doing(f"rolled back {act.flip_at - act.fault_at:.2f}s after the fault: llm-v1 "
                        "serves everything, and the route stays latched until resumed")
        else:
            self._doing(f"no rollback within {FLIP_TIMEOUT:g}s of the fault")

    def _begin_act(self, number: int, title: str, fault: str) -> ActRecord:
        assert self.scene is not None
        act = ActRecord(number=number, title=title, fault=fault, start=self._now())
        self.scene.acts.append(act)
        return act

    async def _pause(self, seconds: Seconds) -> None:
        await self._until(asyncio.Event(), seconds)

    async def _until(self, event: asyncio.Event, timeout: Seconds) -> bool:
        """Wait up to ``timeout`` for ``event``; raises ``_Interrupted`` on Ctrl-C."""
        waits = {asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(event.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._stop.is_set():
            raise _Interrupted
        return event.is_set()

    # -- watching flipback through its admin API ---------------------------------------
    async def _watch(self, admin: AdminClient) -> None:
        assert self.scene is not None
        loop = asyncio.get_running_loop()
        history: deque[tuple[float, dict[Key, float]]] = deque()
        while True:
            try:
                routes = await admin.routes()
                events = await admin.events(limit=20)
                counts = await admin.request_counts()
            except AdminError as exc:
                self.scene.admin_error = str(exc)
            else:
                now = loop.time()
                history.append((now, counts))
                while len(history) > 2 and now - history[1][0] >= 1.0:
                    history.popleft()  # rates over the last second or so
                then, before = history[0]
                self.scene.routes = routes
                self.scene.rates = compute_rates(before, counts, now - then) if now > then \
                    else None
                for event in reversed(events):
                    self._on_event(event)
            await asyncio.sleep(REFRESH)

    def _on_event(self, event: dict[str, Any]) -> None:
        stamp, kind, actor, reason = (str(event.get(k, ""))
                                      for k in ("time", "kind", "actor", "reason"))
        key = (stamp, kind, actor, reason)
        if key in self._seen:
            return
        self._seen.add(key)
        try:
            at = datetime.datetime.fromisoformat(stamp).timestamp() - self._clock_offset
        except ValueError:
            at = self._now()
        self._add(Entry(at, kind, actor, reason))
        assert self.scene is not None
        act = self.scene.acts[-1] if self.scene.acts else None
        if (kind == "rollback" and actor == "auto" and act is not None
                and act.fault_at is not None and act.flip_at is None):
            act.flip_at = at
            act.flip_reason = reason
            self._flipped.set()

    # -- output -------------------------------------------------------------------------
    def _intro(self, app: App, url: str) -> None:
        if self.live:
            return
        lines = [
            f"flipback demo: 2 toy model servers, flipback and {RATE:g} req/s of load on "
            f"127.0.0.1, ~{self._planned():.0f}s",
            f"  stable llm-v1 {self.stable.url}, canary llm-v2 {self.canary.url} "
            f"(weight {WEIGHT}%)",
            f"  proxy {url}, admin http://127.0.0.1:{app.admin_port}",
            f"  rollback: window 5s, min_requests 10, max_error_rate 5%, max_p99 "
            f"{MAX_P99 * 1000:g}ms, consecutive_failures 5; retry_canary_on_stable",
        ]
        self._print("\n".join(lines))

    async def _paint(self, load: LoadGen) -> None:
        loop = asyncio.get_running_loop()
        assert self.scene is not None
        while True:
            await asyncio.sleep(REFRESH if self.live else 1.0)
            self.scene.in_flight = load.in_flight
            if self.live:
                self._draw(loop.time())
            elif self.scene.routes:
                self._print(status_line(self.scene, loop.time()))

    def _draw(self, now: float) -> None:
        assert self.scene is not None
        width = shutil.get_terminal_size((100, 24)).columns
        text = render_frame(self.scene, now, width, color=True)
        body = "".join(line + CLEAR_EOL + "\n" for line in text.splitlines())
        self.out.write(("" if self._drawn else CLEAR) + HOME + body + CLEAR_BELOW)
        self._drawn = True
        self.out.flush()

    def _say(self, kind: str, actor: str, text: str) -> None:
        self._add(Entry(self._now(), kind, actor, text))

    def _add(self, entry: Entry) -> None:
        assert self.scene is not None
        # In the order seen, which is causal (the resume verb before its event); sorting by
        # time would not be: event stamps are wall-clock milliseconds, ours loop time.
        self.scene.timeline.append(entry)
        if not self.live:
            self._print(plain_entry(entry, self.scene.t0))

    def _doing(self, text: str) -> None:
        assert self.scene is not None
        self.scene.doing = text

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- plumbing -------------------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _planned(self) -> float:
        return (HEALTHY_1 + HOLD_1 + HEALTHY_2 + HOLD_2) * self.scale + 1.5

    def _config(self, tmp: Path) -> str:
        return CONFIG.format(state=orjson.dumps(str(tmp / "state.json")).decode(),
                             stable=self.stable.url, canary=self.canary.url, route=ROUTE,
                             weight=WEIGHT, max_p99=round(MAX_P99 * 1000))

    @contextlib.contextmanager
    def _sigint(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """Ctrl-C ends the script through ``_stop`` so that everything is closed in order."""
        try:
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            installed = False
        try:
            yield
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[None]:
        if self.live:
            self.out.write(HIDE_CURSOR)
        try:
            yield
        finally:
            if self.live:
                self.out.write(SHOW_CURSOR)
                self.out.flush()


@contextlib.contextmanager
def _quiet_proxy_logs() -> Iterator[None]:
    """flipback logs each event as a warning; the demo's timeline already shows them, and
    stray log lines would tear the live view."""
    logger = logging.getLogger("proxy")
    handler = logging.NullHandler()
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved
