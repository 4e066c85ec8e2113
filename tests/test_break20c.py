"""Break-it review of issue 20 (query tables), third round: each test reproduced a defect
found then and states what should happen, over the in-memory World of tests/test_tables.py."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_break20 import Clock, _dismiss
from test_tables import DAY1, World

from poller.archive.store import ListedObject, MemoryObjectStore


def _paged_like_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    """MemoryObjectStore.iter_objects lists everything at its first call; S3 lists a page
    at a time (a continuation token is a position, not a snapshot): keys written after the
    first page, behind or ahead of the position, show up as S3 shows them."""

    def paged(self: MemoryObjectStore, prefix: str, start_after: str | None = None) -> Any:
        position = start_after
        while True:
            page: list[ListedObject] = [
                item for item in self.list_objects(prefix) if not position or item.key > position
            ][: self.list_page]
            yield from page
            if len(page) < self.list_page:
                return
            position = page[-1].key

    monkeypatch.setattr(MemoryObjectStore, "iter_objects", paged)


def _build_while_two_are_written(
    world: World, clock: Clock, monkeypatch: pytest.MonkeyPatch, behind: str, ahead: str
) -> Any:
    """A pass during whose first read of a dismissal record the daemon's revisit (another
    process) archives two dismissals: ``behind`` (its key sorts before where the listing
    stands), then, ten minutes later, ``ahead``; then two later passes. The first's report."""
    get = MemoryObjectStore.get
    written: list[str] = []

    def during_the_pass(self: MemoryObjectStore, key: str) -> Any:
        if key.startswith("p/dismissals/") and not written:
            written.append(key)
            clock.now += timedelta(minutes=1)
            _dismiss(world, behind, DAY1 + timedelta(days=1, hours=20))
            clock.now += timedelta(minutes=10)
            _dismiss(world, ahead, DAY1 + timedelta(days=1, hours=21))
        return get(self, key)

    monkeypatch.setattr(MemoryObjectStore, "get", during_the_pass)
    first = world.build(clock=clock)
    assert written
    monkeypatch.setattr(MemoryObjectStore, "get", get)
    for _ in range(2):  # later passes, through the index
        clock.now += timedelta(hours=1)
        world.build(clock=clock)
    return first


def test_a_one_go_scan_keeps_a_dismissal_written_behind_it_while_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "when the scan ends, the mark goes back to an hour before it began, so records
    written meanwhile behind it are met through the index". A scan in one go (poller tables
    has no deadline) ends with the mark at the newest record it listed: a record written
    during the scan behind it (its key sorts before where the scan stands), followed more
    than MARK_MARGIN later by one ahead of it, is never read by any later pass."""
    world = World(tmp_path, count=60, dismissed=0)
    world.store.list_page = 10
    _paged_like_s3(monkeypatch)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    closed = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-03")
    behind, ahead, old = closed[0], closed[-1], closed[1:25]
    for alert_id in old:  # an archive from before the index: records, no entries, no state
        doc = dict(world.docs[alert_id], isDismissed=True, dismissedAt="2026-11-02T23:00:00Z")
        world.store.put(world.layout.dismissal_key(alert_id), json.dumps(doc).encode())
    first = _build_while_two_are_written(world, clock, monkeypatch, behind, ahead)
    assert first.ok and not first.dismissal_scan_paused
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    assert rows == Counter([*old, behind, ahead]), f"missing: {behind in rows=}"


def test_a_pass_on_a_host_whose_clock_is_ahead_loses_no_later_dismissal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dismissal mark is meant to be in S3's time (Last-Modified; README: "the
    Last-Modified it has read up to"). With no record yet, a pass sets it from its own host
    clock (``now - MARK_MARGIN``): an analyst's `poller tables` on a machine two hours ahead
    puts the mark in the store's future, and every dismissal archived before that moment
    is skipped by every later pass (only deleting state.json brings it back)."""
    world = World(tmp_path, count=20, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))  # the store's time
    ahead = datetime(2026, 11, 10, 2, 0, tzinfo=UTC)  # the laptop's clock
    first = world.build(clock=lambda: ahead)  # an archive with no dismissal record yet
    assert first.ok and first.dismissal_rows == 0
    alert_id = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-03")[0]
    clock.now += timedelta(minutes=30)  # the daemon's revisit archives a dismissal
    _dismiss(world, alert_id, DAY1 + timedelta(hours=23))
    for _ in range(3):  # the daemon's passes, on a right clock
        clock.now += timedelta(hours=1)
        world.build(clock=clock)
    assert [r["id"] for r in world.rows("dismissals")] == [alert_id]


@pytest.mark.parametrize("dismissed_at", [None, "", 0])
def test_an_alert_archived_already_dismissed_without_a_dismissed_at_has_a_dismissals_row(
    tmp_path: Path, dismissed_at: Any
) -> None:
    """SPEC: dismissals has "one row per alert whose archive shows a dismissal (its
    dismissal record, or its full record when that is already the dismissed version)"; the
    README files a dismissal *record* with no usable dismissedAt under the day it was
    archived, "still a dismissal the archive shows". A *full record* archived already
    dismissed (isDismissed true, its reason and who) with no usable dismissedAt gets no
    dismissals row at all: `SELECT ... FROM dismissals` (the README's "who dismissed what")
    never counts it, while alerts_latest says it is dismissed."""
    world = World(tmp_path, count=6, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(hours=5), "dismissed")
    doc.update(isDismissed=True, dismissedAt=dismissed_at, dismissedBy="analyst@example.com")
    doc.setdefault("dismissReason", "BENIGN")
    world.put(doc)
    assert world.build().ok
    latest = {r["id"]: r for r in world.rows("alerts_latest")}
    assert latest[doc["id"]]["is_dismissed"]  # the alerts row shows the dismissal...
    dismissals = {r["id"]: r for r in world.rows("dismissals")}
    assert doc["id"] in dismissals  # ...the dismissals table does not


@pytest.mark.parametrize(
    "stray", ["date=2026-02-30/part-0001.parquet", "date=2026-13-01/part-0001.parquet"]
)
def test_a_stray_object_under_tables_with_an_impossible_date_is_passed_over(
    tmp_path: Path, stray: str
) -> None:
    """Keys under P/tables/ that are not parts (a console folder, a copy gone wrong) are
    passed over by the part pattern; one that matches it with a day that does not exist
    (``date=2026-02-30``) raises a bare ValueError out of the listing: every `poller
    tables` pass (and the daemon's) and every `poller query` crash on it, for every day,
    instead of passing it over (or naming it) as a stray ``webhooks/`` folder object is."""
    from datetime import date

    from poller.tables.query import PartCache

    world = World(tmp_path, count=6, dismissed=0)
    world.build()
    world.store.put(f"p/tables/alerts/{stray}", b"PAR1")
    late = world.factory.alert(DAY1 + timedelta(hours=7))
    world.put(late)
    builder = world.builder()
    builder.mark_due(DAY1.date(), "repair")
    report = builder.run(builder.plan(world.watermark))  # ValueError: day is out of range
    assert report.alert_rows == 1
    PartCache(world.store, world.layout, tmp_path / "cache").fetch(
        date(2026, 1, 1), date(2027, 1, 1)
    )


@pytest.mark.parametrize("how", ["a record column chunk damaged", "hand-made, ids only"])
def test_a_part_whose_ids_read_but_not_its_other_columns_blocks_only_its_day(
    tmp_path: Path, how: str
) -> None:
    """README *How a day is built*: "A damaged part (one DuckDB cannot read, when a pass
    reads it to see what the day already holds) blocks its day and table only: the pass
    names it ..., goes on with the other days". The pass checks a part by reading its ``id``
    column only; a part whose ids read but whose other columns do not (a damaged ``record``
    column chunk: ZSTD decompression failure; or a hand-made part) is not named: the raw
    duckdb exception of the next statement (the dismissal staging) escapes the pass, which
    builds no other day and leaves no report, at every rerun (the daemon's too)."""
    import duckdb

    world = World(tmp_path, count=60, dismissed=0.5)
    world.build()
    con = duckdb.connect()
    if how == "hand-made, ids only":
        bad = "p/tables/alerts/date=2026-11-01/part-0002.parquet"
        made = tmp_path / "made.parquet"
        con.execute(f"COPY (SELECT 'handmade0001' AS id) TO '{made}' (FORMAT parquet)")
        world.store.put(bad, made.read_bytes())
    else:
        bad = "p/tables/alerts/date=2026-11-01/part-0001.parquet"
        stored = world.store.get(bad)
        assert stored is not None
        body = bytearray(stored.body)
        copy = tmp_path / "copy.parquet"
        copy.write_bytes(stored.body)
        offset, size = con.execute(
            "SELECT data_page_offset, total_compressed_size FROM parquet_metadata(?)"
            " WHERE path_in_schema = 'record'",
            [str(copy)],
        ).fetchone()
        for i in range(offset + 40, offset + size - 40):
            body[i] ^= 0x5A
        world.store.delete(bad)
        world.store.put(bad, bytes(body))
    builder = world.builder()
    for day in (DAY1, DAY1 + timedelta(days=1)):
        world.put(world.factory.alert(day + timedelta(hours=9)))
        builder.mark_due(day.date(), "repair")
    report = builder.run(builder.plan(world.watermark))  # a raw duckdb.Error escapes
    assert not report.ok and report.damaged_parts == [bad]
    assert report.days_built == ["2026-11-02"] and report.alert_rows == 1


def test_a_pass_through_the_index_keeps_a_dismissal_written_behind_its_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same hole without any scan: the index is listed a page at a time, records read
    between pages, and the mark becomes the newest entry listed. Within one hour's folder
    entries sort by id, so an entry written during the listing behind its position, then
    one ahead of it more than MARK_MARGIN later (a verify --repair writing many, a slow
    pass), moves the mark past the first, which no later pass reads."""
    world = World(tmp_path, count=60, dismissed=0)
    world.store.list_page = 10
    _paged_like_s3(monkeypatch)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    world.build(clock=clock)  # the index is in use from here on
    closed = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-03")
    behind, ahead, old = closed[0], closed[-1], closed[1:25]
    clock.now = datetime(2026, 11, 10, 2, 0, tzinfo=UTC)
    for alert_id in old:  # a repair archives 24 dismissals in the 02:00 hour
        _dismiss(world, alert_id, DAY1 + timedelta(days=1, hours=20))
    clock.now += timedelta(minutes=5)
    assert _build_while_two_are_written(world, clock, monkeypatch, behind, ahead).ok
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    assert rows == Counter([*old, behind, ahead]), f"missing: {behind in rows=}"


@pytest.mark.parametrize(
    "mark",
    [
        "2026-11-10T00:00:00",  # a hand edit without its zone: TypeError, every pass
        "2030-01-01T00:00:00Z",  # a clock once far ahead, or a hand edit: believed
    ],
)
def test_a_hand_edited_or_future_dismissal_mark_is_not_believed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mark: str
) -> None:
    """state.json's mark is read as it is: one without a zone crashes every pass with a
    bare TypeError (not "unreadable", which the loader already handles for other bad
    values by reading every record again); one in the future is believed, so no dismissal
    archived before that date ever reaches the tables. The README does this for
    revisit.json ("A last revisit that revisit.json dates more than 5 minutes after the
    clock ... is not believed"); the tables' mark has the same failure and no such rule."""
    world = World(tmp_path, count=20, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    world.build(clock=clock)
    state = world.layout.key("_poller", "tables", "state.json")
    world.store.delete(state)
    world.store.put(
        state, json.dumps({"version": 2, "index": True, "dismissals_read_until": mark}).encode()
    )
    alert_id = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-03")[0]
    clock.now += timedelta(minutes=30)
    _dismiss(world, alert_id, DAY1 + timedelta(hours=23))
    for _ in range(2):
        clock.now += timedelta(hours=1)
        assert world.build(clock=clock).ok
    assert [r["id"] for r in world.rows("dismissals")] == [alert_id]


@pytest.mark.parametrize("sql", ["", "   ", "-- only a comment", ";"])
def test_query_with_no_statement_is_a_usage_error_not_a_crash(tmp_path: Path, sql: str) -> None:
    """`poller query ""` (an empty shell variable, a comment left alone) crashes: DuckDB's
    execute returns None, run_sql reads ``.description`` of it, and the CLI logs
    "crashed" with an AttributeError traceback, exit 1. The issue: "A wrong SQL statement
    is a clear error with DuckDB's message and exit 2" (QueryError)."""
    from datetime import date

    from poller.errors import QueryError
    from poller.tables.query import PartCache, connect, run_sql

    world = World(tmp_path, count=6, dismissed=0)
    world.build()
    fetched = PartCache(world.store, world.layout, tmp_path / "cache").fetch(
        date(2026, 1, 1), date(2027, 1, 1)
    )
    con = connect(fetched.files, fetched.parts)
    with pytest.raises(QueryError):
        run_sql(con, sql, fetched.parts)
