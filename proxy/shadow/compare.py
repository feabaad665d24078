"""Comparing a shadow response with the primary one (SPEC §6): pure functions, no I/O.

A body is read as one JSON document. A streamed body (SSE) is folded into one: its
``data:`` payloads are parsed as JSON and merged in order, later non-null values winning,
except the text fields of LLM chunk streams (``CONCAT_KEYS``), which are concatenated, and
lists of objects carrying an integer ``index`` (OpenAI ``choices``), which merge by that
index. So for an OpenAI chat stream ``choices.0.finish_reason`` is the final chunk's
finish reason and ``choices.0.delta.content`` is the whole generated text.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.config.model import CompareConfig


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
    lines = _LINES.split(body)
    lines.pop()  # after the last line break: an unterminated line is incomplete
    for line in lines:
        if not line:
            if data:
                events.append(b"\n".join(data).decode("utf-8", "replace"))
                data = []
            continue
        name, _, value = line.partition(b":")
        if name == b"data":  # a bare "data" line is data too, empty
            data.append(value[1:] if value.startswith(b" ") else value)
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
            old[k] = _merge(old[k], v, k) if k in old else v
        return old
    if isinstance(old, list) and isinstance(new, list):
        return _merge_list(old, new)
    if new is None:
        return old
    if key in CONCAT_KEYS and isinstance(old, str) and isinstance(new, str):
        return old + new
    return new


def _indexed(items: list[Any]) -> bool:
    return all(
        isinstance(x, dict) and type(x.get("index")) is int and 0 <= x["index"] < 1024
        for x in items
    )


def _merge_list(old: list[Any], new: list[Any]) -> list[Any]:
    if new and _indexed(new) and _indexed([x for x in old if x is not None]):
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


@dataclass(frozen=True, slots=True, kw_only=True)
class PathDiff:
    """One JSON path whose values differ."""

    path: str
    primary: Any  # MISSING when absent
    shadow: Any

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        missing = []
        for side, value in (("primary", self.primary), ("shadow", self.shadow)):
            if value is MISSING:
                missing.append(side)
                value = None
            out[side] = value
        if missing:
            out["missing"] = missing
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What a comparison found; ``paths_compared`` is False when a body was not complete
    within ``inspect_body`` (then only status and latency are judged)."""

    status_differs: bool
    paths: tuple[PathDiff, ...]
    paths_compared: bool

    @property
    def kinds(self) -> list[str]:
        """Mismatch kinds, as the ``flipback_shadow_mismatch_total`` labels."""
        return (["status"] if self.status_differs else []) + (["body"] if self.paths else [])


def compare(
    cfg: CompareConfig,
    *,
    primary_status: int,
    shadow_status: int,
    primary_body: bytes | None,
    shadow_body: bytes | None,
) -> Verdict:
    """Judge one exchange. A body is None when it was not kept whole (over the cap)."""
    differs = cfg.status and primary_status != shadow_status
    if not cfg.json_paths or primary_body is None or shadow_body is None:
        return _NOT_COMPARED[differs]
    primary_body, shadow_body = decoded(primary_body), decoded(shadow_body)
    if primary_body is None or shadow_body is None:  # compressed past reading: no verdict
        return _NOT_COMPARED[differs]
    p_doc, s_doc = document(primary_body), document(shadow_body)
    diffs = []
    for path in cfg.json_paths:
        parts = split_path(path)
        p, s = lookup(p_doc, parts), lookup(s_doc, parts)
        try:
            agree = same(p, s)
        except RecursionError:
            agree = False
        if not agree:
            diffs.append(PathDiff(path=path, primary=p, shadow=s))
    if not diffs:
        return _PATHS_AGREE[differs]
    return Verdict(status_differs=differs, paths=tuple(diffs), paths_compared=True)


# The common verdicts, built once (a frozen dataclass costs a microsecond to build).
_NOT_COMPARED = {d: Verdict(status_differs=d, paths=(), paths_compared=False)
                 for d in (False, True)}
_PATHS_AGREE = {d: Verdict(status_differs=d, paths=(), paths_compared=True)
                for d in (False, True)}
