"""Sticky-session keys (SPEC §5): which conversation a request belongs to, and the
replica-independent bucket a new conversation falls into.

The bucket comes from blake2b, never ``hash()`` (randomised per process), so every
replica assigns a new key alike even without shared state.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import blake2b

import orjson

from proxy.config.model import StickyConfig

BUCKETS = 10_000


def key_hash(key: str, person: bytes = b"") -> int:
    """64-bit stable hash of a session key, the one session hash of flipback: the pin
    table's key and the canary bucket's source, and (with the shadow's own ``person``
    salt) the shadow's session sample, independent of the canary split. Hashed as the
    bytes the client sent: aiohttp decodes header values with surrogateescape, so a key
    that is not UTF-8 round-trips instead of raising."""
    raw = key.encode("utf-8", "surrogateescape")
    return int.from_bytes(blake2b(raw, digest_size=8, person=person).digest(), "big")


def bucket(hashed: int) -> int:
    """0..9999; a new session goes to canary iff bucket < weight x 100."""
    return hashed % BUCKETS


def cookie_value(header: str, name: str) -> str | None:
    """One cookie's value from a ``Cookie`` header, without parsing the rest."""
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"') or None
    return None


def json_field(body: bytes, field: str) -> str | None:
    """A top-level string or number field of a JSON object body (OpenAI's ``user``)."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get(field)
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def session_key(cfg: StickyConfig, headers: Mapping[str, str], body: bytes | None) -> str | None:
    """The first found of: ``header``, ``cookie``, ``json_field`` (SPEC order; the
    override header is handled by the caller, it names an upstream, not a session)."""
    if cfg.header is not None:
        value = headers.get(cfg.header)
        if value:
            return value
    if cfg.cookie is not None:
        raw = headers.get("cookie")
        if raw:
            value = cookie_value(raw, cfg.cookie)
            if value:
                return value
    if cfg.json_field is not None and body:
        value = json_field(body, cfg.json_field)
        if value:
            return value
    return None
