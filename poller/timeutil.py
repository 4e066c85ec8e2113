"""Time in poller is always UTC and tz-aware. Parsing of user-given instants and spans."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]

_SPAN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utc_now() -> datetime:
    """The real clock; everything else takes a ``Clock`` so tests can inject one."""
    return datetime.now(UTC)


def parse_span(text: str) -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w`` -> timedelta. Raises ValueError."""
    match = _SPAN.match(text)
    if not match:
        raise ValueError(f"not a span like 24h or 7d: {text!r}")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_instant(text: str, now: datetime) -> datetime:
    """ISO 8601 (naive means UTC) or a relative span meaning ``now - span``."""
    text = text.strip()
    if _SPAN.match(text):
        try:
            return now - parse_span(text)
        except OverflowError:  # "9999999d": before the year 1
            raise ValueError(f"a span too long: {text!r}") from None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not ISO 8601 or a span like 24h: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def floor_second(moment: datetime) -> datetime:
    """Seconds are the finest precision the API documents; windows are whole seconds."""
    return moment.replace(microsecond=0)


def api_format(moment: datetime) -> str:
    """The one form threatstack-api.md §2.3 calls documented: UTC ``YYYY-MM-DDTHH:MM:SS``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_z(moment: datetime) -> str:
    """ISO 8601 with a ``Z``, for our own documents and summaries."""
    text = moment.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


def parse_alert_time(value: object) -> datetime:
    """An alert's creation time: ISO string, or epoch number (ms if large, else seconds).

    Raises ValueError for anything else, including booleans and empty strings.
    """
    if isinstance(value, bool):
        raise ValueError("creation time is a boolean")
    if isinstance(value, (int, float)):
        seconds = value / 1000 if abs(value) >= 1e11 else float(value)
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str) and value.strip():
        stripped = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", stripped):
            return parse_alert_time(float(stripped))
        parsed = datetime.fromisoformat(stripped.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    raise ValueError(f"unparseable creation time: {value!r}")
