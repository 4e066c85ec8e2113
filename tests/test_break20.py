"""Break-it review of issue 20 (query tables): reproducers over the in-memory World of
tests/test_tables.py."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_tables import DAY1, PREFIX, World

from poller.archive.records import Alert, classify
from poller.archive.store import MemoryObjectStore
from poller.errors import QueryError
from poller.tables.query import connect, run_sql
from poller.timeutil import parse_alert_time


def _query(world: World, sql: str) -> list[tuple[Any, ...]]:
    from datetime import date

    from poller.tables.query import PartCache

    fetched = PartCache(world.store, world.layout, world.tmp / "cache").fetch(
        date(2026, 1, 1), date(2027, 1, 1)
    )
    return run_sql(connect(fetched.files, fetched.parts), sql, fetched.parts).rows


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 42 AS x) TO '{tmp}/written.csv'",
        "COPY alerts TO '{tmp}/written.parquet' (FORMAT parquet)",
        "ATTACH '{tmp}/written.duckdb' AS x",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/etc/*')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "EXPORT DATABASE '{tmp}/written'",
    ],
)
def test_query_is_read_only_and_confined_to_the_cached_parts(tmp_path: Path, sql: str) -> None:
    (tmp_path / "w").mkdir()
    world = World(tmp_path / "w")
    world.build()
    with pytest.raises(QueryError):
        _query(world, sql.format(tmp=tmp_path))
    assert not list(tmp_path.glob("written*"))
    # ...while the tables themselves still answer
    assert _query(world, "SELECT count(*) FROM alerts_latest")[0][0] > 0


@pytest.mark.parametrize(
    "odd",
    [
        {"severity": "2"},
        {"severity": "high"},
        {"severity": 2**40},
        {"severity": "9999999999999999999"},
        {"severity": 1.5},
        {"title": "\U0001f600 \u202e NUL\u0000 " + "x" * 300_000},
        {"title": {"nested": [1, 2]}},
        {"agentId": 12345},
        {"dismissedAt": "not a time", "isDismissed": "true"},
        {"dismissReason": None, "dataSource": ""},
    ],
)
def test_odd_alerts_never_break_a_pass(tmp_path: Path, odd: dict[str, Any]) -> None:
    world = World(tmp_path, count=4, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(hours=5))
    doc.update(odd)
    world.put(doc)
    report = world.build()
    assert report.ok
    rows = _query(world, f"SELECT record FROM alerts WHERE id = '{doc['id']}'")
    assert len(rows) == 1 and json.loads(rows[0][0]) == doc


def test_an_alert_missing_optional_fields_gets_a_row(tmp_path: Path) -> None:
    world = World(tmp_path, count=2, dismissed=0)
    doc = {"id": "bare0001abcd", "createdAt": (DAY1 + timedelta(hours=3)).isoformat()}
    world.put(doc)
    world.build()
    assert _query(world, "SELECT severity, title FROM alerts WHERE id = 'bare0001abcd'") == [
        (None, None)
    ]


def test_a_lone_surrogate_in_a_field_never_breaks_a_pass(tmp_path: Path) -> None:
    world = World(tmp_path, count=4, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(hours=5))
    doc["title"] = "half an emoji \ud83d here"
    world.put(doc)
    report = world.build()
    assert report.ok
    rows = _query(world, f"SELECT record FROM alerts WHERE id = '{doc['id']}'")
    assert len(rows) == 1 and json.loads(rows[0][0]) == doc


@pytest.mark.parametrize("day", ["2026-11-01", "2026-11-02"])  # first part, or a later one
def test_a_corrupt_part_in_the_bucket_is_named_as_damaged_data_not_bad_sql(
    tmp_path: Path, day: str
) -> None:
    from poller.errors import FatalError

    world = World(tmp_path)
    world.build()
    key = next(k for k in world.part_keys("alerts") if day in k)
    body = world.store.get(key)
    assert body is not None
    world.store.delete(key)
    world.store.put(key, body.body[: len(body.body) // 2])  # truncated
    with pytest.raises(FatalError) as raised:  # exit 1, as for other unreadable archive data
        _query(world, "SELECT count(*) FROM alerts")
    assert not isinstance(raised.value, QueryError) and raised.value.exit_code == 1
    message = str(raised.value)
    assert f"the table part {key} is damaged" in message and "SQL" not in message
    assert "poller tables builds that day again" in message


def test_a_corrupt_part_does_not_crash_the_builder(tmp_path: Path) -> None:

    world = World(tmp_path)
    world.build()
    key = next(k for k in world.part_keys("alerts") if "2026-11-01" in k)
    world.store.delete(key)
    world.store.put(key, b"PAR1 not really")
    late = world.factory.alert(DAY1 + timedelta(hours=9))
    world.put(late)
    later = world.factory.alert(DAY1 + timedelta(days=1, hours=9))
    world.put(later)
    builder = world.builder()
    for day in (DAY1, DAY1 + timedelta(days=1)):
        builder.mark_due(day.date(), "test")
    # Not a raw duckdb exception, and not a stop for every day after it: the damaged day is
    # named and left as it is, day 2 gets its late alert, and the day stays due.
    report = builder.run(builder.plan(world.watermark))
    assert not report.ok and report.damaged_parts == [key]
    assert report.error is not None and "cannot be read" in report.error
    assert report.days_built == ["2026-11-02"] and report.alert_rows == 1
    assert f"{PREFIX}/_poller/tables/due/2026-11-01" in world.store.snapshot()
    # The remedy the message gives: delete the day's parts; the next pass rebuilds the day.
    world.store.delete(key)
    assert world.build().ok
    ids = [r[0] for r in _query(world, "SELECT id FROM alerts")]
    assert Counter(ids) == Counter(list(world.closed_ids()))


def test_a_damaged_dismissals_part_holds_its_day_and_the_remedy_rebuilds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dismissals part DuckDB cannot read: the other days' dismissals are written, the
    mark stays (the damaged day's rows are not lost), and the remedy the error names
    (delete the day's dismissals parts and the state) brings every row back, none twice."""
    world = World(tmp_path, count=30, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    ids = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-02")
    _dismiss(world, ids[0], DAY1 + timedelta(hours=23))
    clock.now += timedelta(hours=2)
    world.build(clock=clock)
    key = next(k for k in world.part_keys("dismissals") if "2026-11-01" in k)
    world.store.delete(key)
    world.store.put(key, b"PAR1 not really")
    _dismiss(world, ids[1], DAY1 + timedelta(hours=23))  # day 1: waits for the remedy
    _dismiss(world, ids[2], DAY1 + timedelta(days=1, hours=5))  # day 2: written now
    # A late repair into day 0 of an alert archived already dismissed on day 1: its row
    # waits for day 1's part too, and day 0 stays due until then.
    late = world.factory.alert(DAY1 - timedelta(hours=1), "dismissed")
    late["dismissedAt"] = (DAY1 + timedelta(hours=2)).isoformat()
    world.put(late)
    builder = world.builder(clock=clock)
    builder.mark_due((DAY1 - timedelta(days=1)).date(), "repair")
    clock.now += timedelta(hours=2)
    report = builder.run(builder.plan(world.watermark))
    assert not report.ok and report.damaged_parts == [key]
    assert report.error is not None and "state.json" in report.error
    assert "p/_poller/tables/due/2026-10-31" in world.store.snapshot()
    world.store.delete(key)
    world.store.delete(world.layout.key("_poller", "tables", "state.json"))
    clock.now += timedelta(hours=2)
    assert world.build(clock=clock).ok
    assert Counter(r["id"] for r in world.rows("dismissals")) == Counter([*ids[:3], late["id"]])


def test_a_stale_cache_is_fetched_again_when_the_etag_moves(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.build()
    assert _query(world, "SELECT count(*) FROM alerts WHERE title = 'swapped'") == [(0,)]
    key = next(k for k in world.part_keys("alerts") if "2026-11-01" in k)
    import duckdb

    swapped = tmp_path / "swapped.parquet"
    con = duckdb.connect()
    cached = next((tmp_path / "cache" / "alerts").rglob("date=2026-11-01/*.parquet"))
    con.execute(
        f"COPY (SELECT * REPLACE ('swapped' AS title) FROM read_parquet('{cached}'))"
        f" TO '{swapped}' (FORMAT parquet)"
    )
    world.store.delete(key)
    world.store.put(key, swapped.read_bytes())
    assert _query(world, "SELECT count(*) FROM alerts WHERE title = 'swapped'")[0][0] > 0


class Clock:
    """One settable time for the store's Last-Modified, the dismissal writer's index key and
    the builder (the index is keyed by hour: old records must be hours old)."""

    def __init__(self, world: World, monkeypatch: pytest.MonkeyPatch, now: datetime) -> None:
        self.now = now
        world.store._clock = self
        monkeypatch.setattr("poller.archive.writer.utc_now", self)

    def __call__(self) -> datetime:
        return self.now


def _dismiss(world: World, alert_id: str, at: datetime) -> None:
    """A dismissal record through the one writer (the revisit's and verify --repair's)."""
    doc = dict(world.docs[alert_id], isDismissed=True, dismissedAt=at.isoformat())
    alert = classify(doc)
    assert isinstance(alert, Alert)
    assert world.archive.store_dismissal(alert)


class Listings:
    """Per pass: the prefixes listed and the entries each listing returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entries: Counter[str] = Counter()
        original = MemoryObjectStore.iter_objects
        listings = self

        def counting(self: MemoryObjectStore, prefix: str, start_after: str | None = None) -> Any:
            for item in original(self, prefix, start_after):
                listings.entries[prefix] += 1
                yield item

        monkeypatch.setattr(MemoryObjectStore, "iter_objects", counting)


def test_a_pass_lists_the_dismissal_index_since_its_mark_not_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dismissal records are keyed by id; each is also entered in a time-keyed index, so a
    pass lists only the index since its mark: its requests do not grow with the archive."""
    listings = Listings(monkeypatch)
    costs = []
    for old in (5, 60):
        (tmp_path / str(old)).mkdir()
        # 240 alerts over three days: the first 62 by creation all fall before day 1's 23:00,
        # so every dismissal below is dated after its alert's creation, as in life.
        world = World(tmp_path / str(old), count=240, dismissed=0)
        world.store.list_page = 10  # S3 lists 1,000 keys a request: 10 here, to see pages
        start = datetime(2026, 11, 10, tzinfo=UTC)
        clock = Clock(world, monkeypatch, start)
        world.build(clock=clock)
        created = {i: parse_alert_time(doc["createdAt"]) for i, doc in world.docs.items()}
        ids = sorted(created, key=created.__getitem__)
        assert created[ids[61]] < DAY1 + timedelta(hours=23)
        for n in range(old):  # an old archive's dismissals, all of day 1
            clock.now = start + timedelta(seconds=n)
            _dismiss(world, ids[n], DAY1 + timedelta(hours=23))
        clock.now = start + timedelta(hours=1)
        assert world.build(clock=clock).dismissal_rows == old
        clock.now = start + timedelta(hours=3)  # idle: the mark moves past the old records
        world.build(clock=clock)
        listings.entries.clear()
        clock.now = start + timedelta(days=2)
        before = world.store.requests
        idle = world.build(clock=clock)
        idle_requests = world.store.requests - before
        for n in (old, old + 1):  # two new dismissals, of day 2
            _dismiss(world, ids[n], DAY1 + timedelta(days=1, hours=3))
        clock.now += timedelta(minutes=10)
        before = world.store.requests
        fresh = world.build(clock=clock)
        costs.append((idle_requests, world.store.requests - before, dict(listings.entries)))
        assert (idle.records_read, fresh.records_read, fresh.dismissal_rows) == (0, 2, 2)
        assert len(world.rows("dismissals")) == old + 2
    # The same requests, and the same entries listed, for 5 old dismissals as for 60; and
    # P/dismissals/ itself was listed by no pass but the first (the one-time scan).
    assert costs[0] == costs[1], costs
    assert costs[0][2] == {"p/_poller/index/dismissals/": 2}, costs


def test_an_archive_from_before_the_index_is_scanned_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dismissal records written before the index existed (no entry, a version-1 state):
    the first pass lists P/dismissals/ once; a record it leaves waiting (its day is not
    closed) gets an index entry, so the passes after it, which read only the index, meet it."""
    world = World(tmp_path, count=20, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    world.build(clock=clock)
    state = world.layout.key("_poller", "tables", "state.json")
    world.store.delete(state)
    world.store.put(state, b'{"version": 1, "dismissals_read_until": "2026-11-09T00:00:00Z"}')
    ids = sorted(world.docs)
    for alert_id, at in ((ids[0], DAY1 + timedelta(hours=20)), (ids[1], DAY1 + timedelta(days=2))):
        doc = dict(world.docs[alert_id], isDismissed=True, dismissedAt=at.isoformat())
        world.store.put(world.layout.dismissal_key(alert_id), json.dumps(doc).encode())
    listings = Listings(monkeypatch)
    clock.now += timedelta(hours=2)
    first = world.build(clock=clock)
    assert (first.dismissal_rows, first.waiting_dismissals) == (1, 1)
    assert listings.entries["p/dismissals/"] == 2
    listings.entries.clear()
    world.set_watermark(DAY1 + timedelta(days=4))  # day 3 closes
    clock.now += timedelta(hours=2)
    second = world.build(clock=clock)
    assert second.dismissal_rows == 1 and "p/dismissals/" not in listings.entries
    assert {r["id"]: r["date"].isoformat() for r in world.rows("dismissals")} == {
        ids[0]: "2026-11-01",
        ids[1]: "2026-11-03",
    }


def test_the_one_time_scan_is_bounded_by_the_deadline_and_resumes_where_it_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon gives tables a bounded time per cycle; an archive whose dismissal records
    predate the index (no state) used to be scanned and read whole in one pass. Each pass
    now reads a batch (7 here) past its deadline and the next resumes after it: every record
    read once, none twice in the parts; a record written during the scan (it sorts before
    where the scan stands), and one left waiting for its day to close, both reach the parts."""
    world = World(tmp_path, count=60, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    ids = sorted(world.docs)
    closed = [i for i in ids if world.docs[i]["createdAt"] < "2026-11-03"]
    old, late, waiting = closed[1:21], closed[0], closed[21]
    for alert_id in old:  # an archive from before the index: records, no entries, no state
        doc = dict(world.docs[alert_id], isDismissed=True, dismissedAt="2026-11-02T23:00:00Z")
        world.store.put(world.layout.dismissal_key(alert_id), json.dumps(doc).encode())
    doc = dict(world.docs[waiting], isDismissed=True, dismissedAt="2026-11-03T20:00:00Z")
    world.store.put(world.layout.dismissal_key(waiting), json.dumps(doc).encode())
    reads: Counter[str] = Counter()
    get = MemoryObjectStore.get

    def counting(self: MemoryObjectStore, key: str) -> Any:
        if key.startswith("p/dismissals/"):
            reads[key] += 1
        return get(self, key)

    monkeypatch.setattr(MemoryObjectStore, "get", counting)
    paused = []
    for n in range(8):  # 21 records, 7 a pass: 3 passes scan, then the index
        clock.now += timedelta(minutes=10)
        builder = world.builder(clock=clock)
        report = builder.run(builder.plan(world.watermark), deadline=0.0)  # long past
        paused.append(report.dismissal_scan_paused)
        if n == 1:  # written during the scan, behind it: found through the index
            _dismiss(world, late, DAY1 + timedelta(days=1, hours=20))
    # Each pass past its deadline builds one day: the first pass reads records of day 2
    # before day 2 is built, so they wait (indexed) and are read once more through the
    # index, a batch a pass; then nothing is left to read.
    assert paused[:3] == [True, True, True] and paused[-2:] == [False, False], paused
    assert set(reads) == {world.layout.dismissal_key(i) for i in [*old, waiting, late]}
    # Every record read at most twice; the waiting one again by each pass until its day closes.
    del reads[world.layout.dismissal_key(waiting)]
    assert set(reads.values()) <= {1, 2}, reads
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    assert rows == Counter([*old, late])  # the waiting one's day (3) is not closed
    world.set_watermark(DAY1 + timedelta(days=4))  # day 3 closes
    clock.now += timedelta(minutes=10)
    world.build(clock=clock)
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    assert rows == Counter([*old, late, waiting])


def test_a_dismissal_dated_in_the_far_future_never_keeps_a_day_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dismissedAt later than its record's archiving cannot be true: a dismissal record
    goes to the day it was archived; a full record's own dismissal is left to its alerts
    row. Neither keeps a day due nor holds the mark back."""
    world = World(tmp_path, count=10, dismissed=0)
    clock = Clock(world, monkeypatch, DAY1 + timedelta(days=1, hours=12))  # in day 2
    future = datetime(2099, 1, 1, tzinfo=UTC)
    whole = world.factory.alert(DAY1 + timedelta(hours=2), "dismissed")
    whole["dismissedAt"] = future.isoformat()
    world.put(whole)  # its full record is already the dismissed version
    world.build(clock=clock)
    target = sorted(i for i in world.docs if i != whole["id"])[0]
    _dismiss(world, target, future)
    for _ in range(2):
        clock.now += timedelta(hours=2)
        report = world.build(clock=clock)
        assert report.waiting_dismissals == 0 and report.ok
    assert not [k for k in world.store.snapshot() if "/_poller/tables/due/" in k]
    rows = {r["id"]: r for r in world.rows("dismissals")}
    assert set(rows) == {target}
    assert rows[target]["date"].isoformat() == "2026-11-02"  # the day it was archived
    assert rows[target]["dismissed_at"] == future.replace(tzinfo=None)  # as recorded
    latest = {r["id"]: r for r in world.rows("alerts_latest")}
    assert latest[whole["id"]]["is_dismissed"] and latest[target]["is_dismissed"]
    assert latest[whole["id"]]["dismissed_at"] == future.replace(tzinfo=None)


def test_a_stop_between_the_record_and_its_index_entry_is_healed_by_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revisit retries an alert whose dismissal record landed but whose run stopped
    before the index entry: the record's 412 still writes the entry, and the tables find it."""
    from poller.errors import ArchiveUnavailable

    world = World(tmp_path, count=10, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    world.build(clock=clock)
    alert_id = sorted(world.docs)[0]
    real_put = world.store.put

    def dropped(key: str, body: bytes, **kwargs: Any) -> str:
        if "/_poller/index/" in key:
            raise ArchiveUnavailable("connection dropped")
        return real_put(key, body, **kwargs)

    monkeypatch.setattr(world.store, "put", dropped)
    with pytest.raises(ArchiveUnavailable):
        _dismiss(world, alert_id, DAY1 + timedelta(hours=20))
    monkeypatch.setattr(world.store, "put", real_put)
    doc = dict(world.docs[alert_id], isDismissed=True, dismissedAt="2026-11-01T20:00:00+00:00")
    alert = classify(doc)
    assert isinstance(alert, Alert)
    clock.now += timedelta(minutes=1)
    assert world.archive.store_dismissal(alert) is False  # the record was there: a 412
    assert [k for k in world.store.snapshot() if "/_poller/index/dismissals/" in k] == [
        f"p/_poller/index/dismissals/2026/11/10/00/{alert_id}"
    ]
    clock.now += timedelta(hours=1)
    assert world.build(clock=clock).dismissal_rows == 1
    assert [r["id"] for r in world.rows("dismissals")] == [alert_id]
