"""The revisit: dismissals of alerts archived while active are archived later, once, cheaply.

Real parts: the Threat Stack simulator and a moto server process, the cycle built by
``poller.app`` as ``sync`` and the daemon build it, with an injected clock."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import (
    ROOT,
    MotoServer,
    bucket_listing,
    bucket_objects,
    poller_env,
    run_poller,
    summary_of,
)

from poller.app import build, run_cycle
from poller.archive.records import Layout
from poller.archive.revisits import RevisitStore
from poller.archive.writer import Archive
from poller.config import Settings, load_settings
from poller.errors import FatalError
from poller.simulator import SimAlert, Simulator
from poller.timeutil import floor_second, utc_now
from poller.walks.backfill import BackfillRange, backfill
from poller.walks.revisit import Revisit
from poller.walks.sync import Summary, chunks

pytestmark = pytest.mark.integration
LAYOUT = Layout()


class Run:
    """``poller sync`` in-process, a fresh runtime each time (as a CronJob starts afresh),
    at a clock the test moves; every S3 PUT is recorded by key."""

    def __init__(self, sim: Simulator, s3: Any, bucket: str, **settings: str) -> None:
        self.now = floor_second(utc_now())
        sim.clock = lambda: self.now
        self.s3 = s3
        self.puts: list[str] = []
        s3.meta.events.register("provide-client-params.s3.PutObject", self._count_put)
        environ = {
            **sim.environment(),
            "TS_AWS_S3_BUCKET": bucket,
            **{f"POLLER_SYNC__{name.upper()}": value for name, value in settings.items()},
        }
        self.settings: Settings = load_settings(None, environ=environ)

    def _count_put(self, params: dict[str, Any], **_: Any) -> None:
        self.puts.append(params["Key"])

    def cycle(self) -> Summary:
        runtime = build(self.settings, "sync", clock=lambda: self.now, s3=self.s3)
        return run_cycle(runtime, Summary("sync", runtime.run_id))

    def puts_under(self, *prefixes: str) -> list[str]:
        return [key for key in self.puts if key.startswith(prefixes)]


def dismissal_records(s3: Any, bucket: str) -> dict[str, Any]:
    return {
        key.rsplit("/", 1)[1]: json.loads(body)
        for key, body in bucket_objects(s3, bucket).items()
        if key.startswith("dismissals/")
    }


def dismiss_some(
    sim: Simulator, count: int, pick: Callable[[SimAlert], bool], seed: int = 3
) -> list[SimAlert]:
    chosen = random.Random(seed).sample([a for a in sim.alerts if pick(a)], count)
    reasons = ("MAINTENANCE", "OTHER", "BUSINESS_OP")
    for i, alert in enumerate(chosen):
        reason = reasons[i % 3]
        text = f"handled in ticket {i}" if reason == "OTHER" else None
        sim.dismiss([alert.id], reason, text, by=f"analyst{i % 4}@example.com")
    return chosen


def dismiss_all(simulator: Simulator, since: datetime, until: datetime) -> None:
    """Dismiss every alert created in [since, until) (by query, one severity at a time)."""
    span = {"from": since.isoformat(), "until": until.isoformat()}
    for severity in (1, 2, 3):
        simulator.dismiss(query={**span, "severity": severity})


def test_dismissals_of_archived_alerts_are_archived_once_at_the_spec_cost(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    run = Run(simulator, s3, bucket, first_run_since="4d")
    start = run.now
    simulator.generate(600, start - timedelta(days=3, hours=12), start, dismissed_fraction=0)
    first = run.cycle()
    assert (first.archived, first.dismissals_archived) == (600, 0)
    # The first cycle revisits nothing: no checkpoint, so nothing archived lies behind it.
    assert first.revisit is not None and first.revisit["due"] is False

    run.now = start + timedelta(hours=1, minutes=1)  # sync.revisit_interval_seconds: 3600
    dismissed = dismiss_some(
        simulator,
        60,
        lambda a: start - timedelta(days=3) <= a.created < start - timedelta(days=1),
    )
    before = {k: v for k, v in bucket_listing(s3, bucket).items() if not k.startswith("_poller")}
    requests_before, run.puts = len(simulator.requests), []

    second = run.cycle()
    assert second.ok and second.archived == 0
    assert second.dismissals_archived == 60
    records = dismissal_records(s3, bucket)
    assert records == {alert.id: alert.doc for alert in dismissed}  # the API's dismissed object
    assert all(record["isDismissed"] is True for record in records.values())
    assert run.puts_under("alerts/", "webhooks/") == []
    after = bucket_listing(s3, bucket)
    assert {k: v for k, v in after.items() if k in before} == before  # first records stand
    # API: the live window's two lists, and the dismissed list of the revisit's range, one
    # request per chunk (a day) and per 100 dismissed alerts.
    assert second.revisit is not None
    revisit_from = datetime.fromisoformat(second.revisit["from"])
    revisit_until = datetime.fromisoformat(second.revisit["until"])
    days = list(chunks(revisit_from, revisit_until, timedelta(days=1), aligned=True))
    assert second.revisit["listed"] == 60
    new_requests = simulator.requests[requests_before:]
    assert len(new_requests) == second.api_requests == 2 + len(days)
    assert sum("status=dismissed" in r.query for r in new_requests) == 1 + len(days)
    # S3: a GET of the full record, a create-only PUT of the dismissal record and one of its
    # entry in the query tables' time-keyed index per dismissed alert, plus a constant:
    # the lease and checkpoint as in every cycle (about 9), and the revisit's state (read
    # once, saved under a renewed lease after each day that decided something, for resuming).
    days_with_dismissals = len({a.created.date() for a in dismissed})
    # And a GET and a PUT per grant of the prefix's shared request budget, and per give-back.
    shared_budget = 2 * run.puts.count("_poller/budget.json")
    assert 180 <= second.s3_requests - shared_budget <= 180 + 12 + 2 * days_with_dismissals

    run.now += timedelta(hours=1, minutes=1)
    run.puts = []
    third = run.cycle()
    assert (third.archived, third.dismissals_archived) == (0, 0)
    assert third.revisit is not None and third.revisit["listed"] == 60
    # Handled alerts cost no S3 request: lease, checkpoint and revisit state only, besides
    # the prefix's budget ledger (a GET and a PUT per grant, and per give-back at the end).
    shared_budget = 2 * run.puts.count("_poller/budget.json")
    assert third.s3_requests - shared_budget <= 12
    assert not run.puts_under("alerts/", "webhooks/", "dismissals/")
    assert dismissal_records(s3, bucket) == records


def test_an_alert_archived_already_dismissed_needs_no_dismissal_record(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    run = Run(simulator, s3, bucket, first_run_since="2d", revisit_interval_seconds="0")
    start = run.now
    simulator.generate(30, start - timedelta(days=1, hours=12), start, dismissed_fraction=0.5)
    run.cycle()
    first_dismissed = {a.id for a in simulator.alerts if a.status == "dismissed"}
    run.now = start + timedelta(hours=1)
    run.puts = []
    second = run.cycle()
    assert second.revisit is not None and second.revisit["listed"] == len(first_dismissed) > 0
    # The first cycle wrote their full records from the dismissed list and remembered it:
    # the revisit reads none of them back (no GET), and writes no dismissal record.
    assert second.revisit["first_dismissed"] == 0
    assert second.dismissals_archived == 0
    assert not run.puts_under("dismissals/")
    # Besides the prefix's budget ledger (a GET and a PUT per grant and per give-back).
    assert second.s3_requests - 2 * run.puts.count("_poller/budget.json") <= 12


def test_a_cronjob_every_five_minutes_revisits_only_when_due(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    run = Run(simulator, s3, bucket, first_run_since="2d", revisit_interval_seconds="1800")
    start = run.now
    simulator.generate(20, start - timedelta(days=1, hours=12), start, dismissed_fraction=0)
    due = []
    for step in range(9):  # 0, 5, ..., 40 minutes
        run.now = start + timedelta(minutes=5 * step)
        if step == 2:
            dismiss_some(simulator, 3, lambda a: a.created < start - timedelta(hours=2))
        summary = run.cycle()
        assert summary.revisit is not None
        due.append(summary.revisit["due"])
        if step == 2:
            assert summary.dismissals_archived == 0  # not due: the dismissals wait
    # The first cycle never revisits; the second does (none ran yet), then every 30 min.
    assert due == [False, True, False, False, False, False, False, True, False]
    assert len(dismissal_records(s3, bucket)) == 3

    # poller status shows the last revisit: when, over which creation times, what it archived.
    env = poller_env(simulator, moto_server, bucket, COLUMNS="200")
    report = json.loads(run_poller(["status", "--json"], env).stdout)["revisit"]
    assert report["last"]["archived"] == 3 and report["current"] is None
    text = run_poller(["status", "--text"], env).stdout
    line = next(x for x in text.splitlines() if x.startswith("revisit"))
    assert f"created {report['last']['from']} → {report['last']['until']}: 3 dismissals" in line
    counts = Counter(
        "status=dismissed" in r.query and "from=" in r.query for r in simulator.requests
    )
    assert counts[True] > 0


def test_a_quiet_fourteen_day_revisit_costs_a_list_request_a_day_whatever_the_window(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """With one-hour windows (``sync.max_window_seconds`` 3600: 336 of them in 14 days), the
    revisit still reads its range in UTC days: nothing dismissed costs one list request a
    day (SPEC Performance: about one per 100 dismissed alerts, so a day's floor of one)."""
    run = Run(simulator, s3, bucket, first_run_since="1h", max_window_seconds="3600")
    simulator.generate(20, run.now - timedelta(minutes=50), run.now, 0)
    run.cycle()  # the first cycle never revisits
    run.now += timedelta(minutes=5)
    before = len(simulator.requests)
    second = run.cycle()
    assert second.revisit is not None and second.revisit["finished"] is True
    assert second.revisit["listed"] == 0 and second.dismissals_archived == 0
    since = datetime.fromisoformat(second.revisit["from"])
    until = datetime.fromisoformat(second.revisit["until"])
    assert until - since > timedelta(days=13, hours=23)
    days = list(chunks(since, until, timedelta(days=1), aligned=True))
    assert len(days) in (14, 15)  # 14 days cut at UTC midnights
    assert len(list(chunks(since, until, timedelta(hours=1)))) >= 335  # what it was
    new_requests = simulator.requests[before:]
    # The live window: one chunk of each list; the rest is the revisit, a request a day.
    assert len(new_requests) == second.api_requests == 2 + len(days)
    revisit_requests = [r for r in new_requests if "status=dismissed" in r.query][1:]
    assert len(revisit_requests) == len(days)


class Guard:
    """The cycle's side of a revisit: the lease is ours, nobody asked to stop."""

    def __init__(self) -> None:
        self.fences = 0

    def fence(self) -> None:
        self.fences += 1

    def stopping(self) -> bool:
        return False

    def progress(self, summary: Summary) -> None:
        pass


def test_a_revisit_that_yields_resumes_from_its_cursor_at_the_next_cycle(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """A revisit spends a bounded number of list requests per cycle, then yields to the next
    cycle's live window; the next picks up at its cursor and reads no chunk twice."""
    run = Run(simulator, s3, bucket, first_run_since="7d", revisit_interval_seconds="0")
    start = run.now
    simulator.generate(40, start - timedelta(days=6), start - timedelta(days=1), 0)
    run.cycle()
    dismissed = dismiss_some(simulator, 10, lambda a: True)
    runtime = build(run.settings, "sync", clock=lambda: run.now, s3=s3)
    settings = replace(runtime.revisit().settings, pages_per_cycle=3, days=7)
    revisit = Revisit(
        runtime.api,
        Archive(runtime.store, runtime.layout, "org"),
        RevisitStore(runtime.store, runtime.layout),
        settings,
        runtime.clock,
        runtime.run_id,
    )
    until = start - timedelta(hours=12)  # as if the live window started there
    reports, before = [], runtime.budget.sent
    for _ in range(5):
        summary = Summary("sync", runtime.run_id)
        revisit.run(run.now, until, summary, Guard())
        assert summary.revisit is not None
        reports.append(summary.revisit)
        if summary.revisit.get("finished"):
            break
    assert [r["finished"] for r in reports] == [False, False, True]
    assert reports[1]["resumed"] is True
    pieces = list(
        chunks(
            datetime.fromisoformat(reports[0]["from"]),
            datetime.fromisoformat(reports[0]["until"]),
            timedelta(days=1),
            aligned=True,
        )
    )
    assert runtime.budget.sent - before == len(pieces)  # no chunk read twice
    assert set(dismissal_records(s3, bucket)) == {a.id for a in dismissed}
    assert reports[-1]["archived"] == 10


@pytest.mark.crash
def test_a_revisit_killed_in_the_middle_then_run_again_is_exact(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """``poller sync`` SIGKILLed while its revisit writes dismissal records, then run again:
    every dismissal archived once, the records written before the kill untouched."""
    now = utc_now()
    simulator.generate(60, now - timedelta(days=3, hours=12), now - timedelta(hours=2), 0)
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="4d",
        POLLER_SYNC__REVISIT_DAYS="5",
        POLLER_SYNC__REVISIT_INTERVAL_SECONDS="0",
        POLLER_SYNC__LEASE_TTL_SECONDS="4",  # the killed run's lease goes stale soon
    )
    first = run_poller(["sync"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    dismissed = dismiss_some(simulator, 40, lambda a: True)

    simulator.faults.trickle_seconds = 0.5  # each answer takes half a second: time to kill
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "sync"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    written: dict[str, tuple[str, Any]] = {}
    try:
        while process.poll() is None and not written:
            listing = s3.list_objects_v2(Bucket=bucket, Prefix="dismissals/")
            written = {
                o["Key"]: (o["ETag"], o["LastModified"]) for o in listing.get("Contents", [])
            }
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert 0 < len(written) < 40, "the kill did not land in the middle of the revisit"
    kept = {k: v for k, v in bucket_listing(s3, bucket).items() if k.startswith("dismissals/")}

    simulator.faults.trickle_seconds = 0.0
    again = run_poller(["sync"], env)
    for _ in range(10):  # exit 75 while the killed run's lease is not stale yet
        if again.returncode != 75:
            break
        time.sleep(1)
        again = run_poller(["sync"], env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary_of(again)["dismissals_archived"] == 40 - len(kept)
    assert dismissal_records(s3, bucket) == {alert.id: alert.doc for alert in dismissed}
    after = bucket_listing(s3, bucket)
    assert {k: after[k] for k in kept} == kept  # nothing written twice


def test_a_dismissal_later_than_revisit_days_is_reported_by_verify_and_repaired(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    run = Run(simulator, s3, bucket, first_run_since="5d", revisit_days="2")
    start = run.now
    simulator.generate(30, start - timedelta(days=4), start - timedelta(days=3), 0.2)
    run.cycle()
    first_dismissed = {a.id for a in simulator.alerts if a.status == "dismissed"}
    late = dismiss_some(simulator, 4, lambda a: a.status == "active")
    run.now = start + timedelta(hours=2)
    assert run.cycle().dismissals_archived == 0  # created before the revisit's reach

    runtime = build(run.settings, "verify", clock=lambda: run.now, s3=s3)
    since, until = start - timedelta(days=5), start
    summary = Summary("verify", runtime.run_id)
    findings = runtime.verifier().run(since, until, False, summary)
    assert not findings.complete
    assert sorted(findings.dismissals_missing) == sorted(a.id for a in late)
    assert sum(day.dismissals_missing for day in findings.days) == 4
    assert sum(day.dismissed for day in findings.days) == len(first_dismissed) + 4

    run.puts = []
    repaired = runtime.verifier().run(since, until, True, Summary("verify", runtime.run_id))
    assert repaired.complete and repaired.dismissals_repaired == 4
    assert dismissal_records(s3, bucket) == {a.id: a.doc for a in late}
    assert not run.puts_under("alerts/", "webhooks/")
    again = runtime.verifier().run(since, until, False, Summary("verify", runtime.run_id))
    assert again.complete and again.dismissals_missing_count == 0


def test_a_backfill_writes_the_dismissal_records_missing_in_its_range(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    run = Run(simulator, s3, bucket, first_run_since="5d", revisit_days="1")
    start = run.now
    simulator.generate(20, start - timedelta(days=4), start - timedelta(days=2), 0.25)
    run.cycle()
    late = dismiss_some(simulator, 3, lambda a: a.status == "active")
    run.now = start + timedelta(hours=2)
    runtime = build(run.settings, "backfill", clock=lambda: run.now, s3=s3)
    span = BackfillRange(start - timedelta(days=5), start - timedelta(days=1), to_now=False)
    before = {k: v for k, v in bucket_listing(s3, bucket).items() if not k.startswith("_poller")}
    summary = run_cycle(
        runtime,
        Summary("backfill", runtime.run_id),
        walk=lambda rt, cycle, s: backfill(cycle, rt.chunk_records(), span, s),
    )
    assert summary.archived == 0 and summary.dismissals_archived == 3
    assert dismissal_records(s3, bucket) == {a.id: a.doc for a in late}
    after = bucket_listing(s3, bucket)
    assert {k: after[k] for k in before} == before  # a backfill's re-reads meet 412s


def test_a_second_backfill_over_an_old_range_writes_the_dismissals_made_since(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """Issue 19: "backfill over an old range writes the dismissal records it finds missing",
    also when an earlier backfill finished that range (its chunks are skipped): the dismissed
    list of a finished chunk is read again once revisit_interval_seconds have passed since
    its record was written or last swept. A rerun right after costs no request (brk19b)."""
    run = Run(simulator, s3, bucket, first_run_since="1h", revisit_days="1")
    start = run.now
    simulator.generate(20, start - timedelta(days=40), start - timedelta(days=35), 0)
    span = BackfillRange(start - timedelta(days=41), start - timedelta(days=30), to_now=False)

    def backfill_once() -> Summary:
        runtime = build(run.settings, "backfill", clock=lambda: run.now, s3=s3)
        return run_cycle(
            runtime,
            Summary("backfill", runtime.run_id),
            walk=lambda rt, cycle, s: backfill(cycle, rt.chunk_records(), span, s),
        )

    assert backfill_once().archived == 20
    late = dismiss_some(simulator, 3, lambda a: a.status == "active")
    run.now = start + timedelta(hours=2)  # the records are 2 h old by this clock
    again = backfill_once()
    assert again.ok and again.archived == 0 and again.dismissals_archived == 3
    assert again.chunks_skipped == again.chunks_total
    assert dismissal_records(s3, bucket) == {a.id: a.doc for a in late}
    # At once, by S3's clock (moto's is the real one): every chunk was just swept.
    run.now = utc_now()
    third = backfill_once()
    assert (third.api_requests, third.dismissals_archived) == (0, 0)


# The break19 review's findings, each fixed here with the test that reproduced it.


def test_a_dismissal_within_revisit_days_is_archived_even_near_the_edge(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """SPEC Guarantees: an alert dismissed up to ``revisit_days`` after its creation is
    covered within ``revisit_interval_seconds`` plus one cycle. Alert created 2 days - 50 min
    before the second cycle, dismissed 5 min later (age 2 d - 45 min < revisit_days), the next
    revisit an hour later: its range starts at now - 2 d, after the alert's creation."""
    run = Run(simulator, s3, bucket, first_run_since="3d", revisit_days="2")
    start = run.now
    revisit_at = start + timedelta(hours=1, minutes=1)
    created = revisit_at - timedelta(days=2) + timedelta(minutes=10)
    (alert,) = simulator.generate(1, created, created + timedelta(seconds=1), 0)
    assert run.cycle().archived == 1  # first cycle: archived active

    run.now = revisit_at
    second = run.cycle()
    assert second.revisit is not None and second.revisit["due"] is True

    run.now = revisit_at + timedelta(minutes=5)
    simulator.dismiss([alert.id], "MAINTENANCE")  # dismissed at age 2 d - 5 min
    for minutes in (10, 35, 60, 62, 67):  # a cycle every few minutes, past the next due
        run.now = revisit_at + timedelta(minutes=minutes)
        run.cycle()
    assert set(dismissal_records(s3, bucket)) == {alert.id}


def _put_state(s3: Any, bucket: str, document: Any) -> None:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    s3.put_object(Bucket=bucket, Key=LAYOUT.revisit_key, Body=body)


@pytest.mark.parametrize("version", [0, -1, True])
def test_a_state_file_of_a_wrong_version_is_named_unreadable(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, version: Any
):
    """A revisit.json of a version this poller never wrote is not silently read as v1."""
    run = Run(simulator, s3, bucket)
    runtime = build(run.settings, "sync", clock=lambda: run.now, s3=s3)
    _put_state(s3, bucket, {"version": version, "handled": {}, "current": None, "last": None})
    with pytest.raises(FatalError, match=r"revisit\.json"):
        RevisitStore(runtime.store, runtime.layout).load()


@pytest.mark.parametrize(
    "current",
    [
        {},  # no range at all
        {"from": "yesterday", "until": "x", "cursor": "y", "started_at": "z", "run_id": "r"},
        {
            "from": "2020-01-01T00:00:00Z",
            "until": "2020-01-02T00:00:00Z",
            "cursor": "2020-01-01T00:00:00Z",
            "started_at": "2020-01-02T00:00:00Z",
            "run_id": "r",
            "listed": "three",
        },
        {
            "from": "2020-01-01T00:00:00Z",
            "until": "2020-01-02T00:00:00Z",
            "cursor": "2020-01-01T00:00:00Z",
            "started_at": "2020-01-02T00:00:00Z",
            "run_id": "r",
            "pieces": [["2020-01-01T06:00:00Z", "2020-01-01T03:00:00Z"]],  # ends before
        },
        {
            "from": "2020-01-01T00:00:00Z",
            "until": "2020-01-02T00:00:00Z",
            "cursor": "2020-01-01T00:00:00Z",
            "started_at": "2020-01-02T00:00:00Z",
            "run_id": "r",
            "pieces": "2020-01-01T06:00:00Z",  # not a list of pairs
        },
    ],
)
def test_a_state_file_with_a_malformed_revisit_under_way_is_named_unreadable(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, current: Any
):
    """A corrupt ``current`` must be reported as revisit.json being unreadable (a
    FatalError naming the file and the fix), not crash every cycle with a KeyError."""
    run = Run(simulator, s3, bucket, first_run_since="1d", revisit_interval_seconds="0")
    simulator.generate(3, run.now - timedelta(hours=6), run.now, 0)
    run.cycle()
    _put_state(s3, bucket, {"version": 1, "handled": {}, "current": current, "last": None})
    run.now += timedelta(minutes=5)
    with pytest.raises(FatalError, match=r"revisit\.json"):
        run.cycle()


def _revisit_with(run: Run, s3: Any, **changes: Any) -> tuple[Any, Revisit]:
    """The revisit as ``poller.app`` builds it, with some of its settings changed."""
    runtime = build(run.settings, "sync", clock=lambda: run.now, s3=s3)
    revisit = Revisit(
        runtime.api,
        Archive(runtime.store, runtime.layout, "org"),
        RevisitStore(runtime.store, runtime.layout),
        replace(runtime.revisit().settings, **changes),
        runtime.clock,
        runtime.run_id,
    )
    return runtime, revisit


def test_a_revisit_spends_at_most_its_pages_per_cycle_and_resumes_inside_a_day(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """450 dismissed alerts in one day (5 pages) and a share of 1 list request a cycle: each
    cycle reads at most one page, saves its position inside the day (the pieces left) and
    yields; the next cycles go on from there. Nothing is lost or written twice, and what is
    read again costs list requests only (about twice the day's own pages)."""
    run = Run(simulator, s3, bucket, first_run_since="4d", revisit_interval_seconds="0")
    start = run.now
    first = start - timedelta(days=3)  # the revisit's first day starts here
    simulator.generate(450, first + timedelta(minutes=1), first + timedelta(minutes=5), 0)
    run.cycle()
    dismiss_all(simulator, first, start)
    dismissed = {a.id: a.doc for a in simulator.alerts if a.status == "dismissed"}
    assert len(dismissed) == 450
    runtime, revisit = _revisit_with(run, s3, pages_per_cycle=1, days=3)
    run.puts = []
    reports, requests = [], []
    for _ in range(40):
        before = len(simulator.requests)
        summary = Summary("sync", "x")
        revisit.run(run.now, start - timedelta(hours=1), summary, Guard())
        requests.append(len(simulator.requests) - before)
        assert summary.revisit is not None
        reports.append(summary.revisit)
        if summary.revisit["finished"]:
            break
        state = RevisitStore(runtime.store, runtime.layout).load().current
        assert state is not None and (state.get("pieces") or state["cursor"] > state["from"])
    assert reports[-1]["finished"] is True
    assert max(requests) <= 1  # the share, every cycle
    assert reports[-1]["listed"] == 450 and reports[-1]["archived"] == 450
    assert dismissal_records(s3, bucket) == dismissed
    assert len(run.puts_under("dismissals/")) == 450  # each written once
    # Each day of the range once, and the dense day's 5 pages about three times at most:
    # what a cut page listed is read again once, in a piece of its own (at no S3 cost), and
    # a second's alerts that straddle a cut can take that piece over a page.
    days = list(
        chunks(
            datetime.fromisoformat(reports[0]["from"]),
            datetime.fromisoformat(reports[0]["until"]),
            timedelta(days=1),
            aligned=True,
        )
    )
    assert sum(requests) <= len(days) - 1 + 3 * 5


def test_verify_repair_survives_a_dismissed_object_with_no_json_form(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """The dismissed version carries NaN (the API's JSON parser accepts it): verify --repair
    must not die on it and leave the other dismissals unrepaired; it quarantines that
    version (the revisit does the same), so the dismissal is kept and counted handled."""
    run = Run(simulator, s3, bucket, first_run_since="5d", revisit_days="1")
    start = run.now
    alerts = simulator.generate(5, start - timedelta(days=4), start - timedelta(days=3), 0)
    run.cycle()
    simulator.dismiss([a.id for a in alerts], "MAINTENANCE")
    bad = alerts[0]
    bad.doc = {**bad.doc, "score": float("nan")}
    run.now = start + timedelta(hours=2)
    runtime = build(run.settings, "verify", clock=lambda: run.now, s3=s3)
    since, until = start - timedelta(days=5), start
    repaired = runtime.verifier().run(since, until, True, Summary("verify", runtime.run_id))
    assert set(dismissal_records(s3, bucket)) == {a.id for a in alerts[1:]}
    assert repaired.dismissals_repaired == 4
    assert repaired.dismissals_quarantined_now == 1 and repaired.complete
    kept = [k for k in bucket_listing(s3, bucket) if k.startswith("_poller/quarantine/")]
    assert len(kept) == 1 and kept[0].startswith("_poller/quarantine/unencodable/")


def test_a_daemon_whose_every_cycle_fails_after_its_live_commit_turns_red(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """Issue 17 (7): cycles that fail again and again are not progress. An unreadable
    revisit.json fails every cycle of the daemon after its live window was committed: the
    failures count, /healthz turns red with the reason and the metric says how many (they
    reset the count before: a cycle that committed anything was progress) (brk19d)."""
    from poller.serving.daemon import FAILURES_BEFORE_RED, Daemon

    run = Run(simulator, s3, bucket, first_run_since="1h", revisit_interval_seconds="0")
    mono = [1000.0]
    runtime = build(run.settings, "run", clock=lambda: run.now, s3=s3)
    daemon = Daemon(runtime, lambda: run.now, lambda: mono[0])
    simulator.generate(3, run.now - timedelta(minutes=30), run.now, 0)
    daemon.cycle()
    assert daemon.last_outcome == "ok"
    _put_state(s3, bucket, b'{"version": 1, "handled": {')
    for _ in range(FAILURES_BEFORE_RED):
        run.now += timedelta(minutes=5)
        mono[0] += 300.0
        daemon.cycle()
        assert daemon.last_outcome == "failed", daemon.last_error
    alive, why = daemon.alive()
    assert not alive and "revisit.json" in str(why)
    failing = daemon.metrics.registry.get_sample_value("poller_failed_cycles_in_a_row")
    assert failing == FAILURES_BEFORE_RED


def test_status_names_a_corrupt_revisit_state_and_still_shows_the_rest(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """status names the unreadable revisit.json and why, shows the checkpoint and lease
    beside it, and exits 0 (it reported; the next sync fails on it, naming the fix)."""
    run = Run(simulator, s3, bucket, first_run_since="1h")
    simulator.generate(3, run.now - timedelta(minutes=30), run.now, 0)
    run.cycle()
    env = poller_env(simulator, moto_server, bucket, COLUMNS="300")
    _put_state(s3, bucket, b'{"version": 1, "handled": {"abc')
    result = run_poller(["status", "--json"], env)
    assert result.returncode == 0, result.stderr[-1500:]
    report = json.loads(result.stdout)
    assert "revisit.json is unreadable (JSONDecodeError: " in report["revisit"]["unreadable"]
    assert report["checkpoint"]["watermark"] is not None and report["lease"] is not None
    text = run_poller(["status", "--text"], env)
    assert text.returncode == 0
    line = next(x for x in text.stdout.splitlines() if x.startswith("revisit"))
    assert "revisit.json is unreadable" in line
    assert any(x.startswith("watermark") for x in text.stdout.splitlines())


def test_odd_dismissed_objects_do_not_crash_the_revisit_and_an_unsafe_id_is_quarantined(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """dismissedAt in epoch seconds, no dismissReason, isDismissed as a string: archived as
    they are. An unsafe id: quarantined as sync does (with its reason, counted, under
    ``_poller/quarantine/``), never an unsafe key, and not again by the next revisit."""
    run = Run(simulator, s3, bucket, first_run_since="3d", revisit_interval_seconds="0")
    start = run.now
    alerts = simulator.generate(4, start - timedelta(days=2), start - timedelta(days=1), 0)
    run.cycle()
    simulator.dismiss([a.id for a in alerts], "MAINTENANCE")
    a, b, c, d = alerts
    a.doc = {**a.doc, "dismissedAt": 1764072000}
    b.doc = {k: v for k, v in b.doc.items() if k != "dismissReason"}
    c.doc = {**c.doc, "isDismissed": "true"}
    d.doc = {**d.doc, "id": "../../etc/passwd"}
    run.now += timedelta(minutes=5)
    before = set(bucket_listing(s3, bucket))
    summary = run.cycle()
    assert summary.revisit is not None and summary.revisit["quarantined"] == 1
    assert summary.quarantined == 1 and summary.dismissals_archived == 3
    records = dismissal_records(s3, bucket)
    assert records == {x.id: x.doc for x in (a, b, c)}
    keys = set(bucket_listing(s3, bucket))
    assert not any(".." in k for k in keys)
    (quarantined,) = [k for k in keys - before if k.startswith("_poller/quarantine/")]
    assert quarantined.startswith("_poller/quarantine/unsafe_id/")
    kept = json.loads(s3.get_object(Bucket=bucket, Key=quarantined)["Body"].read())
    assert kept["reason"] == "unsafe_id" and kept["status"] == "dismissed"
    assert kept["raw"] == d.doc
    run.now += timedelta(minutes=5)
    run.puts = []
    again = run.cycle()
    assert again.revisit is not None and again.revisit["quarantined"] == 0
    assert again.quarantined == 0 and not run.puts_under("_poller/quarantine/")


class Pages:
    def __init__(self) -> None:
        self.pages = 0

    def started(self, summary: Summary, chunk_count: int) -> None:
        pass

    def page(self, summary: Summary) -> None:
        self.pages += 1

    def committed(self, summary: Summary, chunks_done: int) -> None:
        pass


def test_the_revisit_reports_progress_for_liveness(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """The daemon's /healthz turns red after ``stall_after`` without a page or a commit: a
    revisit that reads many pages (at a low budget, minutes each) must count as progress."""
    run = Run(simulator, s3, bucket, first_run_since="4d", revisit_interval_seconds="0")
    start = run.now
    simulator.generate(300, start - timedelta(days=3), start - timedelta(days=1), 0)
    run.cycle()
    dismiss_all(simulator, start - timedelta(days=4), start)
    run.now += timedelta(minutes=5)
    runtime = build(run.settings, "run", clock=lambda: run.now, s3=s3)
    observer = Pages()
    before = len(simulator.requests)
    summary = run_cycle(runtime, Summary("run", runtime.run_id), observer)
    assert summary.dismissals_archived == 300
    assert observer.pages == len(simulator.requests) - before


def test_a_dismissal_put_that_landed_but_failed_is_not_written_twice(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """S3 stores a dismissal record, then the answer is lost (the run fails); the next
    cycle meets a 412 for it and writes the others; no full record is touched."""
    from poller.errors import ArchiveUnavailable

    run = Run(simulator, s3, bucket, first_run_since="3d", revisit_interval_seconds="0")
    start = run.now
    alerts = simulator.generate(20, start - timedelta(days=2), start - timedelta(days=1), 0)
    run.cycle()
    simulator.dismiss([a.id for a in alerts], "MAINTENANCE")
    before = {k: v for k, v in bucket_listing(s3, bucket).items() if k.startswith("alerts/")}
    run.now += timedelta(minutes=5)
    runtime = build(run.settings, "sync", clock=lambda: run.now, s3=s3)
    real_put = runtime.store.put
    failed: list[str] = []

    def put(key: str, body: bytes, **kwargs: Any) -> str:
        etag = real_put(key, body, **kwargs)
        if key.startswith("dismissals/") and not failed:
            failed.append(key)
            raise ArchiveUnavailable("connection dropped after the write landed")
        return etag

    runtime.store.put = put  # type: ignore[method-assign]
    with pytest.raises(ArchiveUnavailable):
        run_cycle(runtime, Summary("sync", runtime.run_id))
    written = {k: v for k, v in bucket_listing(s3, bucket).items() if k.startswith("dismissals/")}
    assert failed[0] in written
    run.now += timedelta(minutes=5)
    again = run.cycle()
    after = bucket_listing(s3, bucket)
    assert set(dismissal_records(s3, bucket)) == {a.id for a in alerts}
    assert {k: after[k] for k in written} == written  # nothing rewritten
    assert {k: v for k, v in after.items() if k.startswith("alerts/")} == before
    assert again.dismissals_archived == 20 - len(written)


DISMISSED = 400


def test_thousands_of_dismissals_cost_what_the_spec_says(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """Scaled to 400: past several pages of the dismissed list (100 each), which is what the
    per-page cost needs; more alerts would only add PUTs to moto."""
    run = Run(simulator, s3, bucket, first_run_since="4d", revisit_interval_seconds="0")
    start = run.now
    simulator.generate(DISMISSED, start - timedelta(days=3), start - timedelta(days=1), 0)
    run.cycle()
    dismiss_all(simulator, start - timedelta(days=4), start)
    run.now += timedelta(minutes=5)
    requests_before, run.puts = len(simulator.requests), []
    second = run.cycle()
    assert second.dismissals_archived == DISMISSED
    assert second.revisit is not None
    pages = len(simulator.requests) - requests_before
    chunks_in_range = 15  # 14 days, aligned: up to 15 pieces
    assert pages <= 2 + chunks_in_range + DISMISSED // 100 + 3
    # The prefix's budget (README: The request budget), counted: a GET and a PUT a grant,
    # and more grants when a slow machine lets one run out of its 10 s.
    ledger = 2 * run.puts.count("_poller/budget.json")
    # A GET, the dismissal record's PUT and its index entry's PUT per dismissed alert.
    assert second.s3_requests <= 3 * DISMISSED + 12 + 2 * 4 + ledger
    size = s3.head_object(Bucket=bucket, Key=LAYOUT.revisit_key)["ContentLength"]
    assert size < 45 * DISMISSED + 2000
    run.now += timedelta(minutes=5)
    requests_before, run.puts = len(simulator.requests), []
    third = run.cycle()
    ledger = 2 * run.puts.count("_poller/budget.json")
    assert third.s3_requests - ledger <= 12 and third.dismissals_archived == 0
    print(pages, second.s3_requests, size, third.s3_requests)
