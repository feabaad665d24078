"""What ``flipback demo`` explains on screen (the ``why`` after a flip, live and plain), and
its toy model servers run on their own (``python -m proxy.demo.models``), as the README's
"Running it for real" block starts them."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import sys

import aiohttp

from proxy.demo.models import ToyModel
from proxy.demo.screen import Screen
from proxy.demo.view import Scene, render_frame

WHY = ("llm-v2's ERR% stays up for up to 5s after the flip: its window still holds the "
       "failures that tripped it and empties as they age out; llm-v2 gets no traffic now")


def _scene(why: str) -> Scene:
    models = (ToyModel("llm-v1"), ToyModel("llm-v2"), ToyModel("llm-v3"))
    route = {"name": "chat", "state": "rolled_back", "configured_weight": 25,
             "effective_weight": 0,
             "last_event": {"kind": "rollback", "actor": "auto", "reason": "canary failed " * 20},
             "upstreams": {"llm-v1": {"role": "stable", "requests": 400, "failures": 0},
                           "llm-v2": {"role": "canary", "requests": 98, "failures": 60}},
             "shadow": {"upstream": "llm-v3", "sample": 50, "copies": {"sent": 10},
                        "compared": 10, "mismatches": {"status": 0, "body": 2}}}
    return Scene(t0=0.0, rate=80.0, url="http://127.0.0.1:1/v1/chat/completions",
                 slow_after=0.3, models=models, samples=[], routes=[route],
                 doing="a very long explanation " * 10, why=why, planned=28.0,
                 shadow_name="llm-v3", shadow_sample=50)


def test_demo_frame_explains_a_flipped_canary_and_still_fits_the_screen():
    lines = render_frame(_scene(WHY), 12.0, 100, color=False, height=24).splitlines()
    why = [i for i, ln in enumerate(lines) if ln.startswith("why: ")]
    assert why == [3] and lines[4].startswith("     ")  # under "now", wrapped once
    assert "window still holds the failures" in " ".join(lines[3:5])
    assert len(lines) < 24 and max(map(len, lines)) <= 100
    # the table leaves the shadow to the demo's own panel
    assert not any(ln.split()[1:2] == ["shadow"] or ln.startswith("  shadow: ") for ln in lines)
    assert any(ln.startswith("shadow llm-v3 · 50% mirrored") for ln in lines)
    assert not any(ln.startswith("why") for ln in
                   render_frame(_scene(""), 12.0, 100, color=False).splitlines())


def test_demo_plain_output_prints_each_explanation_once():
    out = io.StringIO()
    Screen(out, live=False).why(WHY, 8.3)
    Screen(io.StringIO(), live=True).why(WHY, 8.3)  # live: the frame shows it
    assert out.getvalue() == f"[ +8.30s] why: {WHY}\n"


async def test_toy_models_serve_on_their_own_until_sigterm(unused_tcp_port_factory):
    chat, small = unused_tcp_port_factory(), unused_tcp_port_factory()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.demo.models", f"llm-v1:{chat}", f"small:{small}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        said = [await asyncio.wait_for(proc.stdout.readline(), 20) for _ in range(2)]
        assert said[0].decode().startswith(f"toy model llm-v1 on http://127.0.0.1:{chat} ")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{chat}/v1/chat/completions", json={}) as r:
                answer = await r.json()
            assert answer["object"] == "chat.completion" and answer["model"] == "llm-v1"
            async with s.post(f"http://127.0.0.1:{small}/predict",
                              json={"instances": [[1, 2], [3, 4]]}) as r:
                assert await r.json() == {"model": "small", "predictions": [0.87, 0.87]}
            async with s.get(f"http://127.0.0.1:{small}/health") as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        again = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.demo.models", "a:x",
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(again.communicate(), 20)
        assert again.returncode == 2 and b"expected NAME:PORT" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_toy_models_say_when_a_port_is_taken(unused_tcp_port):
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", unused_tcp_port)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.demo.models", f"llm-v1:{unused_tcp_port}",
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        server.close()
        await server.wait_closed()
    assert proc.returncode == 1
    assert re.fullmatch(rf"toy models: cannot listen on 127\.0\.0\.1:{unused_tcp_port} for "
                        r"llm-v1: Address already in use\n", err.decode())
