"""End to end over real sockets: `poller` processes, the Threat Stack simulator, and a moto
S3 server process, configured only through SPEC's environment names."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import (
    MotoServer,
    assert_exact_archive,
    bucket_listing,
    bucket_objects,
    lease_released,
    poller_env,
    run_poller,
    summary_of,
)

from poller.app import build, run_cycle
from poller.archive.allowance import ledger_requests
from poller.config import load_settings
from poller.simulator import Simulator
from poller.timeutil import utc_now
from poller.walks.sync import Summary

pytestmark = pytest.mark.integration


def pages_for(sim: Simulator, statuses: tuple[str, ...] = ("active", "dismissed")) -> int:
    counts = Counter(a.status for a in sim.alerts)
    return sum(max(1, math.ceil(counts[s] / sim.page_size)) for s in statuses)


def test_two_days_of_alerts_are_archived_exactly_then_nothing_more(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(1000, now - timedelta(days=2), now - timedelta(minutes=2))
    # One chunk for the whole first window, so the list requests are pages and nothing else.
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="3d",
        POLLER_SYNC__MAX_WINDOW_SECONDS=str(4 * 86400),
    )

    first = run_poller(["sync"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = summary_of(first)
    assert (summary["listed"], summary["archived"], summary["quarantined"]) == (1000, 1000, 0)
    assert summary["api_requests"] == pages_for(simulator)  # one list request per 100 alerts
    # Two writes per alert, and a constant: lease, checkpoint, and the store proof (eight
    # requests the first time a day, see README: S3-compatible stores); and, once a day, two
    # reads per record of a day that closed, for its manifest (README: What the manifests
    # prove); and a GET and a PUT per grant of the prefix's budget.
    manifests = s3.list_objects_v2(Bucket=bucket, Prefix="_poller/manifests/")["KeyCount"]
    ledger = ledger_requests(summary["api_requests"], 100)
    assert summary["s3_requests"] <= 2 * 1000 + 2 * 1000 + 16 + manifests + ledger
    assert set(summary) >= {
        "listed",
        "archived",
        "already_archived",
        "quarantined",
        "api_requests",
        "s3_requests",
        "window",
        "duration_s",
    }
    assert_exact_archive(s3, bucket, simulator)
    assert simulator.credentials.api_key not in first.stderr + first.stdout
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="alerts/")["Contents"][:1]
    head = s3.head_object(Bucket=bucket, Key=objects[0]["Key"])
    assert head["ContentType"] == "application/json"

    before = {k: v for k, v in bucket_listing(s3, bucket).items() if not k.startswith("_poller")}
    second = run_poller(["sync"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    again = summary_of(second)
    assert again["archived"] == 0
    # The store proof's read, lease, checkpoint, fence, commit, the manifests' listing; and
    # this being the first cycle with a checkpoint, the first revisit (README: Dismissals):
    # its state read and written; and the budget's ledger for all the list requests (README:
    # The request budget). No alert write.
    assert again["s3_requests"] <= 9 + 3 + ledger_requests(again["api_requests"], 100)
    after = {k: v for k, v in bucket_listing(s3, bucket).items() if not k.startswith("_poller")}
    assert after == before


@pytest.mark.parametrize(
    ("from_inclusive", "until_inclusive"),
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["from-incl,until-excl", "both-excl", "both-incl", "from-excl,until-incl"],
)
def test_alerts_exactly_at_chunk_and_cycle_cuts_are_archived(
    from_inclusive: bool, until_inclusive: bool, moto_server: MotoServer, s3: Any, bucket: str
):
    """The API leaves both ends of from/until open to reading: whichever way it behaves, an
    alert created on the very second of a chunk cut or a cycle boundary is archived, even
    with no look-back at all."""
    with Simulator(seed=11, from_inclusive=from_inclusive, until_inclusive=until_inclusive) as sim:
        now = utc_now().replace(microsecond=0)
        start = now - timedelta(hours=3)
        for cut in (start + timedelta(hours=1), start + timedelta(hours=2)):
            for offset in range(-2, 3):  # on, and around, the chunk boundaries
                moment = cut + timedelta(seconds=offset)
                sim.add(sim.factory.alert(moment), moment)
        sim.generate(20, start, now - timedelta(minutes=1))
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__FIRST_RUN_SINCE=start.isoformat(),
            POLLER_SYNC__MAX_WINDOW_SECONDS="3600",
            POLLER_SYNC__LOOKBACK_SECONDS="0",
            POLLER_SYNC__SETTLE_SECONDS="0",
            # The revisit reads its range in the same one-hour chunks: 14 days of them would
            # spend a minute's budget on the second run, and dismissals are not this test's.
            POLLER_SYNC__REVISIT_DAYS="0",
        )
        first = run_poller(["sync"], env)
        assert first.returncode == 0, first.stderr[-2000:]
        assert_exact_archive(s3, bucket, sim, bodies=False)

        # An alert on the very second the first run's window ended (which an exclusive
        # `until` kept out of that run), read by the next cycle.
        watermark = summary_of(first)["watermark"].replace("Z", "+00:00")
        boundary = datetime.fromisoformat(watermark)
        sim.add(sim.factory.alert(boundary, "dismissed"), boundary, "dismissed")
        time.sleep(1.1)  # the next window ends after the boundary second
        second = run_poller(["sync"], env)
        assert second.returncode == 0, second.stderr[-2000:]
        assert_exact_archive(s3, bucket, sim)
        # The overlap cost no writes: only the new alert was archived.
        assert summary_of(second)["archived"] == 1


def test_late_alert_within_lookback_is_archived_by_the_next_cycle(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    clock = [utc_now()]
    simulator.clock = lambda: clock[0]
    env = {**simulator.environment(), "TS_AWS_S3_BUCKET": bucket}
    settings = load_settings(None, environ=env)

    def cycle() -> Summary:
        runtime = build(settings, "sync", clock=lambda: clock[0], s3=s3)
        return run_cycle(runtime, Summary("sync", runtime.run_id))

    start = clock[0]
    simulator.generate(50, start - timedelta(hours=3), start - timedelta(minutes=5))
    late = simulator.add(
        simulator.factory.alert(start - timedelta(minutes=3)),
        start - timedelta(minutes=3),
        "active",
        visible_at=start + timedelta(minutes=4),
    )
    assert cycle().archived == 50
    keys = bucket_objects(s3, bucket)
    assert f"alerts/{late.id[:2]}/{late.id[2:4]}/{late.id}" not in keys

    clock[0] = start + timedelta(minutes=5)  # next cycle: the alert is visible now
    second = cycle()
    assert second.archived == 1
    assert_exact_archive(s3, bucket, simulator)


def test_hawk_failure_is_clear_exit_1_and_not_retried(
    simulator: Simulator, moto_server: MotoServer, bucket: str
):
    now = utc_now()
    simulator.generate(10, now - timedelta(hours=2), now - timedelta(hours=1))
    env = poller_env(simulator, moto_server, bucket, THREATSTACK_API_KEY="wrong-key-0000")
    result = run_poller(["sync"], env)
    assert result.returncode == 1
    summary = summary_of(result)
    assert summary["ok"] is False and "401" in summary["error"]
    assert "THREATSTACK_API_KEY" in summary["error"]
    assert simulator.request_count() == 1  # no retry storm
    assert "wrong-key-0000" not in result.stderr + result.stdout


def test_wrong_organisation_is_refused(simulator: Simulator, moto_server: MotoServer, bucket: str):
    env = poller_env(simulator, moto_server, bucket, THREATSTACK_ORG_ID="5f1e0000000000000000ffff")
    result = run_poller(["sync"], env)
    assert result.returncode == 1
    assert "401" in summary_of(result)["error"]


def test_unsafe_ids_end_in_quarantine(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(20, now - timedelta(hours=2), now - timedelta(hours=1))
    for kind in ("slash_id", "dotdot_id", "missing_id", "bad_created_at"):
        simulator.add_malformed(kind, now - timedelta(minutes=90))
    env = poller_env(simulator, moto_server, bucket, TS_AWS_S3_PREFIX="acme/ts")
    result = run_poller(["sync"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = summary_of(result)
    assert (summary["archived"], summary["quarantined"]) == (20, 4)
    keys = bucket_objects(s3, bucket)
    reasons = Counter(k.split("/")[4] for k in keys if k.startswith("acme/ts/_poller/quarantine/"))
    assert reasons == {"unsafe_id": 2, "missing_id": 1, "bad_created_at": 1}
    assert all(k.startswith("acme/ts/") for k in keys)
    assert not any(".." in k or "//" in k for k in keys)
    assert_exact_archive(s3, bucket, simulator, prefix="acme/ts")
    # verify matches the API's malformed objects to the quarantine; one the sync never met
    # (listed after its window moved on) is missing until --repair quarantines it.
    simulator.add_malformed("missing_id", now - timedelta(minutes=80))

    def verify(*args: str) -> tuple[int, dict[str, Any]]:
        done = run_poller(["verify", "--since", "1d", "--json", *args], env)
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])

    code, report = verify()
    assert (code, report["complete"], report["malformed_in_api"]) == (1, False, 5)
    assert report["malformed_not_quarantined"] == 1
    text = run_poller(["verify", "--since", "1d", "--text"], {**env, "COLUMNS": "200"})
    assert "malformed in the API and not in the quarantine: 1" in text.stdout, text.stdout
    code, report = verify("--repair")
    assert (code, report["malformed_quarantined_now"]) == (0, 1)
    code, report = verify()
    assert (code, report["malformed_not_quarantined"]) == (0, 0)
    assert_exact_archive(s3, bucket, simulator, prefix="acme/ts")


def test_bad_configuration_exits_2_naming_every_problem(moto_server: MotoServer, bucket: str):
    with Simulator() as sim:
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_SYNC__INTERVAL_SECONDS="often",
            POLLER_S3__MAX_CONCURRENCY="-1",
        )
        del env["THREATSTACK_USER_ID"]
        result = run_poller(["--set", "sync.settle_seconds=-5", "sync"], env)
    assert result.returncode == 2
    for expected in (
        "sync.interval_seconds",
        "s3.max_concurrency",
        "threatstack.user_id",
        "sync.settle_seconds: must be between 0 and 86400, got -5 (from flag",
    ):
        assert expected in result.stderr
    assert result.stdout == ""


def test_check_and_status(simulator: Simulator, moto_server: MotoServer, bucket: str):
    env = poller_env(simulator, moto_server, bucket)
    check = run_poller(["check"], env)
    assert check.returncode == 0, check.stderr[-2000:]
    report = json.loads(check.stdout)
    assert report.pop("evidence")["versioning"] == "off"
    assert report == {
        "config": "ok",
        "threatstack": "ok",
        "bucket": "ok",
        "write": "ok",
        "read_back": "ok",
        "create_only": "ok",
        "compare_and_swap": "ok",
        "conditional_writes": True,
        "ok": True,
    }
    assert run_poller(["sync"], env).returncode == 0
    status = json.loads(run_poller(["status"], env).stdout)
    assert status["checkpoint"]["watermark"] is not None
    assert status["lease"]["released"] is True and status["lease"]["free"] is True
    # The holding's token stays the holder's; the request times are only counted.
    assert "token" not in status["lease"] and status["lease"]["recent_requests"] >= 1
    assert 55 <= status["lag_s"] < 120
    assert status["daemon"] is None  # no daemon ever failed on this prefix


def test_check_reports_bad_credentials(simulator: Simulator, moto_server: MotoServer, bucket: str):
    env = poller_env(simulator, moto_server, bucket, THREATSTACK_API_KEY="nope-nope-nope")
    result = run_poller(["check"], env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["threatstack"].startswith("failed") and report["bucket"] == "ok"


def test_missing_bucket_is_fatal_and_clear(simulator: Simulator, moto_server: MotoServer):
    env = poller_env(simulator, moto_server, "no-such-bucket-here")
    result = run_poller(["sync"], env)
    assert result.returncode == 1
    assert "NoSuchBucket" in summary_of(result)["error"]


HOSTILE_TEXT = {
    "lone_high_surrogate": "rm -rf /tmp/\ud83d",
    "lone_low_surrogate": "\ude00 trailing",
    "emoji_and_astral": "deploy 🚀 by \U0001d518\U0001d530\U0001d522\U0001d52f — ok",
    "nul_and_controls": "a\x00b\x07c\x1b[31mred\x7f",
    "rtl_override": "invoice\u202egnp.exe",
    "bom_and_zero_width": "\ufeffzero\u200bwidth",
}


def test_hostile_text_is_archived_as_the_api_sent_it(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """Text written by monitored hosts is hostile: every one of these is stored JSON-equal to
    the API's object; an object with no JSON form at all (NaN) is quarantined with its
    reason; and nothing stops the run or the checkpoint."""
    now = utc_now()
    moment = now - timedelta(minutes=30)
    hostile = {}
    for i, (name, text) in enumerate(HOSTILE_TEXT.items()):
        doc = simulator.factory.alert(moment + timedelta(seconds=i))
        doc["title"] = text
        doc["aggregates"] = [{"fieldName": name, "fieldValue": text}]
        hostile[doc["id"]] = simulator.add(doc, moment + timedelta(seconds=i))
    not_json = simulator.factory.alert(moment)
    not_json["severity"] = float("nan")  # the simulator sends `NaN`, which json.loads accepts
    simulator.add(not_json, moment)
    simulator.generate(30, now - timedelta(hours=2), now - timedelta(minutes=2))
    env = poller_env(simulator, moto_server, bucket)

    result = run_poller(["sync"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(result)
    assert (summary["archived"], summary["quarantined"]) == (30 + len(HOSTILE_TEXT), 1)
    objects = bucket_objects(s3, bucket)
    for alert_id, sim_alert in hostile.items():
        stored = json.loads(objects[f"alerts/{alert_id[:2]}/{alert_id[2:4]}/{alert_id}"])
        assert stored == sim_alert.doc
    quarantined = [k for k in objects if k.startswith("_poller/quarantine/unencodable/")]
    assert len(quarantined) == 1
    record = json.loads(objects[quarantined[0]])
    assert record["reason"] == "unencodable" and not_json["id"] in record["raw"]
    assert summary_of(run_poller(["sync"], env))["ok"]  # the next cycle goes on, too


def test_a_server_that_ignores_the_page_token_fails_the_run_and_frees_the_lease(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """Page one with a fresh token forever: the run stops after a bounded number of pages,
    says paging went wrong, keeps what it archived, and leaves the lease free."""
    now = utc_now()
    simulator.generate(250, now - timedelta(hours=5), now - timedelta(hours=1), 0.0)
    simulator.faults.ignore_token = True
    env = poller_env(simulator, moto_server, bucket)
    result = run_poller(["sync"], env, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    summary = summary_of(result)
    assert "paging went wrong" in summary["error"]
    assert summary["api_requests"] == 4  # page one, then three that brought nothing new
    assert "_poller/checkpoint.json" not in bucket_listing(s3, bucket)
    assert lease_released(s3, bucket)
    simulator.faults.ignore_token = False
    assert run_poller(["sync"], env).returncode == 0
    assert_exact_archive(s3, bucket, simulator)
