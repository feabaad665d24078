"""Follow one OpenAI-style response as it streams to the client, without holding it back.

``ResponseReader`` is fed every body chunk with the time it arrived, after (or while) the
chunk is forwarded; it never changes or delays a byte. Two shapes are read:

* SSE (``text/event-stream``): ``chat.completion.chunk`` events (``choices[].delta``) and
  legacy ``text_completion`` ones (``choices[].text``), ``data: [DONE]``, error events.
  Chunks may split an event anywhere (mid-line, mid-UTF-8: only whole lines are looked at);
  lines end in ``\\n``, ``\\r\\n`` or ``\\r``. Time to first token is the first event whose
  delta carries text (``content``, ``reasoning_content``/``reasoning``, ``refusal``, tool
  call ``arguments``, or ``text``): not the first byte, which a server may send at once.
  The gaps between such events are the inter-token latencies. The token counts come from
  ``usage`` (a last chunk when the client asked ``stream_options.include_usage``); without
  it the completion is the number of content events, flagged ``estimated`` (servers send
  about one token per event).
* JSON (``application/json``): the body is buffered up to ``max_json`` and read at the end
  (``usage``, ``choices[].finish_reason``, ``error``). Nothing is streamed, so no TTFT.

Anything else (another content type, a compressed body, an over-long line or body) turns
the reader off for that response: ``end`` returns None.

Cost: the first content event of a stream is parsed with orjson; once one has been, and
it carried ``"finish_reason":null`` (written compactly, or spaced as Python's json.dumps
does) and the byte test reads it alike, later events that carry that same marker are
classified by two byte searches, without parsing: only events that can end the answer,
carry usage or report an error are parsed. A stream whose first content event holds
several choices (one could finish while another goes on) is always parsed. See
loadtests/llm_telemetry.py.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import orjson

from proxy.units import Bytes, Seconds

MAX_JSON: Bytes = 1024 * 1024  # a non-streamed completion bigger than this is not read
MAX_LINE: Bytes = 1024 * 1024  # an SSE line longer than this turns the reader off
FINISH_REASONS = ("stop", "length", "content_filter", "tool_calls", "error", "other")
# What servers write, mapped onto FINISH_REASONS; anything else is "other".
_FINISH = {
    "stop": "stop", "eos": "stop", "eos_token": "stop", "stop_sequence": "stop",
    "end_turn": "stop", "length": "length", "max_tokens": "length",
    "content_filter": "content_filter", "tool_calls": "tool_calls",
    "function_call": "tool_calls", "tool_use": "tool_calls", "error": "error",
    "abort": "error",
}
# A response with several choices reports the most telling of their reasons.
_RANK = {"stop": 0, "other": 1, "tool_calls": 2, "content_filter": 3, "length": 4, "error": 5}
# Seconds between two content events; tokens come every 5-100 ms, stalls show on the right.
INTER_TOKEN_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                      0.5, 1.0, 2.5, 5.0, 10.0)
_NO_GAPS = (0,) * (len(INTER_TOKEN_BOUNDS) + 1)
_OFF, _SSE, _JSON = 0, 1, 2

class _Style:
    """The byte patterns of one way of writing JSON: compact (``"k":v``, most servers) or
    spaced (``"k": v``, Python's json.dumps: llama-cpp-python). ``text`` is the key whose
    non-empty string value is a token (``content":"`` also ends ``"reasoning_content":"``),
    ``keys`` every such key: for chat, also tool call arguments, reasoning, refusal."""

    __slots__ = ("null_finish", "text", "keys")

    def __init__(self, sep: bytes, legacy: bool) -> None:
        self.null_finish = b'"finish_reason"' + sep + b"null"
        if legacy:
            self.text = b'"text"' + sep + b'"'
            self.keys: tuple[bytes, ...] = (self.text,)
        else:
            self.text = b'content"' + sep + b'"'
            self.keys = (self.text, *(b'"' + key + b'"' + sep + b'"'
                                      for key in (b"arguments", b"reasoning", b"refusal")))


_STYLES = {legacy: (_Style(b":", legacy), _Style(b": ", legacy)) for legacy in (False, True)}
_COMPACT = _STYLES[False][0]
_DELTA_TEXT = ("content", "reasoning_content", "reasoning", "refusal")

FirstToken = Callable[[Seconds], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """What one response showed. Times are seconds; token counts None when unknown.

    ``ttft`` is from ``start`` to the first content event (streams only);
    ``ttft_reported`` says it was already handed to ``on_first_token``.
    ``completion_tokens`` is ``usage.completion_tokens``, or with ``estimated`` the count
    of content events. ``tokens_per_second`` is the completion over the time it took
    (first token to end for a stream with at least two content events, whole request for
    JSON). ``inter_token`` counts the gaps between content events per
    ``INTER_TOKEN_BOUNDS`` bucket (last: above them); ``inter_token_sum`` is their sum.
    """

    streamed: bool
    ttft: Seconds | None
    ttft_reported: bool
    content_events: int
    prompt_tokens: int | None
    completion_tokens: int | None
    estimated: bool
    finish_reason: str | None
    tokens_per_second: float | None
    inter_token: tuple[int, ...]
    inter_token_sum: Seconds

    def as_json(self) -> dict[str, object]:
        """The figures a shadow diff record shows of each side (milliseconds)."""
        return {
            "ttft_ms": None if self.ttft is None else round(self.ttft * 1000.0, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "estimated": self.estimated,
            "finish_reason": self.finish_reason,
            "tokens_per_second": (None if self.tokens_per_second is None
                                  else round(self.tokens_per_second, 3)),
        }


class ResponseReader:
    """Telemetry of one response: ``feed(chunk, now)`` per body chunk, then ``end(now)``.

    ``start`` is when the request was sent upstream (the same clock as every ``now``).
    ``on_first_token(ttft)``, if given, is called once, from ``feed``, as soon as the
    first content event arrives: a window can judge TTFT then, not when the stream ends.
    """

    byte_test: ClassVar[bool] = True  # False: parse every event (tests, measurements)

    __slots__ = ("_start", "_mode", "_on_first", "_max", "_buf", "_tail", "_cr", "_pending",
                 "_error_event", "_first_at", "_last_at", "_events", "_gaps",
                 "_prompt", "_completion", "_finish", "_done", "_fast", "_quick", "_style",
                 "_legacy", "_armed")

    def __init__(self, *, start: float, content_type: str | None,
                 content_encoding: str | None = None,
                 on_first_token: FirstToken | None = None, max_json: Bytes = MAX_JSON) -> None:
        self._start = start
        self._mode = _mode_of(content_type, content_encoding)
        self._on_first = on_first_token
        self._max = max_json
        self._buf = bytearray()  # JSON body, or an SSE line split across chunks
        self._tail = False  # _buf holds the start of an SSE line
        self._cr = False  # the last chunk ended in \r (a \n may follow in the next one)
        self._pending: bytes | None = None  # data of the event being read
        self._error_event = False  # the event being read is "event: error"
        self._first_at: float | None = None
        self._last_at = 0.0
        self._events = 0
        self._gaps: list[int] | None = None
        self._prompt: int | None = None
        self._completion: int | None = None
        self._finish: str | None = None
        self._done = False
        self._fast = False  # later content events may be classified without parsing
        self._quick = False  # _fast, and at an event boundary with nothing pending
        self._style = _COMPACT  # how this stream writes its events (once _fast)
        self._legacy = False  # text_completion events (choices[].text)
        self._armed = on_first_token is not None and self._mode != _OFF

    @property
    def start(self) -> float:
        return self._start

    @property
    def awaits_first_token(self) -> bool:
        """``on_first_token`` is set, the body is readable and no token came yet: what a
        window counts as waiting (and, past a threshold, as a slow first token)."""
        return self._armed and self._first_at is None

    @property
    def active(self) -> bool:
        """False once the response is known not to be readable: feeding it costs nothing."""
        return self._mode != _OFF

    def feed(self, chunk: bytes, now: float) -> None:
        """One body chunk, as it was forwarded, and when it arrived."""
        # The usual chunk once the stream is known: exactly one plain content event, one
        # line and a blank one. (A bare \r inside such a chunk would be a line end too,
        # but a server mixing \r with \n\n in one stream is not worth a scan per chunk.)
        if (
            self._quick
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1] == 0x0A
            and chunk.startswith(b"data:")
            and chunk.rfind(self._style.null_finish) >= 0  # from the end: most put it there
        ):
            text = self._style.text
            i = chunk.rfind(text)
            # chunk[i + len(text)] exists: the chunk ends in a line break, the key does not
            if i >= 0 and chunk[i + len(text)] != 0x22 or _byte_text(chunk, self._style):
                self._events += 1
                gap = now - self._last_at
                self._gaps[bisect_left(INTER_TOKEN_BOUNDS, gap)] += 1  # type: ignore[index]
                self._last_at = now
            return
        if self._quick and chunk.endswith(b"\n\n") and self._plain_events(chunk, now):
            return
        mode = self._mode
        if mode == _SSE:
            self._feed_sse(chunk, now)
            self._quick = (self._fast and not self._tail and not self._cr
                           and self._pending is None and not self._error_event)
        elif mode == _JSON:
            if len(self._buf) + len(chunk) > self._max:
                self._off()
            else:
                self._buf += chunk

    def _plain_events(self, chunk: bytes, now: float) -> bool:
        """Several plain content events in one chunk (events a server wrote apart, read
        together): each one ``data:`` line and a blank line, with ``"finish_reason":null``
        as this stream writes it. Read as the one-event quick path reads one, without the
        line-by-line parser (a fifth of a fast stream's chunks, measured). False, having
        read nothing, for anything else."""
        parts = chunk[:-2].split(b"\n\n")
        null = self._style.null_finish
        for part in parts:
            if (not part.startswith(b"data:") or part.find(null) < 0 or b"\n" in part
                    or b"\r" in part):
                return False
        style = self._style
        for part in parts:
            if _byte_text(part, style):
                self._content(now)
        return True

    def end(self, now: float, *, broken: bool = False) -> Reading | None:
        """The response ended at ``now``; ``broken`` when it was cut (upstream reset or
        idle timeout; not when the client left: then drop the reader). None when there
        was nothing to read."""
        if self._mode == _JSON:
            return self._end_json(now, broken)
        if self._mode != _SSE:
            return None
        if self._tail:  # the stream ended without a final line break
            line, self._tail = bytes(self._buf), False
            self._buf.clear()
            self._line(line, now)
        if self._pending is not None:
            self._dispatch(now)
        finish = self._finish
        if finish is None and (broken or not self._done):
            finish = "error"
        estimated = self._completion is None
        completion = self._events if estimated else self._completion
        first = self._first_at
        rate = None
        if first is not None and self._events >= 2 and now > first and completion:
            rate = completion / (now - first)
        return Reading(
            streamed=True,
            ttft=None if first is None else first - self._start,
            ttft_reported=first is not None and self._on_first is not None,
            content_events=self._events,
            prompt_tokens=self._prompt,
            completion_tokens=completion,
            estimated=estimated,
            finish_reason=finish,
            tokens_per_second=rate,
            inter_token=_NO_GAPS if self._gaps is None else tuple(self._gaps),
            # the gaps telescope: their sum is the first to the last content event
            inter_token_sum=0.0 if first is None else self._last_at - first,
        )

    def _off(self) -> None:
        self._mode = _OFF
        self._quick = False
        self._buf = bytearray()
        self._pending = None

    def _feed_sse(self, chunk: bytes, now: float) -> None:
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":  # the \n of a \r\n split across chunks
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._tail:
            end = chunk.find(b"\n")
            if end < 0:  # still the same line
                self._buf += chunk
                if len(self._buf) > MAX_LINE:
                    self._off()
                return
            self._buf += chunk[:end]
            line = bytes(self._buf)
            self._buf.clear()
            self._tail = False
            if line:
                self._line(line, now)
            elif self._pending is not None:
                self._dispatch(now)
            chunk = chunk[end + 1:]
        lines = chunk.split(b"\n")
        last = lines.pop()  # b"" when the chunk ended a line
        for line in lines:
            if line:
                self._line(line, now)
            elif self._pending is not None:
                self._dispatch(now)
        if last:
            if len(last) > MAX_LINE:
                self._off()
                return
            self._buf += last
            self._tail = True

    def _line(self, line: bytes, now: float) -> None:
        """One field line of an event (SSE: ``data``, ``event``, comments...)."""
        if line.startswith(b"data:"):
            if self._pending is not None:
                # Several data lines make one payload, joined by \n (SSE); rare here.
                self._pending += b"\n" + _value(line)
                return
            if self._fast and not self._error_event and self._classify(line, now):
                return
            self._pending = line
        elif line.startswith(b"event:") and _value(line) == b"error":
            self._error_event = True

    def _classify(self, line: bytes, now: float) -> bool:
        """Read a plain content event without parsing it; False when it must be parsed."""
        has_text = _byte_text(line, self._style)
        if has_text is None:
            return False
        if has_text:
            self._content(now)
        return True

    def _dispatch(self, now: float) -> None:
        """The event is complete (a blank line, or the end of the stream)."""
        data = self._pending
        self._pending = None
        error, self._error_event = self._error_event, False
        if data is None:
            return
        if data.startswith(b"data:"):
            data = _value(data)
        if data == b"[DONE]":
            self._done = True
            return
        if error:
            self._reason("error")
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return  # not JSON: not ours to judge
        if isinstance(obj, dict) and self._object(obj):
            self._content(now)
            if not self._fast and self.byte_test:
                # Trust the byte test from now on only if it reads this very event alike,
                # and events carry one choice each (else one could finish unseen).
                choices = obj.get("choices")
                if isinstance(choices, list) and len(choices) == 1:
                    for style in _STYLES[self._legacy]:
                        if _byte_text(data, style) is True:
                            self._style, self._fast = style, True
                            break

    def _object(self, obj: dict[str, object]) -> bool:
        """Take usage, finish reasons and errors from one parsed chunk (or a whole JSON
        response); True when it carried text. Also learns the stream's text key."""
        if obj.get("error"):
            self._reason("error")
        text = False
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    text = text or _delta_has_text(delta)
                elif isinstance(choice.get("text"), str):
                    self._legacy = True
                    text = text or bool(choice["text"])
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    self._reason(_FINISH.get(reason, "other"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and not isinstance(prompt, bool):
                self._prompt = prompt
            if isinstance(completion, int) and not isinstance(completion, bool):
                self._completion = completion
        return text

    def _content(self, now: float) -> None:
        """A content event arrived at ``now``: first token, or one more gap."""
        self._events += 1
        if self._gaps is None:  # the first token
            self._first_at = now
            self._gaps = [0] * (len(INTER_TOKEN_BOUNDS) + 1)
            if self._on_first is not None:
                self._on_first(now - self._start)
        else:
            gap = now - self._last_at
            self._gaps[bisect_left(INTER_TOKEN_BOUNDS, gap)] += 1
        self._last_at = now

    def _reason(self, reason: str) -> None:
        if self._finish is None or _RANK[reason] > _RANK[self._finish]:
            self._finish = reason

    def _end_json(self, now: float, broken: bool) -> Reading | None:
        body, self._buf = bytes(self._buf), bytearray()
        self._mode = _OFF
        if broken:
            obj: object = None
        else:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(obj, dict):
                return None
            self._object(obj)
            if self._finish is None and not obj.get("choices"):
                return None  # JSON, but not a completion
        finish = "error" if broken else self._finish
        completion = self._completion
        took = now - self._start
        return Reading(
            streamed=False,
            ttft=None,
            ttft_reported=False,
            content_events=0,
            prompt_tokens=self._prompt,
            completion_tokens=completion,
            estimated=False,
            finish_reason=finish,
            tokens_per_second=completion / took if completion and took > 0 else None,
            inter_token=_NO_GAPS,
            inter_token_sum=0.0,
        )


def _mode_of(content_type: str | None, content_encoding: str | None) -> int:
    if content_encoding and content_encoding.strip().lower() not in ("identity", ""):
        return _OFF  # compressed: nothing to read without decoding it
    kind = (content_type or "").partition(";")[0].strip().lower()
    if kind == "text/event-stream":
        return _SSE
    if kind == "application/json" or kind.endswith("+json"):
        return _JSON
    return _OFF


def _value(line: bytes) -> bytes:
    """A field line's value: after the colon and one optional space."""
    _, _, value = line.partition(b":")
    return value[1:] if value[:1] == b" " else value


def _byte_text(line: bytes, style: _Style) -> bool | None:
    """Does an event with ``"finish_reason":null`` (as ``style`` writes it) carry text?
    None: not such an event (it may end the answer, carry usage or an error): parse it."""
    if line.find(style.null_finish) < 0:
        return None
    for key in style.keys:
        size = len(key)
        i = line.find(key)
        while i >= 0:
            if not line.startswith(b'"', i + size):  # a non-empty string value
                return True
            i = line.find(key, i + size)
    return False


def _delta_has_text(delta: dict[str, object]) -> bool:
    for key in _DELTA_TEXT:
        value = delta.get(key)
        if isinstance(value, str) and value:
            return True
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                args = function.get("arguments")
                if isinstance(args, str) and args:
                    return True
    return False
