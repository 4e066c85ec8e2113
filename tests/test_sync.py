"""One cycle, with in-memory fakes for the API and the store (the real ones are in
test_integration.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.archive.records import Layout
from poller.archive.state import CheckpointStore, Lease, PendingRecords
from poller.archive.store import MemoryObjectStore
from poller.archive.writer import Archive
from poller.errors import (
    ApiUnavailable,
    ArchiveUnavailable,
    ConfigError,
    CycleTimeout,
    LeaseLost,
    NotFound,
)
from poller.serving.pushes import PushedAlert, read_alert
from poller.serving.receiver import DetailFetcher, Receiver
from poller.walks.sync import (
    OWED_MAX_ATTEMPTS,
    OWED_NOT_FOUND_GRACE,
    Cycle,
    CycleHooks,
    CycleSettings,
    Summary,
    cycle_deadline,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LAYOUT = Layout()
NO_HOOKS = CycleHooks()


class FakeSource:
    """Alerts by status; ``visible_at`` delays an alert; ``fail_after`` breaks paging."""

    def __init__(self, clock: Any, page_size: int = 3) -> None:
        self.clock = clock
        self.page_size = page_size
        self.alerts: list[tuple[str, dict[str, Any], datetime]] = []
        self.requests_sent = 0
        self.fail_after: int | None = None
        self.broken_ids: set[str] = set()  # get_alert answers 500 for these

    def add(
        self,
        alert_id: str,
        created: datetime,
        status: str = "active",
        visible_at: datetime | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        doc = {
            "id": alert_id,
            "createdAt": created.isoformat(),
            "title": "t",
            "severity": 2,
            **extra,
        }
        self.alerts.append((status, doc, visible_at or created))
        return doc

    def get_alert(self, alert_id: str) -> dict[str, Any]:
        self.requests_sent += 1
        for _, doc, visible in self.alerts:
            if doc["id"] == alert_id and visible <= self.clock():
                return doc
        if alert_id in self.broken_ids:
            raise ApiUnavailable("Threat Stack answered 500")
        raise NotFound("Threat Stack has no such object (404)")

    def list_alerts(self, status: str, since: datetime, until: datetime) -> Iterator[list[Any]]:
        found = [
            doc
            for s, doc, visible in self.alerts
            if s == status
            and visible <= self.clock()
            and since <= datetime.fromisoformat(doc["createdAt"]) < until
        ]
        for start in range(0, max(len(found), 1), self.page_size):
            self.requests_sent += 1
            if self.fail_after is not None and self.requests_sent > self.fail_after:
                raise ApiUnavailable("Threat Stack answered 503")
            yield found[start : start + self.page_size]


class FlakyStore(MemoryObjectStore):
    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.fail_keys: set[str] = set()

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        if key in self.fail_keys:
            raise ArchiveUnavailable(f"S3 failed writing {key}: SlowDown")
        return super().put(key, body, **conditions)


class World:
    def __init__(self) -> None:
        self.now = NOW
        self.store = FlakyStore(lambda: self.now)
        self.source = FakeSource(lambda: self.now)
        self.lease = Lease(self.store, LAYOUT, 120, {"run_id": "r"}, lambda: self.now)
        self.settings = CycleSettings(
            ("active", "dismissed"), timedelta(seconds=900), timedelta(seconds=60), "24h", 4
        )

    def make_cycle(
        self,
        mode: str = "sync",
        hooks: CycleHooks = NO_HOOKS,
        pending: PendingRecords | None = None,
    ) -> Cycle:
        return Cycle(
            self.source,
            Archive(self.store, LAYOUT, "org"),
            CheckpointStore(self.store, LAYOUT),
            self.lease,
            self.settings,
            lambda: self.now,
            "run",
            mode,
            hooks,
            pending,
        )

    def cycle(self) -> Summary:
        self.lease.acquire()
        try:
            return self.make_cycle().run()
        finally:
            self.lease.release()

    def checkpoint(self) -> dict[str, Any]:
        return json.loads(self.store.snapshot()[LAYOUT.checkpoint_key])

    def archived_ids(self) -> set[str]:
        return {k.rsplit("/", 1)[1] for k in self.store.snapshot() if k.startswith("alerts/")}


@pytest.fixture
def world() -> World:
    return World()


def ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


def test_archives_new_alerts_then_rereads_cost_nothing(world: World):
    for i in range(7):
        world.source.add(f"alert{i:04d}", ago(10 + i))
    world.source.add("dismissed01", ago(5), "dismissed")
    first = world.cycle()
    assert (first.listed, first.archived, first.already_archived) == (8, 8, 0)
    assert world.archived_ids() == {f"alert{i:04d}" for i in range(7)} | {"dismissed01"}
    assert world.checkpoint()["watermark"] == "2026-11-25T11:59:00Z"

    world.now += timedelta(minutes=5)
    before = world.store.requests
    second = world.cycle()
    assert (second.listed, second.archived, second.already_archived) == (8, 0, 8)
    # Lease: get (released), take-over put; checkpoint get; renew; checkpoint put; release
    # put. No alert I/O. (The store proof is the composition root's, not the cycle's.)
    assert world.store.requests - before == 6


def test_an_alert_in_both_lists_is_archived_once(world: World):
    doc = world.source.add("moved00001", ago(3), "active")
    world.source.alerts.append(("dismissed", doc, ago(3)))
    summary = world.cycle()
    assert (summary.listed, summary.archived) == (1, 1)


def test_late_alert_within_lookback_is_archived_by_the_next_cycle(world: World):
    world.source.add("ontime0001", ago(20))
    world.source.add("late000001", ago(3), visible_at=NOW + timedelta(minutes=4))
    world.cycle()
    assert world.archived_ids() == {"ontime0001"}
    world.now += timedelta(minutes=5)
    summary = world.cycle()
    assert summary.archived == 1
    assert world.archived_ids() == {"ontime0001", "late000001"}


def test_a_failed_write_leaves_the_checkpoint_where_it_was(world: World):
    for i in range(10):
        world.source.add(f"alert{i:04d}", ago(5 + i))
    world.store.fail_keys.add(LAYOUT.alert_key("alert0004"))
    with pytest.raises(ArchiveUnavailable):
        world.cycle()
    assert LAYOUT.checkpoint_key not in world.store.snapshot()
    world.store.fail_keys.clear()
    summary = world.cycle()
    assert world.archived_ids() == {f"alert{i:04d}" for i in range(10)}
    assert summary.archived + summary.already_archived == 10


def test_an_api_failure_mid_window_commits_nothing(world: World):
    for i in range(10):
        world.source.add(f"alert{i:04d}", ago(5 + i))
    world.cycle()
    watermark = world.checkpoint()["watermark"]
    world.now += timedelta(minutes=10)
    world.source.add("newer00001", ago(1))
    world.source.fail_after = world.source.requests_sent + 1
    with pytest.raises(ApiUnavailable):
        world.cycle()
    assert world.checkpoint()["watermark"] == watermark


def test_malformed_alerts_are_quarantined_and_do_not_block(world: World):
    world.source.add("good000001", ago(5))
    world.source.add("bad/id/001", ago(5))
    world.source.alerts.append(
        ("active", {"title": "no id", "createdAt": ago(5).isoformat()}, ago(5))
    )
    summary = world.cycle()
    assert (summary.archived, summary.quarantined) == (1, 2)
    keys = set(world.store.snapshot())
    quarantined = {k for k in keys if k.startswith("_poller/quarantine/")}
    assert {k.split("/")[2] for k in quarantined} == {"unsafe_id", "missing_id"}
    body = json.loads(world.store.snapshot()[next(k for k in quarantined if "unsafe" in k)])
    assert body["raw"]["id"] == "bad/id/001" and body["reason"] == "unsafe_id"
    assert "watermark" in world.checkpoint()
    # Read again in the overlap: no new quarantine write.
    world.now += timedelta(minutes=2)
    before = world.store.requests
    world.cycle()
    assert world.store.requests - before == 6


def test_a_cycle_that_lost_its_lease_does_not_commit(world: World):
    world.source.add("alert00001", ago(5))
    world.lease.acquire()
    cycle = world.make_cycle()
    # Another run takes over the lease while this one works.
    world.store.put(LAYOUT.lease_key, b'{"run_id": "other"}')
    with pytest.raises(LeaseLost):
        cycle.run()
    assert LAYOUT.checkpoint_key not in world.store.snapshot()
    assert world.archived_ids() == {"alert00001"}  # create-only writes are harmless


def test_a_long_window_is_committed_chunk_by_chunk(world: World):
    world.settings = CycleSettings(
        ("active",),
        timedelta(seconds=900),
        timedelta(seconds=60),
        "3h",
        4,
        max_window=timedelta(hours=1),
    )
    for i in range(6):
        world.source.add(f"alert{i:04d}", NOW - timedelta(minutes=170 - 30 * i))
    # The alert in the last hour cannot be written: the first two hours stay committed.
    world.store.fail_keys.add(LAYOUT.alert_key("alert0005"))
    with pytest.raises(ArchiveUnavailable):
        world.cycle()
    # Chunks of an hour, each starting a second before the last ended: 09:00, 09:59:59, ...
    assert world.checkpoint()["watermark"] == "2026-11-25T10:59:59Z"
    assert world.archived_ids() == {f"alert{i:04d}" for i in range(5)}
    world.store.fail_keys.clear()
    summary = world.cycle()
    assert world.checkpoint()["watermark"] == "2026-11-25T11:59:00Z"
    assert summary.archived == 1  # only what was missing; the rest skipped by the seen set


def test_a_run_polling_fewer_lists_than_the_checkpoint_covers_is_refused(world: World):
    world.source.add("alert00001", ago(5))
    world.cycle()
    assert world.checkpoint()["statuses"] == ["active", "dismissed"]
    world.settings = CycleSettings(
        ("active",), timedelta(seconds=900), timedelta(seconds=60), "24h", 4
    )
    with pytest.raises(ConfigError, match=r"also covers \['dismissed'\]") as caught:
        world.cycle()
    assert caught.value.exit_code == 2


def test_a_run_adding_a_list_says_its_older_alerts_are_a_backfills_work(
    world: World, caplog: pytest.LogCaptureFixture
):
    """Widening is allowed (the added list is read from now on) but never silent: the log
    names the added list and the watermark behind which it was not read."""
    world.settings = CycleSettings(
        ("active",), timedelta(seconds=900), timedelta(seconds=60), "24h", 4
    )
    world.source.add("alert00001", ago(5))
    world.cycle()
    world.settings = CycleSettings(
        ("active", "dismissed"), timedelta(seconds=900), timedelta(seconds=60), "24h", 4
    )
    with caplog.at_level("WARNING"):
        world.cycle()
    widened = [r for r in caplog.records if r.getMessage() == "checkpoint.statuses_widened"]
    assert [r.fields["added"] for r in widened] == [["dismissed"]]  # type: ignore[attr-defined]
    assert world.checkpoint()["statuses"] == ["active", "dismissed"]


class FailNthPut(FlakyStore):
    """Fails the puts whose sequence numbers are in ``fail_at`` (a transient S3 error)."""

    def __init__(self, clock: Any, fail_at: set[int]) -> None:
        super().__init__(clock)
        self.fail_at = fail_at
        self.puts = 0

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        self.puts += 1
        if self.puts in self.fail_at:
            raise ArchiveUnavailable(f"S3 failed writing {key}: InternalError")
        return super().put(key, body, **conditions)


@settings(max_examples=60, deadline=None)
@given(
    alerts=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3 * 3600),  # created this long before NOW
            st.integers(min_value=0, max_value=900),  # visible this long after creation
            st.sampled_from(["active", "dismissed"]),
        ),
        max_size=30,
    ),
    fail_at=st.sets(st.integers(min_value=1, max_value=120), max_size=6),
)
def test_any_late_arrivals_and_failures_end_in_the_exact_archive(
    alerts: list[tuple[int, int, str]], fail_at: set[int]
):
    """Cycles every 5 minutes, alerts visible up to the look-back late, S3 failing at random
    writes: once the clock has passed everything, the archive holds every alert, exactly."""
    world = World()
    world.store = FailNthPut(lambda: world.now, fail_at)
    world.lease = Lease(world.store, LAYOUT, 120, {"run_id": "r"}, lambda: world.now)
    world.settings = CycleSettings(
        ("active", "dismissed"),
        timedelta(seconds=900),
        timedelta(seconds=60),
        "4h",
        4,
        timedelta(hours=1),
    )
    start = NOW - timedelta(hours=3)
    world.now = start
    docs = {}
    for i, (before, delay, status) in enumerate(alerts):
        created = NOW - timedelta(seconds=before)
        docs[f"alert{i:05d}"] = world.source.add(
            f"alert{i:05d}", created, status, visible_at=created + timedelta(seconds=delay)
        )
    while world.now < NOW + timedelta(hours=1):
        with contextlib.suppress(ArchiveUnavailable):
            world.cycle()
        world.now += timedelta(minutes=5)
    objects = world.store.snapshot()
    for alert_id, doc in docs.items():
        assert json.loads(objects[LAYOUT.alert_key(alert_id)]) == doc
    assert world.archived_ids() == set(docs)
    webhooks = [k for k in objects if k.startswith("webhooks/")]
    assert len(webhooks) == len(docs)


def test_a_bug_in_one_alerts_handling_quarantines_that_alert_only(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    import poller.archive.writer

    real = poller.archive.writer.webhook_record

    def broken_for_one(alert: Any, org: str) -> dict[str, Any]:
        if alert.id == "alert0002":
            raise KeyError("a bug")
        return real(alert, org)

    monkeypatch.setattr(poller.archive.writer, "webhook_record", broken_for_one)
    for i in range(1, 4):
        world.source.add(f"alert000{i}", ago(10 + i))
    summary = world.cycle()
    assert (summary.archived, summary.quarantined) == (2, 1)
    assert world.archived_ids() == {"alert0001", "alert0003"}
    keys = [k for k in world.store.snapshot() if k.startswith("_poller/quarantine/")]
    assert [k.split("/")[2] for k in keys] == ["internal_error"]
    assert world.checkpoint()["watermark"] is not None


def test_a_cycle_past_its_deadline_stops_keeps_committed_chunks_and_frees_the_lease(
    world: World,
):
    world.settings = CycleSettings(
        ("active",),
        timedelta(seconds=900),
        timedelta(seconds=60),
        "3h",
        4,
        max_window=timedelta(hours=1),
        max_cycle=timedelta(seconds=250),
    )
    for i in range(6):
        world.source.add(f"alert{i:04d}", NOW - timedelta(minutes=170 - 30 * i))
    ticks = iter(range(0, 10_000, 100))  # every page read costs 100 s of monotonic time
    cycle = world.make_cycle(hooks=CycleHooks(monotonic=lambda: float(next(ticks))))
    world.lease.acquire()
    try:
        with pytest.raises(CycleTimeout, match="deadline of 250s"):
            cycle.run()
    finally:
        world.lease.release()
    # Pages at 100 s and 200 s were in time: two chunks committed; the third page was not.
    assert world.checkpoint()["watermark"] == "2026-11-25T10:59:59Z"
    assert json.loads(world.store.snapshot()[LAYOUT.lease_key])["released"] is True


def test_the_derived_deadline_grows_with_the_work():
    settings = CycleSettings(
        ("active", "dismissed"), timedelta(seconds=900), timedelta(seconds=60), "24h", 4
    )
    assert cycle_deadline(settings, 1) == 780 + 2 * 60
    assert cycle_deadline(settings, 365) == 780 + 365 * 2 * 60


class DismissedBetweenReads(FakeSource):
    """An alert moves from the active list to the dismissed list right after the first
    listing of the cycle is read."""

    def list_alerts(self, status: str, since: datetime, until: datetime) -> Iterator[list[Any]]:
        yield from super().list_alerts(status, since, until)
        self.alerts = [
            ("dismissed" if doc["id"] == "moving0001" else s, doc, visible)
            for s, doc, visible in self.alerts
        ]


def test_active_is_read_before_dismissed_whatever_the_configured_order(world: World):
    world.source = DismissedBetweenReads(lambda: world.now)
    world.source.add("moving0001", ago(5))
    world.settings = CycleSettings(
        ("dismissed", "active"), timedelta(seconds=900), timedelta(seconds=60), "24h", 4
    )
    world.cycle()
    assert world.archived_ids() == {"moving0001"}


def test_a_pushed_alert_older_than_the_window_is_fetched_by_the_next_cycle(world: World):
    """A webhook batch re-sent after an outage: its alerts are older than the look-back, so
    no listing brings them; the cycle fetches the owed ones by id and clears their markers."""
    world.cycle()  # the checkpoint: the next window starts 15 minutes back
    world.now += timedelta(minutes=5)
    world.source.add("pushed00old", ago(180))  # three hours old: in no window from now on
    pending = PendingRecords(world.store, LAYOUT)
    pending.add("pushed00old", "")
    pending.add("invisible01", "")  # accepted, but the API does not show it yet (404)
    world.lease.acquire()
    try:
        summary = world.make_cycle(pending=pending).run()
    finally:
        world.lease.release()
    assert "pushed00old" in world.archived_ids()
    assert (summary.listed, summary.archived) == (1, 1)
    assert pending.ids() == ["invisible01"]  # still owed, and shown by status


def run_with_pending(world: World, pending: Any) -> Summary:
    world.lease.acquire()
    try:
        return world.make_cycle(pending=pending).run()
    finally:
        world.lease.release()


def test_owed_ids_the_api_has_not_are_given_up_and_do_not_block_a_real_one(world: World):
    """The field case other-organisation-batch.json, at scale: thirty pushed ids the API
    answers 404 for and one it answers 500 for, beside one real owed alert. Each cycle asks
    for at most owed_fetches of them in a fresh order; a 404 past the grace period is an
    answer (recorded under unfetchable/, never asked again), the 500 stops the owed fetches
    of that cycle and is given up after OWED_MAX_ATTEMPTS. The real one is archived, and an
    idle cycle afterwards costs its usual two listings."""
    world.settings = replace(world.settings, owed_fetches=10)
    world.cycle()
    pending = PendingRecords(world.store, LAYOUT)
    others = [f"other{n:02d}" for n in range(30)]
    for alert_id in [*others, "broken500", "pushed00old"]:
        pending.add(alert_id, "")
    world.source.broken_ids.add("broken500")
    world.source.add("pushed00old", ago(180))
    world.now += OWED_NOT_FOUND_GRACE  # the 404s are answers now, not "not visible yet"
    cycles = 0
    while pending.ids() and cycles < 40:
        before = world.source.requests_sent
        run_with_pending(world, pending)
        assert world.source.requests_sent - before <= 2 + 10  # two listings, capped fetches
        cycles += 1
        world.now += timedelta(minutes=1)
    assert pending.ids() == []
    assert "pushed00old" in world.archived_ids()
    assert sorted(pending.unfetchable()) == sorted([*others, "broken500"])
    gone = json.loads(world.store.snapshot()["_poller/unfetchable/broken500"])
    assert gone["attempts"] == OWED_MAX_ATTEMPTS
    assert "500" in gone["reason"]
    assert "404" in json.loads(world.store.snapshot()["_poller/unfetchable/other07"])["reason"]
    before = world.source.requests_sent
    run_with_pending(world, pending)
    assert world.source.requests_sent - before == 2


def test_a_failing_owed_fetch_ends_the_owed_fetches_of_the_cycle(world: World):
    """5xx answers (each already retried for its request's whole span) must not add up past
    the cycle's deadline: the first one ends this cycle's owed fetches."""
    world.cycle()
    pending = PendingRecords(world.store, LAYOUT)
    for n in range(5):
        pending.add(f"broken{n}", "")
        world.source.broken_ids.add(f"broken{n}")
    before = world.source.requests_sent
    run_with_pending(world, pending)
    assert world.source.requests_sent - before == 2 + 1
    assert len(pending.ids()) == 5  # still owed, one of them with one failed attempt


def test_a_chunk_too_long_for_its_deadline_is_split_and_committed_in_parts(world: World):
    """Three hours in one chunk hold 40 alerts: 14 pages of 3, at 100 s of monotonic time a
    page, where a listing is given 4 pages (400 s). Read whole it could never finish, cycle
    after cycle; split in halves (each with its own time) it completes in one cycle, each
    part committed on its own, and nothing archived by the abandoned listing is written
    twice."""
    world.settings = CycleSettings(
        ("active",),
        timedelta(seconds=900),
        timedelta(seconds=60),
        "3h",
        4,
        seconds_per_listing=400,
        deadline_floor_seconds=0,
        pages_per_listing=4,
    )
    expected = {f"alert{i:04d}" for i in range(40)}
    for i in range(40):
        world.source.add(f"alert{i:04d}", NOW - timedelta(minutes=175 - 4 * i))
    ticks = iter(range(0, 100_000, 100))
    cycle = world.make_cycle(hooks=CycleHooks(monotonic=lambda: float(next(ticks))))
    world.lease.acquire()
    try:
        summary = cycle.run()
    finally:
        world.lease.release()
    history = world.store.snapshot()
    assert world.archived_ids() == expected
    assert world.checkpoint()["watermark"] == "2026-11-25T11:59:00Z"
    assert summary.chunks_done == summary.chunks_total > 1
    assert summary.archived == 40  # each written once: re-listed ones cost no S3 write
    assert len([k for k in history if k.startswith("alerts/")]) == 40


def test_a_cycle_is_built_whole_and_nothing_is_set_on_it_afterwards(world: World):
    """Every collaborator is a constructor argument: replacing one on a built cycle (as the
    runner once set the lease check, the stop request and the observer) fails at once, and
    so does adding an attribute the cycle does not declare."""
    cycle = world.make_cycle()
    for name in [f.name for f in dataclasses.fields(Cycle)] + ["observer", "should_stop"]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cycle, name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cycle.hooks, "observer", None)  # noqa: B010 - the hooks are frozen too


def _push_then_poll(world: World, fetched_early: bool) -> tuple[set[str], int]:
    """Push an alert created at 11:50:30; the API says it was created at 11:51:10 (the
    next minute). With ``fetched_early`` the detail fetcher writes the full record before
    the cycle. Returns the webhook keys, and the S3 requests of the cycle."""
    pushed_at = datetime(2026, 11, 25, 11, 50, 30, tzinfo=UTC)
    world.source.add("pushpoll01", pushed_at + timedelta(seconds=40))
    pending = PendingRecords(world.store, LAYOUT)
    archive = Archive(world.store, LAYOUT, "org")
    fetcher = DetailFetcher(
        world.source.get_alert, archive.store_full, pending, lambda: True, threading.Event()
    )
    pushed = read_alert({"id": "pushpoll01", "created_at": int(pushed_at.timestamp())}, "org")
    assert isinstance(pushed, PushedAlert)
    Receiver(world.store, LAYOUT, "org", None).take([pushed], NOW)
    if fetched_early:
        fetcher.fetch_one("pushpoll01", pushed.created)
    world.lease.acquire()
    try:
        before = world.store.requests
        world.make_cycle(pending=pending).run()
        spent = world.store.requests - before
    finally:
        world.lease.release()
    assert pending.ids() == []  # the cycle met it: nothing owed any more
    assert "pushpoll01" in world.archived_ids()
    return {k for k in world.store.snapshot() if k.startswith("webhooks/")}, spent


@pytest.mark.parametrize("fetched_early", [False, True], ids=["owed", "fetched-early"])
def test_an_alert_pushed_then_polled_with_created_at_one_minute_later_one_webhook_record(
    world: World, fetched_early: bool
):
    """First record of either kind wins: the push wrote the webhook record under its own
    minute (11:50), so the poll, which meets the alert under the API's 11:51, writes only the
    full record. The pending marker (listed once a cycle) tells the cycle the alert was
    pushed; the detail fetcher leaves it in place when the minutes differ. Cost: no more S3
    requests than a cycle archiving an alert that was never pushed (6 each, counted)."""
    keys, spent = _push_then_poll(world, fetched_early)
    assert keys == {"webhooks/2026/11/25/11/50/pushpoll01"}

    plain = World()
    plain.source.add("pollonly01", datetime(2026, 11, 25, 11, 51, 10, tzinfo=UTC))
    plain.lease.acquire()
    try:
        before = plain.store.requests
        plain.make_cycle(pending=PendingRecords(plain.store, LAYOUT)).run()
        plain_spent = plain.store.requests - before
    finally:
        plain.lease.release()
    assert spent == plain_spent
