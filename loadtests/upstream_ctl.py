"""A toy model server whose behaviour is switched at run time, for fault-injection scenarios.

Any method and path get a small JSON 200 after a base delay (5 ms by default), unless a
fault is on. Control endpoints (not counted as traffic):

    POST /_fault  {"mode": "ok"|"error"|"hang"|"slow", "status": 500, "delay": 2.0}
                  switches at once; answers {"mode", "status", "delay", "time"} where
                  `time` is the switch instant from time.time() (wall clock: comparable
                  across processes on the same machine)
    GET  /_log    {"name", "faults": [...], "arrivals": [[x-request-id, time.time(), mode]]}
                  every request received, in arrival order

Modes: ok (200 after the base delay), error (`status` at once), hang (no answer until
the mode changes away from hang, or the client goes away), slow (200 after `delay` s).

    python loadtests/upstream_ctl.py --port 9002 --name canary [--base-delay 0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from typing import Any

import orjson
import uvloop
from aiohttp import web

MODES = ("ok", "error", "hang", "slow")
HANG_CAP = 600.0  # a hung request is answered after this long at the latest


class Control:
    """The switchable behaviour and the arrival log of one server."""

    def __init__(self, name: str, base_delay: float) -> None:
        self.name = name
        self.base_delay = base_delay
        self.mode = "ok"
        self.status = 500
        self.delay = 2.0
        self.faults: list[dict[str, Any]] = []
        self.arrivals: list[tuple[str, float, str]] = []
        self._released = asyncio.Event()  # set when a hang ends
        self._ok_body = orjson.dumps(
            {
                "id": "ctl-1",
                "object": "text_completion",
                "model": name,
                "choices": [{"index": 0, "text": "ok"}],
            }
        )

    def switch(self, mode: str, status: int, delay: float) -> dict[str, Any]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if not 100 <= status <= 599 or not 0 <= delay <= HANG_CAP:
            raise ValueError("status must be 100-599 and delay 0-600 s")
        self.mode, self.status, self.delay = mode, status, delay
        if mode == "hang":
            self._released = asyncio.Event()
        else:
            self._released.set()
        record = {"mode": mode, "status": status, "delay": delay, "time": time.time()}
        self.faults.append(record)
        return record

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """Ordinary traffic: log the arrival, then behave as the current mode says."""
        mode = self.mode
        self.arrivals.append((request.headers.get("x-request-id", ""), time.time(), mode))
        if request.body_exists:
            await request.read()
        headers = {"x-upstream": self.name}
        if mode == "error":
            body = orjson.dumps({"error": f"injected fault on {self.name}"})
            return web.Response(
                status=self.status, body=body, headers=headers, content_type="application/json"
            )
        if mode == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), HANG_CAP)
        elif mode == "slow":
            await asyncio.sleep(self.delay)
        elif self.base_delay > 0:
            await asyncio.sleep(self.base_delay)
        return web.Response(body=self._ok_body, headers=headers, content_type="application/json")


def make_app(ctl: Control) -> web.Application:
    async def fault(request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
            record = ctl.switch(
                str(data.get("mode", "ok")),
                int(data.get("status", 500)),
                float(data.get("delay", 2.0)),
            )
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.Response(body=orjson.dumps(record), content_type="application/json")

    async def log(request: web.Request) -> web.Response:
        body = orjson.dumps({"name": ctl.name, "faults": ctl.faults, "arrivals": ctl.arrivals})
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/_fault", fault)
    app.router.add_get("/_log", log)
    app.router.add_route("*", "/{tail:.*}", ctl.serve)
    return app


async def serve(port: int, name: str, base_delay: float) -> None:
    ctl = Control(name, base_delay)
    runner = web.AppRunner(make_app(ctl), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream_ctl {name} on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    ctl.switch("ok", 500, 0.0)  # release hung requests so shutdown is quick
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--base-delay", type=float, default=0.005, help="seconds, ok mode")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.name, args.base_delay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
