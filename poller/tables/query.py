"""``poller query``: SQL (DuckDB's dialect) over the parts of a range of days, on this machine.

Parts are fetched into a local cache folder, mirroring their keys, and reused while their
ETag (from one listing per table) is the one recorded beside them. DuckDB runs in memory
over the cached files: nothing is written to the bucket and no lease is taken.

Defined for the SQL:

- ``alerts``: the ``alerts`` parts of the days in [since, until];
- ``dismissals``: the ``dismissals`` parts from ``since`` on (so a later dismissal of an
  alert in the range is found);
- ``alerts_latest``: each alert of ``alerts`` with its dismissal, when there is one (from
  its full record, or else from ``dismissals``); the same view as ``deploy/athena/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from poller.archive.records import Layout
from poller.archive.store import ListedObject, ObjectStore
from poller.errors import ConfigError, FatalError, QueryError
from poller.tables.keys import TableKeys, rebuild_remedy
from poller.tables.schema import ALERT_COLUMNS, COLUMNS, TABLES, select_list

# The view, in SQL both DuckDB and Athena (Trino) read; deploy/athena/ holds the same text.
ALERTS_LATEST = """
SELECT
  a.id, a.created_at, a.title, a.severity,
  (a.is_dismissed OR d.id IS NOT NULL) AS is_dismissed,
  COALESCE(d.dismissed_at, a.dismissed_at) AS dismissed_at,
  COALESCE(d.dismiss_reason, a.dismiss_reason) AS dismiss_reason,
  COALESCE(d.dismiss_reason_text, a.dismiss_reason_text) AS dismiss_reason_text,
  COALESCE(d.dismissed_by, a.dismissed_by) AS dismissed_by,
  a.data_source, a.agent_id, a.rule_id, a.ruleset_id,
  a.record, a.key, d.record AS dismissal_record, d.key AS dismissal_key, a."date"
FROM alerts a
LEFT JOIN dismissals d ON d.id = a.id
""".strip()


def default_cache_dir(bucket: str, prefix: str) -> Path:
    """``$XDG_CACHE_HOME/poller/tables/BUCKET/PREFIX`` (``~/.cache`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "poller" / "tables" / bucket
    return folder / prefix if prefix else folder


@dataclass
class Fetched:
    """What the cache did for one query."""

    folder: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    downloaded: int = 0
    reused: int = 0
    days: dict[str, list[str]] = field(default_factory=dict)  # table -> days with parts
    parts: dict[str, ListedObject] = field(default_factory=dict)  # local path -> its part


class PartCache:
    """The parts of a range of days in a local folder, fetched only when their ETag moved."""

    def __init__(self, store: ObjectStore, layout: Layout, folder: Path) -> None:
        self._store = store
        self._keys = TableKeys(layout)
        self.folder = folder

    def _local(self, table: str, item: ListedObject) -> Path:
        relative = item.key[len(self._keys.table_prefix(table)) :]
        return self.folder / table / relative

    def fetch(self, since: date, until: date, dismissals_until: date | None = None) -> Fetched:
        """Alerts parts of [since, until]; dismissals parts of [since, dismissals_until]
        (default: every one from ``since`` on)."""
        fetched = Fetched(self.folder)
        for table in TABLES:
            last = until if table == "alerts" else dismissals_until
            paths: list[Path] = []
            seen_days: set[str] = set()
            for item in self._store.list_objects(self._keys.table_prefix(table)):
                part = self._keys.parse_part(table, item.key, item.etag)
                if part is None or part.day < since or (last is not None and part.day > last):
                    continue
                seen_days.add(part.day.isoformat())
                path = self._get(table, item, fetched)
                fetched.parts[str(path)] = item
                paths.append(path)
            fetched.files[table] = paths
            fetched.days[table] = sorted(seen_days)
        return fetched

    def _get(self, table: str, item: ListedObject, fetched: Fetched) -> Path:
        path = self._local(table, item)
        tag = path.with_name(path.name + ".etag")
        with contextlib.suppress(OSError):
            if path.is_file() and tag.read_text(encoding="utf-8") == item.etag:
                fetched.reused += 1
                return path
        stored = self._store.get(item.key)
        if stored is None:
            raise FatalError(f"the table part {item.key} vanished while being fetched")
        # Its own staging name: two queries on one cache (no lease: both may run) never
        # rename each other's half-written file into place, nor lose theirs to the other.
        partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(stored.body)
            partial.replace(path)  # never a half-written part under the real name
            tag.write_text(stored.etag, encoding="utf-8")
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise ConfigError(
                [
                    f"tables.cache_dir: the cache folder {self.folder} cannot hold the parts"
                    f" ({exc.strerror or exc}); set tables.cache_dir"
                    " (POLLER_TABLES__CACHE_DIR) to a writable folder"
                ]
            ) from exc
        fetched.downloaded += 1
        return path


def _quoted_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _quoted_list(paths: list[Path]) -> str:
    return "[" + ", ".join(_quoted_path(p) for p in paths) + "]"


def damaged(exc: duckdb.Error, parts: Mapping[str, ListedObject]) -> FatalError | None:
    """A FatalError (exit 1: unreadable archive data, not bad SQL) naming the part DuckDB
    could not read, when its message names one of ``parts`` (local path -> listed part)."""
    message = str(exc)
    for path, item in parts.items():
        if path in message:
            return FatalError(
                f"the table part {item.key} is damaged: {message}; {_remedy(path, item)}"
            )
    return None


def _remedy(path: str, item: ListedObject) -> str:
    """Which copy to delete: a single-part upload's ETag is its body's MD5 (not so under
    SSE-KMS, so a mismatch proves nothing)."""
    try:
        local = hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()
    except OSError:
        local = None
    etag = item.etag.strip('"')
    table = "dismissals" if "/tables/dismissals/" in f"/{item.key}" else "alerts"
    rebuild = rebuild_remedy(table, item.key.rsplit("/", 1)[0])
    if local == etag:
        return (
            f"the bucket's copy is the one damaged (its ETag is the cached copy's MD5): {rebuild}"
        )
    return f"delete the cached copy {path} and query again; if the part stays damaged, {rebuild}"


def connect(
    files: dict[str, list[Path]],
    parts: Mapping[str, ListedObject] | None = None,
    spill: Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with ``alerts``, ``dismissals`` and ``alerts_latest`` defined.
    ``parts`` (``Fetched.parts``) names a damaged part in the error; FatalError (exit 1).
    ``spill``: a folder of the caller's own for DuckDB to spill to (None: no spilling)."""
    con = duckdb.connect(":memory:")
    # DuckDB lets the SQL read and write its temp_directory even with external access off;
    # its default is ``.tmp`` under the working directory, which is the user's.
    con.execute(f"SET temp_directory = {_quoted_path(spill) if spill else repr('')}")
    # The tables hold UTC without a zone: now(), casts and comparisons in UTC as well.
    con.execute("SET TimeZone = 'UTC'")
    for table in TABLES:
        columns = COLUMNS[table]
        paths = files.get(table, [])
        if paths:
            try:
                con.execute(
                    f'CREATE VIEW {table} AS SELECT {select_list(columns)}, CAST("date" AS DATE)'
                    f' AS "date" FROM read_parquet({_quoted_list(paths)}, hive_partitioning=true)'
                )
            except duckdb.Error as exc:  # a damaged part (in the bucket or in the cache)
                con.close()
                named = damaged(exc, parts or {})
                if named is not None:
                    raise named from exc
                raise FatalError(
                    f"a {table} part cannot be read: {exc} (if the cached copy is damaged,"
                    " delete it from the cache folder; if the bucket's is, "
                    f"{rebuild_remedy(table, 'tables/' + table + '/date=DAY')})"
                ) from exc
        else:
            body = ", ".join(f'"{name}" {kind}' for name, kind in columns)
            con.execute(f'CREATE TABLE {table} ({body}, "date" DATE)')
    con.execute(f"CREATE VIEW alerts_latest AS {ALERTS_LATEST}")
    confine(con, [p for table in TABLES for p in files.get(table, [])])
    return con


def confine(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> None:
    """Read-only and confined: the SQL may read the cached parts and nothing else on this
    machine or the network (no ``COPY ... TO``, ``ATTACH``, ``read_csv('/etc/passwd')``,
    ``INSTALL``/``LOAD``), and cannot undo this (the configuration is locked)."""
    con.execute(f"SET allowed_paths = {_quoted_list(paths)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


@dataclass
class Answer:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_sql(
    con: duckdb.DuckDBPyConnection, sql: str, parts: Mapping[str, ListedObject] | None = None
) -> Answer:
    """Run one statement; QueryError (exit 2) with DuckDB's own message when it refuses the
    SQL; FatalError (exit 1) naming the part when one of ``parts`` cannot be read."""
    try:
        cursor = con.execute(sql)
        if cursor is None:  # no statement at all: "", blanks, a comment, a lone ";"
            raise QueryError("the SQL holds no statement: give one, such as SELECT ...")
        if cursor.description is None:
            return Answer([], [])
        columns = [column[0] for column in cursor.description]
        return Answer(columns, cursor.fetchall())
    except duckdb.Error as exc:
        named = damaged(exc, parts or {})
        if named is not None:
            raise named from exc
        raise QueryError(f"DuckDB refused the SQL: {exc}") from exc


def json_value(value: Any) -> Any:
    """A cell as JSON: timestamps (UTC, stored without a zone) as ISO 8601 with ``Z``; NaN
    and infinities as null."""
    if isinstance(value, datetime):
        text = value.isoformat()
        return text + "Z" if value.tzinfo is None else text.replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):  # sum() and DECIMAL columns: a JSON number
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity (JavaScript writes null too)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


__all__ = ["ALERTS_LATEST", "ALERT_COLUMNS", "Answer", "PartCache", "connect", "run_sql"]
