"""The archive as evidence, against the moto server: SHA-256 checksums, SSE, storage class
and Object Lock retention on what poller writes, and what `check` says about the bucket."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest
from conftest import MotoServer, bucket_listing, poller_env, run_poller

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def sha256_b64(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def test_every_object_carries_a_verified_checksum_sse_and_storage_class_and_records_retention(
    simulator: Simulator, moto_server: MotoServer, s3: Any
):
    bucket = "evidence-locked"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)  # versioning comes with it
    now = utc_now()
    simulator.generate(20, now - timedelta(hours=3), now - timedelta(minutes=5))
    simulator.add_malformed("missing_id", now - timedelta(hours=2))
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_S3__SSE="AES256",
        POLLER_S3__STORAGE_CLASS="STANDARD_IA",
        POLLER_S3__OBJECT_LOCK_MODE="GOVERNANCE",
        POLLER_S3__OBJECT_LOCK_DAYS="30",
    )
    result = run_poller(["sync"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    keys = list(bucket_listing(s3, bucket))
    assert len([k for k in keys if k.startswith(("alerts/", "webhooks/"))]) == 40
    for key in keys:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert head["ChecksumSHA256"] == sha256_b64(body), key  # S3 checked it on the way in
        assert head["ServerSideEncryption"] == "AES256", key
        assert head["StorageClass"] == "STANDARD_IA", key
        retained = key.startswith(
            ("alerts/", "webhooks/", "_poller/quarantine/", "_poller/manifests/")
        )
        if retained:
            assert head["ObjectLockMode"] == "GOVERNANCE", key
            until = head["ObjectLockRetainUntilDate"]
            assert now + timedelta(days=29) < until < now + timedelta(days=31), key
        else:  # the checkpoint, the lease and the store proof are rewritten: never locked
            assert "ObjectLockMode" not in head, key

    report = json.loads(run_poller(["check", "--json"], env).stdout)
    assert report["ok"] is True
    assert report["evidence"]["versioning"] == "Enabled"
    assert report["evidence"]["object_lock"].startswith("on")
    assert "warning" not in report["evidence"]


def test_check_warns_when_an_archive_has_no_protection_as_evidence(
    simulator: Simulator, moto_server: MotoServer, bucket: str
):
    env = poller_env(simulator, moto_server, bucket, COLUMNS="300")
    report = json.loads(run_poller(["check", "--json"], env).stdout)
    assert report["ok"] is True  # a warning, not a failure
    assert report["evidence"]["versioning"] == "off"
    assert report["evidence"]["object_lock"] == "off"
    assert "delete or replace archived alerts" in report["evidence"]["warning"]
    text = run_poller(["check", "--text"], env).stdout
    assert "! evidence" in text and "enable versioning and Object Lock" in text


def test_bad_evidence_settings_are_refused_together():
    from poller.config import load_settings
    from poller.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={
                "POLLER_S3__SSE": "aes",
                "POLLER_S3__KMS_KEY_ID": "arn:aws:kms:eu-west-1:1:key/x",
                "POLLER_S3__OBJECT_LOCK_MODE": "GOVERNANCE",
            }
        )
    problems = caught.value.problems
    assert any(p.startswith("s3.sse: expected one of") for p in problems)
    assert "s3.kms_key_id: set only with s3.sse: aws:kms" in problems
    assert any(p.startswith("s3.object_lock_mode and s3.object_lock_days") for p in problems)


def test_verify_checksums_reads_every_record_and_notices_one_rewritten_without_one(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """moto accepts a rewrite with a wrong checksum and keeps none (AWS would refuse it), so
    here the altered record shows as written without a checksum; the mismatch itself is
    proven with a store that keeps the stale checksum (next test)."""
    now = utc_now()
    simulator.generate(15, now - timedelta(hours=3), now - timedelta(minutes=5))
    env = poller_env(simulator, moto_server, bucket)
    assert run_poller(["sync"], env).returncode == 0
    args = ["verify", "--since", "1d", "--checksums", "--json"]
    clean = json.loads(run_poller(args, env).stdout)
    assert clean["complete"] is True and clean["checksums_checked"] == 30
    assert clean["checksum_mismatch_count"] == 0 and clean["checksum_absent"] == 0

    victim = next(k for k in bucket_listing(s3, bucket) if k.startswith("alerts/"))
    s3.put_object(Bucket=bucket, Key=victim, Body=b'{"id": "tampered"}')
    report = json.loads(run_poller(args, env).stdout)
    assert report["checksum_absent"] == 1 and report["checksums_checked"] == 30


def test_a_body_that_no_longer_matches_its_stored_checksum_fails_verify():
    from fakes import OneAlert, StaleChecksums

    from poller.archive.records import Layout
    from poller.archive.writer import Archive
    from poller.walks.sync import Summary
    from poller.walks.verify import Verifier

    now = utc_now().replace(microsecond=0)
    doc = {
        "id": f"{int(now.timestamp()) - 3600:08x}" + "a" * 16,
        "createdAt": (now - timedelta(hours=1)).isoformat(),
        "title": "t",
    }
    store = StaleChecksums()
    archive = Archive(store, Layout(), "org")
    verifier = Verifier(OneAlert(doc), store, archive, ("active",), lambda: now)
    since, until = now - timedelta(hours=2), now
    assert verifier.run(since, until, True, Summary("verify", "r")).complete  # repairs it
    assert verifier.run(since, until, False, Summary("verify", "r"), True).complete
    key = Layout().alert_key(doc["id"])
    store.put(key, b'{"id": "tampered"}')
    findings = verifier.run(since, until, False, Summary("verify", "r"), True)
    assert findings.checksum_mismatch == [key] and not findings.complete
