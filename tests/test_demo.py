"""``flipback demo`` in process, shortened: both bad canaries flip back fast, clients see no
errors, Ctrl-C stops cleanly, and the live frame fits a 100-column terminal."""

from __future__ import annotations

import io
import os
import re
import signal
import threading

import pytest

from proxy import demo
from proxy.demo_models import Sample, ToyModel
from proxy.demo_view import ActRecord, Entry, Report, Scene, render_frame

SCALE = "0.3"
FLIP_LIMIT = 1.5  # seconds from fault onset; the goal is 1 s, the demo usually takes 0.2-0.5


def test_demo_flips_both_canaries_back_without_client_errors(monkeypatch):
    reports: list[Report] = []
    play = demo.play

    async def keep(options: demo.DemoOptions, out: io.StringIO) -> Report:
        reports.append(report := await play(options, out))
        return report

    monkeypatch.setattr(demo, "play", keep)
    out = io.StringIO()
    assert demo.run_demo(["--duration-scale", SCALE], out=out) == 0
    text = out.getvalue()
    (report,) = reports
    act1, act2 = (report.figures(act) for act in report.acts)
    for fig in (act1, act2):
        assert fig.flip_event is not None and 0 <= fig.flip_event < FLIP_LIMIT, fig
        assert fig.flip_traffic is not None and fig.flip_traffic < FLIP_LIMIT, fig
        assert 10 < fig.split.get("llm-v2", 0) < 40, fig.split  # weight 25
    assert act1.errors == 0 and act1.canary_hits > 0  # every 500 was retried on stable
    assert act2.errors == 0 and act2.slow > 0  # the slow canary answered late, not wrongly
    assert report.acts[0].flip_reason and report.acts[1].flip_reason
    assert "\x1b" not in text  # not a terminal: plain lines only
    assert re.search(r"fault\s+demo\s+llm-v2 answers HTTP 500", text)
    assert len(re.findall(r"rollback\s+auto\s+canary", text)) == 2
    assert re.search(r"resume\s+admin", text)
    assert len(re.findall(r"fault -> rollback event\s+\d\.\d\ds", text)) == 2
    assert "ok: both bad canaries were flipped back automatically" in text


def test_demo_ctrl_c_stops_cleanly_with_130():
    out = io.StringIO()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code = demo.run_demo(["--duration-scale", SCALE], out=out)
    finally:
        timer.cancel()
        timer.join()
    assert code == 130
    assert "interrupted" in out.getvalue()


@pytest.mark.parametrize("argv", [["--duration-scale", "0"], ["--duration-scale", "x"],
                                  ["--bogus"]])
def test_demo_bad_arguments_exit_2(argv, capsys):
    assert demo.run_demo(argv) == 2
    assert "flipback demo" in capsys.readouterr().err


def test_demo_frame_fits_100_columns():
    stable, canary = ToyModel("llm-v1"), ToyModel("llm-v2")
    stable.arrivals = [i / 60 for i in range(60 * 30)]
    canary.arrivals = [i / 20 for i in range(20 * 9)]
    act = ActRecord(number=1, title="error fault", fault="llm-v2 answers HTTP 500 " * 3,
                    start=0.0, fault_at=8.0, flip_at=8.2)
    route = {"name": "chat", "state": "rolled_back", "configured_weight": 25,
             "effective_weight": 0, "last_event": {"kind": "rollback", "actor": "auto",
                                                   "reason": "canary failed " * 20},
             "upstreams": {"llm-v1": {"role": "stable", "requests": 400, "failures": 0,
                                      "p50_ms": 21.0, "p99_ms": 25.0, "in_flight": 2},
                           "llm-v2": {"role": "canary", "requests": 98, "failures": 5,
                                      "p50_ms": 21.0, "p99_ms": 2500.0, "in_flight": 12}}}
    scene = Scene(t0=0.0, rate=80.0, url="http://127.0.0.1:1/v1/chat/completions",
                  slow_after=0.3, models=(stable, canary),
                  samples=[Sample(i / 80, 200, "llm-v1", 0.02) for i in range(2400)],
                  acts=[act], doing="a very long explanation " * 10,
                  routes=[route], rates={("chat", "llm-v1"): 80.0},
                  timeline=[Entry(8.0, "fault", "demo", "x" * 200),
                            Entry(8.2, "rollback", "auto", "canary failed 5 in a row")],
                  planned=28.0)
    frame = render_frame(scene, 30.0, 100, color=False)
    lines = frame.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert len(lines) <= 24
    assert any(line.strip().startswith("xR") for line in lines)  # fault and flip marked
    colored = render_frame(scene, 30.0, 100, color=True)
    visible = re.sub(r"\x1b\[[0-9;]*m", "", colored)
    assert max(len(line) for line in visible.splitlines()) <= 100
