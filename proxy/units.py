"""Parse the config's human units: durations, sizes and percentages.

Units live in the type aliases so every field says what it holds; the parsers raise
``ValueError`` with a message fit to follow ``path.to.field:`` in a config error.
"""

from __future__ import annotations

import re

Seconds = float
Bytes = int
Percent = float

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_FACTORS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> Seconds:
    """``"250ms"``, ``"10s"``, ``"1m"``, ``"1h"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '250ms' or '10s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(
                    f"expected a duration like '250ms', '10s', '1m' or '1h', got {value!r}"
                ) from None
        else:
            seconds = float(m.group(1)) * _DURATION_FACTORS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like '250ms' or '10s', got {value!r}")
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"a duration must be 0 or more, got {value!r}")
    return seconds


def parse_size(value: object) -> Bytes:
    """``"64KiB"``, ``"10MiB"`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '64KiB' or '10MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(f"expected a size like '64KiB', '10MiB' or bytes, got {value!r}")
        size = int(float(m.group(1)) * _SIZE_FACTORS[m.group(2)])
    else:
        raise ValueError(f"expected a size like '64KiB' or '10MiB', got {value!r}")
    if size < 0:
        raise ValueError(f"a size must be 0 or more, got {value!r}")
    return size


def parse_percent(value: object) -> Percent:
    """A percentage 0-100, decimals allowed (``0.1``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a percentage 0-100, got {value!r}")
    try:
        pct = float(str(value).rstrip("%")) if isinstance(value, str) else float(value)
    except ValueError:
        raise ValueError(f"expected a percentage 0-100, got {value!r}") from None
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"must be between 0 and 100, got {value!r}")
    return pct


def format_duration(seconds: Seconds) -> str:
    """Short human form for summaries: ``250ms``, ``10s``, ``1m``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    if seconds < 3600 or seconds % 3600:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"


def format_size(size: Bytes) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
