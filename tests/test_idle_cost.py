"""What an idle CronJob run costs, request by request, over TLS as in production (SPEC
*Performance*: an idle cycle is a handful of requests)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import run_poller, summary_of, tls_env
from s3proxy import S3Proxy

from poller.simulator.server import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def _named(method: str, path: str, bucket: str) -> str:
    parts = urlsplit(path)
    listed = parse_qs(parts.query).get("prefix")
    if listed:
        return f"LIST {listed[0]}"
    return f"{method} {parts.path.removeprefix(f'/{bucket}/')}"


def test_an_idle_sync_costs_two_api_requests_and_twelve_s3_requests(
    simulator: Simulator, tls_s3: S3Proxy, bucket: str
):
    now = utc_now()
    simulator.generate(30, now - timedelta(hours=3), now - timedelta(minutes=2))
    env = tls_env(simulator, tls_s3, bucket, POLLER_SYNC__FIRST_RUN_SINCE="4h")
    for _ in range(2):  # the first run, then the first revisit (due once an hour)
        assert run_poller(["sync"], env).returncode == 0
    tls_s3.requests.clear()
    api_before = len(simulator.requests)

    idle = run_poller(["sync"], env)

    assert idle.returncode == 0, idle.stderr[-2000:]
    summary = summary_of(idle)
    assert (summary["archived"], summary["api_requests"], summary["s3_requests"]) == (0, 2, 12)
    assert len(simulator.requests) - api_before == 2  # one list request per status
    assert Counter(_named(m, p, bucket) for m, p in tls_s3.requests) == {
        "GET _poller/probe/proof.json": 1,  # the store proof, cached for the day
        "GET _poller/lease.json": 1,  # the lease: read, taken,
        "PUT _poller/lease.json": 3,  # renewed before the commit (the fence), released
        "GET _poller/checkpoint.json": 1,
        "LIST _poller/pending/": 1,  # full records owed to pushed alerts
        "GET _poller/budget.json": 1,  # the prefix's request budget: one grant of 2
        "PUT _poller/budget.json": 1,
        "PUT _poller/checkpoint.json": 1,  # the commit
        "GET _poller/revisit.json": 1,  # is the revisit due? (not within the hour)
        "LIST _poller/manifests/": 1,  # is a closed day's manifest owed?
    }
