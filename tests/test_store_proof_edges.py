"""The store proof, rotated credentials and manifests at their edges: each test reproduced a
defect a break-it review of issue 16 found, and states what should happen."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from conftest import bucket_objects, poller_env, tls_env
from s3proxy import S3Proxy
from test_stores import last_json, poller

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def test_a_proof_recorded_over_plain_http_is_not_trusted_over_tls(
    simulator: Simulator,
    moto_server: Any,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    """Over plain HTTP boto3 never streams aws-chunked, so a proof made there says nothing
    about the same bucket reached over HTTPS (another endpoint, a TLS gateway)."""
    plain = poller_env(simulator, moto_server, bucket)
    code, out, err = poller(["check", "--json"], plain, monkeypatch, capsys)
    assert code == 0, out + err[-2000:]
    now = utc_now()
    simulator.generate(5, now - timedelta(hours=3), now - timedelta(minutes=5))
    tls_s3.quirks.keep_framing = True
    code, out, err = poller(["sync"], tls_env(simulator, tls_s3, bucket), monkeypatch, capsys)
    framed = [
        key
        for key, body in bucket_objects(s3, bucket).items()
        if key.startswith(("alerts/", "webhooks/")) and not body.startswith(b"{")
    ]
    assert framed == [], f"sync exited {code} and stored aws-chunked framing in {framed}"
    assert code == 1


@pytest.mark.parametrize(
    "findings",
    [
        [],  # no finding at all: nothing failed
        [{"name": "write", "ok": True, "detail": "ok", "fix": ""}],  # only one of four
    ],
)
def test_a_recorded_proof_without_all_four_findings_is_no_proof(
    findings: list[dict[str, Any]],
    simulator: Simulator,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    env = tls_env(simulator, tls_s3, bucket)
    code, out, err = poller(["check", "--json"], env, monkeypatch, capsys)
    assert code == 0, out + err[-2000:]
    key = "_poller/probe/proof.json"
    document = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    document["findings"] = findings  # same version, same fingerprint: a corrupt proof
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(document).encode())

    now = utc_now()
    simulator.generate(3, now - timedelta(hours=3), now - timedelta(minutes=5))
    tls_s3.quirks.keep_framing = True
    tls_s3.requests.clear()
    code, out, err = poller(["sync"], env, monkeypatch, capsys)
    assert code == 1, "a proof with no failing finding was trusted on a store that mangles"
    assert tls_s3.writes() == []


def test_listings_renew_rotated_credentials_too(
    simulator: Simulator, tls_s3: S3Proxy, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
):
    """Every call goes through the one renewal path, listings included."""
    from poller.app import s3_client
    from poller.archive.store import S3ObjectStore
    from poller.config import S3Settings

    for name, value in tls_env(simulator, tls_s3, bucket).items():
        monkeypatch.setenv(name, value)
    s3.put_object(Bucket=bucket, Key="alerts/x", Body=b"{}")
    store = S3ObjectStore(
        s3_client(S3Settings()), bucket, renew_client=lambda: s3_client(S3Settings())
    )
    assert store.list_keys("alerts/") == ["alerts/x"]
    tls_s3.quirks.expired_keys = {"testing"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert store.list_keys("alerts/") == ["alerts/x"]  # renewed
    tls_s3.quirks.expired_keys = {"testing", "rotated"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-again")
    assert [o.key for o in store.list_objects("alerts/")] == ["alerts/x"]
    tls_s3.quirks.expired_keys = {"testing", "rotated", "rotated-again"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "third")
    assert store.first_key("alerts/") == "alerts/x"
    assert store.renewals == 3


@pytest.mark.parametrize("damage", ["deleted", "not JSON", "records emptied"])
def test_a_day_whose_manifest_is_gone_or_unreadable_is_not_verified_as_complete(
    damage: str,
    simulator: Simulator,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    """Verifying one closed day: its record was overwritten (with a matching checksum) and its
    manifest deleted, made unreadable or emptied. Nothing then says the day was altered."""
    midnight = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
    for back in (3, 2, 1):
        day = midnight - timedelta(days=back)
        simulator.generate(2, day + timedelta(hours=1), day + timedelta(hours=20))
    env = tls_env(simulator, tls_s3, bucket, POLLER_SYNC__FIRST_RUN_SINCE="4d")
    code, _, err = poller(["sync"], env, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    day = (midnight - timedelta(days=2)).date()
    key = f"_poller/manifests/{day.isoformat()}.json"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    record = sorted(manifest["records"])[0]
    original = json.loads(s3.get_object(Bucket=bucket, Key=record)["Body"].read())
    altered = json.dumps(dict(original, title="nothing to see here")).encode()
    s3.put_object(Bucket=bucket, Key=record, Body=altered, ChecksumAlgorithm="SHA256")
    if damage == "deleted":
        s3.delete_object(Bucket=bucket, Key=key)
    elif damage == "not JSON":
        s3.put_object(Bucket=bucket, Key=key, Body=b"garbage")
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(dict(manifest, records={})).encode())
    since, until = day.isoformat(), (day + timedelta(days=1)).isoformat()
    args = ["verify", "--since", since, "--until", until, "--checksums", "--json"]
    code, out, _ = poller(args, env, monkeypatch, capsys)
    report = last_json(out)
    assert report["complete"] is False, report
    assert record in report["manifest_mismatch"] or report["manifest_chain_broken"], report
