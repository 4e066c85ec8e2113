"""The query tables when alerts come in through the push path: late pushes into built days
(a lost marker, a re-stamped re-delivery, a receiver's clock behind the watermark's, a batch
of a backlog), a pushed alert never fetchable, a push filed across midnight and verify
--repair. Each test reproduced a defect a break-it review found (but the partition one,
which states the documented rule)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from test_tables import DAY1, PREFIX, World

from poller.app import Runtime, build, local_s3_client
from poller.archive.records import Alert, classify
from poller.archive.state import PendingRecords
from poller.archive.store import MemoryObjectStore
from poller.config import Settings
from poller.errors import ArchiveUnavailable
from poller.serving.pushes import read_push
from poller.simulator.alerts import iso_ms
from poller.walks.sync import Summary
from poller.walks.verify import Verifier

DAY2 = DAY1 + timedelta(days=1)


def runtime_on(world: World, mode: str, now: datetime) -> Runtime:
    runtime = build(Settings(), mode, s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    runtime.clock = lambda: now
    return runtime


def ids_in(world: World, table: str = "alerts") -> Counter[str]:
    return Counter(r["id"] for r in world.rows(table))


class ListingApi:
    """The API listing a fixed set of alerts by their createdAt."""

    requests_sent = 0

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def list_alerts(self, status: str, since: datetime, until: datetime) -> Iterator[list[Any]]:
        page = []
        for doc in self.docs:
            alert = classify(doc)
            assert isinstance(alert, Alert)
            listed_as = "dismissed" if doc.get("isDismissed") else "active"
            if status == listed_as and since <= alert.created < until:
                page.append(doc)
        yield page


# --------------------------------------------------------------------------------------------
# 1. Two webhook keys for one alert in two days -> a row in each day's parts.


def test_verify_repair_after_a_push_stamped_a_minute_earlier_across_midnight_keeps_one_row(
    tmp_path: Path,
) -> None:
    """The push's created_at and the API's createdAt may fall in different minutes (README,
    *One webhook key per alert*); across a UTC midnight they fall in different days. The push
    path files the webhook record under the push's day; verify --repair, which looks for the
    webhook record only in the API's day, writes a second one there and marks that day due:
    the next `poller tables` puts the alert in BOTH days' parts. Expected: exactly one row."""
    world = World(tmp_path, count=6, dismissed=0)
    api_doc = world.factory.alert(DAY2 + timedelta(seconds=20))  # 2026-11-02T00:00:20Z
    pushed_doc = dict(api_doc, created_at=iso_ms(DAY2 - timedelta(seconds=10)))
    del pushed_doc["createdAt"]  # the webhook's own field: 2026-11-01T23:59:50Z
    # A timely push, a few seconds after the alert: day 1 is open then.
    runtime = runtime_on(world, "serve", DAY2 + timedelta(seconds=25))
    results = runtime.receiver(with_detail_fetch=False).take(
        read_push({"alerts": [pushed_doc]}, "org"), DAY2
    )
    assert results[0]["result"] == "archived"
    api_alert = classify(api_doc)
    assert isinstance(api_alert, Alert)
    world.archive.store_full(api_alert)  # the detail fetch (the marker stays: minutes differ)
    world.docs[api_alert.id] = api_doc
    PendingRecords(world.store, world.layout).done(api_alert.id)  # a sync met it
    world.build()
    assert ids_in(world)[api_alert.id] == 1
    # The operator runs the recommended audit over day 2.
    verifier_rt = runtime_on(world, "verify", world.watermark)
    verifier = Verifier(
        ListingApi([api_doc]),
        world.store,
        verifier_rt.archive(),
        ("active", "dismissed"),
        lambda: world.watermark,
    )
    verifier.run(DAY2, DAY2 + timedelta(days=1), True, Summary("verify", "brk6"))
    verifier_rt.mark_tables_due()
    world.build()
    keys = [k for k in world.store.snapshot() if k.endswith(f"/{api_alert.id}")]
    rows = world.rows("alerts", f"id = '{api_alert.id}'")
    assert len(rows) == 1, (sorted(r["date"].isoformat() for r in rows), sorted(keys))


def test_a_pushed_alert_filed_across_midnight_is_in_its_webhook_days_partition(
    tmp_path: Path,
) -> None:
    """A push's created_at a few seconds off the API's createdAt, across midnight: the alert's
    one webhook record is filed under the push's day, and its row goes to that day's
    partition (a day's ids are its webhook keys), with created_at from the full record
    (README, *Query the archive*: a query by creation day widens its date range a day)."""
    world = World(tmp_path, count=6, dismissed=0)
    api_doc = world.factory.alert(DAY2 + timedelta(seconds=20))
    pushed_doc = dict(api_doc, created_at=iso_ms(DAY2 - timedelta(seconds=10)))
    del pushed_doc["createdAt"]
    runtime = runtime_on(world, "serve", DAY2 + timedelta(seconds=25))
    runtime.receiver(with_detail_fetch=False).take(read_push(pushed_doc, "org"), DAY2)
    api_alert = classify(api_doc)
    assert isinstance(api_alert, Alert)
    world.archive.store_full(api_alert)
    world.docs[api_alert.id] = api_doc
    world.build()
    (row,) = world.rows("alerts", f"id = '{api_alert.id}'")
    assert row["created_at"].astimezone(UTC).date() == date(2026, 11, 2)
    assert row["date"] == date(2026, 11, 1)


# --------------------------------------------------------------------------------------------
# 2. A late push whose due marker is lost


class FailFirstDuePut(MemoryObjectStore):
    """S3 fails (5xx after botocore's retries) the first due-marker PUT."""

    failed = False

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        if "/_poller/tables/due/" in key and not self.failed:
            self.failed = True
            raise ArchiveUnavailable("503 SlowDown")
        return super().put(key, body, **conditions)


def test_a_restamped_redelivery_after_a_lost_mark_still_marks_the_day_of_the_webhook_key(
    tmp_path: Path,
) -> None:
    """A late push into a built day writes its webhook record, then its due-marker PUT fails:
    the sender gets a 5xx and re-sends. A relay that re-stamps created_at (README names it)
    re-sends in today's (open) minute: the receiver finds the first key and writes nothing,
    but tells after_write the RE-SEND's day, which is open, so nothing marks the day the
    webhook record is really filed under. The alert never reaches the tables. Expected: the
    day of the key that stands is marked due (and the alert gets its row)."""
    world = World(tmp_path, count=6, dismissed=0)
    store = FailFirstDuePut()
    for key, body in world.store.snapshot().items():
        store.put(key, body)
    world.store = store
    world.archive = type(world.archive)(store, world.layout, "org")
    world.build()
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    late = world.factory.alert(DAY1 + timedelta(hours=5))
    try:
        receiver.take(read_push(late, "org"), now)
        raise AssertionError("the first delivery should have failed on the marker")
    except ArchiveUnavailable:
        pass  # the server answers 503; the sender re-sends
    restamped = dict(late, createdAt=iso_ms(now - timedelta(seconds=30)))
    results = receiver.take(read_push(restamped, "org"), now)
    assert results[0]["result"] == "already_archived"
    alert = classify(late)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)  # the detail fetch
    world.docs[alert.id] = late
    world.build()
    assert ids_in(world)[alert.id] == 1, "the late pushed alert never reaches the tables"


def test_a_late_push_is_tabled_when_the_receivers_clock_is_behind_the_watermarks(
    tmp_path: Path,
) -> None:
    """`poller serve` (its own pods, beside a CronJob) decides "may the day be closed" by its
    own clock plus 5 minutes, while the day was closed by the checkpoint's watermark (the
    sync host's clock less settle). A serve host 8 minutes behind the sync host takes a late
    push (webhook relayed an hour late) into a day already built and writes no marker: the
    alert never reaches the tables. Expected: the day gets marked (e.g. decide by the
    watermark the builder uses, or by whether the day has parts)."""
    world = World(tmp_path, count=6, dismissed=0)
    world.set_watermark(DAY2 + timedelta(minutes=16))  # day 1 is closed (lookback 15 min)
    report = world.build()
    assert "2026-11-01" in report.days_built
    serve_now = DAY2 + timedelta(minutes=9)  # 8 minutes behind the sync host (00:17)
    receiver = runtime_on(world, "serve", serve_now).receiver(with_detail_fetch=False)
    late = world.factory.alert(DAY2 - timedelta(hours=1))
    assert receiver.take(read_push(late, "org"), serve_now)[0]["result"] == "archived"
    alert = classify(late)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)
    world.docs[alert.id] = late
    world.build()
    assert ids_in(world)[alert.id] == 1, "the late push went into a built day unmarked"


# --------------------------------------------------------------------------------------------
# 3. Cost


class CountingStore(MemoryObjectStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts: Counter[str] = Counter()

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        self.puts[key] += 1
        return super().put(key, body, **conditions)


def test_a_batch_of_late_pushes_of_one_day_writes_its_due_marker_once(tmp_path: Path) -> None:
    """A relay replaying a backlog sends a batch of 200 late alerts of one built day. The
    receiver rewrites the day's due marker after EACH alert: 200 marker PUTs (a 4th PUT per
    alert) where one after the batch's writes does the same job. Expected: at most one
    marker PUT per day per batch."""
    world = World(tmp_path, count=6, dismissed=0)
    store = CountingStore()
    for key, body in world.store.snapshot().items():
        store.put(key, body)
    world.store = store
    world.build()
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    backlog = [world.factory.alert(DAY1 + timedelta(minutes=m)) for m in range(200)]
    store.puts.clear()
    results = receiver.take(read_push({"alerts": backlog}, "org"), now)
    assert all(r["result"] == "archived" for r in results)
    marker = f"{PREFIX}/_poller/tables/due/2026-11-01"
    assert store.puts[marker] <= 1, f"{store.puts[marker]} PUTs of {marker} for one batch"


# --------------------------------------------------------------------------------------------
# 4. Owed for ever


def test_a_day_whose_pushed_alert_is_unfetchable_does_not_starve_older_due_days(
    tmp_path: Path,
) -> None:
    """A late push whose full record never comes (the API answers 404: the sync gives it up
    under _poller/unfetchable/) leaves its day due for ever ("a later part completes it"
    never happens). Due-only days are built newest first, and a deadline-bounded pass (the
    daemon's tables.max_seconds_per_cycle) builds at least one day: that day is rebuilt on
    every pass, and an older day marked due by a repair is never reached. Expected: a day
    whose owed alert was given up is finished, and the older day gets built."""
    world = World(tmp_path, count=6, dismissed=0)
    world.build()
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    ghost = world.factory.alert(DAY2 + timedelta(hours=5))  # day 2, never fetchable
    receiver.take(read_push(ghost, "org"), now)
    pending = PendingRecords(world.store, world.layout)
    owed = pending.owed(ghost["id"])
    assert owed is not None
    pending.give_up(owed, "the API answers 404 for it", now)  # what the sync does
    # A repair archives a missing alert into day 1 and marks it due.
    repaired = world.factory.alert(DAY1 + timedelta(hours=3))
    world.put(repaired)
    world.builder().mark_due(DAY1.date(), "archived into by verify")
    built: list[str] = []
    for _ in range(3):  # three daemon passes whose time budget is spent after one day
        builder = world.builder()
        report = builder.run(builder.plan(world.watermark), deadline=time.monotonic())
        built += report.days_built
    assert "2026-11-01" in built, f"passes built only {built}"
    assert ids_in(world)[repaired["id"]] == 1
