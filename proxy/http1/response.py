"""Response bytes: status lines, header blocks and the whole answers the proxy makes
itself. Pure byte building; the connection (``protocol``) decides framing and keep-alive
and does the writing, so a head and a small body leave in one ``transport.write``."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

import orjson

from proxy.units import format_size

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"  # said only to HTTP/1.0 clients that asked
JSON = "application/json"

_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in HTTPStatus}
_PHRASES = {int(s): s.phrase for s in HTTPStatus}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A whole response the proxy makes itself (errors, the kill switch's answer)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def status_line(status: int, reason: str = "") -> bytes:
    """``HTTP/1.1 <status> <reason>``; the standard phrase unless the upstream gave
    another (its own reason passes through, as it came)."""
    if not reason or reason == _PHRASES.get(status):
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
    return b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace"))


def header_lines(pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bytes:
    """``name: value`` lines; a CR, LF or NUL in either refuses the header (ValueError)
    rather than letting it split the response."""
    out = []
    for name, value in pairs:
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line or "\0" in line:
            raise ValueError(f"invalid response header {name!r}: control character")
        out.append(line.encode("latin-1") + b"\r\n")
    return b"".join(out)


def json_error(status: int, message: str, request_id: str,
               id_header: str = "x-request-id") -> Reply:
    """Errors the proxy makes itself (SPEC §4)."""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON),)
    if request_id:
        headers += ((id_header, request_id),)
    return Reply(status=status, headers=headers,
                 body=orjson.dumps({"error": message, "request_id": request_id}))


def raw_error(status: int, message: str) -> bytes:
    """A whole JSON error answer that closes the connection, for a request that never got
    far enough for the handler (malformed, header block too large)."""
    body = orjson.dumps({"error": message, "request_id": ""})
    return (status_line(status) + b"Content-Type: application/json\r\n" + CLOSE
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def header_431(limit: int) -> bytes:
    return raw_error(431, f"request headers over {format_size(limit)}")
