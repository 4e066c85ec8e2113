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


def repair_day_2(world: World, api_doc: dict[str, Any], to_the_end: bool = True) -> None:
    """`poller verify --repair` over day 2, the API listing ``api_doc``, then (unless killed
    before its end) the days it archived into marked due, as the command does at its end."""
    runtime = runtime_on(world, "verify", world.watermark)
    verifier = Verifier(
        ListingApi([api_doc]),
        world.store,
        runtime.archive(),
        ("active", "dismissed"),
        lambda: world.watermark,
    )
    verifier.run(DAY2, DAY2 + timedelta(days=1), True, Summary("verify", "repair"))
    if to_the_end:
        runtime.mark_tables_due()


def fetched_then_tabled(world: World, doc: dict[str, Any]) -> None:
    """The sync's by-id fetch writes the owed full record of ``doc`` (and clears its pending
    marker); the next pass puts it in exactly one row."""
    alert = classify(doc)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)
    PendingRecords(world.store, world.layout).done(alert.id)
    world.docs[alert.id] = doc
    world.build()
    assert Counter(ids_in(world))[alert.id] == 1, "archived, never in the tables"


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
    day already has a marker, then the WAITING rewrite replaced the marker's
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
    api_doc = _pushed_and_given_up(world)
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
    fetched_then_tabled(world, first)


def test_status_shows_a_day_with_a_damaged_dismissals_part_as_pending_not_waiting(
    tmp_path: Path,
) -> None:
    """Day 2 waits for open day 3 (an alert archived already dismissed, dismissedAt on day 3),
    and its dismissals part is damaged. A pass rewrote day 2's marker as WAITING
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


def _pushed_and_given_up(
    world: World,
    created: datetime = DAY2 + timedelta(seconds=20),
    pushed: datetime = DAY2 - timedelta(seconds=10),
) -> dict[str, Any]:
    """A push stamped ``pushed`` of an alert the API says was created ``created`` (by
    default: 23:59:50 on day 1 and 00:00:20 on day 2, its one webhook record filed under
    day 1); its full record never fetched (the sync gave up). Returns the API's document."""
    api_doc = world.factory.alert(created)
    pushed_doc = dict(api_doc, created_at=iso_ms(pushed))
    del pushed_doc["createdAt"]
    runtime = runtime_on(world, "serve", created + timedelta(seconds=25))
    runtime.receiver(with_detail_fetch=False).take(read_push(pushed_doc, "org"), pushed)
    pending = PendingRecords(world.store, world.layout)
    owed = pending.owed(api_doc["id"])
    assert owed is not None
    pending.give_up(owed, "10 fetches failed: 503", created + timedelta(hours=1))
    world.docs[api_doc["id"]] = api_doc
    return api_doc


def test_verify_repair_marks_the_webhook_records_day_due_ahead_and_after_its_verified_day(
    tmp_path: Path,
) -> None:
    """verify --repair over day 2 writes the full record of a pushed alert whose webhook
    record is filed under day 1 (across midnight). Its row comes from day 1, but the marker
    written before the write (Archive's before_write) and after the verified day (settle)
    name the API's day 2 only: day 1 is added to `touched` after the write and marked only
    at the very END of the run (mark_tables_due). A verify killed after that write (before
    the run's end) leaves day 1 built without the alert (given up) and unmarked; its rerun
    finds nothing missing (the full record is there, the webhook record elsewhere) and marks
    nothing: the alert is never in the tables. README: "A day is marked before the run's
    first write into it ... again after the writes of ... a verified day's". Expected:
    day 1 is marked due by the time the verified day is settled."""
    world = World(tmp_path, count=6, dismissed=0)
    api_doc = _pushed_and_given_up(world)
    report = world.build()
    assert report.given_up_full_records == 1  # day 1 built without it, not kept due
    marker = f"{PREFIX}/_poller/tables/due/2026-11-01"
    assert marker not in world.store.snapshot()
    repair_day_2(world, api_doc, to_the_end=False)
    assert world.store.get(world.layout.alert_key(api_doc["id"])) is not None  # repaired
    # Killed here, before runtime.mark_tables_due() at the run's end. The rerun:
    runtime = runtime_on(world, "verify", world.watermark)
    again = Verifier(
        ListingApi([api_doc]),
        world.store,
        runtime.archive(),
        ("active", "dismissed"),
        lambda: world.watermark,
    )
    again.run(DAY2, DAY2 + timedelta(days=1), True, Summary("verify", "repair"))
    runtime.mark_tables_due()
    world.build()
    assert marker in world.store.snapshot() or ids_in(world)[api_doc["id"]] == 1, (
        "archived, day 1 (the row's day) never marked due: never in the tables"
    )


def test_verify_repair_of_a_given_up_pushed_alert_in_the_same_day_writes_no_second_webhook_key(
    tmp_path: Path,
) -> None:
    """A pushed alert whose push named 10:00:50 and the API 10:01:20 (same day): its one
    webhook record is under minute 10:00. The sync gave its full record up; verify --repair
    finds the full record missing (the webhook record is found in the day) and calls
    Archive.take(..., webhook=True), which writes a SECOND webhook record under the API's
    minute 10:01. README, *One webhook key per alert*: first record of either kind wins,
    the other path finds it. Expected: one webhook key for the alert after the repair."""
    world = World(tmp_path, count=6, dismissed=0)
    api_doc = _pushed_and_given_up(
        world,
        created=DAY2 + timedelta(hours=10, minutes=1, seconds=20),
        pushed=DAY2 + timedelta(hours=10, seconds=50),
    )
    repair_day_2(world, api_doc, to_the_end=False)
    assert world.store.get(world.layout.alert_key(api_doc["id"])) is not None
    mine = sorted(
        k
        for k in world.store.snapshot()
        if k.startswith(f"{PREFIX}/webhooks/") and k.endswith("/" + api_doc["id"])
    )
    assert len(mine) == 1, mine


def test_status_does_not_show_a_day_with_a_damaged_alerts_part_as_only_waiting(
    tmp_path: Path,
) -> None:
    """Day 2 waits for open day 3 (an alert archived already dismissed, dismissedAt on day
    3): its marker says WAITING. Its ALERTS part is then damaged. A pass meets the damage
    in `_alerts_day` (DamagedPart: `_damaged`, continue) and never calls `_keep_due` with a
    work reason, so the marker still says WAITING: `poller status` lists day 2 under
    waiting_days ("nothing to do but wait"), 0 pending, while `poller tables` exits 1 and
    the day needs the operator's remedy. Expected: day 2 is pending."""
    world = World(tmp_path, count=6, dismissed=0)
    doc = world.factory.alert(DAY2 + timedelta(hours=23), "dismissed")
    doc["dismissedAt"] = iso_ms(world.watermark - timedelta(hours=1))  # on open day 3
    world.put(doc)
    world.build()
    assert _status(world)["waiting_days"] == ["2026-11-02"]
    part = f"{PREFIX}/tables/alerts/date=2026-11-02/part-0001.parquet"
    assert part in world.store.snapshot()
    world.store.put(part, b"not parquet at all")
    report = world.build()
    assert report.damaged_parts == [part]
    status = _status(world)
    assert "2026-11-02" in status["pending_days"], status


class HookAfterListing(MemoryObjectStore):
    """Runs ``hook`` once, right after the first listing of ``prefix`` (a pass listing a
    day's webhook keys), as if another process wrote meanwhile."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.hook: Any = None

    def list_keys(self, prefix: str) -> list[str]:
        listed = super().list_keys(prefix)
        if prefix == self.prefix and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return listed


def _copy_into(world: World, store: MemoryObjectStore) -> None:
    for key, body in world.store.snapshot().items():
        store.put(key, body)
    world.store = store
    world.archive = type(world.archive)(store, world.layout, "org")


def test_a_first_pass_does_not_overwrite_a_repairs_marker_written_meanwhile_with_waiting(
    tmp_path: Path,
) -> None:
    """Day 2's first pass (no marker when it planned) finds a dismissal of day 2 waiting
    for open day 3 and writes the WAITING marker UNCONDITIONALLY (`_keep_due`, no planned
    etag). A verify --repair that archived an alert into day 2 after the pass listed it,
    and marked the day (ahead, after the day, at its end) meanwhile, loses its reason:
    `poller status` shows day 2 only waiting ("nothing to do but wait"), while an archived
    alert of it is in no part. README: the reason is written "only over the marker version
    it planned with (a repair that marked the day meanwhile keeps its reason)". Expected:
    day 2 pending."""
    world = World(tmp_path, count=6, dismissed=0)
    store = HookAfterListing(f"{PREFIX}/webhooks/2026/11/02/")
    _copy_into(world, store)
    doc = world.factory.alert(DAY2 + timedelta(hours=23), "dismissed")
    doc["dismissedAt"] = iso_ms(world.watermark - timedelta(hours=1))  # on open day 3
    world.put(doc)
    repaired = world.factory.alert(DAY2 + timedelta(hours=4))

    def repair() -> None:  # verify --repair over day 2, while the pass is in day 2
        builder = world.builder()
        builder.mark_due(DAY2.date(), "being archived into by verify")
        world.put(repaired)
        builder.mark_due(DAY2.date(), "archived into by verify")

    store.hook = repair
    report = world.build()
    assert "2026-11-02" in report.days_built
    assert ids_in(world)[repaired["id"]] == 0  # not in this pass's part: the next one's
    status = _status(world)
    assert "2026-11-02" in status["pending_days"], status


class FailWebhookPutOf(MemoryObjectStore):
    """S3 fails every webhook PUT of one id (5xx after retries) while armed."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_id = ""
        self.before_first_webhook: Any = None

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        if "/webhooks/" in key:
            if self.before_first_webhook is not None:
                hook, self.before_first_webhook = self.before_first_webhook, None
                hook()
            if self.bad_id and key.endswith("/" + self.bad_id):
                raise ArchiveUnavailable("503 SlowDown")
        return super().put(key, body, **conditions)


def test_a_late_batch_failing_half_way_after_a_pass_cleared_its_first_marker_leaves_day_due(
    tmp_path: Path,
) -> None:
    """A late batch of two alerts of built day 1: the receiver writes day 1's marker ahead,
    then a pass (planned with that marker, listed day 1 before the first webhook PUT) ends
    and clears it; the first alert's webhook record is written, the second's PUT fails (5xx),
    so the marking after the batch is never written and the sender gives up. The first
    alert's full record comes by the sync's by-id fetch (no marker): day 1 is never built
    again. README: "a batch failing half way, never re-sent, still leaves the day due";
    backfill and repair mark again after their writes, the push path only on success.
    Expected: the written day is marked again even when the batch fails after a write."""
    world = World(tmp_path, count=6, dismissed=0)
    store = FailWebhookPutOf()
    _copy_into(world, store)
    world.build()
    first = world.factory.alert(DAY1 + timedelta(hours=5))
    second = world.factory.alert(DAY1 + timedelta(hours=6))
    store.bad_id = second["id"]

    def a_pass_in_between() -> None:  # planned with the marker written ahead: clears it
        world.build()
        assert f"{PREFIX}/_poller/tables/due/2026-11-01" not in world.store.snapshot()

    store.before_first_webhook = a_pass_in_between
    now = world.watermark + timedelta(minutes=1)
    receiver = runtime_on(world, "serve", now).receiver(with_detail_fetch=False)
    try:
        receiver.take(read_push({"alerts": [first, second]}, "org"), now)
        raise AssertionError("the batch should have failed")
    except ArchiveUnavailable:
        pass  # 503; the sender gives up
    store.bad_id = ""
    fetched_then_tabled(world, first)


def test_verify_with_a_window_starting_mid_hour_finds_a_pushed_alerts_record_before_it(
    tmp_path: Path,
) -> None:
    """`verify --repair --since 2026-11-02T10:05:30Z`: a pushed alert stamped 10:04:59 by
    its push and 10:05:40 by the API, full record present. Its webhook record (minute
    10:04) is outside the window's listing, and the neighbouring-hour look-up probed only the
    hours created-1h (09:05:40, listed: not there) and created+1h (inside the window,
    skipped): the hour 10 where the record is, before the window's start, is never looked
    at. The alert is reported missing its webhook record and the repair writes a second
    one (minute 10:05). Expected: the record is found, nothing is written."""
    world = World(tmp_path, count=6, dismissed=0)
    api_doc = world.factory.alert(DAY2 + timedelta(hours=10, minutes=5, seconds=40))
    pushed_doc = dict(api_doc, created_at=iso_ms(DAY2 + timedelta(hours=10, minutes=4, seconds=59)))
    del pushed_doc["createdAt"]
    runtime = runtime_on(world, "serve", DAY2 + timedelta(hours=10, minutes=6))
    runtime.receiver(with_detail_fetch=False).take(read_push(pushed_doc, "org"), DAY2)
    alert = classify(api_doc)
    assert isinstance(alert, Alert)
    world.archive.store_full(alert)  # the detail fetch
    world.docs[alert.id] = api_doc
    runtime = runtime_on(world, "verify", world.watermark)
    verifier = Verifier(
        ListingApi([api_doc]),
        world.store,
        runtime.archive(),
        ("active", "dismissed"),
        lambda: world.watermark,
    )
    since = DAY2 + timedelta(hours=10, minutes=5, seconds=30)
    findings = verifier.run(since, DAY2 + timedelta(days=1), True, Summary("verify", "repair"))
    mine = sorted(
        k
        for k in world.store.snapshot()
        if k.startswith(f"{PREFIX}/webhooks/") and k.endswith("/" + alert.id)
    )
    assert len(mine) == 1 and findings.repaired == 0, (mine, findings.repaired)
