"""The bucket as it really is: S3 over TLS (boto3 streams every PUT as aws-chunked with a
checksum trailer there), and S3-compatible stores with the quirks found in the field
(tests/s3proxy.py switches them on). Each quirk is named by ``check``, refused by every
command that writes before it writes anything, or worked around by the documented setting,
and then the archive is exact, byte for byte."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from conftest import (
    assert_exact_archive,
    bucket_objects,
    expected_archive,
    run_poller,
    summary_of,
    tls_env,
)
from s3proxy import S3Proxy
from test_push import README_PAYLOAD, TOKEN, Served, free_port

from poller.archive.records import Layout, json_body
from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def assert_byte_exact(s3: Any, bucket: str, sim: Simulator) -> None:
    """Every record holds exactly the bytes poller renders for it, and nothing else."""
    assert_exact_archive(s3, bucket, sim, bodies=False)
    actual = bucket_objects(s3, bucket)
    for key, document in expected_archive(sim, sim.credentials.org_id).items():
        assert actual[key] == json_body(document), f"bytes differ at {key}"


def test_sync_backfill_and_verify_over_tls_with_botos_defaults_are_byte_exact(
    simulator: Simulator, tls_s3: S3Proxy, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(30, now - timedelta(days=2), now - timedelta(minutes=5))
    env = tls_env(simulator, tls_s3, bucket, POLLER_SYNC__FIRST_RUN_SINCE="1d")
    first = run_poller(["sync"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    backfilled = run_poller(["backfill", "--since", "3d"], env)
    assert backfilled.returncode == 0, backfilled.stderr[-3000:]
    assert summary_of(first)["archived"] + summary_of(backfilled)["archived"] == 30
    assert tls_s3.streamed > 0  # the production transport was exercised, not plain PUTs
    assert_byte_exact(s3, bucket, simulator)

    gone = Layout().alert_key(simulator.alerts[3].id)
    s3.delete_object(Bucket=bucket, Key=gone)
    repaired = run_poller(["verify", "--since", "3d", "--repair", "--checksums", "--json"], env)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    report = json.loads(repaired.stdout.strip().splitlines()[-1])
    assert report["archived"] == 1
    assert_byte_exact(s3, bucket, simulator)


def test_a_push_over_tls_is_archived_byte_exact(
    simulator: Simulator, tls_s3: S3Proxy, s3: Any, bucket: str
):
    port = free_port()
    env = tls_env(
        simulator,
        tls_s3,
        bucket,
        POLLER_RECEIVER__TOKEN=TOKEN,
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    served = Served(env, port)
    try:
        answer = served.push(README_PAYLOAD)
        assert answer.status_code == 200, answer.text
    finally:
        served.stop()
    key = "webhooks/2017/01/15/23/10/587c0159a907346eccb84004"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert json.loads(body)["id"] == "587c0159a907346eccb84004"
    assert body.startswith(b"{")  # no aws-chunked framing
    assert tls_s3.streamed > 0
