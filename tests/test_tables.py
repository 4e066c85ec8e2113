"""The query tables over an in-memory store: parts per closed day, later parts with only what
earlier parts lack, dismissals, owed full records, a kill and a rerun, and poller query's
SQL over the parts (SPEC "Query tables")."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
from rich.console import Console

from poller.app import build, local_s3_client
from poller.archive.records import Alert, Layout, classify
from poller.archive.state import CheckpointStore
from poller.archive.store import MemoryObjectStore
from poller.archive.writer import Archive
from poller.cli import _tables_status
from poller.config import Settings, TablesSettings
from poller.errors import QueryError
from poller.serving.daemon import Daemon
from poller.serving.pushes import read_push
from poller.simulator.alerts import AlertFactory
from poller.tables.build import TablesBuilder
from poller.tables.keys import last_closed_day
from poller.tables.query import PartCache, connect, json_value, run_sql
from poller.terminal import render_status
from poller.timeutil import utc_now
from poller.walks.sync import Summary

DAY1 = datetime(2026, 11, 1, tzinfo=UTC)
LOOKBACK = timedelta(seconds=900)
PREFIX = "p"


class World:
    """An archive of a few alerts over three days; days 1 and 2 closed, day 3 open."""

    def __init__(self, tmp: Path, count: int = 30, dismissed: float = 0.3) -> None:
        self.store = MemoryObjectStore()
        self.layout = Layout(PREFIX)
        self.archive = Archive(self.store, self.layout, "org")
        self.factory = AlertFactory(seed=3)
        self.tmp = tmp
        self.docs: dict[str, dict[str, Any]] = {}
        for doc, _created, _status in self.factory.spread(
            count, DAY1, DAY1 + timedelta(days=3), dismissed
        ):
            self.put(doc)
        # Day 3 (2026-11-03) is open: the watermark is inside it.
        self.set_watermark(DAY1 + timedelta(days=2, hours=6))

    def put(self, doc: dict[str, Any]) -> Alert:
        alert = classify(doc)
        assert isinstance(alert, Alert)
        self.archive.store_alert(alert, "active", DAY1)
        self.docs[alert.id] = doc
        return alert

    def set_watermark(self, watermark: datetime) -> None:
        checkpoints = CheckpointStore(self.store, self.layout)
        checkpoints.commit(checkpoints.load(), watermark, {}, "test", "sync", watermark)
        self.watermark = watermark

    def builder(self, **extra: Any) -> TablesBuilder:
        return TablesBuilder(
            self.store, self.layout, lookback=LOOKBACK, batch_size=7, workdir=self.tmp, **extra
        )

    def build(self, **extra: Any) -> Any:
        builder = self.builder(**extra)
        return builder.run(builder.plan(self.watermark))

    def rows(self, table: str, where: str = "true") -> list[dict[str, Any]]:
        cache = PartCache(self.store, self.layout, self.tmp / "cache")
        fetched = cache.fetch(date(2026, 1, 1), date(2027, 1, 1))
        con = connect(fetched.files)
        answer = run_sql(con, f'SELECT *, "date" FROM {table} WHERE {where} ORDER BY id')
        return [dict(zip(answer.columns, row, strict=True)) for row in answer.rows]

    def part_keys(self, table: str) -> list[str]:
        return [k for k in self.store.snapshot() if k.startswith(f"{PREFIX}/tables/{table}/")]

    def closed_ids(self) -> dict[str, date]:
        closed = last_closed_day(self.watermark, LOOKBACK)
        assert closed is not None
        return {
            alert_id: created.date()
            for alert_id, doc in self.docs.items()
            if (created := _created(doc)).date() <= closed
        }


def _created(doc: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(doc["createdAt"].replace("Z", "+00:00"))


def test_one_part_per_closed_day_and_table_each_alert_once_and_a_rerun_writes_nothing(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    report = world.build()
    assert report.days_built == ["2026-11-01", "2026-11-02"]
    for table in ("alerts", "dismissals"):
        assert sorted(world.part_keys(table)) == [
            f"{PREFIX}/tables/{table}/date=2026-11-01/part-0001.parquet",
            f"{PREFIX}/tables/{table}/date=2026-11-02/part-0001.parquet",
        ]
    rows = world.rows("alerts")
    expected = world.closed_ids()
    assert Counter(r["id"] for r in rows) == Counter(list(expected))  # each closed-day alert once
    for row in rows:
        assert json.loads(row["record"]) == world.docs[row["id"]]
        assert row["date"] == expected[row["id"]]
        assert row["key"] == world.layout.alert_key(row["id"])
        assert row["severity"] == world.docs[row["id"]]["severity"]
    before = world.store.snapshot()
    again = world.build()
    assert again.parts_written == 0 and again.days_built == []
    assert world.store.snapshot() == before


def test_late_alerts_into_a_closed_day_go_into_a_new_part_with_exactly_them(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.build()
    late = [world.factory.alert(DAY1 + timedelta(hours=h)) for h in (3, 4)]
    world.archive.touched.clear()
    for doc in late:
        world.put(doc)
    builder = world.builder()
    for day in world.archive.touched:  # what a backfill or verify --repair does
        builder.mark_due(day, "repair")
    report = builder.run(builder.plan(world.watermark))
    assert report.days_built == ["2026-11-01"]
    new_part = f"{PREFIX}/tables/alerts/date=2026-11-01/part-0002.parquet"
    assert new_part in world.part_keys("alerts")
    con = duckdb.connect()
    path = tmp_path / "p2.parquet"
    path.write_bytes(world.store.snapshot()[new_part])
    ids = {r[0] for r in con.execute(f"SELECT id FROM read_parquet('{path}')").fetchall()}
    assert ids == {doc["id"] for doc in late}
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))
    assert not [k for k in world.store.snapshot() if "/_poller/tables/due/" in k]


def test_an_alert_owed_its_full_record_is_completed_by_a_later_part(tmp_path: Path) -> None:
    world = World(tmp_path, count=6, dismissed=0)
    pushed = classify(world.factory.alert(DAY1 + timedelta(hours=5)))
    assert isinstance(pushed, Alert)
    # The push path wrote the webhook record; the full record is still owed.
    world.store.put(world.layout.webhook_key(pushed.id, pushed.created), b"{}")
    first = world.build()
    assert first.owed_full_records == 1
    assert pushed.id not in {r["id"] for r in world.rows("alerts")}
    assert f"{PREFIX}/_poller/tables/due/2026-11-01" in world.store.snapshot()
    world.archive.store_full(pushed)
    world.docs[pushed.id] = pushed.raw
    second = world.build()
    assert second.days_built == ["2026-11-01"] and second.alert_rows == 1
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))
    assert f"{PREFIX}/_poller/tables/due/2026-11-01" not in world.store.snapshot()


def test_dismissals_from_full_records_and_dismissal_records_by_their_day(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, count=12, dismissed=0)
    # One alert archived already dismissed (its full record is the dismissed version).
    dismissed_doc = world.factory.alert(DAY1 + timedelta(hours=1), "dismissed")
    dismissed_doc["dismissedAt"] = "2026-11-01T02:00:00.000Z"
    world.put(dismissed_doc)
    world.build()
    # Later, the revisit archives a dismissal record for an active alert of day 1, dismissed
    # on day 3 (open now); then day 3 closes.
    target = next(d for d in world.docs.values() if _created(d).date() == DAY1.date())
    if target is dismissed_doc:
        target = [d for d in world.docs.values() if _created(d).date() == DAY1.date()][1]
    record = dict(target, isDismissed=True, dismissedAt="2026-11-03T10:00:00.000Z")
    record |= {"dismissReason": "OTHER", "dismissReasonText": "ticket 7", "dismissedBy": "ann"}
    dismissal = classify(record)
    assert isinstance(dismissal, Alert)
    assert world.archive.store_dismissal(dismissal)  # as the revisit and verify --repair do
    waiting = world.build()
    assert waiting.waiting_dismissals == 1  # its day is not closed yet
    world.set_watermark(DAY1 + timedelta(days=4, hours=1))
    world.build()
    dismissals = {r["id"]: r for r in world.rows("dismissals")}
    assert set(dismissals) == {dismissed_doc["id"], target["id"]}
    assert dismissals[target["id"]]["date"] == date(2026, 11, 3)
    assert dismissals[dismissed_doc["id"]]["date"] == date(2026, 11, 1)
    latest = {r["id"]: r for r in world.rows("alerts_latest")}
    assert latest[target["id"]]["is_dismissed"] is True
    assert latest[target["id"]]["dismiss_reason_text"] == "ticket 7"
    assert json.loads(latest[target["id"]]["dismissal_record"]) == record
    assert json.loads(latest[target["id"]]["record"]) == target  # the first record stands
    # Nothing twice, and a further pass writes nothing.
    assert Counter(r["id"] for r in world.rows("dismissals")).most_common(1)[0][1] == 1
    before = world.store.snapshot()
    world.build()
    assert {k: v for k, v in world.store.snapshot().items() if "/tables/" in k} == {
        k: v for k, v in before.items() if "/tables/" in k
    }


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


class DyingStore(MemoryObjectStore):
    """A store whose process dies at the n-th PUT of a table part."""

    def __init__(self, base: MemoryObjectStore, die_at: int) -> None:
        self.__dict__.update(base.__dict__)
        self.die_at = die_at
        self.part_puts = 0

    def put(self, key: str, body: bytes, **options: Any) -> str:
        if "/tables/" in key:
            self.part_puts += 1
            if self.part_puts == self.die_at:
                raise Killed()
        return super().put(key, body, **options)


@pytest.mark.parametrize("die_at", [1, 2, 3, 4, 5])
def test_a_kill_during_tables_then_a_rerun_same_rows_none_twice(
    tmp_path: Path, die_at: int
) -> None:
    """A kill at each write of a part (and of a due marker): the rerun has every row once,
    including a dismissal that goes to a later day than its alert's (archived already
    dismissed: the kill between its days' dismissals parts must not lose it)."""
    world = World(tmp_path, count=20)
    crossing = world.factory.alert(DAY1 + timedelta(hours=23), "dismissed")
    crossing["dismissedAt"] = "2026-11-02T01:00:00.000Z"
    world.put(crossing)
    world.store = DyingStore(world.store, die_at)
    with pytest.raises(Killed):
        world.build()
    world.store.die_at = 0
    world.build()
    rows = world.rows("alerts")
    assert Counter(r["id"] for r in rows) == Counter(list(world.closed_ids()))
    dismissals = world.rows("dismissals")
    assert len({r["id"] for r in dismissals}) == len(dismissals)
    closed = date(2026, 11, 2)
    assert {r["id"] for r in dismissals} == {
        r["id"] for r in rows if r["dismissed_at"] and r["dismissed_at"].date() <= closed
    }
    assert {r["id"]: r["date"] for r in dismissals}[crossing["id"]] == closed


def test_two_builders_racing_for_a_part_never_put_an_alert_twice(tmp_path: Path) -> None:
    world = World(tmp_path, count=10, dismissed=0)
    slow, fast = world.builder(), world.builder()
    plan = slow.plan(world.watermark)  # planned before the other one wrote anything
    fast.run(fast.plan(world.watermark))
    late = world.put(world.factory.alert(DAY1 + timedelta(hours=9)))
    slow.mark_due(late.created.date(), "repair")
    plan.markers = slow.markers()
    slow.run(plan)
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))


def test_query_counts_by_severity_like_the_archive_and_bad_sql_is_refused(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.build()
    cache = PartCache(world.store, world.layout, tmp_path / "cache")
    fetched = cache.fetch(date(2026, 11, 1), date(2026, 11, 3))
    assert fetched.downloaded == 4 and fetched.reused == 0
    answer = run_sql(
        connect(fetched.files), "SELECT severity, count(*) FROM alerts GROUP BY 1 ORDER BY 1"
    )
    expected = Counter(world.docs[i]["severity"] for i in world.closed_ids())
    assert dict(answer.rows) == dict(expected)
    again = cache.fetch(date(2026, 11, 1), date(2026, 11, 3))
    assert again.downloaded == 0 and again.reused == 4  # ETags unchanged: nothing fetched
    with pytest.raises(QueryError, match=r"DuckDB refused the SQL: .*alertz"):
        run_sql(connect(fetched.files), "SELECT * FROM alertz")


def test_query_over_days_without_tables_has_the_tables_empty(tmp_path: Path) -> None:
    con = connect({})
    assert run_sql(con, "SELECT count(*) FROM alerts_latest").rows == [(0,)]


def test_the_readme_questions_run(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.build()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("Three questions:", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    statements = [s.strip() for s in block.split(";") if s.strip()]
    assert len(statements) == 3
    cache = PartCache(world.store, world.layout, tmp_path / "cache")
    con = connect(cache.fetch(date(2026, 11, 1), date(2026, 11, 3)).files)
    per_day = run_sql(con, statements[1])
    assert sum(row[2] for row in per_day.rows) == len(world.closed_ids())
    for statement in (statements[0], statements[2]):
        run_sql(con, statement)


def test_a_pass_past_its_deadline_starts_no_new_day_and_the_next_goes_on(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    builder = world.builder()
    first = builder.run(builder.plan(world.watermark), deadline=0.0)  # long past
    assert first.days_built == ["2026-11-01"] and first.days_left == 1
    second = world.build()
    assert second.days_built == ["2026-11-02"]
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))


def _daemon(world: World, enabled: bool) -> Any:
    settings = Settings(tables=TablesSettings(enabled=enabled))
    runtime = build(settings, "run", s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    return Daemon(runtime, utc_now)


def test_the_daemon_builds_tables_after_an_ok_cycle_and_then_only_when_a_day_closes(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    daemon = _daemon(world, enabled=True)
    summary = Summary(mode="run", run_id="r", watermark=world.watermark.isoformat())
    daemon.tables(summary)
    assert len(world.part_keys("alerts")) == 2
    assert daemon.metrics.registry.get_sample_value("poller_table_parts_total") == 4
    requests = world.store.requests
    daemon.tables(summary)  # no day closed since: not even a listing
    assert world.store.requests == requests
    world.set_watermark(DAY1 + timedelta(days=3, hours=1))
    daemon.tables(Summary(mode="run", run_id="r", watermark=world.watermark.isoformat()))
    assert len(world.part_keys("alerts")) == 3


def test_the_daemon_leaves_tables_alone_when_disabled(tmp_path: Path) -> None:
    world = World(tmp_path)
    requests = world.store.requests
    _daemon(world, enabled=False).tables(
        Summary(mode="run", run_id="r", watermark=world.watermark.isoformat())
    )
    assert world.store.requests == requests and world.part_keys("alerts") == []


def test_a_kill_after_a_day_looks_finished_still_leaves_its_owed_alert_to_a_later_part(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, count=6, dismissed=0)
    pushed = classify(world.factory.alert(DAY1 + timedelta(hours=5)))
    assert isinstance(pushed, Alert)
    world.store.put(world.layout.webhook_key(pushed.id, pushed.created), b"{}")
    world.store = DyingStore(world.store, die_at=4)  # after the last dismissals part
    with pytest.raises(Killed):
        world.build()
    world.store.die_at = 0
    world.archive.store_full(pushed)
    world.docs[pushed.id] = pushed.raw
    world.build()
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))


def test_a_range_from_before_the_archive_starts_at_its_first_day(tmp_path: Path) -> None:
    world = World(tmp_path, count=6)
    builder = world.builder()
    plan = builder.plan(world.watermark, since=date(2020, 1, 1))
    assert plan.due == [date(2026, 11, 1), date(2026, 11, 2)]


def test_query_cells_become_json_values() -> None:
    assert json_value(datetime(2026, 11, 1, 12, 0)) == "2026-11-01T12:00:00Z"
    assert json_value(date(2026, 11, 1)) == "2026-11-01"
    assert json_value(Decimal("3")) == 3 and json_value(Decimal("2.5")) == 2.5
    assert json_value([1, None, "x"]) == [1, None, "x"]


def test_a_late_push_into_a_built_day_goes_into_a_new_part(tmp_path: Path) -> None:
    """A webhook pushed after its alert's day has its parts (a relayed webhook retried for
    hours; an alert the API does not list, so no sync writes it) makes the day due again:
    the next pass writes a part with exactly that alert. A push into the open day marks
    nothing (a PUT per push would cost the push path)."""
    world = World(tmp_path, count=6, dismissed=0)
    world.build()
    runtime = build(Settings(), "run", s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    runtime.clock = lambda: world.watermark + timedelta(minutes=1)
    receiver = runtime.receiver(with_detail_fetch=False)
    late = world.factory.alert(DAY1 + timedelta(hours=5))
    today = world.factory.alert(world.watermark - timedelta(minutes=3))
    pushed = read_push({"alerts": [late, today]}, "org")
    results = receiver.take(pushed, world.watermark)
    assert [r["result"] for r in results] == ["archived", "archived"]
    due = [k for k in world.store.snapshot() if "/_poller/tables/due/" in k]
    assert due == [f"{PREFIX}/_poller/tables/due/2026-11-01"]
    first = world.build()
    assert first.owed_full_records == 1  # the detail fetch has not run yet: the day waits
    alert = classify(late)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)  # what the detail fetch writes
    world.docs[alert.id] = late
    second = world.build()
    assert second.days_built == ["2026-11-01"] and second.alert_rows == 1
    assert Counter(r["id"] for r in world.rows("alerts")) == Counter(list(world.closed_ids()))


def test_status_tells_a_day_waiting_for_a_later_days_dismissals_from_pending_work(
    tmp_path: Path,
) -> None:
    """An alert created on a closed day and archived already dismissed on the open day keeps
    its day due (its dismissals row is built from that day, for a day not closed yet): not
    work anyone must do, so `poller status` shows it as waiting, not pending; a day a repair
    marked stays pending."""
    world = World(tmp_path, count=6, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(days=1, hours=23), "dismissed")
    doc["dismissedAt"] = (world.watermark - timedelta(hours=1)).isoformat()  # on day 3
    world.put(doc)
    report = world.build()
    assert report.waiting_dismissals == 1
    runtime = build(Settings(), "status", s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    status = _tables_status(runtime, world.watermark)
    assert status["pending"] == 0 and status["pending_days"] == []
    assert status["waiting_days"] == ["2026-11-02"]
    world.builder().mark_due(DAY1.date(), "archived into by verify")
    status = _tables_status(runtime, world.watermark)
    assert status["pending_days"] == ["2026-11-01"] and status["waiting_days"] == ["2026-11-02"]
    console = Console(record=True, width=200)
    console.print(render_status({"bucket": "b", "tables": status}, world.watermark))
    assert "1 days pending: 2026-11-01; 1 built, waiting" in console.export_text()
    world.set_watermark(DAY1 + timedelta(days=3, hours=1))  # day 3 closes: nothing waits
    world.build()
    status = _tables_status(runtime, world.watermark)
    assert status["pending"] == 0 and status["waiting_days"] == []


def test_a_repair_marking_a_waiting_day_during_a_pass_keeps_it_pending(tmp_path: Path) -> None:
    """The pass rewrites a waiting day's marker to say why it stays due, but only over the
    marker it planned with: a repair that marked the day again meanwhile (a new alert the
    pass may not have listed) keeps its reason, and status shows the day pending."""
    world = World(tmp_path, count=6, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(days=1, hours=23), "dismissed")
    doc["dismissedAt"] = (world.watermark - timedelta(hours=1)).isoformat()  # on day 3
    world.put(doc)
    world.build()  # day 2 waits for day 3
    marker = f"{PREFIX}/_poller/tables/due/2026-11-02"

    class RepairMeanwhile(MemoryObjectStore):
        def put(self, key: str, body: bytes, **options: Any) -> str:
            if key == marker and options.get("if_match"):
                super().put(key, b'{"reason": "archived into by verify"}')  # the repair
            return super().put(key, body, **options)

    store = RepairMeanwhile()
    store.__dict__.update(world.store.__dict__)
    world.store = store
    world.build()
    runtime = build(Settings(), "status", s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    status = _tables_status(runtime, world.watermark)
    assert status["pending_days"] == ["2026-11-02"] and status["waiting_days"] == []
