from __future__ import annotations

import pytest

from proxy.units import format_duration, format_size, parse_duration, parse_percent, parse_size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        ("30", 30.0),
        (5, 5.0),
        (0.1, 0.1),
        (0, 0.0),
    ],
)
def test_parse_duration_reads_units_and_plain_seconds(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10 sec", "1d", "", "ms", True, None, [1]])
def test_parse_duration_rejects_malformed(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, "-5"])
def test_parse_duration_rejects_negative(value: object) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("1KB", 1000),
        ("2MB", 2_000_000),
        ("512B", 512),
        ("512", 512),
        (4096, 4096),
        (8.0, 8),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size_reads_units_and_bytes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["10 mb", "lots", 1.5, True, None, "-1"])
def test_parse_size_rejects_malformed(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)


def test_parse_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        parse_size(-1)


@pytest.mark.parametrize(
    ("value", "pct"), [(0, 0.0), (100, 100.0), (0.1, 0.1), ("5", 5.0), ("2.5%", 2.5)]
)
def test_parse_percent_reads_numbers_and_percent_strings(value: object, pct: float) -> None:
    assert parse_percent(value) == pct


@pytest.mark.parametrize("value", [-0.1, 100.5, "101%"])
def test_parse_percent_rejects_out_of_range(value: object) -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        parse_percent(value)


@pytest.mark.parametrize("value", [True, None, "ten", [5]])
def test_parse_percent_rejects_non_numbers(value: object) -> None:
    with pytest.raises(ValueError, match="expected a percentage"):
        parse_percent(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (0.0, "0ms"), (10.0, "10s"), (90.0, "90s"), (60.0, "1m"), (7200.0, "2h")],
)
def test_format_duration_picks_short_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"), [(1024, "1KiB"), (10 * 1024**2, "10MiB"), (1024**3, "1GiB"), (1500, "1500B")]
)
def test_format_size_picks_exact_binary_unit(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("text", ["250ms", "10s", "1m", "1h"])
def test_format_duration_round_trips_through_parse(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
