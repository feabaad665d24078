"""Where ``flipback demo``'s output goes: a live frame redrawn in place on a terminal, or
plain lines (timeline entries as they happen, a status line a second) anywhere else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from typing import TextIO

from proxy.cli.status_table import CLEAR, CLEAR_BELOW, CLEAR_EOL, HOME
from proxy.demo.view import Entry, Scene, plain_entry, render_frame, status_line
from proxy.units import Seconds

HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


class Screen:
    """The demo's output stream, live (ANSI, redrawn in place) or plain."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self._drawn = False

    async def paint(self, scene: Scene, in_flight: Callable[[], int],
                    refresh: Seconds) -> None:
        """Forever (until cancelled): redraw the frame every ``refresh``, or print a plain
        status line every second."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(refresh if self.live else 1.0)
            scene.in_flight = in_flight()
            if self.live:
                self.draw(scene, loop.time())
            elif scene.routes:
                self.print(status_line(scene, loop.time()))

    def draw(self, scene: Scene, now: float) -> None:
        size = shutil.get_terminal_size((100, 24))
        text = render_frame(scene, now, size.columns, color=True, height=size.lines)
        body = "".join(line + CLEAR_EOL + "\n" for line in text.splitlines())
        self.out.write(("" if self._drawn else CLEAR) + HOME + body + CLEAR_BELOW)
        self._drawn = True
        self.out.flush()

    def entry(self, entry: Entry, t0: float) -> None:
        """A new timeline entry: printed at once in plain mode (the frame shows it live)."""
        if not self.live:
            self.print(plain_entry(entry, t0))

    def why(self, text: str, since_start: Seconds) -> None:
        """An explanation of what the view shows: printed at once in plain mode (the frame
        shows it under "now")."""
        if not self.live:
            self.print(f"[{since_start:+6.2f}s] why: {text}")

    def print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    @contextlib.contextmanager
    def cursor(self) -> Iterator[None]:
        """Hide the cursor while the live frame is redrawn; show it again however we end."""
        if self.live:
            self.out.write(HIDE_CURSOR)
        try:
            yield
        finally:
            if self.live:
                self.out.write(SHOW_CURSOR)
                self.out.flush()


@contextlib.contextmanager
def quiet_proxy_logs() -> Iterator[None]:
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
