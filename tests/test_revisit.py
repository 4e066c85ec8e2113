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
