"""``flipback demo`` (SPEC §2): a self-contained show of the canary split, shadow traffic,
automatic rollback, its verification and its notification, on one uvloop event loop and
127.0.0.1 only.

Cast: a healthy stable ``llm-v1``, a canary ``llm-v2`` at 25%, a shadow ``llm-v3`` that gets
a copy of half the requests and words every 5th answer differently, a flipback with a
generated config (``verify`` after each rollback, ``notify`` to a webhook), a webhook
receiver standing in for the on-call channel, an open-loop load of 80 req/s, and a watcher
polling the admin API like an operator. Act 1: the canary starts answering HTTP 500 and
must be flipped back, and flipback must then verify that stable is fine; the demo then
calls ``resume`` (the operator verb). Act 2: the canary turns slow (2 s to the first byte
against ``max_p99`` 300 ms) and must be flipped back and verified again. A summary measures
both flips, both verifications, the notifications and the shadow's agreement.

Modules: this one is the command; ``script`` plays the acts, ``watch`` follows flipback,
``models`` holds the toy model servers and the load generator, ``probes`` the webhook
receiver and the metrics reader, ``view`` and ``screen`` the live view, ``report`` the
measurements and the summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

import uvloop

from proxy.demo.report import Report
from proxy.demo.script import Demo, DemoOptions
from proxy.errors import ProxyError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flipback demo", description=(
        "Watch flipback flip a failing, then a slow, canary back to stable, verify each "
        "rollback and notify a webhook, with a shadow model on the side (~32 s)."))
    p.add_argument("--duration-scale", type=_scale, default=1.0, metavar="FLOAT",
                   help="stretch or shrink the acts (default 1.0: ~32 s; 0.3: ~11 s)")
    p.add_argument("--no-live", action="store_true",
                   help="print plain progress lines even on a terminal")
    return p


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.05 <= value <= 2.0:
        raise argparse.ArgumentTypeError("must be between 0.05 and 2")
    return value


def run_demo(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """``flipback demo``: 0 when both bad canaries were flipped back automatically and each
    rollback was verified, 1 when not (the summary and stderr say why), 2 on bad arguments,
    130 after Ctrl-C."""
    try:
        args = build_parser().parse_args([] if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    out = out or sys.stdout
    options = DemoOptions(scale=args.duration_scale, live=False if args.no_live else None)
    try:
        report = uvloop.run(play(options, out))
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handler was in place
        print("\nflipback demo: interrupted", file=out)
        return 130
    except (ProxyError, OSError) as exc:
        print(f"flipback demo: {exc}", file=sys.stderr)
        return 1
    for problem in report.problems() if not report.interrupted else []:
        print(f"flipback demo: {problem}", file=sys.stderr)
    return report.exit_code


async def play(options: DemoOptions, out: TextIO) -> Report:
    """Run the whole demo on the running loop; returns the measurements."""
    return await Demo(options, out).run()
