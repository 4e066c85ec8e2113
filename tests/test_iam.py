"""The least-privilege policy in deploy/iam/ allows exactly the S3 actions poller performs:
every command runs in-process against the moto server with botocore's event hook recording
each operation, and the set of IAM actions they need equals the policy's."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from conftest import ROOT, MotoServer

import poller.app
from poller import cli
from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration

# botocore operation -> the IAM actions it needs (S3's "Actions, resources and condition keys").
ACTIONS = {
    "GetObject": {"s3:GetObject"},
    "HeadObject": {"s3:GetObject"},
    "PutObject": {"s3:PutObject"},
    "DeleteObject": {"s3:DeleteObject"},
    "ListObjectsV2": {"s3:ListBucket"},
    "GetBucketVersioning": {"s3:GetBucketVersioning"},
    "GetObjectLockConfiguration": {"s3:GetBucketObjectLockConfiguration"},
    "GetBucketEncryption": {"s3:GetEncryptionConfiguration"},
}


def policy_actions() -> set[str]:
    policy = json.loads((ROOT / "deploy/iam/poller-s3-policy.json").read_text())
    found: set[str] = set()
    for statement in policy["Statement"]:
        actions = statement["Action"]
        found |= {actions} if isinstance(actions, str) else set(actions)
    return found


def test_the_policy_allows_exactly_what_sync_backfill_verify_check_and_status_do(
    simulator: Simulator,
    moto_server: MotoServer,
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
):
    bucket = "iam-evidence"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    needed: set[str] = set()
    unknown: set[str] = set()
    real_client = poller.app.s3_client

    def recording_client(settings: Any) -> Any:
        client = real_client(settings)

        def record(model: Any, params: dict[str, Any], **_: Any) -> None:
            # before-parameter-build: the call's own parameters, before serialisation
            if model.name not in ACTIONS:
                unknown.add(model.name)
            needed.update(ACTIONS.get(model.name, set()))
            if "ObjectLockMode" in params:  # retention set on the PUT needs its own action
                needed.add("s3:PutObjectRetention")

        client.meta.events.register("before-parameter-build.s3", record)
        return client

    monkeypatch.setattr(poller.app, "s3_client", recording_client)
    for name, value in {
        **simulator.environment(),
        "TS_AWS_S3_BUCKET": bucket,
        "TS_AWS_S3_PREFIX": "threatstack",
        "AWS_ENDPOINT_URL_S3": moto_server.url,
        "POLLER_S3__OBJECT_LOCK_MODE": "GOVERNANCE",
        "POLLER_S3__OBJECT_LOCK_DAYS": "1",
        "POLLER_LOG__LEVEL": "warning",
        "POLLER_TABLES__CACHE_DIR": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    now = utc_now()
    simulator.generate(30, now - timedelta(days=2), now - timedelta(minutes=5))
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        assert cli.main(["check", "--json"]) == 0
        assert cli.main(["sync"]) == 0
        assert cli.main(["backfill", "--since", "3d"]) == 0
        gone = s3.list_objects_v2(Bucket=bucket, Prefix="threatstack/alerts/")["Contents"][0]
        s3.delete_object(Bucket=bucket, Key=gone["Key"])  # so verify --repair writes
        assert cli.main(["verify", "--since", "3d", "--repair", "--json"]) == 0
        assert cli.main(["status", "--json"]) == 0
        assert cli.main(["tables"]) == 0
        assert cli.main(["query", "SELECT count(*) FROM alerts_latest", "--json"]) == 0
    finally:
        root.handlers[:] = handlers
    assert not unknown, f"operations the table does not map yet: {unknown}"
    assert needed == policy_actions()
