"""Microbenchmark: the CPU cost of LLM telemetry per streamed response (issue 18, item 6).

No network: 200-chunk OpenAI-style streams (one SSE event per chunk, as servers flush
them) are fed through ``proxy.llm.reader.ResponseReader`` N times on a fake clock, and the
cost is reported per stream and per chunk for:

* ``reader``: ``feed`` per chunk and ``end`` (the byte test for plain content events);
* ``reader, parse every event``: the same with the byte test off (orjson on each event);
* ``reader + window + metrics``: what the handler will add per response, through
  ``LlmLane`` (``reader``: the window marks the wait for a first token and takes it,
  ``end``: ``LlmWindow.record`` and ``LlmSeries.record``, a watcher called twice);
* ``split``: the same stream re-chunked at odd offsets (events split mid-line and several
  per chunk), the slow path;
* the stream shapes of four servers: OpenAI (include_usage), vLLM (no usage), llama.cpp
  (finish_reason first in the choice), llama-cpp-python (spaced JSON).

and two forwarding baselines, to put the figure against:

* ``python loop``: the bare ``for chunk: write(chunk)`` loop with a list append as the
  write (the floor of any per-chunk Python work);
* ``asyncio relay``: each chunk written by a fake upstream into a socketpair, read by an
  asyncio ``StreamReader`` (on uvloop, as flipback runs), written to a second socketpair
  and read by a fake client, one chunk at a time (as tokens arrive), with and without the
  reader fed in the relay: the whole pipe's CPU per chunk (upstream + relay + client, all
  in this process), so the relay's own share is a part of it; the with/without difference
  is the telemetry.

With ``--e2e`` it also measures what a real flipback (``python -m proxy run``, a plain
route, telemetry not yet wired) spends per 200-chunk stream: a toy SSE upstream (a child,
one chunk every ``--gap-ms``, chunked encoding) streams through it to an aiohttp client,
``--concurrency`` streams at a time, and flipback's CPU comes from /proc (127.0.0.1 only).
That is the cost the reader's figure is to be set against.

Run: ``python loadtests/llm_telemetry.py [--streams N] [--relay-streams N] [--e2e]``
(~20 s; ~40 s with ``--e2e``).
Prints a table; figures are the best of 5 repeats (the least disturbed by other programs
on a shared machine), CPU time from ``time.process_time``.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.llm.lane import LlmLane  # noqa: E402
from proxy.llm.reader import ResponseReader  # noqa: E402
from proxy.llm.window import LlmWindow  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402

CHUNKS = 200
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
         " Ça", " va", "?", "\\n", " 42", " tokens")
SSE = "text/event-stream"


def _openai(delta: str, finish: str = "null") -> str:
    return ('{"id":"chatcmpl-AbC4x9","object":"chat.completion.chunk","created":1733390000,'
            '"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
            '"system_fingerprint":"fp_0705bf87c0","choices":[{"index":0,"delta":' + delta
            + ',"logprobs":null,"finish_reason":' + finish + '}],"usage":null}')


def _vllm(delta: str, finish: str = "null") -> str:
    return ('{"id":"chatcmpl-5c1d0f3e","object":"chat.completion.chunk","created":1733390001,'
            '"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":'
            + delta + ',"logprobs":null,"finish_reason":' + finish + '}]}')


def _llamacpp(delta: str, finish: str = "null") -> str:
    return ('{"choices":[{"finish_reason":' + finish + ',"index":0,"delta":' + delta
            + '}],"created":1733390002,"id":"chatcmpl-xJ2k","model":"tiny",'
            '"system_fingerprint":"b4273-0d9a8d9e","object":"chat.completion.chunk"}')


def _spaced(delta: str, finish: str = "null") -> str:
    """llama-cpp-python: json.dumps with its default ", " and ": " separators."""
    return ('{"id": "chatcmpl-f77b23f9-6a8f-4c28-be74-4e5dd1498bb0", "model": "tiny.gguf", '
            '"created": 1796471694, "object": "chat.completion.chunk", "choices": [{"index": 0, '
            '"delta": ' + delta.replace('":"', '": "') + ', "logprobs": null, '
            '"finish_reason": ' + finish + '}]}')


def stream(shape: Callable[[str, str], str], usage: bool) -> list[bytes]:
    """A 200-chunk stream: role chunk, content chunks, finish chunk, [usage], [DONE]."""
    tail = ['{"id":"x","object":"chat.completion.chunk","choices":[],"usage":'
            '{"prompt_tokens":25,"completion_tokens":196,"total_tokens":221}}'] if usage else []
    content = CHUNKS - 3 - len(tail)
    events = [shape('{"role":"assistant","content":""}', "null"),
              *(shape('{"content":"' + WORDS[i % len(WORDS)] + '"}', "null")
                for i in range(content)),
              shape("{}", '"stop"'), *tail, "[DONE]"]
    chunks = [f"data: {event}\n\n".encode() for event in events]
    assert len(chunks) == CHUNKS
    return chunks


def rechunk(chunks: list[bytes]) -> list[bytes]:
    """The same bytes cut at odd offsets: events split mid-line, several per chunk."""
    whole = b"".join(chunks)
    sizes = (97, 413, 260, 31, 700)
    out, i, k = [], 0, 0
    while i < len(whole):
        out.append(whole[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return out


class _ParseEveryEvent(ResponseReader):
    __slots__ = ()
    byte_test = False


def per_stream_us(run: Callable[[], None], streams: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.process_time()
        for _ in range(streams):
            run()
        best = min(best, time.process_time() - t)
    return best / streams * 1e6


def reader_run(chunks: list[bytes],
               cls: type[ResponseReader] = ResponseReader) -> Callable[[], None]:
    times = [0.3 + i * 0.02 for i in range(len(chunks))]
    pairs = list(zip(chunks, times, strict=True))
    end = times[-1]

    def run() -> None:
        reader = cls(start=0.0, content_type=SSE)
        feed = reader.feed
        for chunk, now in pairs:
            feed(chunk, now)
        reader.end(end)

    return run


def full_run(chunks: list[bytes]) -> Callable[[], None]:
    clock = [0.0]
    lane = LlmLane(route="chat", upstream="llm-v2", window=LlmWindow(10.0, lambda: clock[0],
                                                                     slots=100),
                   metrics=Metrics())
    lane.watch(lambda: None)  # where the rollout will judge
    times = [0.3 + i * 0.02 for i in range(len(chunks))]
    pairs = list(zip(chunks, times, strict=True))

    def run() -> None:
        clock[0] += 0.01
        reader = lane.reader(start=0.0, content_type=SSE)
        feed = reader.feed
        for chunk, now in pairs:
            feed(chunk, now)
        assert lane.end(reader, times[-1], role="canary") is not None

    return run


def loop_run(chunks: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        out: list[bytes] = []
        write = out.append
        for chunk in chunks:
            write(chunk)

    return run


async def relay(chunks: list[bytes], streams: int) -> tuple[float, float]:
    """CPU µs per stream of the whole socketpair pipe without and with the reader fed in
    the relay, best of 5 repeats, the two alternating (see the module doc)."""
    up_out, up_in = socket.socketpair()
    cl_out, cl_in = socket.socketpair()
    _, upstream = await asyncio.open_connection(sock=up_out)
    from_upstream, w2 = await asyncio.open_connection(sock=up_in)
    _, to_client = await asyncio.open_connection(sock=cl_out)
    client, w4 = await asyncio.open_connection(sock=cl_in)
    loop = asyncio.get_running_loop()
    best = [float("inf"), float("inf")]
    try:
        for _ in range(5):
            for telemetry in (False, True):
                t = time.process_time()
                for _ in range(streams):
                    reader = (ResponseReader(start=loop.time(), content_type=SSE)
                              if telemetry else None)
                    for chunk in chunks:
                        upstream.write(chunk)
                        data = await from_upstream.read(65536)
                        to_client.write(data)
                        if reader is not None:
                            reader.feed(data, loop.time())
                        await client.readexactly(len(data))
                    if reader is not None:
                        reader.end(loop.time())
                best[telemetry] = min(best[telemetry], time.process_time() - t)
    finally:
        for writer in (upstream, to_client, w2, w4):
            writer.close()
        for writer in (upstream, to_client, w2, w4):
            await writer.wait_closed()
    return best[0] / streams * 1e6, best[1] / streams * 1e6


async def serve_upstream(port: int, gap: float) -> None:
    """The toy SSE upstream of ``--e2e``: any request gets the 200-chunk OpenAI stream."""
    framed = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in stream(_openai, usage=True)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and int(value):
                        await reader.readexactly(int(value))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for chunk in framed:
                    writer.write(chunk)
                    await asyncio.sleep(gap)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def e2e(streams: int, concurrency: int, gap_ms: float,
              telemetry: bool = False) -> dict[str, float]:
    """flipback's CPU µs per 200-chunk stream it forwards (see the module doc), with the
    route's ``llm.telemetry`` on or off."""
    import tempfile

    import aiohttp

    from loadtests.procs import ChildGroup, cpu_meter, free_port, wait_http, wait_port

    expected = len(b"".join(stream(_openai, usage=True)))
    up, port, admin = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp, ChildGroup() as children:
        cfg = Path(tmp) / "flipback.yaml"
        cfg.write_text(
            f'server: {{listen: "127.0.0.1:{port}"}}\nadmin: {{listen: "127.0.0.1:{admin}"}}\n'
            f'state: {{file: null}}\nupstreams:\n  llm: {{url: "http://127.0.0.1:{up}"}}\n'
            'routes:\n  - name: chat\n    match: {path_prefix: "/v1/"}\n    stable: llm\n'
            f'    llm: {{telemetry: {"true" if telemetry else "false"}}}\n')
        toy = children.start_python("upstream", [__file__, "--serve-upstream", str(up),
                                                 "--gap-ms", str(gap_ms)])
        await wait_port(up, child=toy)
        proxy = children.start_python("flipback", ["-m", "proxy", "run", "-c", str(cfg)])
        await wait_http(f"http://127.0.0.1:{admin}/readyz", child=proxy)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                async with session.post(url, data=body,
                                        headers={"content-type": "application/json"}) as resp:
                    got = 0
                    async for part in resp.content.iter_any():
                        got += len(part)
                    assert resp.status == 200 and got == expected, (resp.status, got)

            async def run(n: int) -> float:
                gate = asyncio.Semaphore(concurrency)

                async def gated() -> None:
                    async with gate:
                        await one()

                t = time.monotonic()
                await asyncio.gather(*(gated() for _ in range(n)))
                return time.monotonic() - t

            await run(concurrency * 2)  # warm-up: connections, caches
            best = float("inf")
            for _ in range(3):
                with cpu_meter([proxy.popen.pid]) as meter:
                    wall = await run(streams)
                best = min(best, meter["seconds"])
    return {"cpu_us_per_stream": best / streams * 1e6, "wall_s": wall,
            "streams_per_s": streams / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--relay-streams", type=int, default=100)
    parser.add_argument("--e2e", action="store_true", help="also measure a real flipback")
    parser.add_argument("--e2e-streams", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        uvloop.run(serve_upstream(args.serve_upstream, args.gap_ms / 1000))
        return 0
    print(f"CPython {platform.python_version()} on {platform.machine()}, "
          f"{platform.processor() or platform.platform()}; {CHUNKS}-chunk streams, "
          f"{args.streams} per repeat, best of 5")
    openai = stream(_openai, usage=True)
    rows: list[tuple[str, float, int]] = [
        ("python loop (list append per chunk)", per_stream_us(loop_run(openai), args.streams),
         CHUNKS),
        ("reader, OpenAI with usage", per_stream_us(reader_run(openai), args.streams), CHUNKS),
        ("reader, vLLM without usage",
         per_stream_us(reader_run(stream(_vllm, usage=False)), args.streams), CHUNKS),
        ("reader, llama.cpp order",
         per_stream_us(reader_run(stream(_llamacpp, usage=False)), args.streams), CHUNKS),
        ("reader, llama-cpp-python (spaced JSON)",
         per_stream_us(reader_run(stream(_spaced, usage=False)), args.streams), CHUNKS),
        ("reader, parse every event (OpenAI)",
         per_stream_us(reader_run(openai, _ParseEveryEvent), args.streams), CHUNKS),
        ("reader + window + metrics (OpenAI)", per_stream_us(full_run(openai), args.streams),
         CHUNKS),
    ]
    split = rechunk(openai)
    rows.append((f"reader, split at odd offsets ({len(split)} chunks)",
                 per_stream_us(reader_run(split), args.streams), len(split)))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as flipback runs
        off, on = runner.run(relay(openai, args.relay_streams))
    rows.append(("asyncio relay pipe, telemetry off", off, CHUNKS))
    rows.append(("asyncio relay pipe, reader fed in the relay", on, CHUNKS))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'':<{width}}  µs/stream  µs/chunk")
    for name, us, chunks in rows:
        print(f"{name:<{width}}  {us:9.1f}  {us / chunks:8.3f}")
    print(f"relay: telemetry adds {on - off:.1f} µs per stream ({(on - off) / off * 100:.1f}% of "
          "the whole pipe)")
    if args.e2e:
        # telemetry off and on, alternated twice: the best of each
        measured: dict[bool, float] = {False: float("inf"), True: float("inf")}
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for telemetry in (False, True, False, True):
                got = runner.run(e2e(args.e2e_streams, args.concurrency, args.gap_ms,
                                     telemetry))
                measured[telemetry] = min(measured[telemetry], got["cpu_us_per_stream"])
        off_us, on_us = measured[False], measured[True]
        print(f"flipback, llm.telemetry off / on: {off_us:.0f} / {on_us:.0f} µs CPU per "
              f"{CHUNKS}-chunk stream: telemetry adds {(on_us - off_us) / off_us * 100:.1f}%")
        per_stream = off_us
        full = dict((name, us) for name, us, _ in rows)["reader + window + metrics (OpenAI)"]
        print(f"flipback forwarding a {CHUNKS}-chunk stream: {per_stream:.0f} µs CPU per stream "
              f"({per_stream / CHUNKS:.2f} µs per chunk; {got['streams_per_s']:.0f} streams/s, "
              f"{args.concurrency} at a time, best of 3 x {args.e2e_streams})")
        print(f"reader + window + metrics would add {full:.0f} µs: "
              f"{full / per_stream * 100:.1f}% more CPU per stream")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
