"""Break-it review of issue 20 (query tables), fourth round: each test reproduced a defect
found then and states what should happen, over the in-memory World of tests/test_tables.py."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from test_break20 import Clock
from test_tables import DAY1, World


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
    from test_break20 import _dismiss

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
    from test_break20b import _alert, _runtime

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
