"""The query tables at their edges: damaged parts, dismissals written behind a listing, clocks
ahead or behind, deadlines and kills between parts, odd alerts and odd keys, ``poller query``'s
own edges. Each test reproduced a defect a break-it review of issue 20 found, and states what
should happen; over the in-memory World of tests/test_tables.py."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from test_tables import DAY1, PREFIX, World

from poller.app import Runtime, build, local_s3_client
from poller.archive.records import Alert, classify
from poller.archive.store import ListedObject, MemoryObjectStore
from poller.archive.writer import Outcome
from poller.cli import _days_without_tables
from poller.config import Settings
from poller.errors import QueryError
from poller.tables.build import TablesBuilder
from poller.tables.query import PartCache, connect, json_value, run_sql
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


def _runtime(world: World, mode: str) -> Runtime:
    runtime = build(Settings(), mode, s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    return runtime


def _alert(world: World, hours: float) -> Alert:
    alert = classify(world.factory.alert(DAY1 + timedelta(hours=hours)))
    assert isinstance(alert, Alert)
    world.docs[alert.id] = alert.raw
    return alert


def test_a_backfill_killed_after_archiving_into_a_closed_day_still_gets_its_alert_tabled(
    tmp_path: Path,
) -> None:
    """A backfill (or verify --repair) killed (SIGKILL, OOM) after it archived into a day whose
    parts exist, and then rerun: the rerun meets a 412 for what the killed run wrote, so the
    day must have been marked due before the write, not only at the end of the run."""
    world = World(tmp_path)
    world.build()
    late = _alert(world, 5)
    killed = _runtime(world, "backfill")
    killed.archive().take(late, "active", DAY1)
    # killed here: its mark_tables_due() never ran
    rerun = _runtime(world, "backfill")
    rerun.archive().take(late, "active", DAY1)  # 412: already archived
    rerun.mark_tables_due()
    world.build()
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))


def test_a_repair_during_a_pass_is_not_lost_when_the_day_was_due_already(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's pass and a manual verify --repair at once. The day is due already (an
    earlier backfill); the pass lists the day's webhooks, then the repair archives a late
    alert and marks the day due: the pass must not clear that marker (README: "a marker a
    backfill rewrote meanwhile stays"), or the late alert is never tabled."""
    world = World(tmp_path)
    world.build()
    builder = world.builder()
    builder.mark_due(DAY1.date(), "archived into by backfill")  # an earlier backfill
    late = _alert(world, 7)
    day_prefix = builder.keys.webhooks_day_prefix(DAY1.date())
    listed = world.store.list_keys
    repaired: list[bool] = []

    def list_keys(prefix: str) -> list[str]:
        keys = listed(prefix)
        if prefix == day_prefix and not repaired:
            repair = _runtime(world, "verify")
            repaired.append(repair.archive().take(late, "active", DAY1) is Outcome.ARCHIVED)
            repair.mark_tables_due()
        return keys

    monkeypatch.setattr(world.store, "list_keys", list_keys)
    pass_ = world.builder()
    pass_.run(pass_.plan(world.watermark))
    monkeypatch.undo()
    assert repaired == [True]
    world.build()
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))


def test_query_does_not_send_the_user_to_poller_tables_for_days_before_the_archive(
    tmp_path: Path,
) -> None:
    """Days before the archive's first day never get tables (poller tables starts there), so
    the default 30-day range of a young archive must not tell the user to run poller tables
    for them: they would run it and be told the same again."""
    world = World(tmp_path)
    world.build()
    runtime = _runtime(world, "query")
    message = _days_without_tables(
        runtime, date(2026, 10, 5), date(2026, 11, 3), ["2026-11-01", "2026-11-02"]
    )
    assert "not closed yet: 2026-11-03" in message
    assert "run poller tables" not in message, message
    assert "2026-10-05" in message and "before the archive" in message, message


@pytest.mark.parametrize(
    "odd", [{"dismissedAt": ""}, {"dismissedAt": None}, {}, {"dismissedAt": 0}]
)
def test_a_dismissal_record_without_a_usable_dismissed_at_still_shows_the_dismissal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, odd: dict[str, Any]
) -> None:
    """The revisit writes a dismissal record for whatever the dismissed list returns; one
    whose dismissedAt is empty (the API's "" for null, threatstack-api.md §7.11), missing or
    0 is still a dismissal the archive shows (SPEC: one row per alert whose archive shows a
    dismissal): counted unreadable and passed over for ever, alerts_latest says "not
    dismissed". It goes to the day it was archived, like a dismissedAt in the future."""
    world = World(tmp_path, count=10, dismissed=0)
    clock = Clock(world, monkeypatch, DAY1 + timedelta(days=1, hours=12))  # in day 2
    world.build(clock=clock)
    target = sorted(world.docs)[0]
    doc = {k: v for k, v in world.docs[target].items() if k != "dismissedAt"}
    alert = classify(doc | {"isDismissed": True, "dismissedBy": "ann"} | odd)
    assert isinstance(alert, Alert)
    assert world.archive.store_dismissal(alert)
    clock.now += timedelta(hours=2)
    report = world.build(clock=clock)
    assert report.ok and report.unreadable == 0
    rows = {r["id"]: r for r in world.rows("dismissals")}
    assert set(rows) == {target}
    assert rows[target]["date"].isoformat() == "2026-11-02"  # the day it was archived
    assert rows[target]["dismissed_at"] is None and rows[target]["dismissed_by"] == "ann"
    latest = {r["id"]: r for r in world.rows("alerts_latest")}
    assert latest[target]["is_dismissed"] is True and latest[target]["dismissed_by"] == "ann"


def test_query_json_lines_are_json_even_for_nan_and_infinity() -> None:
    """SPEC: one JSON object per row. JSON has no NaN or Infinity (Python's json writes them,
    jq and every strict parser refuse the line): they become null, as JavaScript's do."""
    con = duckdb.connect()
    row = con.execute(
        "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, '-inf'::FLOAT AS c,"
        " [1.5, 'nan'::DOUBLE] AS d"
    ).fetchone()
    assert row is not None
    cells = [json_value(v) for v in row]
    assert cells == [None, None, None, [1.5, None]]
    json.dumps(cells, allow_nan=False)


def test_a_dismissal_dated_just_before_its_alert_is_found_by_alerts_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dismissedAt before its alert's creation (clock skew at a UTC midnight) is filed
    under the alert's day, which poller query --since that day reads, not the day before."""
    world = World(tmp_path, count=4, dismissed=0)
    clock = Clock(world, monkeypatch, DAY1 + timedelta(days=2, hours=3))  # in day 3
    alert = _alert(world, 24.01)  # 2026-11-02 00:00:36
    world.archive.store_alert(alert, "active", DAY1)
    doc = dict(alert.raw, isDismissed=True, dismissedAt="2026-11-01T23:59:58Z")
    dismissal = classify(doc)
    assert isinstance(dismissal, Alert)
    assert world.archive.store_dismissal(dismissal)
    world.build(clock=clock)
    fetched = PartCache(world.store, world.layout, tmp_path / "q").fetch(
        date(2026, 11, 2), date(2026, 11, 3)
    )  # poller query --since 2026-11-02
    answer = run_sql(
        connect(fetched.files), f"SELECT is_dismissed FROM alerts_latest WHERE id = '{alert.id}'"
    )
    assert answer.rows == [(True,)]


def test_query_cannot_read_or_write_the_spill_folder_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB adds its temp_directory (``.tmp`` under the working directory, by default) to
    the directories the SQL may use even with external access off: a query could read and
    write files there. The spill folder must be one only poller's DuckDB uses, or none."""
    (tmp_path / "w").mkdir()
    world = World(tmp_path / "w")
    world.build()
    here = tmp_path / "cwd"
    (here / ".tmp").mkdir(parents=True)
    (here / ".tmp" / "notes.csv").write_text("secret,1\n")
    monkeypatch.chdir(here)
    fetched = PartCache(world.store, world.layout, tmp_path / "q").fetch(
        date(2026, 11, 1), date(2026, 11, 3)
    )
    for sql in (
        f"COPY (SELECT 42 AS x) TO '{here}/.tmp/written.csv'",
        "COPY (SELECT 42 AS x) TO '.tmp/written2.csv'",
        f"SELECT * FROM read_csv('{here}/.tmp/notes.csv')",
    ):
        with pytest.raises(QueryError):
            run_sql(connect(fetched.files), sql)
    assert sorted(p.name for p in (here / ".tmp").iterdir()) == ["notes.csv"]


@pytest.mark.parametrize("stray", ["webhooks/", "webhooks/.keep", "webhooks/2026/"])
def test_a_folder_marker_under_webhooks_does_not_hide_the_archive(
    tmp_path: Path, stray: str
) -> None:
    """The S3 console's "Create folder" writes a zero-byte ``webhooks/`` key, lower than every
    dated key: taken as the archive's first key, it is no day, and no day was ever due."""
    world = World(tmp_path)
    world.store.put(
        f"{world.layout.key(stray.rstrip('/'))}{'/' if stray.endswith('/') else ''}", b""
    )
    report = world.build()
    assert report.days_built == ["2026-11-01", "2026-11-02"]


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


def _old_record(world: World, alert_id: str, dismissed_at: str) -> None:
    """A dismissal record from before the index: no entry beside it."""
    doc = dict(world.docs[alert_id], isDismissed=True, dismissedAt=dismissed_at)
    world.store.put(world.layout.dismissal_key(alert_id), json.dumps(doc).encode())


def _part_ids(world: World, table: str, day: str) -> list[str]:
    """The ids in one day's parts, read straight from the bucket."""
    ids: list[str] = []
    for n, key in enumerate(k for k in world.part_keys(table) if f"date={day}/" in k):
        path = world.tmp / f"read-{table}-{day}-{n}.parquet"
        path.write_bytes(world.store.snapshot()[key])
        ids += [r[0] for r in duckdb.connect().execute(f"SELECT id FROM '{path}'").fetchall()]
    return ids


def test_a_damaged_part_does_not_stop_a_paused_scan_from_ever_going_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, *How a day is built*: a damaged part "blocks its day and table only: the pass
    names it, goes on with the other days"; the one-time scan of an archive without the
    index "saves the last key it read (scan_after) ... and the next pass resumes after that
    key". With a damaged dismissals part of day 1 and a scan the daemon's deadline pauses,
    the pass returns before saving scan_after: every later pass scans the same first batch
    again, and the records after it never reach any day, day 2 included (undamaged)."""
    world = World(tmp_path, count=60, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    ids = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-02T23")
    assert world.build(clock=clock).ok  # parts of days 1 and 2
    state = world.layout.key("_poller", "tables", "state.json")
    world.store.delete(state)  # e.g. the remedy of another damaged part, or an old archive
    key = next(k for k in world.part_keys("dismissals") if "2026-11-01" in k)
    world.store.delete(key)
    world.store.put(key, b"PAR1 not really")  # day 1's dismissals part is damaged
    first = min(ids, key=lambda i: world.docs[i]["createdAt"])
    ids.remove(first)
    _old_record(world, first, "2026-11-01T23:00:00Z")  # its day is damaged
    day2 = ids[1:21]
    for alert_id in day2:  # 20 dismissals of day 2, whose parts are fine
        _old_record(world, alert_id, "2026-11-02T23:00:00Z")
    for _ in range(8):  # the daemon's hourly rechecks; batch 7: 3 passes would do
        clock.now += timedelta(hours=1)
        builder = world.builder(clock=clock)
        report = builder.run(builder.plan(world.watermark), deadline=0.0)  # long past
        assert report.damaged_parts == [key]
    rows = Counter(_part_ids(world, "dismissals", "2026-11-02"))
    assert rows == Counter(day2), f"{len(rows)} of {len(day2)} day-2 dismissals"


def test_a_pass_on_a_host_whose_clock_is_behind_keeps_a_recent_dismissal_in_dismissals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC: dismissals has "one row per alert whose archive shows a dismissal (... its
    full record when that is already the dismissed version)"; README: "a host whose clock
    is wrong (poller tables on a laptop) moves nothing". A full record archived already
    dismissed seven hours ago (by S3's clock), built by `poller tables` on a laptop whose
    clock is eight hours behind (a hardware clock kept in local time), is judged "dated
    after the pass" by the host clock and left out of dismissals; its day's dismissals
    part is then written without it, and no later pass (on a right clock) ever adds it."""
    world = World(tmp_path, count=10, dismissed=0)  # the watermark: 2026-11-03T06:00
    clock = Clock(world, monkeypatch, datetime(2026, 11, 3, 6, 30, tzinfo=UTC))  # S3's time
    late = world.factory.alert(DAY1 + timedelta(hours=5), "dismissed")  # a backfill's
    late["dismissedAt"] = "2026-11-02T23:45:00Z"  # a closed day, before S3's now
    world.put(late)
    behind = clock.now - timedelta(hours=8)  # a hardware clock kept in US Pacific time
    report = world.build(clock=lambda: behind)
    assert report.ok
    for _ in range(2):  # the daemon's passes, on a right clock
        clock.now += timedelta(hours=1)
        world.build(clock=clock)
    assert late["id"] in {r["id"] for r in world.rows("dismissals")}


def test_a_pass_past_its_deadline_reads_no_unbounded_number_of_dismissal_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20: the daemon builds tables "within a bounded time per cycle"
    (tables.max_seconds_per_cycle; README: no new day, nor a new batch of the one-time
    scan, after it). Reading the dismissal records through the index has no bound at all:
    after a verify --repair (or a first revisit) archived many dismissals, one daemon pass
    reads every one of them whatever its deadline (here 40 records, batch 7, the deadline
    long past), so a big repair makes one cycle as long as reading them all takes (and
    /healthz, which sees no progress meanwhile, can turn red and restart the pod mid-pass)."""

    world = World(tmp_path, count=60, dismissed=0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    assert world.build(clock=clock).ok  # index in use from now on
    closed = sorted(i for i in world.docs if world.docs[i]["createdAt"] < "2026-11-02T20")
    assert len(closed) >= 20
    clock.now += timedelta(minutes=5)
    for alert_id in closed[:20]:  # a repair's dismissals
        _dismiss(world, alert_id, DAY1 + timedelta(days=1, hours=21))
    clock.now += timedelta(minutes=5)
    builder = world.builder(clock=clock)
    report = builder.run(builder.plan(world.watermark), deadline=0.0)  # long past
    assert report.records_read <= 7, f"{report.records_read} records read past the deadline"


def test_two_queries_at_once_on_one_cache_both_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: poller query "fetches ... into a local cache"; it takes no lease, so an
    analyst may run two at once (two terminals, a script in a loop). Both fetch a part into
    the same temporary name (PART.partial): when the other query renames it into place
    between this one's write and rename, this one's rename finds no file and the query
    fails with a ConfigError (exit 2) saying the cache folder "cannot hold the parts"."""
    from datetime import date

    from poller.tables.query import PartCache

    world = World(tmp_path, count=10, dismissed=0)
    assert world.build().ok
    folder = tmp_path / "shared-cache"
    replace = Path.replace
    raced: list[Path] = []

    def other_query_in_between(self: Path, target: Path) -> Path:
        if self.name.endswith(".partial") and not raced:
            raced.append(self)  # the other query fetches the same part, whole, right now
            PartCache(world.store, world.layout, folder).fetch(date(2026, 11, 1), date(2026, 11, 1))
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", other_query_in_between)
    fetched = PartCache(world.store, world.layout, folder).fetch(
        date(2026, 11, 1), date(2026, 11, 1)
    )
    assert raced and fetched.files["alerts"]


def test_a_backfill_killed_after_a_pass_cleared_its_day_still_gets_its_later_alert_tabled(
    tmp_path: Path,
) -> None:
    """README: "A day is marked before the run's first write into it (a run killed after a
    write leaves it due ...) and again at the run's end". Only the *first* write of a run
    into a day marks it: a daemon pass that runs between two of the backfill's writes into
    the day builds it and deletes the marker (its ETag has not moved); the backfill's next
    write into that day marks nothing, its chunk is committed, and a SIGKILL before the
    run's end (OOM, eviction) leaves the day finished without that alert. The rerun skips
    the committed chunk, so nothing ever marks the day again."""

    world = World(tmp_path, count=10, dismissed=0)
    assert world.build().ok  # the day's parts exist
    backfill = _runtime(world, "backfill")
    archive = backfill.archive()
    first, second = _alert(world, 5), _alert(world, 6)
    archive.take(first, "active", DAY1)  # marks day 1 due, then writes
    report = world.build()  # the daemon's hourly pass, meanwhile
    assert report.alert_rows == 1
    archive.take(second, "active", DAY1)  # the same chunk, a moment later
    archive.settle()  # the chunk commits (BackfillPlan.finish settles first)
    # SIGKILL: mark_tables_due() never runs; the rerun skips the chunk
    world.build()
    assert second.id in {r["id"] for r in world.rows("alerts")}


class Killed(Exception):
    pass


def _dismissed_ids(world: World) -> set[str]:
    closed = world.closed_ids()
    return {
        i
        for i, doc in world.docs.items()
        if i in closed and (doc.get("isDismissed") or doc.get("dismissedAt"))
    }


def _killed_between_parts_then_a_day2_dismissal(
    world: World, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> set[str]:
    """A first pass killed after the alerts parts, before the dismissals parts (both closed
    days lack their dismissals part: due); then the revisit archives a dismissal dated day
    2 of an alert of day 1. Returns day 2's alerts archived already dismissed."""
    day2_dismissed = {
        i for i in _dismissed_ids(world) if world.docs[i]["createdAt"].startswith("2026-11-02")
    }
    assert day2_dismissed
    original = TablesBuilder.write_part

    def killed(self: TablesBuilder, table: str, day: Any, number: int, path: Path) -> Any:
        if table == "dismissals":
            raise Killed()
        return original(self, table, day, number, path)

    monkeypatch.setattr(TablesBuilder, "write_part", killed)
    with pytest.raises(Killed):
        world.build(clock=clock)
    monkeypatch.setattr(TablesBuilder, "write_part", original)
    assert world.part_keys("dismissals") == []
    active_day1 = sorted(
        i
        for i, doc in world.docs.items()
        if doc["createdAt"].startswith("2026-11-01") and not doc.get("isDismissed")
    )
    clock.now += timedelta(minutes=10)
    _dismiss(world, active_day1[0], DAY1 + timedelta(days=1, hours=1))
    clock.now += timedelta(minutes=10)
    return day2_dismissed


def _every_dismissal_once_after_three_passes(
    world: World, clock: Clock, day2_dismissed: set[str]
) -> None:
    for _ in range(3):  # later passes over everything, no deadline
        clock.now += timedelta(hours=1)
        world.build(clock=clock)
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    missing = sorted(day2_dismissed - set(rows))
    assert not missing, f"day 2's dismissed alerts never in dismissals: {missing}"
    assert max(rows.values()) == 1


def test_a_deadline_pass_after_a_kill_between_parts_loses_a_days_dismissals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (How a day is built): "a day's dismissals part is what makes it look finished
    ... a kill between the two leaves the day to be built again". After such a kill, the
    daemon's next pass (its deadline already spent after one day) built day 1 only but wrote
    day 2's dismissals part anyway (a dismissal of day 2 came in): day 2 looked finished and
    its alerts archived already dismissed never got their dismissals rows (brk3a)."""
    world = World(tmp_path, count=40, dismissed=0.5)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    day2_dismissed = _killed_between_parts_then_a_day2_dismissal(world, clock, monkeypatch)
    builder = world.builder(clock=clock)
    first = builder.run(builder.plan(world.watermark), time.monotonic() - 1)  # deadline spent
    assert first.days_built == ["2026-11-01"]
    _every_dismissal_once_after_three_passes(world, clock, day2_dismissed)


def test_a_ranged_pass_writes_no_dismissals_part_for_an_unbuilt_day_outside_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same loss by another way: ``poller tables --until 2026-11-01`` after such a kill
    wrote day 2's dismissals part (day 2 outside its range, not in its plan) with only the
    dismissal sent to it from day 1 (brk4a)."""
    world = World(tmp_path, count=40, dismissed=0.5)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    day2_dismissed = _killed_between_parts_then_a_day2_dismissal(world, clock, monkeypatch)
    builder = world.builder(clock=clock)
    ranged = builder.run(builder.plan(world.watermark, until=date(2026, 11, 1)))
    assert ranged.days_built == ["2026-11-01"]
    _every_dismissal_once_after_three_passes(world, clock, day2_dismissed)


def test_with_no_lookback_a_day_is_closed_while_the_next_cycle_still_rereads_into_it() -> None:
    """SPEC (Query tables): a day is closed once the live watermark is past its end by
    ``sync.lookback_seconds`` (README: only closed days get parts, and the sync cycle's
    archive marks nothing due). ``lookback_seconds`` may be 0, but every cycle still re-reads
    at least one second (SPEC, Windows overlap): with the watermark at midnight the day
    before is closed, and the next cycle's window starts at 23:59:59 of that closed day, so
    an alert it archives there (created in that second, returned late or only by the
    re-read) goes into a day whose parts exist, with no due marker: never in a table.
    A day should be closed only once no cycle can archive into it any more."""
    from poller.tables.keys import last_closed_day
    from poller.timeutil import floor_second
    from poller.walks.sync import reread

    lookback = timedelta(0)
    watermark = datetime(2026, 11, 2, tzinfo=UTC)
    closed = last_closed_day(watermark, lookback)
    next_window_from = floor_second(watermark - reread(lookback))
    assert closed is not None
    assert next_window_from.date() > closed, (
        f"day {closed} is closed, yet the next cycle reads from {next_window_from}"
    )


def test_passes_whose_deadline_allows_one_day_never_reach_the_day_a_dismissal_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass past its deadline still builds one day (README: the next cycle goes on). An
    alert of day 1 archived already dismissed, its dismissedAt on day 2, keeps day 1 due
    while day 2 is unbuilt (held_days); every later pass builds the oldest due day first,
    so day 1 again and again, and day 2 is never reached: it never gets its parts, and day
    1 never leaves due (SPEC Query tables: every closed day gets its parts)."""
    world = World(tmp_path, count=20, dismissed=0.0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    doc = dict(next(iter(world.docs.values())))
    doc["id"] = "abcd" + doc["id"][4:]
    doc["createdAt"] = "2026-11-01T23:00:00.000Z"
    doc.update(isDismissed=True, dismissedAt="2026-11-02T01:00:00.000Z")
    world.put(doc)
    for _ in range(4):
        clock.now += timedelta(hours=1)
        builder = world.builder(clock=clock)
        builder.run(builder.plan(world.watermark), time.monotonic() - 1)  # one day a pass
    assert world.part_keys("alerts") and any(
        "date=2026-11-02" in k for k in world.part_keys("alerts")
    ), f"day 2 never built: {world.part_keys('alerts')}"


def test_passes_with_time_for_one_day_reach_a_marked_day_a_dismissal_waits_for(
    tmp_path, monkeypatch
):
    # brk4a put days lacking a part before days only marked due, but both days of the same
    # cycle can be marked only (a backfill or verify --repair into two closed, built days):
    # day 1 (oldest marked) is rebuilt by every one-day pass, its dismissal dated day 2
    # waits because day 2 is marked and unbuilt (held_days), day 1 stays due, and day 2 is
    # never reached: the row never lands, both days stay due for ever.
    import time
    from datetime import UTC, date, datetime, timedelta

    from test_tables import World

    world = World(tmp_path, count=20, dismissed=0.0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    world.build(clock=clock)  # every closed day built, nothing due
    clock.now += timedelta(hours=1)
    doc = dict(next(iter(world.docs.values())))
    doc["id"] = "abcd" + doc["id"][4:]
    doc["createdAt"] = "2026-11-01T23:00:00.000Z"
    doc.update(isDismissed=True, dismissedAt="2026-11-02T01:00:00.000Z")
    world.put(doc)  # a backfill of day 1, and something archived into day 2: both marked
    builder = world.builder(clock=clock)
    builder.mark_due(date(2026, 11, 1), "backfill")
    builder.mark_due(date(2026, 11, 2), "backfill")
    for _ in range(4):
        clock.now += timedelta(hours=1)
        builder = world.builder(clock=clock)
        builder.run(builder.plan(world.watermark), time.monotonic() - 1)  # one day a pass
    assert doc["id"] in {r["id"] for r in world.rows("dismissals")}
    assert builder.plan(world.watermark).due == []


def test_a_dismissal_dated_before_the_archives_first_day_does_not_wait_for_ever(
    tmp_path, monkeypatch
):
    # A dismissal record whose alert and dismissedAt are before the archive's first webhooks
    # day (an alert the archive never had: a revisit, verify --repair). That day is never due
    # (plans start at the first day) so it never gets parts; since brk4a, a target day that
    # lacks a part is held (held_days) whether or not any pass can build it: the row waits
    # for ever and the dismissal mark stays before it, so every later pass lists and reads
    # again everything written since. Before brk4a the row got its part.
    from datetime import UTC, datetime, timedelta

    from test_tables import World

    from poller.archive.records import classify

    world = World(tmp_path, count=20, dismissed=0.0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    doc = dict(next(iter(world.docs.values())))
    doc["id"] = "abcd" + doc["id"][4:]
    doc.update(
        createdAt="2026-10-30T23:00:00.000Z",
        isDismissed=True,
        dismissedAt="2026-10-31T01:00:00.000Z",
    )
    assert world.archive.store_dismissal(classify(doc))
    for _ in range(3):
        clock.now += timedelta(hours=1)
        report = world.build(clock=clock)
    assert report.waiting_dismissals == 0
    assert world.builder(clock=clock).load_mark().at > datetime(2026, 11, 10, tzinfo=UTC)
