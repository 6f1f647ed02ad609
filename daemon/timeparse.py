"""Instants on the command line: ISO-8601, or relative to now ('-15m', '-2h', 'now')."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?$")


def parse_instant(text: str, now: datetime) -> datetime:
    """An aware UTC datetime. Naive ISO times are taken as UTC."""
    value = text.strip()
    if value == "now":
        return now
    match = _RELATIVE.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO-8601 (2026-11-21T14:03:00Z) or a relative "
            "form such as -15m, -2h, -1d"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '5m', '2h'."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration: use a number of seconds or 30s, 5m, 2h")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def iso(at: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as every output of wirekeep prints times."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
