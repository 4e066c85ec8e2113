"""The two tables' columns, in one place: the Parquet parts are written with these DuckDB
types, ``poller query`` declares empty tables with them, and the Athena DDL in
``deploy/athena/`` is tested against them.

A row is derived from an archived body by ``alert_row``: the record as archived (JSON text)
plus the fields an analyst filters on. Field names are the v2 API's (threatstack-api.md §7:
``isDismissed``, ``dismissedAt``, ``dismissReason``, ``dismissReasonText`` (also spelled
``dismissedReasonText``), ``dismissedBy``, ``dataSource``, ``agentId``, ``ruleId``,
``rulesetId``); ``""`` and null mean the same (§7.11).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from typing import Any

from poller.archive.records import as_integer, as_text
from poller.timeutil import parse_alert_time

# (name, DuckDB type). ``date`` is the Hive partition (the key's ``date=YYYY-MM-DD``), not a
# column inside the files. Timestamps are UTC, stored without a zone (Parquet
# TIMESTAMP_MICROS), which both DuckDB and Athena read as ``timestamp``.
ALERT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "VARCHAR"),
    ("created_at", "TIMESTAMP"),
    ("title", "VARCHAR"),
    ("severity", "INTEGER"),
    ("is_dismissed", "BOOLEAN"),
    ("dismissed_at", "TIMESTAMP"),
    ("dismiss_reason", "VARCHAR"),
    ("dismiss_reason_text", "VARCHAR"),
    ("dismissed_by", "VARCHAR"),
    ("data_source", "VARCHAR"),
    ("agent_id", "VARCHAR"),
    ("rule_id", "VARCHAR"),
    ("ruleset_id", "VARCHAR"),
    ("record", "VARCHAR"),
    ("key", "VARCHAR"),
)
DISMISSAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "VARCHAR"),
    ("dismissed_at", "TIMESTAMP"),
    ("dismiss_reason", "VARCHAR"),
    ("dismiss_reason_text", "VARCHAR"),
    ("dismissed_by", "VARCHAR"),
    ("record", "VARCHAR"),
    ("key", "VARCHAR"),
)
COLUMNS = {"alerts": ALERT_COLUMNS, "dismissals": DISMISSAL_COLUMNS}
TABLES = tuple(COLUMNS)


def _moment(value: Any) -> datetime | None:
    if as_text(value) is None:
        return None
    try:
        moment = parse_alert_time(value)
    except (ValueError, OverflowError, OSError):
        return None
    return moment if 1970 < moment.year < 10_000 else None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> str | None:
    """A VARCHAR cell: as_text, with a lone UTF-16 surrogate (a legal ``"\\ud83d"`` escape in
    the archived JSON, which UTF-8 cannot carry) as U+FFFD; ``record`` keeps the escape."""
    text = as_text(value)
    return None if text is None else _LONE_SURROGATE.sub("\ufffd", text)


def _severity(value: Any) -> int | None:
    """An INTEGER column: a number beyond its range is None (the record keeps it), never a
    row that makes DuckDB refuse the whole batch."""
    number = as_integer(value)
    return number if number is not None and -(2**31) <= number < 2**31 else None


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return value is True


def _stamp(moment: datetime | None) -> str | None:
    """The JSON form DuckDB's ``read_json`` takes for a TIMESTAMP column (UTC, no zone)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")


def alert_row(body: bytes, key: str) -> dict[str, Any] | None:
    """The ``alerts`` row of an archived full record (or of a dismissal record, which has the
    same shape), or None when the body is not an alert object with an id and a creation time
    (the archive only holds such, so None means a damaged object; it is counted, not guessed).
    ``dismissed_at`` is None when the record says nothing parseable about it."""
    try:
        text = body.decode("utf-8")
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        return None
    created = _moment(raw.get("createdAt", raw.get("created_at")))
    if created is None:
        return None
    dismissed_at = _moment(raw.get("dismissedAt"))
    reason_text = raw.get("dismissReasonText", raw.get("dismissedReasonText"))
    return {
        "id": raw["id"],
        "created_at": _stamp(created),
        "title": _text(raw.get("title")),
        "severity": _severity(raw.get("severity")),
        "is_dismissed": _flag(raw.get("isDismissed")) or dismissed_at is not None,
        "dismissed_at": _stamp(dismissed_at),
        "dismiss_reason": _text(raw.get("dismissReason")),
        "dismiss_reason_text": _text(reason_text),
        "dismissed_by": _text(raw.get("dismissedBy")),
        "data_source": _text(raw.get("dataSource")),
        "agent_id": _text(raw.get("agentId")),
        "rule_id": _text(raw.get("ruleId")),
        "ruleset_id": _text(raw.get("rulesetId")),
        "record": text,
        "key": key,
        # Staging only (not a Parquet column): the partition of the row.
        "date": created.date().isoformat(),
    }


def dismissal_day(row: dict[str, Any]) -> date | None:
    """The ``dismissals`` partition of a row: the UTC day of ``dismissedAt``."""
    stamp = row.get("dismissed_at")
    return None if stamp is None else datetime.fromisoformat(stamp).date()


def select_list(columns: tuple[tuple[str, str], ...], alias: str = "") -> str:
    """``a.id, a.created_at, ...``: the columns of a table in their order."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + name for name, _ in columns)


def duckdb_struct(columns: tuple[tuple[str, str], ...]) -> str:
    """The ``columns=`` argument of DuckDB's ``read_json`` for these columns."""
    return "{" + ", ".join(f"'{name}': '{kind}'" for name, kind in columns) + "}"
