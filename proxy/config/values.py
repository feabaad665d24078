"""Checks for the config's own value formats: addresses, URLs, names, headers, statuses.

Apart from ``config.schema`` so the schema tables stay readable; each ``parse_*``
takes a plain YAML value and returns the value or raises ``Invalid`` with a message
that reads well after ``path.to.field:``. The ``Conv``s walk nodes for list items.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

from yaml.nodes import Node

from proxy.config.model import NOTIFY_KINDS
from proxy.config.yamlnodes import (
    Conv,
    Invalid,
    NodeReader,
    as_str,
    choice,
    describe,
    line_of,
    list_of,
    percent,
    scalar,
    string,
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# No dots: names sit inside dotted paths (upstreams.NAME.timeout), URLs and metric labels.
NAME_HINT = "names use letters, digits, '-' and '_'"
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header and method names
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_STATUS_CLASS = re.compile(r"[1-5]xx", re.IGNORECASE)


class Url(NamedTuple):
    """An upstream URL split the way ``UpstreamConfig`` stores it."""

    text: str
    scheme: str
    host: str  # without IPv6 brackets
    port: int
    base_path: str  # no trailing slash; "" for none


def parse_listen(value: object) -> str:
    """``HOST:PORT``, with IPv6 hosts in brackets (``[::1]:8080``); port 0-65535."""
    address = value if isinstance(value, str) else ""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        expected = "expected HOST:PORT like '0.0.0.0:8080' or '[::1]:8080'"
        raise Invalid(f"{expected}, got {describe(value)}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise Invalid(f"{host[1:-1]!r} is not an IPv6 address") from None
    elif ":" in host:
        raise Invalid(f"an IPv6 host needs brackets, like '[::1]:8080', got {address!r}")
    elif not _HOST.fullmatch(host):
        raise Invalid(f"{host!r} is not a valid host name or address")
    if not port.isdigit() or int(port) > 65535:
        raise Invalid(f"the port must be a number 0-65535, got {port!r}")
    return address


def parse_url(value: object) -> Url:
    """An ``http://`` or ``https://`` URL with a host and no query, fragment or userinfo."""
    text = as_str(value)
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise Invalid(f"expected an http:// or https:// URL, got {text!r}")
    if "?" in text or "#" in text:
        raise Invalid(f"takes no query or fragment, got {text!r}")
    if "@" in parts.netloc:
        # Credentials in a URL end up in logs; an auth header does not.
        raise Invalid("credentials do not belong in the URL; use the upstream's headers")
    if any(ch.isspace() for ch in text):
        raise Invalid(f"contains white space: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise Invalid(f"invalid port in {text!r}") from None
    if not parts.hostname:
        raise Invalid(f"has no host: {text!r}")
    scheme = parts.scheme.lower()
    default = 443 if scheme == "https" else 80
    return Url(text, scheme, parts.hostname, default if port is None else port,
               parts.path.rstrip("/"))  # fmt: skip


def parse_redis_url(value: object) -> str:
    """``redis://[:password@]host[:port][/db]``, ``rediss://...`` or ``unix:///path?db=N``,
    checked as far as the client will read it, so a bad one is refused here and not at
    start-up."""
    text = as_str(value)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix") or any(ch.isspace() for ch in text):
        raise Invalid(f"expected a redis://, rediss:// or unix:// URL, got {text!r}")
    if scheme == "unix":
        if not parts.path:
            raise Invalid(f"has no socket path: {text!r}")
    else:
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise Invalid(f"invalid port in {text!r}") from None
        if not parts.hostname:
            raise Invalid(f"has no host: {text!r}")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise Invalid(f"the path is the database number, got {db!r} in {text!r}")
    for name, _, given in (q.partition("=") for q in parts.query.split("&") if q):
        if name == "db" and not given.isdigit():
            raise Invalid(f"db must be a number, got {given!r} in {text!r}")
    return text


def parse_status(value: object) -> frozenset[int]:
    """``"5xx"`` -> 500..599; ``429`` or ``"429"`` -> {429}."""
    if isinstance(value, str) and _STATUS_CLASS.fullmatch(value):
        first = int(value[0]) * 100
        return frozenset(range(first, first + 100))
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected a status like 503, '503' or '5xx', got {describe(value)}")
    if not 100 <= value <= 599:
        raise Invalid(f"a status must be 100-599, got {value}")
    return frozenset({value})


def version_label(value: object) -> str:
    """An upstream's model version: a short printable string (it goes into a response
    header and a metric label). Numbers are taken as written (``version: 3``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Invalid(f"expected a version string, got {describe(value)}")
    text = str(value)
    if not text or len(text) > 128 or not text.isprintable() or not text.isascii():
        raise Invalid(f"expected 1-128 printable ASCII characters, got {describe(value)}")
    return text


# Dotted: keys and list indexes (-1 the last), no empty part, no white space.
JSON_PATH = re.compile(r"[^.\s]+(\.[^.\s]+)*")
json_path = string(pattern=JSON_PATH, hint="expected a dotted path like 'predictions.0' "
                   "or 'choices.0.message.content'")


def fraction(value: object) -> float:
    """A number from 0 to 1 (an accuracy)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise Invalid(f"expected a number from 0 to 1, got {describe(value)}")
    return float(value)


def alpha(value: object) -> float:
    """A false-rollback bound: a probability above 0, at most 0.5."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 0.5:
        raise Invalid(f"expected a probability above 0 and at most 0.5 (like 0.01), "
                      f"got {describe(value)}")
    return float(value)


def retry_policy(value: object) -> bool | str:
    """``retry_canary_on_stable``: true, false, or ``unsent`` (only what never left)."""
    if isinstance(value, bool) or value == "unsent":
        return value
    raise Invalid(f"expected true, false or 'unsent', got {describe(value)}")


def id_generator(value: object) -> str:
    """``request_id.generate``: uuid4, hex32 or off (YAML reads a bare ``off`` as false)."""
    if value is False:
        return "off"
    if value in ("uuid4", "hex32", "off"):
        return str(value)
    raise Invalid(f"must be one of: uuid4, hex32, off; got {describe(value)}")


def _header_value(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise Invalid(f"expected a string, got {describe(value)} (quote it: '{describe(value)}')")
    text = as_str(value)
    if any(ch in text for ch in "\r\n\0"):
        raise Invalid("a header value cannot contain line breaks or NUL")
    return text


def _token(value: object, what: str) -> str:
    token = as_str(value)
    if not TOKEN.fullmatch(token):
        raise Invalid(f"expected {what}, got {token!r}")
    return token


name = string(pattern=NAME, hint=NAME_HINT)
header_name = string(pattern=TOKEN, hint="expected a header name", lower=True)
method = scalar(lambda v: _token(v, "an HTTP method").upper())
path_prefix = string(pattern=re.compile(r"/\S*"), hint="expected a path starting with '/'")


def header_map(*, lower: bool) -> Conv:
    """``{name: value}`` -> pairs; names are tokens, lower-cased where matched on."""

    def conv(reader: NodeReader, node: Node, path: str) -> tuple[tuple[str, str], ...]:
        pairs: dict[str, str] = {}
        for key, knode, vnode in reader.entries(node, path):
            hpath = f"{path}.{key}"
            if not TOKEN.fullmatch(key):
                reader.error(line_of(knode), hpath, "not a valid header name")
                continue
            if key.lower() in (k.lower() for k in pairs):
                reader.error(line_of(knode), hpath, "header given twice (names ignore case)")
                continue
            value = reader.read(vnode, hpath, scalar(_header_value))
            if isinstance(value, str):
                pairs[key.lower() if lower else key] = value
        return tuple(pairs.items())

    return conv


def progressive_steps(reader: NodeReader, node: Node, path: str) -> tuple[float, ...]:
    """Percents that strictly increase and end at 100."""
    steps: tuple[float, ...] = list_of(percent(), min_items=1)(reader, node, path)
    items = reader.items(node)
    for i in range(1, len(steps)):
        if steps[i] <= steps[i - 1]:
            message = f"steps must increase, got {steps[i]:g} after {steps[i - 1]:g}"
            reader.error(line_of(items[i]), f"{path}[{i}]", message)
    if steps[-1] != 100:
        message = f"the last step must be 100, got {steps[-1]:g}"
        reader.error(line_of(items[-1]), f"{path}[{len(steps) - 1}]", message)
    return steps


def notify_kinds(reader: NodeReader, node: Node, path: str) -> tuple[str, ...]:
    kinds: tuple[str, ...] = list_of(choice(*NOTIFY_KINDS))(reader, node, path)
    return tuple(dict.fromkeys(kinds))


def failure_statuses(reader: NodeReader, node: Node, path: str) -> frozenset[int]:
    sets: tuple[frozenset[int], ...] = list_of(scalar(parse_status))(reader, node, path)
    return frozenset().union(*sets)
