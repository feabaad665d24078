"""``flipback demo`` in process, shortened: both bad canaries flip back fast and each
rollback is verified and notified, clients see no errors, the shadow mostly agrees, Ctrl-C
stops cleanly, a missing verification fails the demo, and the live frame fits a 100x24
terminal."""

from __future__ import annotations

import io
import os
import re
import signal
import threading

import aiohttp
import pytest

from proxy.demo import main as demo
from proxy.demo.models import Sample, ToyModel
from proxy.demo.probes import Notification, ShadowFigures, WebhookReceiver, parse_metrics
from proxy.demo.report import ActRecord, Report, render_summary
from proxy.demo.view import Entry, Scene, render_frame

SCALE = "0.3"
FLIP_LIMIT = 1.5  # seconds from fault onset; the goal is 1 s, the demo usually takes 0.2-0.5
VERIFY = 0.9  # rollback.verify at scale 0.3
NOTIFY_LIMIT = 1.0  # event to webhook receipt; on loopback it takes a few ms


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
    for act, fig in zip(report.acts, (act1, act2), strict=True):
        assert act.verdict == "verified", act
        assert "stable within thresholds" in act.verdict_reason
        assert fig.verify_after is not None and VERIFY - 0.05 < fig.verify_after < VERIFY + 1
        assert set(fig.notified) == {"rollback", "verified"}, fig.notified
        assert all(0 <= delay < NOTIFY_LIMIT for delay in fig.notified.values()), fig.notified
    assert sorted(n.kind for n in report.notifications) == [
        "resume", "rollback", "rollback", "verified", "verified"]
    assert report.shadow is not None and report.shadow.agreement is not None
    assert 70 < report.shadow.agreement < 90, report.shadow  # every 5th answer differs
    assert report.diffs.lines > 0 and report.diffs.primary != report.diffs.shadow
    assert "\x1b" not in text  # not a terminal: plain lines only
    assert re.search(r"fault\s+demo\s+llm-v2 answers HTTP 500", text)
    assert len(re.findall(r"rollback\s+auto\s+canary", text)) == 2
    assert re.search(r"resume\s+admin", text)
    assert len(re.findall(r"verified\s+auto\s+stable within thresholds", text)) == 2
    assert len(re.findall(r"webhook\s+notify\s+got rollback in \d+ ms after the flip", text)) == 2
    assert len(re.findall(r"webhook\s+notify\s+got verified in \d+ ms", text)) == 2
    assert re.search(r"webhook\s+notify\s+got resume in \d+ ms", text)
    summary = text[text.index("\nsummary\n"):]
    assert len(re.findall(r"fault -> rollback event\s+\d\.\d\ds", summary)) == 2
    assert len(re.findall(r"rollback -> verified\s+\d\.\d\ds", summary)) == 2
    assert len(re.findall(r"webhook notifications\s+rollback \d+ ms, verified \d+ ms",
                          summary)) == 2
    assert "webhook: 5 notifications received (" in summary
    assert re.search(r"event -> receipt\s+\d+ ms median, \d+ ms at most", summary)
    agreement = re.search(r"shadow: llm-v3.*\n\s+agreement\s+(\d+\.\d)%", summary)
    assert agreement and 0 < float(agreement.group(1)) < 100
    assert re.search(r"recorded\s+\d+ mismatches", summary)
    assert "note:" not in summary and "FAILED" not in summary
    assert "ok: both bad canaries were flipped back automatically, each rollback verified" in text


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


def _report(*acts: ActRecord) -> Report:
    return Report(t0=0.0, acts=list(acts), samples=[], canary_arrivals=[], slow_after=0.3,
                  verify=3.0)


def test_demo_fails_without_a_verification():
    flipped = {"fault_at": 10.0, "flip_at": 10.2, "flip_reason": "canary failed"}
    verified = ActRecord(number=1, title="error fault", fault="500s", start=0.0, **flipped,
                         verdict="verified", verdict_at=13.2, verdict_reason="stable ok")
    missing = ActRecord(number=2, title="latency fault", fault="slow", start=16.0, **flipped,
                        no_verdict="neither verified nor verify_failed within 5s")
    report = _report(verified, missing)
    assert report.exit_code == 1
    (problem,) = report.problems()
    assert problem.startswith("act 2 (latency fault): the rollback was not verified: neither")
    assert "FAILED: act 2" in render_summary(report)
    missing.verdict, missing.verdict_reason = "verify_failed", "stable error rate 40.0% > 5%"
    assert report.problems() == ["act 2 (latency fault): verify_failed after the rollback: "
                                 "stable error rate 40.0% > 5%"]
    missing.verdict = "verified"
    assert report.exit_code == 0


def test_demo_reads_shadow_agreement_from_metrics():
    text = "\n".join([
        "# TYPE flipback_shadow_total counter",
        'flipback_shadow_total{route="chat",outcome="sent"} 100.0',
        'flipback_shadow_total{route="chat",outcome="dropped"} 2.0',
        'flipback_shadow_total{route="other",outcome="sent"} 7.0',
        "# TYPE flipback_shadow_mismatch_total counter",
        'flipback_shadow_mismatch_total{route="chat",kind="body",primary="v1"} 15.0',
        'flipback_shadow_mismatch_total{route="chat",kind="status",primary="v1"} 1.0',
        'flipback_shadow_mismatch_total{route="chat",kind="body",primary="v2"} 4.0',
        "# TYPE flipback_shadow_mismatched_requests_total counter",
        'flipback_shadow_mismatched_requests_total{route="chat",primary="v1"} 15.0',
        'flipback_shadow_mismatched_requests_total{route="chat",primary="v2"} 4.0',
        "# TYPE flipback_shadow_latency_delta_seconds histogram",
        'flipback_shadow_latency_delta_seconds_bucket{route="chat",le="+Inf"} 98.0',
        'flipback_shadow_latency_delta_seconds_count{route="chat"} 98.0',
        "# TYPE flipback_requests_total counter",
        'flipback_requests_total{route="chat",upstream="llm-v3",role="shadow",outcome="2xx"} 100.0',
        "",
    ])
    scrape = parse_metrics(text, "chat")
    # A pair can count under both kinds: the requests counter, not the sum of kinds.
    assert scrape.shadow == ShadowFigures(sent=100, dropped=2, compared=98, differed=19)
    assert scrape.shadow.agreement == pytest.approx(100 * 79 / 98)
    assert scrape.counts == {("chat", "llm-v3"): 100.0}
    assert ShadowFigures().agreement is None
    # From a flipback without the requests counter: the larger kind, over every primary.
    older = "\n".join(line for line in text.splitlines() if "mismatched_requests" not in line)
    assert parse_metrics(older + "\n", "chat").shadow.differed == 19


@pytest.mark.parametrize("argv", [["--duration-scale", "0"], ["--duration-scale", "x"],
                                  ["--bogus"]])
def test_demo_bad_arguments_exit_2(argv, capsys):
    assert demo.run_demo(argv) == 2
    assert "flipback demo" in capsys.readouterr().err


def test_demo_frame_fits_100_columns():
    stable, canary, shadow = ToyModel("llm-v1"), ToyModel("llm-v2"), ToyModel("llm-v3")
    stable.arrivals = [i / 60 for i in range(60 * 30)]
    canary.arrivals = [i / 20 for i in range(20 * 9)]
    shadow.arrivals = [i / 40 for i in range(40 * 30)]
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
                  slow_after=0.3, models=(stable, canary, shadow),
                  samples=[Sample(i / 80, 200, "llm-v1", 0.02) for i in range(2400)],
                  acts=[act], doing="a very long explanation " * 10,
                  routes=[route], rates={("chat", "llm-v1"): 80.0},
                  timeline=[Entry(8.0, "fault", "demo", "x" * 200),
                            Entry(8.2, "rollback", "auto", "canary failed 5 in a row"),
                            Entry(8.21, "webhook", "notify", "got rollback in 3 ms"),
                            *(Entry(9.0, "verb", "demo", "filler") for _ in range(5)),
                            Entry(11.2, "verified", "auto", "stable within thresholds"),
                            Entry(11.21, "webhook", "notify", "got verified in 2 ms")],
                  planned=28.0, shadow_name="llm-v3", shadow_sample=50,
                  shadow=ShadowFigures(sent=1000, compared=990, differed=198))
    frame = render_frame(scene, 30.0, 100, color=False, height=24)
    lines = frame.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert len(lines) < 24  # the cursor stays on the screen
    assert any(line.strip().startswith("xR") for line in lines)  # fault and flip marked
    assert any(line.strip() == "xR    v" for line in lines)  # ... and the verification
    assert any("agreement" in line and "80.0% of 990" in line for line in lines)
    assert "got verified in 2 ms" in lines[-1]  # the timeline gives way from the top
    assert len(render_frame(scene, 30.0, 100, color=False, height=40).splitlines()) > 23
    colored = render_frame(scene, 30.0, 100, color=True)
    visible = re.sub(r"\x1b\[[0-9;]*m", "", colored)
    assert max(len(line) for line in visible.splitlines()) <= 100


async def test_demo_receiver_keeps_a_retried_delivery_once():
    kept: list[Notification] = []
    hook = WebhookReceiver(kept.append)
    await hook.start()
    try:
        event = b'{"time": "2026-11-26T06:00:00Z", "route": "chat", "kind": "rollback"}'
        async with aiohttp.ClientSession() as session:
            for delivery in ("d1", "d1", "d2"):  # d1 retried after a lost answer
                async with session.post(hook.url, data=event,
                                        headers={"x-flipback-delivery": delivery}) as resp:
                    assert resp.status == 204
        assert len(kept) == len(hook.received) == 2
    finally:
        await hook.aclose()
