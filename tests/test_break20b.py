"""Break-it review of issue 20 (query tables), second round: reproducers over the in-memory
World of tests/test_tables.py."""

from __future__ import annotations

import json
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from test_break20 import Clock
from test_tables import DAY1, World

from poller.app import Runtime, build, local_s3_client
from poller.archive.records import Alert, classify
from poller.archive.writer import Outcome
from poller.cli import _days_without_tables
from poller.config import Settings
from poller.errors import QueryError
from poller.tables.query import PartCache, connect, json_value, run_sql


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
