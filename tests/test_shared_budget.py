"""One request budget per prefix (SPEC, A good API citizen): every process on the same
bucket and prefix takes its requests from one ledger, so together they never send more than
``threatstack.requests_per_minute`` in any 60 s. Counted at the simulator."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from conftest import ROOT, MotoServer, poller_env

from poller.archive.allowance import HORIZON_SECONDS, PrefixAllowance
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.errors import ArchiveAccessError
from poller.simulator import Simulator
from poller.timeutil import utc_now


def most_in_any_minute(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 60.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_processes_sharing_a_prefix_never_exceed_the_budget_together():
    """Three processes (their own allowance each, one bucket) take requests in turn for ten
    virtual minutes: never more than 20 in any 60 s, and the budget is used (no starvation)."""
    wall = [1_764_000_000.0]

    def sleep(seconds: float) -> None:
        wall[0] += seconds

    store = MemoryObjectStore()
    takers = [
        PrefixAllowance(store, Layout("p"), 20, f"run{n}", lambda: wall[0], sleep) for n in range(3)
    ]
    sent: list[float] = []
    per_taker = [0, 0, 0]
    while wall[0] < 1_764_000_600.0:
        for n, taker in enumerate(takers):
            taker.take()
            sent.append(wall[0])
            per_taker[n] += 1
            wall[0] += 0.2  # the request itself
    assert most_in_any_minute(sent) <= 20
    assert len(sent) >= 20 * 600 / HORIZON_SECONDS - 20
    assert min(per_taker) >= len(sent) // 4  # each process gets its turn
    grants = sum(t.grants for t in takers)
    assert grants == pytest.approx(len(sent) / 2, abs=6)  # a grant is 2 at a budget of 20


@pytest.mark.integration
def test_backfill_and_verify_together_stay_within_one_budget(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """Started together with a budget of 20, each with far more than 20 pages to read (they
    sent 38 in their first minute when each process had its own budget): the simulator sees
    at most 20 before the first minute is over."""
    with Simulator(seed=11, page_size=2) as sim:
        now = utc_now()
        sim.generate(120, now - timedelta(days=2), now - timedelta(hours=1))
        env = poller_env(sim, moto_server, bucket, POLLER_THREATSTACK__REQUESTS_PER_MINUTE="20")
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "poller", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for args in (["backfill", "--since", "3d"], ["verify", "--since", "3d"])
        ]
        try:
            started = time.monotonic()
            last, stable_since = -1, time.monotonic()
            # Until the count has not moved for 4 s (both wait for the next minute), at most 40 s.
            while time.monotonic() - stable_since < 4 and time.monotonic() - started < 40:
                count = sim.request_count()
                if count != last or count == 0:
                    last, stable_since = count, time.monotonic()
                time.sleep(0.25)
            assert time.monotonic() - started < 55, "too slow to prove the first minute"
            assert 10 <= sim.request_count() <= 20
        finally:
            for process in processes:
                process.kill()
                process.wait(timeout=10)


def test_a_bucket_that_refuses_the_ledger_leaves_the_process_its_own_budget():
    """A read-only role (verify without --repair) or a missing bucket: the API request is not
    failed for it; sharing is off, with the reason, and the process's own budget holds."""

    class ReadOnly(MemoryObjectStore):
        def put(self, key: str, body: bytes, **conditions: Any) -> str:
            raise ArchiveAccessError(f"S3 refused writing {key}: AccessDenied")

    allowance = PrefixAllowance(ReadOnly(), Layout(), 20, "run", lambda: 0.0, lambda _: None)
    allowance.take()
    allowance.take()
    assert allowance.unavailable is not None and "AccessDenied" in allowance.unavailable


@pytest.mark.faults
def test_backfill_verify_and_serve_detail_fetches_stay_within_one_budget(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """``poller serve`` with 30 webhooks pushed to it (each owed a detail fetch), a
    ``backfill`` and a ``verify`` with far more than 20 pages each, all on one prefix at a
    budget of 20: over 75 s, by the simulator's clock, never more than 20 requests in any
    60 s, and each kind of work took part (listings and detail fetches). A minute and a
    quarter is the least that proves a sliding minute beyond the first: hence ``faults``."""
    from test_push import TOKEN, Served, free_port

    with Simulator(seed=13, page_size=2) as sim:
        now = utc_now()
        sim.generate(120, now - timedelta(days=2), now - timedelta(hours=1))
        pushed = sim.generate(30, now - timedelta(minutes=50), now - timedelta(minutes=10), 0.0)
        env = poller_env(sim, moto_server, bucket, POLLER_THREATSTACK__REQUESTS_PER_MINUTE="20")
        port = free_port()
        server = Served(
            {
                **env,
                "POLLER_RECEIVER__TOKEN": TOKEN,
                "POLLER_HTTP__HOST": "127.0.0.1",
                "POLLER_HTTP__PORT": str(port),
            },
            port,
        )
        processes = []
        try:
            processes = [
                subprocess.Popen(
                    [sys.executable, "-m", "poller", *args],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for args in (["backfill", "--since", "3d"], ["verify", "--since", "3d"])
            ]
            started = time.monotonic()
            for start in range(0, len(pushed), 5):
                batch = [
                    {
                        "id": alert.id,
                        "title": alert.doc["title"],
                        "created_at": int(alert.created.timestamp() * 1000),
                        "severity": alert.doc["severity"],
                        "organization_id": sim.credentials.org_id,
                    }
                    for alert in pushed[start : start + 5]
                ]
                assert server.push({"alerts": batch}).status_code == 200
            while time.monotonic() - started < 75:
                time.sleep(0.5)
        finally:
            for process in processes:
                process.kill()
                process.wait(timeout=10)
            server.stop()
        assert sim.max_requests_in_any_window(60.0) <= 20
        listings = sim.request_count("/v2/alerts") - sim.request_count("/v2/alerts/")
        details = sim.request_count("/v2/alerts/")
        most = sim.max_requests_in_any_window(60.0)
        print(f"{listings} listings, {details} detail fetches, at most {most} in any 60 s")
        assert details >= 1 and listings >= 10, (listings, details)
        assert sim.request_count() >= 21  # the budget was used past its first minute
