"""Header rewriting at the proxy boundary (SPEC §4): hop-by-hop removal, x-forwarded-*,
request ids. Works on raw ``(bytes, bytes)`` pairs, the form both sides already have."""

from __future__ import annotations

import random

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 hop-by-hop names, plus the framing and Host headers that the upstream
# pool writes itself, and Expect (the proxy answers 100-continue to the client itself).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {b"content-length"}
# Headers the proxy sets itself: a client's copy is replaced, never merged.
_PROXY_SET_UP = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-flipback-shadow"})

X_REQUEST_ID = b"x-request-id"
X_FORWARDED_FOR = b"x-forwarded-for"
_getrandbits = random.getrandbits


def new_request_id() -> str:
    """16 hex digits: unique enough to correlate logs, cheap enough for every request."""
    return f"{_getrandbits(64):016x}"


def _connection_listed(headers: tuple[tuple[bytes, bytes], ...] | RawHeaders) -> frozenset[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def upstream_headers(
    raw: tuple[tuple[bytes, bytes], ...],
    *,
    client_ip: str,
    proto: bytes,
    request_id: bytes,
) -> RawHeaders:
    """Client headers -> headers for the upstream request.

    Names a client lists in ``Connection`` are dropped, but only from what the client
    sent: the x-forwarded-* and x-request-id values the proxy adds are appended after the
    filter, so ``Connection: x-forwarded-for`` cannot strip them.
    """
    out: RawHeaders = []
    listed: frozenset[bytes] = frozenset()
    host = b""
    xff = b""
    for name, _ in raw:
        if name.lower() == b"connection":
            listed = _connection_listed(raw)
            break
    for name, value in raw:
        lname = name.lower()
        if lname in _NOT_FORWARDED_UP or lname in listed or lname in _PROXY_SET_UP:
            if lname == b"host":
                host = value
            continue
        if lname == X_FORWARDED_FOR:
            xff = value if not xff else xff + b", " + value
            continue
        if lname == X_REQUEST_ID:
            continue
        out.append((name, value))
    ip = client_ip.encode()
    out.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    out.append((b"X-Forwarded-Proto", proto))
    if host:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Request-Id", request_id))
    return out


def downstream_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Upstream response headers -> headers for the client (hop-by-hop removed)."""
    listed: frozenset[bytes] = frozenset()
    for name, _ in raw:
        if name.lower() == b"connection":
            listed = _connection_listed(raw)
            break
    out: list[tuple[str, str]] = []
    for name, value in raw:
        lname = name.lower()
        if lname in _NOT_FORWARDED_DOWN or lname in listed:
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    return out
