"""One worker process of ``run --workers N`` (``python -m proxy.workers.worker``, started
by the supervisor only): connects to the parent's channel, takes its config from the
welcome, serves the data plane on the shared listener (SO_REUSEPORT) and a private admin
API on an ephemeral loopback port that the parent's admin reads, applies the configs the
parent sends, and drains on SIGTERM or when the parent is gone."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import pickle
import shutil
import signal
import sys
from dataclasses import replace
from typing import Any

from proxy.config.model import ProxyConfig
from proxy.errors import ProxyError
from proxy.runtime import Runtime
from proxy.server import App, serve
from proxy.workers.channel import Frame
from proxy.workers.link import WorkerChannel, WorkerLink

logger = logging.getLogger(__name__)

PRIVATE_ADMIN = "127.0.0.1:0"
PRIVATE_DIR_PREFIX = "flipback-workers-"  # the parent's directory for the channel


def encode_config(config: ProxyConfig) -> str:
    """A validated config for the channel: the parent's own object, pickled (both ends
    run the same code; the channel is a socket in a directory only this user reaches)."""
    return base64.b64encode(pickle.dumps(config)).decode()


def _decode_config(frame: Frame) -> ProxyConfig:
    config = pickle.loads(base64.b64decode(frame["config"]))  # noqa: S301 - our parent
    assert isinstance(config, ProxyConfig)
    # The shared listener the parent reserved, and a private admin only the parent reads.
    return replace(config, server=replace(config.server, listen=str(frame["listen"])),
                   admin=replace(config.admin, listen=PRIVATE_ADMIN))


async def run_worker(channel_path: str, worker: int) -> None:
    channel, welcome = await WorkerChannel.connect(channel_path, worker, os.getpid())
    config = _decode_config(welcome)
    link = None
    if not config.state.redis:
        def link(rollouts: Any) -> WorkerLink:
            return WorkerLink(channel, worker=worker, rollouts=rollouts)
    runtime = Runtime(config, link=link, primary=bool(welcome.get("primary")))

    def on_frame(frame: Frame) -> None:
        kind = frame.get("t")
        if kind == "reload":
            try:
                runtime.apply(_decode_config(frame))
            except Exception:  # the parent validated it; a failure here is a bug, logged
                logger.exception("worker %d: applying the parent's config failed", worker)
        elif kind == "refused":  # the primary notifies it (the webhook's reload_refused)
            runtime.refuse([str(e) for e in frame.get("errors", [])])

    channel.on_frame = on_frame
    channel.start()

    def started(app: App) -> None:
        channel.send({"t": "ready", "worker": worker, "admin_port": app.admin_port,
                      "data_port": app.data_port, "pid": os.getpid()})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        parent_gone = asyncio.ensure_future(channel.closed.wait())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait({parent_gone, signalled}, return_when=asyncio.FIRST_COMPLETED)
        for task in (parent_gone, signalled):
            task.cancel()
        if channel.closed.is_set() and not stop.is_set():
            logger.warning("worker %d: the parent is gone; draining", worker)
            _remove_private_dir(channel_path)  # a killed parent could not

    try:
        await serve(config, shutdown_trigger=shutdown_trigger, on_started=started,
                    runtime=runtime, reuse_port=True)
    finally:
        await channel.aclose()


def _remove_private_dir(channel_path: str) -> None:
    """The channel's directory (``flipback-workers-*``, made by the parent), if it is one."""
    folder = os.path.dirname(channel_path)
    if os.path.basename(folder).startswith(PRIVATE_DIR_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from proxy.cli.main import EXIT_OK, EXIT_RUNTIME, _setup_logging

    p = argparse.ArgumentParser(prog="flipback-worker")
    p.add_argument("--channel", required=True)
    p.add_argument("--worker", type=int, required=True)
    args = p.parse_args(argv)
    _setup_logging()
    try:
        import uvloop

        uvloop.run(run_worker(args.channel, args.worker))
    except ProxyError as exc:
        print(f"flipback worker {args.worker}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except (KeyboardInterrupt, ConnectionError):
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
