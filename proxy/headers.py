"""Header rewriting at the proxy boundary (SPEC §4): hop-by-hop removal, x-forwarded-*,
request ids, names with underscores. Works on raw ``(bytes, bytes)`` pairs, the form both
sides already have."""

from __future__ import annotations

import random
from collections.abc import Callable

from proxy.config.model import ServerConfig
from proxy.errors import ClientRequestError

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

X_FORWARDED_FOR = b"x-forwarded-for"
_getrandbits = random.getrandbits
# UUID version 4 and RFC 9562 variant bits, on a 128-bit random number.
_UUID4_CLEAR = ~((0xF << 76) | (0xC << 60))
_UUID4_SET = (0x4 << 76) | (0x8 << 60)


def uuid4_id() -> str:
    """A UUID4 string, as Envoy generates: model servers that validate request ids (FastAPI
    with starlette-context, a common setup) reject anything else with 400. Built from
    ``getrandbits`` (not ``uuid.uuid4``'s os.urandom): ids need uniqueness, not secrecy."""
    h = f"{(_getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def hex32_id() -> str:
    """32 hex digits, the form of NGINX's ``$request_id``."""
    return f"{_getrandbits(128):032x}"


def _no_id() -> str:
    return ""


ID_GENERATORS: dict[str, Callable[[], str]] = {"uuid4": uuid4_id, "hex32": hex32_id,
                                                 "off": _no_id}


def _connection_listed(headers: tuple[tuple[bytes, bytes], ...] | RawHeaders) -> frozenset[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


class RequestHeaders:
    """Client headers -> headers for the upstream request, under the ``server`` settings
    (request id header and generator, names with underscores), hoisted once per config."""

    __slots__ = ("id_name", "new_id", "_id_raw", "_id_out", "_underscores")

    def __init__(self, server: ServerConfig) -> None:
        self.id_name = server.request_id.header
        self.new_id = ID_GENERATORS[server.request_id.generate]
        self._id_raw = self.id_name.encode()
        self._id_out = b"-".join(p.capitalize() for p in self._id_raw.split(b"-"))
        self._underscores = server.headers_with_underscores

    def upstream(
        self,
        raw: tuple[tuple[bytes, bytes], ...] | RawHeaders,
        *,
        client_ip: str,
        proto: bytes,
        request_id: str,
    ) -> RawHeaders:
        """Names a client lists in ``Connection`` are dropped, but only from what the client
        sent: the x-forwarded-* and request id values the proxy adds are appended after the
        filter, so ``Connection: x-forwarded-for`` cannot strip them.

        A name with ``_`` is dropped (``drop``, NGINX's and gunicorn's default), refused
        with 400 (``reject``, Envoy's edge advice) or passed (``allow``): a WSGI/CGI server
        reads ``X_Forwarded_For`` as ``X-Forwarded-For``, a spoofing path past this filter.
        """
        out: RawHeaders = []
        listed: frozenset[bytes] = frozenset()
        host = b""
        xff = b""
        id_raw = self._id_raw
        underscores = self._underscores
        for name, _ in raw:
            if len(name) == 10 and name.lower() == b"connection":
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
            if lname == id_raw:
                continue
            if b"_" in name and underscores != "allow":
                if underscores == "reject":
                    raise ClientRequestError(
                        400, f"header name with an underscore: "
                        f"{name.decode('latin-1')!r}", reason="header_underscore")
                continue
            out.append((name, value))
        ip = client_ip.encode()
        out.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
        out.append((b"X-Forwarded-Proto", proto))
        if host:
            out.append((b"X-Forwarded-Host", host))
        if request_id:
            out.append((self._id_out, request_id.encode("utf-8", "surrogateescape")))
        return out


# The headers flipback sets on every answer itself: an upstream's own (a server echoing
# the request id, a flipback behind flipback) would give the client two of each.
OWN_DOWN = frozenset({b"x-flipback-upstream", b"x-flipback-version",
                      b"x-flipback-retried-from"})


def not_forwarded_down(id_header: bytes | None) -> frozenset[bytes]:
    """The response headers ``downstream_head`` drops: hop-by-hop, flipback's own, and
    the request id header when flipback sets it (``id_header``)."""
    return _NOT_FORWARDED_DOWN | OWN_DOWN | ({id_header.lower()} if id_header else set())


def downstream_head(raw: list[tuple[bytes, bytes]],
                    dropped: frozenset[bytes] = _NOT_FORWARDED_DOWN) -> bytes:
    """Upstream response headers -> the client's header lines (hop-by-hop and ``dropped``
    removed), as bytes: llhttp already refused CR and LF in them, so they pass as they
    came."""
    listed: frozenset[bytes] = frozenset()
    for name, _ in raw:
        if len(name) == 10 and name.lower() == b"connection":
            listed = _connection_listed(raw)
            break
    out: list[bytes] = []
    for name, value in raw:
        lname = name.lower()
        if lname in dropped or lname in listed:
            continue
        out += (name, b": ", value, b"\r\n")
    return b"".join(out)
