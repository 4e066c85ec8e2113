"""Never lose an alert: faults on every layer, and SIGKILL at random moments.

Each test proves what was archived key by key and body by body against the simulator."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import (
    ROOT,
    MotoServer,
    assert_exact_archive,
    bucket_listing,
    poller_env,
    run_poller,
    summary_of,
)

from poller.archive.records import Alert, Layout, classify
from poller.simulator import Faults, Simulator
from poller.simulator.server import FAULT_KINDS
from poller.timeutil import utc_now

MALFORMED = {
    "missing_id": "missing_id",
    "slash_id": "unsafe_id",
    "dotdot_id": "unsafe_id",
    "bad_created_at": "bad_created_at",
}
ODD = ("string_severity", "empty_strings")
ALERTS = 1400


def layout_ok(key: str) -> bool:
    """Is ``key`` one the SPEC's layout allows?"""
    parts = key.split("/")
    if parts[0] == "alerts":
        return len(parts) == 4 and parts[3][:2] == parts[1] and parts[3][2:4] == parts[2]
    if parts[0] == "webhooks":
        return len(parts) == 7 and all(p.isdigit() for p in parts[1:6])
    if parts[0] == "dismissals":
        return len(parts) == 4 and parts[3][:2] == parts[1] and parts[3][2:4] == parts[2]
    if parts[0] == "_poller":
        state = ("checkpoint.json", "lease.json", "revisit.json", "budget.json")
        # The store proof, the daily manifests, the query tables' due days, owed records.
        folders = ("probe", "manifests", "tables", "pending", "unfetchable")
        return (
            (len(parts) == 2 and parts[1] in state)
            or (len(parts) == 4 and parts[1] == "quarantine" and parts[2] in MALFORMED.values())
            or (len(parts) >= 3 and parts[1] in folders)
        )
    return False


@pytest.mark.faults
def test_ten_percent_faults_still_give_the_exact_archive_within_budget(
    moto_server: MotoServer, s3: Any, bucket: str
):
    rate = 0.10
    faults = Faults.spread(
        rate,
        slow_seconds=2.5,
        duplicates_across_pages=True,
        shuffle_pages=True,
        org_limit_per_minute=200,
    )
    # About 80 requests against a budget of 60 a minute, so the budget must hold some back;
    # the request count, not the alert count, is what the test needs (each alert is two PUTs).
    with Simulator(seed=21, faults=faults, page_size=20) as sim:
        now = utc_now()
        sim.generate(ALERTS, now - timedelta(days=2), now - timedelta(minutes=5))
        odd_ids = []
        for i, kind in enumerate(list(MALFORMED) + list(ODD)):
            alert = sim.add_malformed(kind, now - timedelta(hours=3, minutes=i))
            if kind in ODD:
                odd_ids.append(alert.id)
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__FIRST_RUN_SINCE="3d",
            POLLER_THREATSTACK__REQUESTS_PER_MINUTE="60",
            POLLER_THREATSTACK__TIMEOUT_SECONDS="1.5",
            POLLER_THREATSTACK__MAX_ATTEMPTS="12",
        )
        result = run_poller(["sync"], env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = summary_of(result)

        # Every kind of fault really happened, and the run went through them all.
        assert set(sim.faults_served) == set(FAULT_KINDS), sim.faults_served
        retries = [
            json.loads(line) for line in result.stderr.splitlines() if '"event": "retrying"' in line
        ]
        assert len(retries) >= 3
        assert summary["api_requests"] == sim.request_count()
        # The budget held in every 60-second window, by the server's own clock.
        assert sim.request_count() > 60  # so the budget really had to hold requests back
        assert sim.max_requests_in_any_window(60.0) <= 60
        assert sim.org_limited == 0

        assert summary["archived"] == ALERTS + len(ODD)
        assert summary["quarantined"] == len(MALFORMED)
        objects = assert_exact_archive(s3, bucket, sim)
        assert all(layout_ok(k) for k in objects), [k for k in objects if not layout_ok(k)]
        reasons = Counter(k.split("/")[2] for k in objects if k.startswith("_poller/quarantine/"))
        assert reasons == Counter(MALFORMED.values())
        for key, body in objects.items():
            if key.startswith("_poller/quarantine/"):
                record = json.loads(body)
                assert record["reason"] == key.split("/")[2]
                assert record["raw"] in [a.doc for a in sim.alerts]
        for alert_id in odd_ids:  # kept as they came, normalised in the webhook record
            item = next(classify(a.doc) for a in sim.alerts if a.id == alert_id)
            assert isinstance(item, Alert)
            webhook = json.loads(objects[Layout().webhook_key(item.id, item.created)])
            assert isinstance(webhook["severity"], int)
            assert webhook["server_or_region"] is None or webhook["server_or_region"] != ""


@pytest.mark.faults
def test_a_page_that_stays_malformed_fails_cleanly(moto_server: MotoServer, s3: Any, bucket: str):
    with Simulator(seed=5) as sim:
        now = utc_now()
        sim.generate(300, now - timedelta(hours=6), now - timedelta(hours=1))
        env = poller_env(sim, moto_server, bucket, POLLER_THREATSTACK__MAX_ATTEMPTS="3")
        assert run_poller(["sync"], env).returncode == 0
        before = bucket_listing(s3, bucket)
        sim.generate(50, now - timedelta(minutes=10), now - timedelta(minutes=2))
        sim.faults.rate = {"bad_json": 1.0}
        result = run_poller(["sync"], env)
        assert result.returncode == 1
        assert (
            "not JSON" in summary_of(result)["error"] or "signature" in summary_of(result)["error"]
        )
        assert sim.request_count("/v2/alerts") == 4 + 3  # 3 attempts, then it stops
        assert (
            bucket_listing(s3, bucket)["_poller/checkpoint.json"]
            == before["_poller/checkpoint.json"]
        )
        sim.faults.rate = {}
        assert run_poller(["sync"], env).returncode == 0
        assert_exact_archive(s3, bucket, sim)


def kill_after_pages(env: dict[str, str], pages: int, rng: random.Random) -> int | None:
    """Start `poller sync` and SIGKILL it just after its ``pages``-th page read, a random
    fraction of a page's writes later. Returns its exit code if it ended first, else None.

    Kills are placed by the run's own progress (its log), not by wall-clock delays, so
    which phase a kill lands in does not depend on how fast the machine is."""
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "sync"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stderr is not None
    read = 0
    for line in process.stderr:
        if '"event": "page.read"' in line:
            read += 1
            if read >= pages:
                time.sleep(rng.uniform(0.0, 0.3))
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                process.stderr.close()
                return None
    process.stderr.close()
    return process.wait()


def assert_nothing_behind_the_watermark_missing(
    s3: Any, bucket: str, sim: Simulator, added_at: dict[str, datetime]
) -> None:
    """The promise at every instant: an alert that was visible when the committed cycle
    started (the checkpoint's ``updated_at``) and was created before its watermark is
    archived. Alerts that arrived later, behind the watermark, are the next cycle's
    look-back work (or verify's), and are judged by the final exact archive."""
    keys = set(bucket_listing(s3, bucket))
    if "_poller/checkpoint.json" not in keys:
        return
    checkpoint = json.loads(
        s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")["Body"].read()
    )
    watermark = datetime.fromisoformat(checkpoint["watermark"].replace("Z", "+00:00"))
    cycle_started = datetime.fromisoformat(checkpoint["updated_at"].replace("Z", "+00:00"))
    layout = Layout()
    missing = []
    for sim_alert in sim.alerts:
        item = classify(sim_alert.doc)
        assert isinstance(item, Alert)
        if item.created < watermark and added_at[item.id] <= cycle_started:
            for key in (layout.alert_key(item.id), layout.webhook_key(item.id, item.created)):
                if key not in keys:
                    missing.append(key)
    assert not missing, (checkpoint["watermark"], checkpoint["updated_at"], missing[:5])


def run_until_done(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `poller sync` until it is not turned away by a dead run's still-fresh lease."""
    deadline = time.monotonic() + 120
    while True:
        result = run_poller(["sync"], env)
        if result.returncode != 75 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.mark.crash
def test_twenty_sigkills_then_the_exact_archive(moto_server: MotoServer, s3: Any, bucket: str):
    """Ten kills inside the chunks of a first run, then ten inside incremental runs that
    have late alerts to archive; the invariant holds after each, the end is exact.

    Sized to the kills, not to volume: 48 one-hour chunks give the first run room for ten
    kills, and ten alerts a chunk (20 writes) are enough for a kill to land between writes."""
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    rng = random.Random(2026)
    with Simulator(seed=33) as sim:
        now = utc_now()
        # 48 one-hour chunks, two list pages each (one per status): about 96 page reads.
        sim.generate(480, now - timedelta(hours=48), now - timedelta(minutes=5))
        added_at = dict.fromkeys((a.id for a in sim.alerts), utc_now())
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__FIRST_RUN_SINCE="49h",
            POLLER_SYNC__MAX_WINDOW_SECONDS="3600",
            POLLER_SYNC__LEASE_TTL_SECONDS="3",
            # The revisit is kept (kills land in it too), over one day: a day is one list
            # request, and fourteen would only add page reads the kills need not land in.
            POLLER_SYNC__REVISIT_DAYS="1",
            # The budget is not this test's subject (test_shared_budget.py's is): about 100
            # page reads in the first minute would only wait for it.
            POLLER_THREATSTACK__REQUESTS_PER_MINUTE="6000",
        )

        def kill_rounds(kills_wanted: int, pages: tuple[int, int], before: Any) -> int:
            kills = finished = 0
            for _ in range(kills_wanted * 4):
                before()
                code = kill_after_pages(env, rng.randint(*pages), rng)
                if code is None:
                    kills += 1
                    assert_nothing_behind_the_watermark_missing(s3, bucket, sim, added_at)
                    if kills == kills_wanted:
                        break
                    time.sleep(3)  # the dead run's lease goes stale (ttl 3 s)
                else:
                    # 75: a killed run's lease is still fresh. 0: it read fewer pages than
                    # the kill waited for and finished.
                    assert code in (0, 75)
                    finished += code == 0
                    time.sleep(0.5)
            assert kills == kills_wanted
            return finished

        # Phase 1: a first run over 48 chunks, killed ten times after 2 to 8 page reads
        # (at most four chunks a run), so every kill lands inside the first run.
        finished = kill_rounds(10, (2, 8), lambda: None)
        assert finished == 0, "the first run finished before ten kills"
        assert run_until_done(env).returncode == 0

        # Phase 2: incremental runs, each with a batch of late alerts created behind the
        # watermark the last run committed (inside the look-back), killed after 1 to 3 pages.
        def add_late_batch() -> None:
            later = utc_now()
            batch = sim.generate(40, later - timedelta(minutes=14), later - timedelta(minutes=2))
            seen_at = utc_now()
            added_at.update((a.id, seen_at) for a in batch)

        kill_rounds(10, (1, 3), add_late_batch)

        result = run_until_done(env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert_exact_archive(s3, bucket, sim)
        # Nothing was ever overwritten: one version per archived object.
        versions: Counter[str] = Counter()
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for version in page.get("Versions", []):
                versions[version["Key"]] += 1
        rewritten = [k for k, n in versions.items() if n > 1 and not k.startswith("_poller/")]
        assert not rewritten


@pytest.mark.faults
def test_the_budget_holds_across_runs_taking_turns(moto_server: MotoServer, s3: Any, bucket: str):
    """A CronJob Job retried right after a run that used its budget: a fresh process, a
    fresh limiter, but the same 3 requests per minute by the server's clock."""
    with Simulator(seed=9) as sim:
        now = utc_now()
        sim.generate(10, now - timedelta(hours=3), now - timedelta(hours=1))
        # No revisit: its list requests (the second run is the first with a checkpoint) are
        # not this test's subject, and at 3 a minute each costs 20 s.
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_THREATSTACK__REQUESTS_PER_MINUTE="3",
            POLLER_SYNC__REVISIT_DAYS="0",
        )
        for _ in range(2):  # each run: one list request per status
            result = run_poller(["sync"], env, timeout=180)
            assert result.returncode == 0, result.stderr[-2000:]
        assert sim.request_count("/v2/alerts") == 4
        assert sim.max_requests_in_any_window(60.0) <= 3
        assert_exact_archive(s3, bucket, sim)
