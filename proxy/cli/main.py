"""The ``flipback`` command (SPEC §2). The only place exit codes come from:
0 ok, 1 runtime failure, 2 bad input. Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config.model import ProxyConfig
from proxy.errors import ConfigError, ProxyError, describe

DEFAULT_CONFIG = "config/flipback.yaml"
DEFAULT_ADMIN = "http://127.0.0.1:9901"
EXIT_OK, EXIT_RUNTIME, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"flipback: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flipback", description="Canary, shadow and instant rollback for "
                "model servers.")
    p.add_argument("--version", action="version", version=f"flipback {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="serve")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    run.add_argument("--workers", type=_workers, default=1, metavar="N",
                     help="worker processes on one listener (default 1; auto: one per core)")
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True)
    demo = sub.add_parser("demo", help="watch a bad canary get flipped back (self-contained)")
    demo.add_argument("--duration-scale", type=float, default=1.0,
                      help="stretch or shrink the acts (0.3 runs in ~11 s)")
    demo.add_argument("--no-live", action="store_true", help="plain lines, no live view")
    status = sub.add_parser("status", help="routes, weights and windows of a running flipback")
    status.add_argument("--admin", default=None, help=f"admin URL (default {DEFAULT_ADMIN})")
    status.add_argument("--watch", action="store_true", help="refresh in place")
    status.add_argument("--wait", type=_duration, default=None, metavar="SECONDS",
                        help="first wait up to this long for flipback to be ready "
                             "(GET /readyz); exit 1 if it is not")
    for verb, helptext in (("rollback", "send all traffic to stable and latch"),
                           ("promote", "send all traffic to canary (weight 100)"),
                           ("resume", "clear the latch: back to the configured weight")):
        v = sub.add_parser(verb, help=helptext)
        v.add_argument("route")
        v.add_argument("--admin", default=None)
        if verb == "rollback":
            v.add_argument("--reason", default=None)
    weight = sub.add_parser("weight", help="set the canary weight (percent)")
    weight.add_argument("route")
    weight.add_argument("pct", type=_percent)
    weight.add_argument("--admin", default=None)
    kill = sub.add_parser("kill", help="turn a route's kill switch on or off")
    kill.add_argument("route")
    kill.add_argument("state", choices=["on", "off"])
    kill.add_argument("--admin", default=None)
    return p


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100: {text!r}")
    return value


def _workers(text: str) -> int:
    if text == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to 256, or auto: {text!r}")
    return int(text)


def _duration(text: str) -> float:
    from proxy.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _admin_url(given: str | None) -> str:
    return (given or os.environ.get("FLIPBACK_ADMIN_URL") or DEFAULT_ADMIN).rstrip("/")


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("FLIPBACK_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    access = logging.getLogger("proxy.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    access.setLevel(logging.INFO)


def _load(path: str) -> ProxyConfig | None:
    """The config, or None after printing every error as FILE:LINE: path: message."""
    from proxy.config.parser import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None
    except Exception as exc:  # noqa: BLE001 - a reader bug: still one line, exit 2
        print(f"{path}:1: (root): cannot read this config: {describe(exc)}", file=sys.stderr)
        return None


def cmd_check(path: str) -> int:
    from proxy.config.parser import summarize
    from proxy.config.preflight import run_refusals

    cfg = _load(path)
    if cfg is None:
        return EXIT_BAD_INPUT
    with open(path, encoding="utf-8", errors="replace") as f:
        refusals = run_refusals(cfg, f.read(), os.environ)
    for line in refusals:  # valid, but `run` would refuse it here
        print(line, file=sys.stderr)
    if refusals:
        return EXIT_BAD_INPUT
    print(summarize(cfg))
    return EXIT_OK


def cmd_run(path: str, workers: int = 1) -> int:
    from proxy.server import serve

    cfg = _load(path)
    if cfg is None:
        return EXIT_BAD_INPUT
    _setup_logging()
    try:
        import uvloop

        if workers > 1:
            from proxy.workers.supervisor import run_supervisor

            uvloop.run(run_supervisor(cfg, path, workers))
        else:
            uvloop.run(serve(cfg, config_path=path))
    except ProxyError as exc:
        print(f"flipback: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = os.environ.get("FLIPBACK_ADMIN_TOKEN") or None
    try:
        if args.command == "check":
            return cmd_check(args.config)
        if args.command == "run":
            return cmd_run(args.config, args.workers)
        if args.command == "demo":
            from proxy.demo.main import run_demo

            return run_demo(["--duration-scale", str(args.duration_scale)]
                            + (["--no-live"] if args.no_live else []))
        from proxy.cli import commands

        url = _admin_url(args.admin)
        if args.command == "status":
            return asyncio.run(commands.status(url, token, watch=args.watch, wait=args.wait))
        arg: str | float | bool | None = None
        if args.command == "rollback":
            arg = args.reason
        elif args.command == "weight":
            arg = args.pct
        elif args.command == "kill":
            arg = args.state == "on"
        return asyncio.run(commands.run_verb(url, token, args.command, args.route, arg))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `flipback check ... | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ProxyError as exc:
        print(f"flipback: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
