"""The script of ``flipback demo``: start the cast, play the two acts while ``watch``
follows flipback (admin API, metrics, webhook) and ``screen`` keeps the view current,
and measure everything into a ``Report``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import orjson

from proxy.cli.admin_client import TOKEN_ENV, AdminClient, AdminError
from proxy.config.parser import parse_config
from proxy.demo.models import SLOW_DELAY, LoadGen, Mode, ToyModel
from proxy.demo.probes import DiffSample, WebhookReceiver, read_diffs
from proxy.demo.report import ActRecord, Report, render_summary
from proxy.demo.screen import Screen, quiet_proxy_logs
from proxy.demo.view import Entry, Scene
from proxy.demo.watch import Watcher
from proxy.server import App
from proxy.tasks import TaskSet
from proxy.units import Seconds

ROUTE = "chat"
RATE = 80.0  # req/s offered to flipback
WEIGHT = 25  # canary percent
SHADOW_SAMPLE = 50  # percent of requests copied to the shadow
DISAGREE_EVERY = 5  # the shadow's every 5th answer differs: about 80% agreement
COMPARED = "choices.0.message.content"
MAX_P99: Seconds = 0.3
WINDOW: Seconds = 5.0  # rollback.window
REFRESH: Seconds = 0.25  # admin poll and live redraw
FLIP_TIMEOUT: Seconds = 5.0  # not scaled: the flip itself must be fast whatever the scale
# rollback.verify: scaled, but never so short that stable's window says little.
VERIFY, MIN_VERIFY = 3.0, 0.5
VERIFY_SLACK: Seconds = 2.0  # not scaled: the verdict is due one tick after flip + verify
NOTIFY = ("rollback", "verified", "verify_failed", "resume")
# The script, in seconds at --duration-scale 1: healthy, (fault) hold, resume, healthy, hold.
# Each hold counts from the flip and covers the verification.
HEALTHY_1, HOLD_1, HEALTHY_2, HOLD_2 = 10.0, 6.0, 8.0, 6.0

CONFIG = """\
server: {{listen: "127.0.0.1:0"}}
admin: {{listen: "127.0.0.1:0"}}
state: {{file: {state}}}
notify: {{webhook: "{webhook}", kinds: [{kinds}]}}
upstreams:
  llm-v1: {{url: "{stable}"}}
  llm-v2: {{url: "{canary}"}}
  llm-v3: {{url: "{shadow}"}}
routes:
  - name: {route}
    match: {{path_prefix: "/v1/", methods: [POST]}}
    stable: llm-v1
    canary: {{upstream: llm-v2, weight: {weight}}}
    shadow:
      upstream: llm-v3
      sample: {sample}
      compare: {{status: true, json_paths: ["{compared}"], record: {record}}}
    retry_canary_on_stable: true
    llm: {{telemetry: true}}
    rollback: {{window: {window:g}s, min_requests: 10, max_error_rate: 5, max_p99: {max_p99}ms,
               consecutive_failures: 5, verify: {verify}ms}}
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    scale: float = 1.0
    live: bool | None = None  # None: a live view when the output is a terminal


class _Interrupted(Exception):
    """Ctrl-C during the script: stop, clean up, report what was seen."""


class Demo:
    """The script, the watchers (admin API, metrics, webhook) and the view, over the cast
    of ``models``."""

    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.scale = options.scale
        self.screen = Screen(out, out.isatty() if options.live is None else options.live)
        self.models = (ToyModel("llm-v1"), ToyModel("llm-v2"),
                       ToyModel("llm-v3", disagree_every=DISAGREE_EVERY))
        self.stable, self.canary, self.shadow = self.models
        self.verify: Seconds = max(round(VERIFY * self.scale, 1), MIN_VERIFY)
        self.watcher = Watcher(self.screen, REFRESH)
        self.hooks = WebhookReceiver(self.watcher.on_notification)
        self.diffs = DiffSample()
        self._stop = asyncio.Event()
        self._drain: Seconds = 3.0  # how long requests in flight may finish at the end
        self.scene: Scene | None = None

    async def run(self) -> Report:
        loop = asyncio.get_running_loop()
        with quiet_proxy_logs(), self._sigint(loop), self.screen.cursor():
            async with contextlib.AsyncExitStack() as stack:
                app, admin, load = await self._start_cast(stack)
                background = TaskSet("demo")
                stack.push_async_callback(background.aclose, 0)  # closes first
                t0 = loop.time()
                scene = self.scene = Scene(
                    t0=t0, rate=RATE, url=load.url, slow_after=MAX_P99, models=self.models,
                    samples=load.samples, planned=self._planned(),
                    shadow_name=self.shadow.name, shadow_sample=SHADOW_SAMPLE)
                report = Report(
                    t0=t0, acts=scene.acts, samples=load.samples,
                    canary_arrivals=self.canary.arrivals, slow_after=MAX_P99,
                    verify=self.verify, notifications=self.hooks.received,
                    shadow_about=(f"{self.shadow.name}, {SHADOW_SAMPLE}% of requests mirrored, "
                                  f"compared on status and {COMPARED}"),
                    shadow_expected=100 - 100 / DISAGREE_EVERY)
                self.watcher.start(scene)
                self._intro(app, load.url)
                background.spawn(load.run(), name="demo-load")
                background.spawn(self.watcher.run(admin, ROUTE), name="demo-watch")
                background.spawn(self.screen.paint(scene, lambda: load.in_flight, REFRESH),
                                 name="demo-paint")
                try:
                    await self._script(admin)
                except _Interrupted:
                    report.interrupted = True
                    self._drain = 0.2  # do not wait for slow answers
                scene.doing = "done: stopping the load, letting requests in flight finish"
                if scene.acts and scene.acts[-1].end is None:
                    scene.acts[-1].end = loop.time()
            self.watcher.flush()
            report.duration = loop.time() - t0
            report.dropped = load.dropped
            report.shadow = scene.shadow
            report.diffs = self.diffs
            scene.in_flight = 0
            scene.doing = "interrupted" if report.interrupted else "finished: summary below"
            if self.screen.live:
                self.screen.draw(scene, loop.time())
            self.screen.write(render_summary(report))
        return report

    async def _start_cast(self, stack: contextlib.AsyncExitStack) -> tuple[
            App, AdminClient, LoadGen]:
        """Toy models, webhook receiver, flipback, admin readers and load generator, each
        closed by ``stack`` in reverse order: the load drains first, flipback then delivers
        its last notifications, the record of shadow diffs is read before its directory
        goes."""
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flipback-")))
        record = tmp / "shadow-diffs.jsonl"
        stack.callback(self._read_diffs, record)
        for model in self.models:
            stack.push_async_callback(model.aclose)
            await model.start()
        stack.push_async_callback(self.hooks.aclose)
        await self.hooks.start()
        app = App(parse_config(self._config(tmp, record), "<flipback demo>"))
        await app.start()
        stack.push_async_callback(app.aclose)
        admin_url = f"http://127.0.0.1:{app.admin_port}"
        admin = AdminClient(admin_url, os.environ.get(TOKEN_ENV) or None)
        stack.push_async_callback(admin.aclose)
        stack.push_async_callback(self.watcher.last_reading, admin, ROUTE)
        load = LoadGen(f"http://127.0.0.1:{app.data_port}/v1/chat/completions", RATE)
        stack.push_async_callback(lambda: load.aclose(self._drain))
        return app, admin, load

    # -- the script -------------------------------------------------------------------
    async def _script(self, admin: AdminClient) -> None:
        s = self.scale
        act = self._begin_act(1, "error fault", "llm-v2 answers HTTP 500 to every request")
        self._doing(f"canary llm-v2 is healthy and takes {WEIGHT}% of the traffic; llm-v3 "
                    f"gets a copy of {SHADOW_SAMPLE}% of the requests, as a shadow")
        await self._pause(HEALTHY_1 * s)
        await self._fault(act, "error", "each 500 is retried on llm-v1 (the client never sees "
                          "it) and counted against the canary", HOLD_1 * s,
                          after=f"llm-v2's ERR% stays up for up to {WINDOW:g}s after the flip: "
                          "its window still holds the failures that tripped it and empties as "
                          "they age out; llm-v2 gets no traffic now")

        self.canary.mode = "ok"
        self._why("")
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
                          "as slow, so a hanging canary trips before it answers", HOLD_2 * s,
                          after=f"no slow answer had come back when it tripped: requests in "
                          f"flight longer than max_p99 ({MAX_P99 * 1000:g}ms) count as slow, so "
                          f"a {SLOW_DELAY:g}s first byte trips at about max_p99; llm-v2's p99 "
                          f"stays up until its {WINDOW:g}s window empties")
        act.end = self._now()

    async def _fault(self, act: ActRecord, mode: Mode, why: str, hold: Seconds, *,
                     after: str) -> None:
        """Break the canary, wait (bounded) for flipback's rollback event, then for its
        verification; hold the broken canary ``hold`` seconds from the flip. ``after``
        explains what the table shows once the canary is flipped out."""
        self.canary.mode = mode
        act.fault_at = self._now()
        flipped, verdict = self.watcher.flipped, self.watcher.verdict
        flipped.clear()
        verdict.clear()
        self._say("fault", "demo", act.fault)
        self._doing(f"{act.fault}: {why}")
        if not await self._until(flipped, FLIP_TIMEOUT):
            self._doing(f"no rollback within {FLIP_TIMEOUT:g}s of the fault")
            await self._pause(hold)
            return
        seen = self._now()
        assert act.flip_at is not None
        self._why(after)
        self._doing(f"rolled back {act.flip_at - act.fault_at:.2f}s after the fault: llm-v1 "
                    f"serves everything; flipback watches stable for {self.verify:g}s to verify "
                    "that the canary was the fault")
        limit = self.verify + VERIFY_SLACK
        if await self._until(verdict, act.flip_at + limit - self._now()):
            assert act.verdict_at is not None
            self._doing(f"{act.verdict} {act.verdict_at - act.flip_at:.2f}s after the rollback: "
                        + ("stable is fine, so the canary was the fault"
                           if act.verdict == "verified" else "stable is bad too")
                        + "; the route stays latched until resumed")
        else:
            act.no_verdict = (f"neither verified nor verify_failed in GET /events within "
                              f"{limit:g}s of the rollback (verify: {self.verify:g}s)")
            self._doing(act.no_verdict)
        await self._pause(seen + hold - self._now())

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
            await asyncio.wait(waits, timeout=max(timeout, 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._stop.is_set():
            raise _Interrupted
        return event.is_set()

    # -- output -------------------------------------------------------------------------
    def _intro(self, app: App, url: str) -> None:
        if self.screen.live:
            return
        self.screen.print("\n".join([
            f"flipback demo: 3 toy model servers, flipback and {RATE:g} req/s of load on "
            f"127.0.0.1, ~{self._planned():.0f}s",
            f"  stable llm-v1 {self.stable.url}, canary llm-v2 {self.canary.url} "
            f"(weight {WEIGHT}%)",
            f"  shadow llm-v3 {self.shadow.url} ({SHADOW_SAMPLE}% mirrored, every "
            f"{DISAGREE_EVERY}th answer differs; compared on {COMPARED})",
            f"  proxy {url}, admin http://127.0.0.1:{app.admin_port}",
            f"  webhook receiver {self.hooks.url} ({', '.join(NOTIFY)})",
            f"  rollback: window {WINDOW:g}s, min_requests 10, max_error_rate 5%, max_p99 "
            f"{MAX_P99 * 1000:g}ms, consecutive_failures 5, verify {self.verify:g}s; "
            "retry_canary_on_stable",
        ]))

    def _say(self, kind: str, actor: str, text: str) -> None:
        self.watcher.add(Entry(self._now(), kind, actor, text))

    def _doing(self, text: str) -> None:
        assert self.scene is not None
        self.scene.doing = text

    def _why(self, text: str) -> None:
        """Explain what the view shows (live: under "now"; plain: one line, once)."""
        assert self.scene is not None
        self.scene.why = text
        if text:
            self.screen.why(text, self._now() - self.scene.t0)

    # -- plumbing -------------------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _planned(self) -> float:
        return (HEALTHY_1 + HOLD_1 + HEALTHY_2 + HOLD_2) * self.scale + 1.5

    def _config(self, tmp: Path, record: Path) -> str:
        def quoted(path: Path) -> str:
            return orjson.dumps(str(path)).decode()

        return CONFIG.format(
            state=quoted(tmp / "state.json"), webhook=self.hooks.url, kinds=", ".join(NOTIFY),
            stable=self.stable.url, canary=self.canary.url, shadow=self.shadow.url,
            route=ROUTE, weight=WEIGHT, sample=SHADOW_SAMPLE, compared=COMPARED, window=WINDOW,
            record=quoted(record), max_p99=round(MAX_P99 * 1000),
            verify=round(self.verify * 1000))

    def _read_diffs(self, record: Path) -> None:
        self.diffs = read_diffs(record)

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
