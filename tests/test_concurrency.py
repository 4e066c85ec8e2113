"""One writer at a time, with real processes racing over a moto server process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from conftest import (
    ROOT,
    MotoServer,
    assert_exact_archive,
    bucket_listing,
    lease_released,
    poller_env,
    run_poller,
    summary_of,
    tls_env,
)
from s3proxy import S3Proxy

from poller.archive.records import Layout
from poller.archive.state import Lease
from poller.archive.store import S3ObjectStore
from poller.errors import LeaseHeld
from poller.simulator import Faults, Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def start(env: dict[str, str]) -> subprocess.Popen[str]:
    return start_command(["sync"], env)


def start_command(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "poller", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> tuple[int, dict[str, Any]]:
    out, err = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return process.returncode, summary_of(result)


def checkpoint_history(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """Every version of the checkpoint ever written, oldest first (bucket versioning)."""
    versions = s3.list_object_versions(Bucket=bucket, Prefix="_poller/checkpoint.json")
    # S3 lists a key's versions newest first (LastModified has only 1 s resolution).
    ordered = list(reversed(versions.get("Versions", [])))
    history = []
    for version in ordered:
        body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        history.append(json.loads(body["Body"].read()))
    return history


def wait_for_lease(s3: Any, bucket: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(s3.get_object(Bucket=bucket, Key="_poller/lease.json")["Body"].read())
        except s3.exceptions.NoSuchKey:
            time.sleep(0.05)
    raise AssertionError("no lease appeared")


def test_racing_processes_one_works_the_rest_exit_75(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    env = poller_env(simulator, moto_server, bucket, POLLER_SYNC__FIRST_RUN_SINCE="7d")
    # The "catch-up-style" contender re-reads a whole day.
    catch_up = {**env, "POLLER_SYNC__LOOKBACK_SECONDS": "86400"}
    turned_away = 0  # a round's losers may start after the winner released the lease
    for round_number in range(6):
        # New alerts inside the look-back of every contender, so whoever wins has work.
        now = utc_now()
        simulator.generate(120, now - timedelta(minutes=10), now - timedelta(minutes=2))
        processes = [start(env) for _ in range(3)] + [start(catch_up)]
        outcomes = [finish(p) for p in processes]
        codes = sorted(code for code, _ in outcomes)
        # Each outcome's code and error whole: a failure says why (the repr is truncated).
        assert set(codes) <= {0, 75}, [
            (code, s.get("error"), s.get("listed")) for code, s in outcomes
        ]
        workers = [s for code, s in outcomes if code == 0 and s["archived"] > 0]
        assert len(workers) == 1, f"round {round_number}: {outcomes}"
        turned_away += codes.count(75)
        for code, summary in outcomes:
            if code == 75:
                assert "another run holds the lease" in summary["error"]
                assert summary["archived"] == 0 and summary["api_requests"] == 0
        assert_exact_archive(s3, bucket, simulator, bodies=False)

    assert turned_away >= 1, "no contention happened in six rounds"
    assert_exact_archive(s3, bucket, simulator)
    history = checkpoint_history(s3, bucket)
    watermarks = [h["watermark"] for h in history]
    assert watermarks == sorted(watermarks), "the checkpoint moved backwards"
    assert len(history) >= 6


def start_holder_mid_work(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
) -> tuple[dict[str, str], subprocess.Popen[str], dict[str, Any]]:
    """A `poller sync` with a 10 s lease, once its first records are in the bucket (of 900
    alerts: about 1,800 writes still to go, whatever the machine's speed)."""
    now = utc_now()
    simulator.generate(900, now - timedelta(hours=23), now - timedelta(minutes=5))
    env = poller_env(simulator, moto_server, bucket, POLLER_SYNC__LEASE_TTL_SECONDS="10")
    holder = start(env)
    lease = wait_for_lease(s3, bucket)
    deadline = time.monotonic() + 60
    while s3.list_objects_v2(Bucket=bucket, Prefix="alerts/")["KeyCount"] == 0:
        assert time.monotonic() < deadline, "the holder archived nothing"
        time.sleep(0.05)
    return env, holder, lease


@pytest.mark.crash
def test_a_killed_holder_is_taken_over_after_expiry(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    env, holder, lease = start_holder_mid_work(simulator, moto_server, s3, bucket)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lease["pid"] == holder.pid

    blocked = start(env)
    code, summary = finish(blocked)
    assert code == 75, summary  # the dead holder's lease is still fresh

    time.sleep(11)  # past the ttl, by S3's clock
    taker = start(env)
    code, summary = finish(taker)
    assert code == 0, summary
    assert summary["archived"] + summary["already_archived"] == 900
    assert_exact_archive(s3, bucket, simulator)
    assert lease_released(s3, bucket)


@pytest.mark.crash
def test_a_paused_holder_that_lost_its_lease_writes_no_checkpoint(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    env, paused, _ = start_holder_mid_work(simulator, moto_server, s3, bucket)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        time.sleep(12)
        taker = start(env)
        code, summary = finish(taker)
        assert code == 0, summary
        checkpoint = s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")
        etag_after_taker = checkpoint["ETag"]
        assert json.loads(checkpoint["Body"].read())["updated_by"] == summary["run_id"]
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    code, paused_summary = finish(paused)
    assert code == 1, paused_summary
    assert "lease" in paused_summary["error"]
    assert paused_summary["watermark"] is None
    after = s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")
    assert after["ETag"] == etag_after_taker  # the paused run wrote no checkpoint
    assert_exact_archive(s3, bucket, simulator)


@pytest.mark.crash
def test_sigterm_releases_the_lease_and_loses_nothing(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    env, holder, _ = start_holder_mid_work(simulator, moto_server, s3, bucket)
    holder.send_signal(signal.SIGTERM)
    code, summary = finish(holder, timeout=60)
    assert code == 143, summary
    assert summary["error"] == "stopped by SIGTERM"
    assert lease_released(s3, bucket)
    code, summary = finish(start(env))  # no wait for a ttl: the lease is free at once
    assert code == 0, summary
    assert_exact_archive(s3, bucket, simulator)


# ------------------------------------------------------------------ lease edges (issue 17)
LEASE_KEY = "_poller/lease.json"


def test_a_renewal_whose_answer_was_lost_is_not_a_lost_lease(
    simulator: Simulator, tls_s3: S3Proxy, s3: Any, bucket: str
):
    """Every write to the lease after the first lands and is never answered (the proxy
    closes the connection once moto has the write): botocore retries, gives up, and the run
    sees an error for a renewal that landed. The run reads the lease back, finds its own
    token, and commits; its release landed too."""
    now = utc_now()
    simulator.generate(30, now - timedelta(hours=3), now - timedelta(minutes=5))
    tls_s3.quirks.unanswered, tls_s3.quirks.answered_first = LEASE_KEY, 1
    env = tls_env(
        simulator,
        tls_s3,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="1d",
        POLLER_S3__MAX_ATTEMPTS="3",  # fewer backoffs before botocore gives up
    )
    result = run_poller(["sync"], env)
    summary = summary_of(result)
    assert result.returncode == 0, summary
    assert tls_s3.unanswered_count >= 2  # the renewal before the commit, and the release
    assert summary["archived"] == 30
    checkpoint = json.loads(
        s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")["Body"].read()
    )
    assert checkpoint["updated_by"] == summary["run_id"]
    assert lease_released(s3, bucket)
    assert_exact_archive(s3, bucket, simulator)


def guarded(listing: dict[str, Any]) -> dict[str, Any]:
    """What the lease guards: every key but the lease and the request-budget ledger, which
    processes without the lease write too (a run gives its unused grant back as it exits)."""
    return {k: v for k, v in listing.items() if k not in (LEASE_KEY, "_poller/budget.json")}


def test_a_run_that_lost_its_lease_mid_chunk_stops_before_the_next_page(
    tls_s3: S3Proxy, s3: Any, bucket: str
):
    """One chunk of 60 alerts in pages of 5. While the 4th page is held at the simulator,
    the run's renewals fail (503) until its lease is stale by S3's clock, and another holder
    takes it over. The held page is the last one the run asks for; it writes none of that
    page's alerts and no checkpoint: key by key, the bucket holds what it held at the loss,
    which is exactly the first three pages' records."""
    with Simulator(seed=17, page_size=5, faults=Faults(hold_listing=4)) as sim:
        now = utc_now()
        sim.generate(60, now - timedelta(hours=6), now - timedelta(minutes=5), 0.0)
        env = tls_env(
            sim,
            tls_s3,
            bucket,
            POLLER_SYNC__FIRST_RUN_SINCE="1d",
            POLLER_SYNC__LEASE_TTL_SECONDS="3",
        )
        process = start_command(["sync"], env)
        try:
            assert sim.holding.wait(timeout=120), "the run never asked for the 4th page"
            tls_s3.quirks.refuse_writes = LEASE_KEY  # its renewals fail from now on
            taker = Lease(S3ObjectStore(s3, bucket), Layout(), 3, {"run_id": "taker"}, utc_now)
            deadline = time.monotonic() + 60
            while True:  # until the lease is stale by S3's clock (ttl 3 s)
                try:
                    taker.acquire()
                    break
                except LeaseHeld:
                    assert time.monotonic() < deadline, "the lease never went stale"
                    time.sleep(0.5)
            at_loss = guarded(bucket_listing(s3, bucket))
            tls_s3.quirks.refuse_writes = None
        finally:
            sim.release_hold()
        code, summary = finish(process, timeout=120)
        assert code == 1, summary
        assert "lease" in summary["error"]
        assert sim.request_count("/v2/alerts") == 4  # the held page, then nothing
        after = guarded(bucket_listing(s3, bucket))
        assert after == at_loss  # nothing written (or rewritten) after the loss
        newest_first = sorted(sim.alerts, key=lambda a: (a.created, str(a.id)), reverse=True)
        layout = Layout()
        first_pages = {layout.alert_key(a.id) for a in newest_first[:15]}
        assert {k for k in after if k.startswith("alerts/")} == first_pages
        assert len([k for k in after if k.startswith("webhooks/")]) == 15
        assert "_poller/checkpoint.json" not in after
        assert (
            json.loads(s3.get_object(Bucket=bucket, Key=LEASE_KEY)["Body"].read())["run_id"]
            == "taker"
        )
        taker.release()
        result = run_poller(["sync"], env)  # the next run archives the rest
        assert result.returncode == 0, result.stderr[-2000:]
        assert_exact_archive(s3, bucket, sim)
