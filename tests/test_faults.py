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
from datetime import timedelta
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

from poller.records import Alert, Layout, classify
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


def layout_ok(key: str) -> bool:
    """Is ``key`` one the SPEC's layout allows?"""
    parts = key.split("/")
    if parts[0] == "alerts":
        return len(parts) == 4 and parts[3][:2] == parts[1] and parts[3][2:4] == parts[2]
    if parts[0] == "webhooks":
        return len(parts) == 7 and all(p.isdigit() for p in parts[1:6])
    if parts[0] == "_poller":
        return key in ("_poller/checkpoint.json", "_poller/lease.json") or (
            len(parts) == 4 and parts[1] == "quarantine" and parts[2] in MALFORMED.values()
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
    with Simulator(seed=21, faults=faults, page_size=40) as sim:
        now = utc_now()
        sim.generate(3000, now - timedelta(days=2), now - timedelta(minutes=5))
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

        assert summary["archived"] == 3000 + len(ODD)
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


def creation_times(sim: Simulator) -> dict[str, Any]:
    return {a.id: classify(a.doc).created for a in sim.alerts}  # all well-formed here


@pytest.mark.crash
def test_twenty_sigkills_then_the_exact_archive(moto_server: MotoServer, s3: Any, bucket: str):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    rng = random.Random(2026)
    with Simulator(seed=33) as sim:
        now = utc_now()
        sim.generate(3000, now - timedelta(days=2), now - timedelta(minutes=5))
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__FIRST_RUN_SINCE="3d",
            POLLER_SYNC__MAX_WINDOW_SECONDS="7200",
            POLLER_SYNC__LEASE_TTL_SECONDS="3",
            POLLER_LOG__LEVEL="warning",
        )
        created = creation_times(sim)
        kills = 0
        while kills < 20:
            process = subprocess.Popen(
                [sys.executable, "-m", "poller", "sync"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            time.sleep(rng.uniform(0.6, 3.5))
            if process.poll() is not None:
                # 75: the killed run's lease was still fresh. 0: it finished everything
                # before it could be killed, so give the next runs more work.
                assert process.returncode in (0, 75)
                if process.returncode == 0:
                    later = utc_now()
                    sim.generate(500, later - timedelta(minutes=14), later - timedelta(minutes=2))
                    created = creation_times(sim)
                time.sleep(0.5)
                continue
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
            # Invariant at every kill: nothing before the watermark is missing.
            keys = set(bucket_listing(s3, bucket))
            if "_poller/checkpoint.json" in keys:
                checkpoint = json.loads(
                    s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")["Body"].read()
                )
                watermark = checkpoint["watermark"].replace("Z", "+00:00")
                for alert_id, moment in created.items():
                    if moment.isoformat() < watermark:
                        assert Layout().alert_key(alert_id) in keys
                        assert Layout().webhook_key(alert_id, moment) in keys

        deadline = time.monotonic() + 300
        while True:
            result = run_poller(["sync"], env)
            if result.returncode != 75 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert result.returncode == 0, result.stderr[-2000:]
        assert_exact_archive(s3, bucket, sim)
        # Nothing was ever overwritten: one version per archived object.
        versions = Counter()
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for version in page.get("Versions", []):
                versions[version["Key"]] += 1
        rewritten = [k for k, n in versions.items() if n > 1 and not k.startswith("_poller/")]
        assert not rewritten
