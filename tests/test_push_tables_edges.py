"""The query tables when alerts come in through the push path: late pushes into built days
(a lost marker, a re-stamped re-delivery, a receiver's clock behind the watermark's, a
backlog in one batch, a batch failing half way), pushed alerts given up on (and pushed again),
a push filed across midnight and verify --repair, and what `poller status` says of the days
kept due. Each test reproduced a defect a break-it review found (but the partition one,
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
from poller.cli import _tables_status
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


def repair_day_2(world: World, api_doc: dict[str, Any]) -> None:
    """`poller verify --repair` over day 2, the API listing ``api_doc``, then the days it
    archived into marked due (as the command does at its end)."""
    runtime = runtime_on(world, "verify", world.watermark)
    verifier = Verifier(
        ListingApi([api_doc]),
        world.store,
        runtime.archive(),
        ("active", "dismissed"),
        lambda: world.watermark,
    )
    verifier.run(DAY2, DAY2 + timedelta(days=1), True, Summary("verify", "repair"))
    runtime.mark_tables_due()


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
    repair_day_2(world, api_doc)
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


class FailSecondDuePut(MemoryObjectStore):
    """S3 fails (5xx after botocore's retries) the second due-marker PUT: a push's marking
    after its batch's writes (the first is the marking before them)."""

    due_puts = 0

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        if "/_poller/tables/due/" in key:
            self.due_puts += 1
            if self.due_puts == 2:
                raise ArchiveUnavailable("503 SlowDown")
        return super().put(key, body, **conditions)


def test_a_restamped_redelivery_after_a_lost_mark_still_marks_the_day_of_the_webhook_key(
    tmp_path: Path,
) -> None:
    """A late push into a built day writes its webhook record, then its due-marker PUT after
    the batch fails (and a pass cleared the one written ahead of the write): the sender gets
    a 5xx and re-sends. A relay that re-stamps created_at (README names it)
    re-sends in today's (open) minute: the receiver finds the first key and writes nothing,
    but tells after_write the RE-SEND's day, which is open, so nothing marks the day the
    webhook record is really filed under. The alert never reaches the tables. Expected: the
    day of the key that stands is marked due (and the alert gets its row)."""
    world = World(tmp_path, count=6, dismissed=0)
    store = FailSecondDuePut()
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
    # A pass that listed the day just before the write cleared the marker written ahead of it.
    store.delete(f"{PREFIX}/_poller/tables/due/2026-11-01")
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


class CountingStore(MemoryObjectStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts: Counter[str] = Counter()

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        self.puts[key] += 1
        return super().put(key, body, **conditions)


def test_a_batch_of_late_pushes_of_one_day_marks_the_day_twice_not_per_alert(
    tmp_path: Path,
) -> None:
    """A relay replaying a backlog sends a batch of 200 late alerts of one built day. The
    receiver rewrote the day's due marker after EACH alert: 200 marker PUTs (a 4th PUT per
    alert). Expected: two per day and batch (before its first write into the day, and after
    the batch's writes)."""
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
    # Once before the batch's first write into the day, once after its writes.
    assert store.puts[marker] == 2, f"{store.puts[marker]} PUTs of {marker} for one batch"


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


DAY3 = DAY1 + timedelta(days=2)


def _status(world: World) -> dict[str, Any]:
    runtime = build(Settings(), "status", s3=local_s3_client("http://127.0.0.1:9"))
    runtime.store, runtime.layout = world.store, world.layout
    return _tables_status(runtime, world.watermark)


def test_a_given_up_alert_pushed_again_and_then_fetched_gets_its_row(tmp_path: Path) -> None:
    """A late push into built day 2 whose full record the sync gave up on (10 failed
    fetches: `_poller/unfetchable/ID`). The sender re-delivers it later: the receiver marks
    it owed again (`_poller/pending/ID`) and marks day 2 due. The next pass runs before the
    full record is fetched: the id is in `unfetchable/` (nothing ever removes that entry), so
    the pass builds the day WITHOUT it and deletes the marker. Then the sync's by-id fetch
    (run mode: no due marker) writes the full record: no marker is left, the alert is in the
    archive and never in the tables. Expected: an id that is owed again (pending) is not
    "given up": the day stays due until its full record comes, and the alert gets its row."""
    world = World(tmp_path, count=6, dismissed=0)
    world.build()
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    late = world.factory.alert(DAY2 + timedelta(hours=5))
    receiver.take(read_push(late, "org"), now)
    pending = PendingRecords(world.store, world.layout)
    owed = pending.owed(late["id"])
    assert owed is not None
    pending.give_up(owed, "10 fetches failed: 503", now)  # what the sync does
    first = world.build()
    assert first.given_up_full_records == 1
    # The vendor (or a relay replaying its backlog) delivers the alert again.
    later = now + timedelta(hours=2)
    receiver = runtime_on(world, "serve", later).receiver(with_detail_fetch=False)
    assert receiver.take(read_push(late, "org"), later)[0]["result"] == "already_archived"
    assert pending.owed(late["id"]) is not None  # owed again
    assert f"{PREFIX}/_poller/tables/due/2026-11-02" in world.store.snapshot()
    world.build()  # a daemon pass, before the sync's fetch of the owed id
    alert = classify(late)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)  # the sync's _fetch_owed (mode run: marks nothing)
    pending.done(alert.id)
    world.docs[alert.id] = late
    world.build()
    assert ids_in(world)[alert.id] == 1, "archived, but never in the tables"


def test_status_does_not_show_a_day_owed_a_full_record_as_only_waiting(tmp_path: Path) -> None:
    """Day 2 holds an alert archived already dismissed whose dismissedAt is on open day 3:
    its marker says WAITING (fine). A late push then files an alert into day 2 (marker:
    "archived into by a late push"; status: pending). The next pass builds day 2 before the
    full record is fetched: `_keep_due(day, "owed full records")` writes nothing because the
    day already has a marker, then the WAITING rewrite (say_why) replaces the marker's
    reason. `poller status` now lists day 2 under waiting_days only ("nothing to do but
    wait") and pending 0, while the day lacks an alert. Expected: a day with owed full
    records is pending, not waiting."""
    world = World(tmp_path, count=6, dismissed=0)
    doc = world.factory.alert(DAY2 + timedelta(hours=23), "dismissed")
    doc["dismissedAt"] = iso_ms(world.watermark - timedelta(hours=1))  # on open day 3
    world.put(doc)
    world.build()
    assert _status(world)["waiting_days"] == ["2026-11-02"]
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    late = world.factory.alert(DAY2 + timedelta(hours=5))
    receiver.take(read_push(late, "org"), now)
    assert _status(world)["pending_days"] == ["2026-11-02"]
    report = world.build()
    assert report.owed_full_records == 1  # the day lacks an alert still
    status = _status(world)
    assert "2026-11-02" in status["pending_days"], status


def test_verify_repair_of_a_pushed_alert_across_midnight_without_full_record_keeps_one_key(
    tmp_path: Path,
) -> None:
    """A push stamped 23:59:50 on day 1 for an alert the API says was created 00:00:20 on
    day 2: its one webhook record is filed under day 1. Its full record was never fetched
    (the sync gave up: 10 failed fetches). `verify --repair` over day 2 looks in day 1's
    last hour only for alerts whose full record is archived, so it writes the full record
    AND a second webhook record under day 2. The alert now has two webhook keys; day 1 is
    built again (any later repair/backfill over it marks it) and the alert has a row in both
    days' parts. Expected: one webhook key, one row."""
    world = World(tmp_path, count=6, dismissed=0)
    api_doc = world.factory.alert(DAY2 + timedelta(seconds=20))
    pushed_doc = dict(api_doc, created_at=iso_ms(DAY2 - timedelta(seconds=10)))
    del pushed_doc["createdAt"]
    runtime = runtime_on(world, "serve", DAY2 + timedelta(seconds=25))
    runtime.receiver(with_detail_fetch=False).take(read_push(pushed_doc, "org"), DAY2)
    pending = PendingRecords(world.store, world.layout)
    owed = pending.owed(api_doc["id"])
    assert owed is not None
    pending.give_up(owed, "10 fetches failed: 403", DAY2 + timedelta(hours=1))
    world.docs[api_doc["id"]] = api_doc
    world.build()
    repair_day_2(world, api_doc)
    world.builder().mark_due(DAY1.date(), "archived into by backfill")  # any later touch
    world.build()
    keys = sorted(k for k in world.store.snapshot() if k.startswith(f"{PREFIX}/webhooks/"))
    mine = [k for k in keys if k.endswith("/" + api_doc["id"])]
    assert len(mine) == 1, mine
    assert ids_in(world)[api_doc["id"]] == 1


class FailingWebhookPut(MemoryObjectStore):
    """S3 fails (5xx after retries) every webhook PUT of one id."""

    def __init__(self, bad_id: str) -> None:
        super().__init__()
        self.bad_id = bad_id
        self.armed = False

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        if self.armed and "/webhooks/" in key and key.endswith("/" + self.bad_id):
            raise ArchiveUnavailable("503 SlowDown")
        return super().put(key, body, **conditions)


def test_a_late_batch_failing_half_way_still_leaves_its_written_days_due(tmp_path: Path) -> None:
    """A relay replays a late batch of two alerts of built day 1. The first alert's pending
    marker and webhook record are written, then S3 fails the second's webhook PUT: the batch
    answers 5xx and no due marker is written (the marker is written only after the whole
    batch). If the sender gives up (it drops a batch after its retries, say while S3 is
    unwell), the first alert stays owed; the sync fetches its full record by id (run mode:
    no marker) and day 1 is never built again: an archived alert missing from the tables.
    Expected: the day is marked due before (or regardless of) a failure after the first
    webhook record is written, as backfill and repair mark ahead."""
    world = World(tmp_path, count=6, dismissed=0)
    first = world.factory.alert(DAY1 + timedelta(hours=5))
    second = world.factory.alert(DAY1 + timedelta(hours=6))
    store = FailingWebhookPut(second["id"])
    for key, body in world.store.snapshot().items():
        store.put(key, body)
    world.store = store
    world.archive = type(world.archive)(store, world.layout, "org")
    world.build()
    store.armed = True
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    try:
        receiver.take(read_push({"alerts": [first, second]}, "org"), now)
        raise AssertionError("the batch should have failed")
    except ArchiveUnavailable:
        pass  # 503 to the sender, which never comes back
    store.armed = False
    alert = classify(first)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)  # the sync's by-id fetch of the owed id
    PendingRecords(world.store, world.layout).done(alert.id)
    world.docs[alert.id] = first
    world.build()
    assert Counter(ids_in(world))[alert.id] == 1, "archived, never in the tables"


def test_status_shows_a_day_with_a_damaged_dismissals_part_as_pending_not_waiting(
    tmp_path: Path,
) -> None:
    """Day 2 waits for open day 3 (an alert archived already dismissed, dismissedAt on day 3),
    and its dismissals part is damaged. A pass rewrites day 2's marker as WAITING (say_why)
    first, then meets the damaged part: `_keep_due(day, "its dismissals part is damaged")`
    is a no-op for a day already kept due this pass, so the marker still says WAITING.
    `poller status` shows day 2 as waiting ("nothing to do but wait") and 0 pending, while
    it needs the operator's remedy. Expected: day 2 is pending."""
    world = World(tmp_path, count=6, dismissed=0)
    doc = world.factory.alert(DAY2 + timedelta(hours=23), "dismissed")
    doc["dismissedAt"] = iso_ms(world.watermark - timedelta(hours=1))  # on open day 3
    world.put(doc)
    world.build()
    part = f"{PREFIX}/tables/dismissals/date=2026-11-02/part-0001.parquet"
    assert part in world.store.snapshot()
    world.store.put(part, b"not parquet at all")  # bit rot, a bad copy, a hand edit
    report = world.build()
    assert report.damaged_parts == [part]
    status = _status(world)
    assert "2026-11-02" in status["pending_days"], status
