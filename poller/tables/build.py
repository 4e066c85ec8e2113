"""``poller tables``: the Parquet parts of closed days, derived from the archive alone.

One *pass*:

1. **Plan** (a handful of LISTs): the closed days of the range (from the archive's first
   ``webhooks/`` day, found in one request, unless given) that lack a part of either table,
   or that carry a due marker.
2. **Alerts**, day by day (those lacking a part first, oldest first, then those only
   marked due, newest first), until the deadline: the day's ids are the last
   segments of its ``webhooks/YYYY/MM/DD/`` keys; ids already in the day's parts (read from
   the parts themselves) are left out; the rest have their full records read, a batch at a
   time, staged on disk in DuckDB and written as one new part, create-only. An id whose full
   record is not archived yet (a pushed alert still owed it) is left for a later part, and
   the day keeps a due marker until it has it.
3. **Dismissals**: rows come from full records that are already the dismissed version
   (read in step 2, or from the day's existing parts when it is built again) and from
   dismissal records (``P/dismissals/...``), found through their time-keyed index
   (``P/_poller/index/dismissals/YYYY/MM/DD/HH/ID``, listed from the mark on, a page at a
   time; an archive from before the index is scanned once) and read only when written since
   the last pass (by their Last-Modified, less a margin). Each goes to the part of its
   ``dismissedAt`` day once that day is closed, unless that day's parts have it; until then
   it waits (its creation day stays due, or the mark stays before it). A ``dismissedAt``
   that cannot be true (later than the record's archiving) never waits (FUTURE_SLACK).
4. **Bookkeeping**: due markers of finished days are deleted under their ETag (a marker a
   backfill rewrote meanwhile stays), the dismissal mark moves.

Every part is written create-only under the next free number, so a rerun after a kill, or
two builders at once, never put an alert in two parts: a lost race (412) re-reads the day's
parts and writes only what they still lack. Memory is a batch of records plus DuckDB's
bounded working set; the staging database and downloaded parts live in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from poller.archive.records import SAFE_ID, Layout
from poller.archive.state import PendingRecords
from poller.archive.store import ObjectStore, PreconditionFailed, StoredObject
from poller.errors import FatalError, Stopped
from poller.tables.keys import (
    Part,
    TableKeys,
    day_of_webhook_key,
    days,
    last_closed_day,
    rebuild_remedy,
)
from poller.tables.schema import (
    ALERT_COLUMNS,
    COLUMNS,
    DISMISSAL_COLUMNS,
    TABLES,
    alert_row,
    duckdb_struct,
    select_list,
)
from poller.timeutil import Clock, iso_z, utc_now

log = logging.getLogger(__name__)

PARQUET = "application/vnd.apache.parquet"
# 2: the dismissal records are found through the time-keyed index (1: by listing them all).
STATE_VERSION = 2
# Dismissal records written this close before the mark are read again (and found in the
# parts): Last-Modified has whole seconds and S3's front ends do not share one clock.
MARK_MARGIN = timedelta(minutes=5)
# An index entry's key has its writer's clock, its Last-Modified the store's: the listing
# starts this much earlier. (A writer's clock is within a minute: Hawk refuses more.)
INDEX_CLOCK_SLACK = timedelta(hours=1)
# A dismissedAt later than this after its record was archived cannot be true (README,
# *Query the archive*): the row goes to the day its record was archived.
FUTURE_SLACK = timedelta(hours=1)
WRITE_ATTEMPTS = 5
# The due marker's reason for a day kept due only for its dismissals waiting for a later day.
WAITING = "dismissals wait for their day to close or be built"
# What the pass knows of a marker another process wrote during it (its reason stands).
MARKED_MEANWHILE = "marked by another process during the pass"


# A full record that is already the dismissed version: a row of ``dismissals`` (SPEC), also
# when its dismissedAt is missing (then on its alert's day, as recorded).
_DISMISSED = "(dismissed_at IS NOT NULL OR is_dismissed)"
# Its partition: the dismissal's day, never before its alert's ``{day}`` (a skewed clock).
_DISMISSAL_DAY = "COALESCE(GREATEST(CAST(dismissed_at AS DATE), {day}), {day})"


class DamagedPart(FatalError):
    """A part in the bucket that DuckDB cannot read: its day (and table) is left as it is,
    the pass goes on with the others and ends with this error (``TablesReport.error``)."""

    def __init__(self, table: str, key: str, reason: str) -> None:
        remedy = rebuild_remedy(table, key.rsplit("/", 1)[0])
        super().__init__(f"tables: the part {key} cannot be read ({reason}); {remedy}")
        self.key = key


@dataclass(frozen=True)
class Mark:
    """How far the dismissal records have been read (their Last-Modified, or None), the
    state object's ETag, and whether the index may be read instead of the records' listing."""

    at: datetime | None
    etag: str | None
    indexed: bool
    # The store's clock when the state was read: every record written this long (less
    # MARK_MARGIN) before it is in this pass's listing, so the mark may move up to it.
    read_at: datetime | None = None
    # A one-time scan that a pass's deadline paused: the last key it read, and the mark the
    # scan ends with (its first pass's start, or before a record it left waiting).
    scan_after: str | None = None
    scan_mark: datetime | None = None


@dataclass
class Plan:
    """What a pass will do: the due days (lacking a part, oldest first; then only marked,
    newest first), and what the bucket holds."""

    last_closed: date | None
    first: date | None
    due: list[date]
    parts: dict[str, dict[date, list[Part]]]
    markers: dict[date, str]  # day -> the marker's ETag
    archive_first: date | None = None  # the archive's first day, whatever the range

    def last_day_with_tables(self) -> date | None:
        built = [d for d in self.parts["alerts"] if self.last_closed and d <= self.last_closed]
        return max(built) if built else None


@dataclass
class TablesReport:
    """The JSON summary ``poller tables`` prints, and what the daemon logs."""

    last_closed: str | None = None
    days_due: int = 0
    days_built: list[str] = field(default_factory=list)
    days_left: int = 0  # due days not reached before the deadline
    parts_written: int = 0
    alert_rows: int = 0
    dismissal_rows: int = 0
    records_read: int = 0
    owed_full_records: int = 0  # ids in webhooks/ whose full record is not archived yet
    given_up_full_records: int = 0  # of those, given up on (``_poller/unfetchable/``): no row
    unreadable: int = 0  # archived bodies that are not an alert with id and creation time
    waiting_dismissals: int = 0  # dismissals of a day that is not closed yet
    future_dismissals: int = 0  # dismissedAt later than possible (README, Query the archive)
    dismissal_scan_paused: bool = False  # the one-time scan stopped at the deadline; resumes
    damaged_parts: list[str] = field(default_factory=list)  # left alone; see DamagedPart
    undated_dismissals: int = 0  # dismissal records with no usable dismissedAt
    s3_requests: int = 0
    duration_s: float = 0.0
    ok: bool = True
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _time(text: Any) -> datetime | None:
    """An ISO 8601 time of the state object (``Z`` or an offset), or None when absent.
    ValueError for one without its zone (a hand edit): its moment is not known."""
    if not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return moment


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_STAGED = {
    "alert_rows": (*ALERT_COLUMNS, ("date", "DATE")),
    # source_day: the creation day a full-record dismissal came from (None for a dismissal
    # record); listed_at: a dismissal record's Last-Modified.
    "dismissal_rows": (
        *DISMISSAL_COLUMNS,
        ("date", "DATE"),
        ("source_day", "DATE"),
        ("listed_at", "TIMESTAMP"),
    ),
}


class TablesBuilder:
    """Builds the parts; reads and writes only through ``ObjectStore``."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        *,
        lookback: timedelta,
        batch_size: int = 1000,
        concurrency: int = 16,
        # DuckDB's own working set; beyond it, it spills to the work folder. Kept well under
        # the daemon's 256 MiB container limit with Python's ~70 MiB beside it.
        memory_limit: str = "96MB",
        workdir: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self.clock = clock
        self.keys = TableKeys(layout)
        self._lookback = lookback
        self._batch = max(1, batch_size)
        self._concurrency = max(1, concurrency)
        self._memory_limit = memory_limit
        self._workdir = workdir
        self._should_stop = should_stop

    # ------------------------------------------------------------------ plan
    def parts(self) -> dict[str, dict[date, list[Part]]]:
        found: dict[str, dict[date, list[Part]]] = {table: {} for table in TABLES}
        for table in TABLES:
            for item in self._store.list_objects(self.keys.table_prefix(table)):
                part = self.keys.parse_part(table, item.key, item.etag)
                if part is not None:
                    found[table].setdefault(part.day, []).append(part)
        for by_day in found.values():
            for listed in by_day.values():
                listed.sort(key=lambda p: p.number)
        return found

    def waiting_days(self, plan: Plan, limit: int = 100) -> list[date]:
        """Of the plan's due days that only carry a marker, those kept due only because
        dismissals of their alerts wait for a later day to close (the marker says so): no
        work is pending in them. One GET per marker, at most ``limit``."""
        marked = [d for d in plan.due if all(d in plan.parts[t] for t in TABLES)][:limit]
        waiting = []
        for day in marked:
            found = self._store.get(self.keys.due_key(day))
            with contextlib.suppress(ValueError, AttributeError):
                if found is not None and json.loads(found.body).get("reason") == WAITING:
                    waiting.append(day)
        return waiting

    def markers(self) -> dict[date, str]:
        found: dict[date, str] = {}
        prefix = self.keys.due_prefix
        for item in self._store.list_objects(prefix):
            with contextlib.suppress(ValueError):
                found[date.fromisoformat(item.key[len(prefix) :])] = item.etag
        return found

    def first_day(self) -> date | None:
        """The archive's first creation day: its lowest dated ``webhooks/`` key, one request
        (more when keys that are no day, like a console folder object, sort before it)."""
        key = self._store.first_key(self.keys.webhooks_prefix)
        if key is None:
            return None
        day = day_of_webhook_key(self.keys, key)
        if day is not None:
            return day
        # Not a dated key (a console "folder" object such as ``webhooks/``, a ``.keep``):
        # the first dated one, a page at a time. Dated keys sort right after such strays.
        for item in self._store.iter_objects(self.keys.webhooks_prefix, key):
            day = day_of_webhook_key(self.keys, item.key)
            if day is not None:
                return day
        return None

    def plan(
        self, watermark: datetime | None, since: date | None = None, until: date | None = None
    ) -> Plan:
        """The closed days in [since, until] that lack a part of either table or are marked
        due; ``since`` is never before the archive's first day (its default), ``until``
        defaults to the last closed day."""
        last_closed = last_closed_day(watermark, self._lookback)
        parts, markers = self.parts(), self.markers()
        # Never before the archive's first day: days before it would only get empty parts.
        archive_first = self.first_day()
        first = (
            archive_first if since is None or archive_first is None else max(since, archive_first)
        )
        due: list[date] = []
        if last_closed is not None and first is not None:
            end = min(until, last_closed) if until is not None else last_closed
            if first <= end:
                lacking = [d for d in days(first, end) if any(d not in parts[t] for t in TABLES)]
                marked = [d for d in days(first, end) if d in markers and d not in lacking]
                # Days that lack a part first, then days that only carry a marker, newest
                # first: a marker can come back (a day's dismissals waiting for a later day,
                # which rows only ever go to), a missing part cannot, so passes that have
                # time for one day each still reach every day.
                due = sorted(lacking) + sorted(marked, reverse=True)
        return Plan(last_closed, first, due, parts, markers, archive_first)

    # ------------------------------------------------------------------ run
    def run(
        self, plan: Plan, deadline: float | None = None, report: TablesReport | None = None
    ) -> TablesReport:
        """Build the plan's due days (until ``deadline``, a ``time.monotonic()`` value), then
        the dismissals. Raises PollerError for storage failures, Stopped on a stop request."""
        report = report or TablesReport()
        report.last_closed = plan.last_closed.isoformat() if plan.last_closed else None
        report.days_due = len(plan.due)
        if plan.last_closed is None:
            return report
        with tempfile.TemporaryDirectory(prefix="poller-tables-", dir=self._workdir) as tmp:
            work = Path(tmp)
            con = duckdb.connect(str(work / "staging.duckdb"))
            try:
                con.execute(f"SET memory_limit = '{self._memory_limit}'")
                con.execute(f"SET temp_directory = {_quote(work / 'spill')}")
                con.execute("SET threads = 2")
                for name, columns in _STAGED.items():
                    body = ", ".join(f'"{n}" {kind}' for n, kind in columns)
                    con.execute(f"CREATE TABLE {name} ({body})")
                _Pass(self, con, work, plan, report).run(deadline)
            finally:
                con.close()
        return report

    # ------------------------------------------------------------------ state
    def load_mark(self) -> Mark:
        """The state as this pass starts, with S3's clock at that moment (``read_at``): the
        mark never passes it. With no state yet, one is created first (a PUT and a GET,
        once per prefix), so that even the first pass knows S3's time, not only its host's."""
        stored = self._store.get(self.keys.state_key)
        if stored is None:
            fresh = {"version": STATE_VERSION, "index": False, "dismissals_read_until": None}
            with contextlib.suppress(PreconditionFailed):  # another builder made it first
                self._store.put(
                    self.keys.state_key,
                    json.dumps(fresh, sort_keys=True).encode("utf-8"),
                    if_none_match=True,
                )
            stored = self._store.get(self.keys.state_key)
        if stored is None:
            return Mark(None, None, indexed=False)
        try:
            document = json.loads(stored.body)
            mark = _time(document.get("dismissals_read_until"))
            indexed = document.get("version") == STATE_VERSION and document.get("index") is True
            scan_after = document.get("scan_after")
            scan_mark = _time(document.get("scan_mark"))
            if scan_after is not None and not isinstance(scan_after, str):
                raise TypeError("scan_after")
        except (ValueError, AttributeError, TypeError):
            log.warning("tables.state_unreadable", extra={"fields": {"key": self.keys.state_key}})
            # Read every dismissal record again: safe, just slower.
            return Mark(None, stored.etag, indexed=False, read_at=stored.server_time)
        ahead = [t for t in (mark, scan_mark) if t is not None and t > stored.server_time]
        if ahead:
            # A mark is never later than S3's clock when a pass began: one that is was edited
            # by hand or left by a host whose clock was ahead, and believing it would skip
            # every dismissal archived before that date. Read them all again instead.
            log.warning(
                "tables.mark_from_the_future",
                extra={"fields": {"mark": iso_z(ahead[0]), "now": iso_z(stored.server_time)}},
            )
            return Mark(None, stored.etag, indexed=False, read_at=stored.server_time)
        return Mark(mark, stored.etag, indexed, stored.server_time, scan_after, scan_mark)

    def save_mark(
        self,
        mark: datetime | None,
        etag: str | None,
        scan_after: str | None = None,
        scan_mark: datetime | None = None,
        indexed: bool = True,
    ) -> None:
        """The mark, and whether the index may be read; with ``scan_after``, a listing a
        deadline paused (``mark`` stays what it skips by, ``scan_mark`` is the mark it will
        end with)."""
        document: dict[str, Any] = {
            "version": STATE_VERSION,
            "dismissals_read_until": iso_z(mark) if mark is not None else None,
            "index": indexed,
        }
        if scan_after is not None:
            document |= {"scan_after": scan_after, "scan_mark": iso_z(scan_mark or self.clock())}
        body = json.dumps(document, sort_keys=True).encode("utf-8")
        try:
            if etag is None:
                self._store.put(self.keys.state_key, body, if_none_match=True)
            else:
                self._store.put(self.keys.state_key, body, if_match=etag)
        except PreconditionFailed:
            # Another builder moved it meanwhile; its mark is as good as ours.
            log.info("tables.mark_raced")

    def dismissal_listing(self, mark: Mark) -> Iterator[tuple[str, datetime, str]]:
        """(dismissal record key, when listed, the key listed) of the records written since
        ``mark`` (less MARK_MARGIN), a page at a time. From the time-keyed index once a pass
        has scanned ``P/dismissals/`` itself (``mark.indexed``); before that, that one scan.
        A listing a deadline paused resumes after the key it stopped at (``scan_after``)."""
        layout = self.keys.layout
        if not mark.indexed or mark.at is None:
            for item in self._store.iter_objects(self.keys.dismissals_prefix, mark.scan_after):
                yield item.key, item.last_modified, item.key
            return
        prefix = layout.dismissal_index_prefix
        start = (mark.at - MARK_MARGIN - INDEX_CLOCK_SLACK).astimezone(UTC)
        after = mark.scan_after or prefix + start.strftime("%Y/%m/%d/%H")
        for item in self._store.iter_objects(prefix, after):
            alert_id = item.key.rsplit("/", 1)[-1]
            if SAFE_ID.fullmatch(alert_id):
                yield layout.dismissal_key(alert_id), item.last_modified, item.key

    def index(self, record_key: str, written: datetime) -> None:
        """An index entry for a record the one-time scan leaves waiting, so the passes after
        it, which read the index only, meet it again."""
        alert_id = record_key.rsplit("/", 1)[-1]
        with contextlib.suppress(PreconditionFailed):
            self._store.put(
                self.keys.layout.dismissal_index_key(alert_id, written),
                json.dumps({"key": record_key}).encode("utf-8"),
                if_none_match=True,
            )

    def read(self, keys: list[str]) -> list[StoredObject | None]:
        with ThreadPoolExecutor(max_workers=min(self._concurrency, len(keys) or 1)) as pool:
            return list(pool.map(self._store.get, keys))

    def download(self, part: Part, folder: Path) -> Path:
        stored = self._store.get(part.key)
        if stored is None:
            raise FatalError(f"the table part {part.key} vanished while being read")
        path = folder / f"{part.table}-{part.day.isoformat()}-{part.number}.parquet"
        path.write_bytes(stored.body)
        return path

    def write_part(self, table: str, day: date, number: int, path: Path) -> Part:
        """Create-only; raises PreconditionFailed when the number is taken."""
        key = self.keys.part_key(table, day, number)
        etag = self._store.put(key, path.read_bytes(), if_none_match=True, content_type=PARQUET)
        return Part(table, day, number, key, etag)

    def refresh_day(self, plan: Plan, table: str, day: date) -> None:
        listed = [
            self.keys.parse_part(table, item.key, item.etag)
            for item in self._store.list_objects(self.keys.day_prefix(table, day))
        ]
        plan.parts[table][day] = sorted((p for p in listed if p), key=lambda p: p.number)

    def mark_due(
        self, day: date, reason: str, if_match: str | None = None, if_none_match: bool = False
    ) -> None:
        """(Re)write the day's due marker. Each body is new (a nonce), so its ETag is: a pass
        that read the marker before this write (and listed the day before what was just
        archived) fails its If-Match delete, and the marker stays for the next pass.
        ``if_match``: only over that version; ``if_none_match``: only when there is none
        (both raise PreconditionFailed otherwise)."""
        body = json.dumps(
            {"reason": reason, "at": iso_z(self.clock()), "nonce": uuid.uuid4().hex}
        ).encode("utf-8")
        self._store.put(
            self.keys.due_key(day), body, if_match=if_match, if_none_match=if_none_match
        )

    def clear_due(self, day: date, etag: str) -> None:
        with contextlib.suppress(PreconditionFailed):
            self._store.delete(self.keys.due_key(day), if_match=etag)


class _Pass:
    """One pass's working state (the staging database, what waits, what was built)."""

    def __init__(
        self,
        builder: TablesBuilder,
        con: duckdb.DuckDBPyConnection,
        work: Path,
        plan: Plan,
        report: TablesReport,
    ) -> None:
        self.b = builder
        self.con = con
        self.work = work
        self.plan = plan
        self.report = report
        self.owed_days: set[date] = set()
        self._unfetchable: set[str] | None = None  # listed once, when first needed
        self.built: list[date] = []
        self.scan_after: str | None = None  # where a paused one-time scan resumes
        self._files = 0
        self._kept_due: dict[date, str] = {}  # day -> the reason its marker got this pass
        self._work_days: set[date] = set()  # kept due for work still pending in them
        self.mark = Mark(None, None, indexed=False)
        self.now = builder.clock()

    def _damaged(self, exc: DamagedPart) -> None:
        """One damaged part blocks its day and table only: named, and the pass goes on."""
        log.error("tables.damaged_part", extra={"fields": {"key": exc.key, "error": str(exc)}})
        self.report.damaged_parts.append(exc.key)
        if self.report.ok:  # the first is the report's error; the log names every one
            self.report.ok, self.report.error = False, str(exc)

    def _keep_due(self, day: date, reason: str) -> None:
        """Mark ``day`` due before anything makes it look finished (its dismissals part), so
        a kill after that point still leaves it to be built again.

        The marker's reason is what `poller status` reads: ``WAITING`` (built, its
        dismissals wait for a later day) only when nothing else keeps the day due. A marker
        the plan read keeps the day due already; for work still pending there (owed full
        records, a damaged part) it is rewritten with that reason, over the version the
        plan read only (a repair that marked the day since keeps its own)."""
        if reason != WAITING:
            self._work_days.add(day)
        said = self._kept_due.get(day)
        if said is not None and (said != WAITING or reason == WAITING):
            return  # said already, as strongly
        etag = self.plan.markers.get(day)
        if said is None and etag is not None:
            if reason == WAITING:
                return  # said after the parts, when no other reason came (_say_waiting)
            with contextlib.suppress(PreconditionFailed):
                self.b.mark_due(day, reason, if_match=etag)
        elif said is None and reason == WAITING:
            try:  # create-only: a repair's marker written since the plan keeps its reason
                self.b.mark_due(day, reason, if_none_match=True)
            except PreconditionFailed:
                reason = MARKED_MEANWHILE
        else:
            self.b.mark_due(day, reason)
        self._kept_due[day] = reason

    def _say_waiting(self, days: set[date]) -> None:
        """The planned markers of days kept due only because their dismissals wait: say so
        (over the version the plan read: a repair that marked the day since keeps its own)."""
        for day in sorted(days - self._work_days):
            etag = self.plan.markers.get(day)
            if etag is not None and day not in self._kept_due:
                with contextlib.suppress(PreconditionFailed):
                    self.b.mark_due(day, WAITING, if_match=etag)
                self._kept_due[day] = WAITING

    def _file(self, suffix: str) -> Path:
        self._files += 1
        return self.work / f"f{self._files}{suffix}"

    def _stage(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Rows into a staging table through a JSON-lines file: DuckDB parses them."""
        if not rows:
            return
        path = self._file(".jsonl")
        with path.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        columns = _STAGED[table]
        wanted = [n for n, _ in columns if n in rows[0]]
        struct = duckdb_struct(tuple(c for c in columns if c[0] in wanted))
        names = ", ".join(f'"{n}"' for n in wanted)
        self.con.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM read_json({_quote(path)},"
            f" format='newline_delimited', columns={struct})"
        )
        path.unlink()

    def _check_stop(self) -> None:
        if self.b._should_stop():
            raise Stopped()

    # ------------------------------------------------------------------ run
    def run(self, deadline: float | None) -> None:
        started = time.monotonic()
        for index, day in enumerate(self.plan.due):
            if deadline is not None and time.monotonic() >= deadline and self.built:
                self.report.days_left = len(self.plan.due) - index
                break
            self._check_stop()
            try:
                self._alerts_day(day)
            except DamagedPart as exc:
                self._damaged(exc)
                self._keep_due(day, "its alerts part is damaged")  # status: pending
                continue
            self.built.append(day)
            self.report.days_built.append(day.isoformat())
        deferred_days = self._dismissals(deadline)
        for day in self.built:
            etag = self.plan.markers.get(day)
            if etag is not None and day not in self.owed_days and day not in deferred_days:
                self.b.clear_due(day, etag)
        self.report.duration_s = round(time.monotonic() - started, 3)

    # ------------------------------------------------------------------ alerts
    def _existing_ids(self, table: str, day: date, keep_dismissed: bool) -> set[str]:
        """The ids in a day's parts; with ``keep_dismissed``, the dismissed full records in
        them are staged as dismissal candidates too (a day built again finds them there)."""
        ids: set[str] = set()
        wanted = {name for name, _ in COLUMNS[table]}
        for part in self.plan.parts[table].get(day, []):
            path = self.b.download(part, self.work)
            try:
                # Read whole, every column: a part damaged anywhere (not only in its ids), or
                # not one of this table's (columns missing), is named, not half believed.
                self.con.execute(
                    f"CREATE OR REPLACE TEMP TABLE part_rows AS SELECT * FROM"
                    f" read_parquet({_quote(path)})"
                )
                have = {row[0] for row in self.con.execute("DESCRIBE part_rows").fetchall()}
                if not wanted <= have:
                    lacking = ", ".join(sorted(wanted - have))
                    raise DamagedPart(table, part.key, f"not a part of {table}: no {lacking}")
            except duckdb.Error as exc:
                raise DamagedPart(table, part.key, str(exc)) from exc
            finally:
                path.unlink()
            ids.update(row[0] for row in self.con.execute("SELECT id FROM part_rows").fetchall())
            if keep_dismissed:
                literal = f"DATE '{day.isoformat()}'"
                self.con.execute(
                    f"INSERT INTO dismissal_rows SELECT {select_list(DISMISSAL_COLUMNS)},"
                    f" {_DISMISSAL_DAY.format(day=literal)}, {literal}, NULL"
                    f" FROM part_rows WHERE {_DISMISSED}"
                )
        self.con.execute("DROP TABLE IF EXISTS part_rows")
        return ids

    def _alerts_day(self, day: date) -> None:
        for _attempt in range(WRITE_ATTEMPTS):
            self.con.execute("DELETE FROM alert_rows")
            have = self._existing_ids("alerts", day, keep_dismissed=True)
            ids = list(
                dict.fromkeys(
                    key.rsplit("/", 1)[-1]
                    for key in self.b._store.list_keys(self.b.keys.webhooks_day_prefix(day))
                )
            )
            todo = [i for i in ids if SAFE_ID.fullmatch(i) and i not in have]
            staged = self._read_alerts(day, todo)
            existing = self.plan.parts["alerts"].get(day, [])
            if staged == 0 and existing:
                return
            number = existing[-1].number + 1 if existing else 1
            path = self._file(".parquet")
            self.con.execute(
                f"COPY (SELECT {select_list(ALERT_COLUMNS)} FROM alert_rows"
                f" ORDER BY created_at, id) TO {_quote(path)} (FORMAT parquet, COMPRESSION zstd)"
            )
            try:
                part = self.b.write_part("alerts", day, number, path)
            except PreconditionFailed:
                # Another builder wrote this number: see what it holds, then write the rest.
                log.info("tables.part_raced", extra={"fields": {"day": day.isoformat()}})
                self.b.refresh_day(self.plan, "alerts", day)
                continue
            finally:
                path.unlink()
            self.plan.parts["alerts"].setdefault(day, []).append(part)
            self.report.parts_written += 1
            self.report.alert_rows += staged
            self.con.execute(
                f"INSERT INTO dismissal_rows SELECT {select_list(DISMISSAL_COLUMNS)},"
                f" {_DISMISSAL_DAY.format(day='date')}, date, NULL FROM alert_rows"
                f" WHERE {_DISMISSED}"
            )
            log.info(
                "tables.part",
                extra={"fields": {"table": "alerts", "day": day.isoformat(), "rows": staged}},
            )
            return
        raise FatalError(f"tables: the parts of {day} keep changing; another builder is busy")

    def _given_up(self) -> set[str]:
        """Pushed alerts whose full record the sync gave up on (``_poller/unfetchable/``),
        but for those owed again (pushed again since: ``_poller/pending/``)."""
        if self._unfetchable is None:
            records = PendingRecords(self.b._store, self.b.keys.layout)
            gone = set(records.unfetchable())
            self._unfetchable = gone - set(records.ids()) if gone else gone
        return self._unfetchable

    def _read_alerts(self, day: date, ids: list[str]) -> int:
        staged = 0
        layout = self.b.keys.layout
        for batch in _batches(ids, self.b._batch):
            self._check_stop()
            keys = [layout.alert_key(i) for i in batch]
            rows: list[dict[str, Any]] = []
            for alert_id, key, stored in zip(batch, keys, self.b.read(keys), strict=True):
                if stored is None:
                    if alert_id in self._given_up():
                        # The API answered it is not there (another organisation's alert, a
                        # typo): no full record will ever come, so the day does not wait.
                        self.report.given_up_full_records += 1
                        continue
                    self._keep_due(day, "owed full records")
                    self.owed_days.add(day)
                    self.report.owed_full_records += 1
                    continue
                self.report.records_read += 1
                row = alert_row(stored.body, key)
                if row is None or row["id"] != alert_id:
                    self.report.unreadable += 1
                    log.warning("tables.unreadable", extra={"fields": {"key": key}})
                    continue
                row["date"] = day.isoformat()  # the day its webhook key files it under
                rows.append(row)
            self._stage("alert_rows", rows)
            staged += len(rows)
        return staged

    # ------------------------------------------------------------------ dismissals
    def _dismissal_records(self, deadline: float | None) -> datetime | None:
        """Stage the dismissal records written since the mark, a batch at a time; return the
        newest Last-Modified listed (the next mark, before what waits). The listing (the
        index, or the one-time scan) stops at ``deadline`` after a batch (or a page of keys
        it skips), noting in ``scan_after`` where the next pass resumes: it is bounded like
        the rest of a pass, however many records a repair or a first revisit archived."""
        self.mark = self.b.load_mark()
        since = None if self.mark.at is None else self.mark.at - MARK_MARGIN
        newest = self.mark.at
        batch: dict[str, datetime] = {}
        listing = self.b.dismissal_listing(self.mark)
        for listed, (key, listed_at, position) in enumerate(listing, 1):
            newest = listed_at if newest is None else max(newest, listed_at)
            if since is None or listed_at >= since:
                batch[key] = max(listed_at, batch.get(key, listed_at))
            full = len(batch) >= self.b._batch
            if full:
                self._stage_dismissal_records(batch)
                batch = {}
            if (
                (full or listed % 1000 == 0)
                and deadline is not None
                and time.monotonic() >= deadline
            ):
                self._stage_dismissal_records(batch)
                self.scan_after = position
                return newest
        self._stage_dismissal_records(batch)
        return newest

    def _stage_dismissal_records(self, batch: dict[str, datetime]) -> None:
        if not batch:
            return
        self._check_stop()
        keys = list(batch)
        rows: list[dict[str, Any]] = []
        for key, stored in zip(keys, self.b.read(keys), strict=True):
            if stored is None:
                continue
            self.report.records_read += 1
            row = alert_row(stored.body, key)
            if row is None:
                self.report.unreadable += 1
                log.warning("tables.unreadable", extra={"fields": {"key": key}})
                continue
            staged = {name: row[name] for name, _ in DISMISSAL_COLUMNS}
            staged["date"] = max(
                self._record_day(key, row["dismissed_at"], stored.last_modified), row["date"]
            )  # never before its alert's day (a skewed clock): poller query reads from there
            staged["listed_at"] = batch[key].astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
            rows.append(staged)
        self._stage("dismissal_rows", rows)

    def _record_day(self, key: str, dismissed_at: str | None, archived: datetime) -> str:
        """A dismissal record's partition: the day of its ``dismissedAt``, unless that is
        later than the record's own archiving (plus FUTURE_SLACK), which cannot be true, or
        missing (``""``, null, 0: the record is still a dismissal the archive shows); then
        the day it was archived (its Last-Modified, which never changes)."""
        if dismissed_at is None:
            self.report.undated_dismissals += 1
            log.warning(
                "tables.undated_dismissal",
                extra={"fields": {"key": key, "filed_under": "archived day"}},
            )
            return archived.astimezone(UTC).date().isoformat()
        claimed = datetime.fromisoformat(dismissed_at).replace(tzinfo=UTC)
        if claimed <= archived + FUTURE_SLACK:
            return dismissed_at[:10]
        self.report.future_dismissals += 1
        log.warning(
            "tables.future_dismissal",
            extra={
                "fields": {
                    "key": key,
                    "dismissed_at": iso_z(claimed),
                    "archived_at": iso_z(archived),
                    "filed_under": "archived day",
                }
            },
        )
        return archived.astimezone(UTC).date().isoformat()

    def _drop_future_full_records(self) -> None:
        """A full record's dismissal dated after this pass (plus FUTURE_SLACK) cannot be
        true: it is left out of ``dismissals`` (its ``alerts`` row shows it, as recorded)
        instead of keeping its creation day due until that date."""
        # S3's clock at the pass's start, not the host's (a laptop behind would drop them).
        now = self.mark.read_at or self.now
        cutoff = (now + FUTURE_SLACK).astimezone(UTC).replace(tzinfo=None)
        where = "source_day IS NOT NULL AND dismissed_at > ?"
        for key, at in self.con.execute(
            f"SELECT key, dismissed_at FROM dismissal_rows WHERE {where}", [cutoff]
        ).fetchall():
            self.report.future_dismissals += 1
            log.warning(
                "tables.future_dismissal",
                extra={
                    "fields": {
                        "key": key,
                        "dismissed_at": iso_z(at.replace(tzinfo=UTC)),
                        "filed_under": "none (the alerts row shows it)",
                    }
                },
            )
        self.con.execute(f"DELETE FROM dismissal_rows WHERE {where}", [cutoff])

    def _dismissals(self, deadline: float | None) -> set[date]:
        """Write the dismissals parts; return the creation days whose dismissals wait."""
        newest = self._dismissal_records(deadline)
        self._drop_future_full_records()
        last_closed = self.plan.last_closed
        assert last_closed is not None
        target = {
            row[0]
            for row in self.con.execute("SELECT DISTINCT date FROM dismissal_rows").fetchall()
        }
        # Every day built: its dismissals parts are read too, so a damaged one is named on
        # every pass that builds the day, not only when a new dismissal comes for it.
        target.update(self.built)
        # A due day this pass did not build (its deadline came first, or its alerts part is
        # damaged) gets no dismissals part now: that part would make it look finished without
        # its own dismissed full records. Its rows wait, as a day not closed yet does.
        # Also such a day outside the pass's range (poller tables --until): what makes a day
        # unfinished is the bucket's, not the range's.
        # Never a day before the archive's first: no pass builds it, so its rows go to their
        # part as before rather than wait for ever.
        first = self.plan.archive_first
        unreached = {
            d
            for d in target
            if d not in self.built
            and (first is not None and d >= first)
            and (d in self.plan.markers or any(d not in self.plan.parts[t] for t in TABLES))
        }
        self.con.execute("CREATE OR REPLACE TEMP TABLE held_days (day DATE)")
        if unreached:
            self.con.executemany("INSERT INTO held_days VALUES (?)", [[d] for d in unreached])
        closed = f"DATE '{last_closed.isoformat()}'"
        waits = f"(date > {closed} OR date IN (SELECT day FROM held_days))"
        waiting_sources = {
            row[0]
            for row in self.con.execute(
                f"SELECT DISTINCT source_day FROM dismissal_rows"
                f" WHERE {waits} AND source_day IS NOT NULL"
            ).fetchall()
        }
        for day in waiting_sources:
            self._keep_due(day, WAITING)
        damaged: set[date] = set()
        # Latest day first: a day's dismissals part is what makes it look finished, so the
        # rows it sends to later days (an alert archived already dismissed, created the day
        # before) are written before it; a kill between the two leaves it due.
        for day in sorted(target, reverse=True):
            if day > last_closed or day in unreached:
                continue
            try:
                self._dismissals_day(day)
            except DamagedPart as exc:
                self._damaged(exc)
                self._keep_due(day, "its dismissals part is damaged")
                damaged.add(day)
                for (source,) in self.con.execute(
                    f"SELECT DISTINCT source_day FROM dismissal_rows WHERE date = DATE"
                    f" '{day.isoformat()}' AND source_day IS NOT NULL AND source_day <> date"
                ).fetchall():  # built again once the day's remedy is applied
                    self._keep_due(source, "a dismissal of it waits for a damaged part")
                    damaged.add(source)
        self._say_waiting(waiting_sources)
        waiting = self.con.execute(
            f"SELECT count(*), min(listed_at) FROM dismissal_rows WHERE {waits}"
        ).fetchone()
        assert waiting is not None
        self.report.waiting_dismissals = int(waiting[0])
        if not self.mark.indexed:
            # The one-time scan: what waits must be in the index the next passes read.
            for key, listed_at in self.con.execute(
                f"SELECT DISTINCT key, listed_at FROM dismissal_rows"
                f" WHERE {waits} AND source_day IS NULL"
            ).fetchall():
                self.b.index(key, listed_at.replace(tzinfo=UTC))
        # Never later than S3's clock when the state was read (this pass's start): a record
        # written since may lie behind where the listing stood, and is met next time. With
        # no record yet, or once the last is an hour behind: that moment, so the next
        # listing starts there (at most one state write an hour for it).
        read_at = self.mark.read_at
        mark = newest
        if read_at is not None and (mark is None or read_at - mark >= INDEX_CLOCK_SLACK):
            mark = read_at
        if mark is not None and read_at is not None:
            mark = min(mark, read_at)
        waiting_from = waiting[1].replace(tzinfo=UTC) if waiting[1] is not None else None
        if waiting_from is not None:  # a record whose day is not closed: read it again
            mark = waiting_from if mark is None else min(mark, waiting_from)
        scan_mark: datetime | None = None
        if self.mark.scan_after is not None or self.scan_after is not None:
            # A scan over several passes ends no later than its first pass began (what was
            # written since is in the index) nor after what a pass left waiting.
            scan_mark = self.mark.scan_mark or read_at
            if waiting_from is not None:
                scan_mark = waiting_from if scan_mark is None else min(scan_mark, waiting_from)
            if scan_mark is not None:
                mark = scan_mark if mark is None else min(mark, scan_mark)
        # A damaged day's rows are not written; the mark moves on all the same (the remedy,
        # deleting state.json, reads every record again), and the damaged days (and the
        # days their rows came from) stay due.
        if self.scan_after is not None:
            self.report.dismissal_scan_paused = True
            log.info(
                "tables.dismissal_scan_paused",
                extra={"fields": {"resumes_after": self.scan_after, "reason": "deadline"}},
            )
            indexed = self.mark.indexed and self.mark.at is not None
            self.b.save_mark(self.mark.at, self.mark.etag, self.scan_after, scan_mark, indexed)
        elif mark is not None and (
            mark != self.mark.at or not self.mark.indexed or self.mark.scan_after is not None
        ):
            self.b.save_mark(mark, self.mark.etag)
        return waiting_sources | damaged

    def _dismissals_day(self, day: date) -> None:
        for _attempt in range(WRITE_ATTEMPTS):
            have = self._existing_ids("dismissals", day, keep_dismissed=False)
            self.con.execute("CREATE OR REPLACE TEMP TABLE have_ids (id VARCHAR)")
            if have:
                self.con.executemany("INSERT INTO have_ids VALUES (?)", [[i] for i in have])
            rows_sql = (
                f"SELECT {select_list(DISMISSAL_COLUMNS)} FROM dismissal_rows"
                f" WHERE date = DATE '{day.isoformat()}' AND id NOT IN (SELECT id FROM have_ids)"
                " QUALIFY row_number() OVER (PARTITION BY id ORDER BY key) = 1"
            )
            counted = self.con.execute(f"SELECT count(*) FROM ({rows_sql})").fetchone()
            count = int(counted[0]) if counted else 0
            existing = self.plan.parts["dismissals"].get(day, [])
            if count == 0 and existing:
                return
            number = existing[-1].number + 1 if existing else 1
            path = self._file(".parquet")
            self.con.execute(
                f"COPY ({rows_sql} ORDER BY dismissed_at, id) TO {_quote(path)}"
                " (FORMAT parquet, COMPRESSION zstd)"
            )
            try:
                part = self.b.write_part("dismissals", day, number, path)
            except PreconditionFailed:
                log.info("tables.part_raced", extra={"fields": {"day": day.isoformat()}})
                self.b.refresh_day(self.plan, "dismissals", day)
                continue
            finally:
                path.unlink()
            self.plan.parts["dismissals"].setdefault(day, []).append(part)
            self.report.parts_written += 1
            self.report.dismissal_rows += count
            log.info(
                "tables.part",
                extra={"fields": {"table": "dismissals", "day": day.isoformat(), "rows": count}},
            )
            return
        raise FatalError(f"tables: the dismissals of {day} keep changing; another builder is busy")


def schema_of(table: str) -> tuple[tuple[str, str], ...]:
    return COLUMNS[table]
