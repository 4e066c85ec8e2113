"""`poller backfill` as a real process against the simulator and a moto server: a month of
alerts from an empty bucket, SIGKILLed and rerun; and beside a running daemon."""

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
from urllib.parse import parse_qs

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

from poller.simulator import Simulator
from poller.timeutil import iso_z, utc_now

ALERTS_IN_THE_MONTH = 900


def windows_read(sim: Simulator, after: float = 0.0) -> Counter[tuple[str, str]]:
    """(from, until) -> list requests for it that arrived after ``after`` (time.time())."""
    found: Counter[tuple[str, str]] = Counter()
    for record in sim.requests:
        if record.path == "/v2/alerts" and record.at > after:
            query = parse_qs(record.query)
            found[(query["from"][0], query["until"][0])] += 1
    return found


def finished_chunks(s3: Any, bucket: str) -> set[tuple[str, str]]:
    """The spans of the chunks recorded as finished, in the API's time format."""
    spans = set()
    for key in bucket_listing(s3, bucket):
        if key.startswith("_poller/backfill/"):
            since, until = key.rsplit("/", 1)[1].split("_")[:2]  # then the statuses read
            spans.add(
                tuple(
                    f"{t[0:4]}-{t[4:6]}-{t[6:8]}T{t[9:11]}:{t[11:13]}:{t[13:15]}"
                    for t in (since, until)
                )
            )
    return spans


def kill_after_chunks(env: dict[str, str], chunks: int, rng: random.Random) -> int | None:
    """Start a backfill; SIGKILL it once ``chunks`` chunks of the range are done (by its own
    progress events, earlier runs' included), a moment into the next one. Returns its exit
    code if it ended first."""
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "backfill", "--since", "31d"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if '"event": "walk.progress"' not in line:
            continue
        event = json.loads(line)
        if event["chunks_done"] + event["chunks_skipped"] >= chunks:
            time.sleep(rng.uniform(0.05, 0.3))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()
            return None
    process.stderr.close()
    return process.wait()


@pytest.mark.crash
def test_a_month_backfilled_from_empty_killed_three_times_is_exact_and_rereads_no_finished_chunk(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """Sized to its point, not to a real month's volume: 31 one-day chunks are what the
    kills land between, and 30 alerts a day (60 writes a chunk) keep each chunk long enough
    for a kill to land inside the next one. More alerts would only add PUTs to moto."""
    rng = random.Random(8)
    with Simulator(seed=88) as sim:
        now = utc_now()
        sim.generate(ALERTS_IN_THE_MONTH, now - timedelta(days=30), now - timedelta(minutes=10))
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__LEASE_TTL_SECONDS="3",
            POLLER_THREATSTACK__REQUESTS_PER_MINUTE="100000",
            POLLER_LOG__PROGRESS_SECONDS="0",
        )
        finished_before_kill: list[tuple[float, set[tuple[str, str]]]] = []
        for chunks in (4, 12, 22):  # kills early, in the middle and late in the month
            while (code := kill_after_chunks(env, chunks, rng)) == 75:
                time.sleep(0.5)  # the killed run's lease is still fresh
            assert code is None, f"the backfill ended (exit {code}) before its kill"
            finished_before_kill.append((time.time(), finished_chunks(s3, bucket)))
        deadline = time.monotonic() + 60
        while (
            result := run_poller(["backfill", "--since", "31d"], env, timeout=900)
        ).returncode == 75:
            assert time.monotonic() < deadline, result.stdout[-1000:]
            time.sleep(0.5)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = summary_of(result)
        assert summary["chunks_skipped"] >= 20 and summary["chunks_done"] >= 1
        assert summary["chunks_done"] + summary["chunks_skipped"] == summary["chunks_total"]

        # No chunk finished before a kill was ever read again after it.
        for killed_at, finished in finished_before_kill:
            reread = set(windows_read(sim, after=killed_at)) & finished
            assert not reread, sorted(reread)[:3]
        # The live checkpoint was created as the range ran up to now.
        checkpoint = json.loads(
            s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")["Body"].read()
        )
        assert checkpoint["mode"] == "backfill" and checkpoint["watermark"] > (
            now - timedelta(minutes=10)
        ).strftime("%Y-%m-%dT%H:%M:%S")
        objects = assert_exact_archive(s3, bucket, sim, bodies=False)
        assert len([k for k in objects if k.startswith("alerts/")]) == ALERTS_IN_THE_MONTH
        # Bodies: a sample, so the test does not download 40,000 objects.
        from conftest import expected_archive

        expected = expected_archive(sim, sim.credentials.org_id)
        for key in rng.sample(sorted(expected), 200):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert json.loads(body) == expected[key], key


@pytest.mark.integration
def test_a_backfill_beside_the_running_daemon_never_moves_the_checkpoint_back(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """The daemon keeps cycling; a backfill over the last two days (the live window
    included) takes the lease between its cycles. Every checkpoint version ever written is
    at or after the one before it, and the archive ends exact."""
    from test_daemon import start_daemon

    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    with Simulator(seed=19) as sim:
        now = utc_now()
        sim.generate(800, now - timedelta(days=2), now - timedelta(minutes=3))
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__INTERVAL_SECONDS="2",
            POLLER_SYNC__FIRST_RUN_SINCE="1h",
            POLLER_SYNC__SETTLE_SECONDS="5",
            POLLER_HTTP__PORT="0",
        )
        daemon = start_daemon(env)
        try:
            deadline = time.monotonic() + 60
            while "_poller/checkpoint.json" not in bucket_listing(s3, bucket):
                assert time.monotonic() < deadline, "the daemon committed nothing"
                time.sleep(0.2)
            sim.generate(50, utc_now() - timedelta(minutes=4), utc_now() - timedelta(minutes=1))
            backfill_deadline = time.monotonic() + 120
            while (result := run_poller(["backfill", "--since", "2d"], env)).returncode == 75:
                assert time.monotonic() < backfill_deadline, "the daemon never let go"
                time.sleep(0.3)
            assert result.returncode == 0, result.stderr[-2000:]
            backfilled = summary_of(result)
            assert backfilled["archived"] > 0
            time.sleep(5)  # a few more daemon cycles after the backfill
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.communicate(timeout=60)
        assert daemon.returncode == 0

        history = []
        versions = s3.list_object_versions(Bucket=bucket, Prefix="_poller/checkpoint.json")
        for version in reversed(versions.get("Versions", [])):  # oldest first
            body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])[
                "Body"
            ].read()
            history.append(json.loads(body))
        watermarks = [h["watermark"] for h in history]
        assert watermarks == sorted(watermarks), "the checkpoint moved backwards"
        # The backfill moved the checkpoint only if its end passed the daemon's watermark
        # (which it may not: both end near now); whatever it committed is in the history.
        if backfilled["watermark"] is not None:
            assert backfilled["watermark"] in watermarks
        assert "run" in {h["mode"] for h in history}
        assert_exact_archive(s3, bucket, sim)


def list_requests_by_status(sim: Simulator, after: float) -> Counter[str]:
    """status -> list requests that arrived after ``after`` (time.time())."""
    found: Counter[str] = Counter()
    for record in sim.requests:
        if record.path == "/v2/alerts" and record.at > after:
            found[parse_qs(record.query)["status"][0]] += 1
    return found


@pytest.mark.integration
def test_a_backfill_of_both_statuses_reads_the_dismissed_list_of_days_read_for_active_only(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """Three days, read first with ``threatstack.statuses: [active]``, then with both: the
    second run lists only the dismissed list over them and archives every dismissed alert;
    a third identical run lists nothing. Forty alerts: the point is the lists, not volume."""
    with Simulator(seed=41) as sim:
        now = utc_now()
        alerts = sim.generate(40, now - timedelta(days=3), now - timedelta(days=1), 0.5)
        dismissed = [a for a in alerts if a.status == "dismissed"]
        assert dismissed and len(dismissed) < len(alerts)
        both = poller_env(sim, moto_server, bucket)
        active_only = {**both, "POLLER_THREATSTACK__STATUSES": "active"}
        # Fixed instants: a relative --until moves with the clock, and a chunk it ends
        # differently is another chunk.
        since, until = (now - timedelta(days=d) for d in (4, 0.5))
        command = ["backfill", "--since", iso_z(since), "--until", iso_z(until)]

        first = run_poller(command, active_only)
        assert first.returncode == 0, first.stderr[-2000:]
        keys = bucket_listing(s3, bucket)
        assert not [a for a in dismissed if f"alerts/{a.id[:2]}/{a.id[2:4]}/{a.id}" in keys]
        records = [k for k in keys if k.startswith("_poller/backfill/")]
        assert records and all(k.endswith("Z_active") for k in records)

        started = time.time()
        second = run_poller(command, both)
        assert second.returncode == 0, second.stderr[-2000:]
        summary = summary_of(second)
        assert summary["chunks_done"] == summary["chunks_total"] and summary["chunks_skipped"] == 0
        reads = list_requests_by_status(sim, started)
        assert reads["active"] == 0 and reads["dismissed"] > 0  # only what was not covered
        assert summary["archived"] == len(dismissed)
        assert_exact_archive(s3, bucket, sim)  # every alert of the range, key by key
        records = [k for k in bucket_listing(s3, bucket) if k.startswith("_poller/backfill/")]
        assert len([k for k in records if k.endswith("Z_active_dismissed")]) == len(
            [k for k in records if k.endswith("Z_active")]
        )

        started = time.time()
        third = run_poller(command, both)
        assert third.returncode == 0, third.stderr[-2000:]
        summary = summary_of(third)
        assert summary["chunks_skipped"] == summary["chunks_total"]
        assert list_requests_by_status(sim, started) == Counter()  # not one list page
