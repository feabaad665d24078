"""Reading a model server's answer (shadow compare, the quality guards): pure, no I/O.

A body is read as one JSON document. A streamed body (SSE) is folded into one: its
``data:`` payloads are parsed as JSON and merged in order, later non-null values winning,
except the text fields of LLM chunk streams (``CONCAT_KEYS``), which are concatenated, and
lists of objects carrying an integer ``index`` (OpenAI ``choices``), which merge by that
index. So for an OpenAI chat stream ``choices.0.finish_reason`` is the final chunk's
finish reason and ``choices.0.delta.content`` is the whole generated text. A gzip or zlib
body is inflated first (``decoded``). ``value_at`` does all of it for one path.
"""

from __future__ import annotations

import functools
import re
import zlib
from typing import Any, Final

import orjson


class _Missing:
    """A path that leads nowhere (absent key, index out of range, body not JSON)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
CONCAT_KEYS = frozenset({"content", "text", "arguments", "refusal", "reasoning_content"})
SSE_DONE = "[DONE]"
_SSE_START = (b"data:", b"event:", b"id:", b"retry:", b":")
_LINES = re.compile(rb"\r\n|\r|\n")
_JSON_START = frozenset((b"{", b"["))


def is_sse(body: bytes) -> bool:
    """Whether ``body`` looks like an event stream rather than a JSON document."""
    return body[:64].lstrip().startswith(_SSE_START)  # not a copy of a 1 MiB body


def sse_data(body: bytes) -> list[str]:
    """The ``data`` of each complete event, multi-line data joined by newlines (WHATWG
    rules: one space after the colon is dropped; an event ends at a blank line, so a
    trailing event without one is incomplete and left out)."""
    events: list[str] = []
    data: list[bytes] = []
    # Most servers end lines with \n alone: a plain split is several times the regex's speed.
    lines = body.split(b"\n") if b"\r" not in body else _LINES.split(body)
    lines.pop()  # after the last line break: an unterminated line is incomplete
    for line in lines:
        if not line:
            if data:
                events.append(b"\n".join(data).decode("utf-8", "replace"))
                data = []
        elif line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line == b"data":  # a bare "data" line is data too, empty
            data.append(b"")
    return events


def fold(payloads: list[str]) -> Any:
    """One document from the JSON payloads of a stream (see the module docstring);
    MISSING when none is a JSON object."""
    doc: Any = MISSING
    for payload in payloads:
        if payload == SSE_DONE:
            continue
        try:
            item = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(item, dict):
            doc = item if doc is MISSING else _merge(doc, item, None)
    return doc


def _merge(old: Any, new: Any, key: str | None) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        for k, v in new.items():
            if k not in old:
                old[k] = v
                continue
            kind = type(v)
            # What _merge would do, without the call, for the scalars that fill a chunk.
            if v is None:
                continue
            if kind is str:
                before = old[k]
                old[k] = before + v if k in CONCAT_KEYS and type(before) is str else v
            elif kind is int or kind is float or kind is bool:
                old[k] = v
            else:
                old[k] = _merge(old[k], v, k)
        return old
    if isinstance(old, list) and isinstance(new, list):
        return _merge_list(old, new)
    if new is None:
        return old
    if key in CONCAT_KEYS and isinstance(old, str) and isinstance(new, str):
        return old + new
    return new


def _indexed(items: list[Any], holes: bool = False) -> bool:
    """Whether every item is an object with an ``index`` 0-1023 (``holes``: None items,
    the gaps a merge by index leaves, are skipped). A loop: this runs once per chunk."""
    for x in items:
        if x is None and holes:
            continue
        if not isinstance(x, dict):
            return False
        i = x.get("index")
        if type(i) is not int or not 0 <= i < 1024:
            return False
    return True


def _merge_list(old: list[Any], new: list[Any]) -> list[Any]:
    if new and _indexed(new) and _indexed(old, holes=True):
        for item in new:  # OpenAI chunks: choice ``index`` n may sit at list position 0
            at = item["index"]
            while len(old) <= at:
                old.append(None)
            old[at] = item if old[at] is None else _merge(old[at], item, None)
        return old
    for i, item in enumerate(new):
        if i < len(old):
            old[i] = _merge(old[i], item, None)
        else:
            old.append(item)
    return old


# Most decoded bytes read from a compressed body (it was kept capped; so is this).
DECODED_MAX = 16 * 1024 * 1024


def decoded(body: bytes) -> bytes | None:
    """A gzip or zlib body decompressed (sniffed by its magic bytes: a JSON or SSE body
    never starts with them), capped at ``DECODED_MAX``; the body itself when it is not
    compressed; None when it is compressed but cannot be read (cut by the cap, damaged).
    A model server may compress its answer (MLServer gzips answers over 500 bytes for a
    client that accepts it): both sides must be read as JSON alike."""
    head = body[:2]
    if head != b"\x1f\x8b" and not (len(head) == 2 and head[0] == 0x78
                                     and (head[0] * 256 + head[1]) % 31 == 0):
        return body
    try:
        inflater = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header
        out = inflater.decompress(body, DECODED_MAX)
    except zlib.error:
        return None
    return out if inflater.eof else None


def document(body: bytes) -> Any:
    """The JSON document of a response body (a folded stream for SSE), or MISSING."""
    try:
        if body[:1] in _JSON_START:  # the common case, without is_sse's copy
            return orjson.loads(body)
        if is_sse(body):
            return fold(sse_data(body))
        return orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):  # not JSON, or nested past reason
        return MISSING


def lookup(doc: Any, path: str | tuple[str, ...]) -> Any:
    """The value at a dotted ``path`` (``choices.0.finish_reason``; ``-1`` is the last
    item of a list), or MISSING. ``path`` may come split already (``split_path``)."""
    node = doc
    for part in (path.split(".") if isinstance(path, str) else path):
        if isinstance(node, dict):
            node = node.get(part, MISSING)
        elif isinstance(node, list):
            try:
                i = int(part)
            except ValueError:
                return MISSING
            if not -len(node) <= i < len(node):
                return MISSING
            node = node[i]
        else:
            return MISSING
        if node is MISSING:
            return MISSING
    return node


def same(a: Any, b: Any) -> bool:
    """JSON equality: like ``==`` but ``true`` is not ``1`` (1 and 1.0 are equal)."""
    kind = type(a)
    if kind is type(b) and (kind is str or kind is int or kind is float):
        return bool(a == b)  # the common case: two strings or two numbers
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@functools.cache
def split_path(path: str) -> tuple[str, ...]:
    """A dotted path's parts, split once per path (the config's paths are few)."""
    return tuple(path.split("."))


def value_at(body: bytes | None, path: str | tuple[str, ...]) -> Any:
    """The value at ``path`` in a whole answer body (JSON, SSE, possibly compressed), or
    MISSING when the body is absent, unreadable or has nothing there."""
    if body is None:
        return MISSING
    plain = decoded(body)
    if plain is None:
        return MISSING
    return lookup(document(plain), split_path(path) if isinstance(path, str) else path)


class Capped:
    """The first ``cap`` bytes of a body as it streams, and whether more came (the shadow
    keeps both sides of a pair; the quality guards keep the answers they read)."""

    __slots__ = ("parts", "room", "truncated")

    def __init__(self, cap: int) -> None:
        self.parts: list[bytes] = []
        self.room = cap
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.room
        if len(chunk) <= room:
            self.parts.append(chunk)
            self.room = room - len(chunk)
        elif not self.truncated:
            self.truncated = True
            if room > 0:
                self.parts.append(chunk[:room])
            self.room = 0

    def take(self) -> bytes:
        parts, self.parts = self.parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def stop(self) -> None:
        """Keep nothing more (the other side failed)."""
        self.parts = []
        self.room = 0


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a raw response header, by its lower-case name."""
    size = len(name)
    for key, value in headers:
        if len(key) == size and key.lower() == name:
            return value.decode("latin-1")
    return None
