"""`poller verify` against the simulator and a moto server: it finds exactly what was
deleted and what the API does not know, and --repair restores byte for byte, create-only."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from conftest import (
    MotoServer,
    assert_exact_archive,
    bucket_listing,
    poller_env,
    run_poller,
    tls_env,
)
from s3proxy import S3Proxy

from poller.archive.records import Layout
from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def verify(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = run_poller(["verify", "--since", "4d", "--json", *args], env)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_verify_finds_what_was_deleted_and_added_and_repair_restores_it_byte_for_byte(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(600, now - timedelta(days=3), now - timedelta(minutes=5))
    env = poller_env(simulator, moto_server, bucket, POLLER_SYNC__FIRST_RUN_SINCE="4d")
    assert run_poller(["sync"], env).returncode == 0

    code, report = verify(env)
    assert code == 0 and report["complete"] is True
    assert report["missing_count"] == report["unknown_count"] == {"alerts": 0, "webhooks": 0}
    assert sum(day["api"] for day in report["days"]) == 600
    assert report["listed"] == 600 and report["archived"] == 0

    layout = Layout()
    alerts = sorted(simulator.alerts, key=lambda a: a.id)
    gone_full = [a.id for a in alerts[10:13]]
    gone_webhook = [a.id for a in alerts[20:22]]
    originals = {}
    for sim_alert in alerts[10:13]:
        key = layout.alert_key(sim_alert.id)
        originals[key] = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.delete_object(Bucket=bucket, Key=key)
    for sim_alert in alerts[20:22]:
        key = layout.webhook_key(sim_alert.id, sim_alert.created)
        originals[key] = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.delete_object(Bucket=bucket, Key=key)
    # Objects the API does not know: an ObjectId of yesterday, and a webhook record.
    stranger = f"{int((now - timedelta(days=1)).timestamp()):08x}" + "f" * 16
    s3.put_object(Bucket=bucket, Key=layout.alert_key(stranger), Body=b"{}")
    ghost = "ghost-webhook-0001"
    ghost_key = layout.webhook_key(ghost, now - timedelta(days=2))
    s3.put_object(Bucket=bucket, Key=ghost_key, Body=b"{}")
    before = bucket_listing(s3, bucket)

    code, report = verify(env)
    assert code == 1 and report["complete"] is False
    assert sorted(report["missing"]["alerts"]) == sorted(gone_full)
    assert sorted(report["missing"]["webhooks"]) == sorted(gone_webhook)
    assert report["unknown"] == {"alerts": [stranger], "webhooks": [ghost]}
    # verify alone writes nothing but its share of the prefix's request budget (README: The
    # request budget): no record, no state of the archive's.
    budget = "_poller/budget.json"
    assert {k: v for k, v in bucket_listing(s3, bucket).items() if k != budget} == {
        k: v for k, v in before.items() if k != budget
    }

    code, report = verify(env, "--repair")
    assert code == 0 and report["repaired"] == 5 and report["complete"] is True
    after = bucket_listing(s3, bucket)
    for key, body in originals.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    rewritten = [k for k in before if after[k] != before[k] and k != budget]
    assert not rewritten  # everything that was there stands untouched
    # The repaired records, and the days they went into marked due for the query tables.
    days = {a.created.date().isoformat() for a in alerts[10:13] + alerts[20:22]}
    assert set(after) - set(before) == set(originals) | {f"_poller/tables/due/{d}" for d in days}

    code, report = verify(env)
    assert code == 0 and report["missing_count"] == {"alerts": 0, "webhooks": 0}
    assert report["unknown_count"] == {"alerts": 1, "webhooks": 1}  # still reported

    text = run_poller(["verify", "--since", "4d", "--text"], {**env, "COLUMNS": "200"})
    assert text.returncode == 0
    assert f"alerts in the archive, unknown to the API (1): {stranger}" in text.stdout
    assert "complete:" in text.stdout


def test_an_alert_visible_later_than_the_lookback_is_restored_by_verify_repair(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(50, now - timedelta(hours=6), now - timedelta(minutes=5))
    late = simulator.add(
        simulator.factory.alert(now - timedelta(hours=2)),
        now - timedelta(hours=2),
        visible_at=now + timedelta(days=1),  # hidden from the first sync
    )
    env = poller_env(simulator, moto_server, bucket)
    assert run_poller(["sync"], env).returncode == 0
    # Visible from now on, by the test's word rather than a sleep: a sync that starts late
    # on a loaded machine must not see it early.
    late.visible_at = utc_now()
    assert run_poller(["sync"], env).returncode == 0  # two hours back: past the look-back
    assert Layout().alert_key(late.id) not in bucket_listing(s3, bucket)

    code, report = verify(env, "--repair")
    assert code == 0 and report["missing"]["alerts"] == [late.id] and report["repaired"] == 1
    assert_exact_archive(s3, bucket, simulator)


def test_an_alert_the_sync_quarantined_is_reported_as_quarantined_and_never_repaired_again(
    simulator: Simulator, tls_s3: S3Proxy, bucket: str
):
    """An alert with no JSON form (NaN, which the API's JSON parser accepts) is quarantined
    by the sync; verify names it as quarantined with its reason, not as missing, and exits 0
    (README, *An audit*); --repair writes nothing for it, run after run (PUTs counted at the
    S3 endpoint). A second such alert the sync never saw is quarantined by the first
    --repair, which counts it as handled."""
    now = utc_now()
    simulator.generate(10, now - timedelta(days=2), now - timedelta(hours=1), 0.3)
    not_json = simulator.factory.alert(now - timedelta(days=1))
    not_json["severity"] = float("nan")
    simulator.add(not_json, now - timedelta(days=1))
    env = tls_env(simulator, tls_s3, bucket, POLLER_SYNC__FIRST_RUN_SINCE="4d")
    synced = run_poller(["sync"], env)
    assert synced.returncode == 0, synced.stderr[-2000:]
    assert json.loads(synced.stdout.strip().splitlines()[-1])["quarantined"] == 1
    late = simulator.factory.alert(now - timedelta(days=1, hours=2))
    late["score"] = float("inf")  # no JSON form either; added after the sync
    simulator.add(late, now - timedelta(days=1, hours=2))

    def writes() -> list[str]:
        """The archive's writes: not the prefix's request budget, not the store proof."""
        return [w for w in tls_s3.writes() if bucket in w and "/_poller/budget.json" not in w]

    code, report = verify(env)
    assert code == 1 and report["complete"] is False  # `late` is missing: nothing holds it
    assert report["missing"] == {"alerts": [late["id"]], "webhooks": [late["id"]]}
    assert report["quarantined_count"] == 1
    (kept,) = report["quarantined_alerts"]
    assert kept["id"] == not_json["id"] and kept["reason"] == "unencodable"
    assert "no faithful JSON form" in kept["detail"] and kept["status"] == "active"
    assert kept["key"].startswith("_poller/quarantine/unencodable/")

    before = len(writes())
    code, report = verify(env, "--repair")
    assert code == 0 and report["complete"] is True
    assert (report["repaired"], report["quarantined_now"], report["quarantined_count"]) == (
        0,
        1,
        2,
    )
    assert {q["id"]: q["reason"] for q in report["quarantined_alerts"]} == {
        not_json["id"]: "unencodable",
        late["id"]: "unencodable",
    }
    assert len(writes()) - before == 1  # `late`'s quarantine record, nothing else

    before = len(writes())
    code, report = verify(env, "--repair")
    assert code == 0 and report["complete"] is True, report
    assert report["missing_count"] == {"alerts": 0, "webhooks": 0}
    assert (report["quarantined_count"], report["quarantined_now"]) == (2, 0)
    assert report["quarantined"] == 2  # the summary's count: alerts, kept aside
    assert writes()[before:] == []  # not one PUT, not even a create-only one

    text = run_poller(["verify", "--since", "4d", "--text"], {**env, "COLUMNS": "200"})
    assert text.returncode == 0, text.stdout[-2000:]
    assert "quarantined, not archived (2" in text.stdout
    assert f"{not_json['id']}: unencodable: no faithful JSON form" in text.stdout
