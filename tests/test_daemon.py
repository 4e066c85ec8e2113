"""`poller run`: cycles on an interval, health and metrics over HTTP, graceful SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
import requests
from conftest import (
    ROOT,
    MotoServer,
    assert_exact_archive,
    bucket_listing,
    lease_released,
    poller_env,
    run_poller,
    summary_of,
)

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def start_daemon(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "poller", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_daemon_cycles_serves_health_and_stops_gracefully(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(200, now - timedelta(hours=20), now - timedelta(minutes=5))
    port = free_port()
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_SYNC__INTERVAL_SECONDS="2",
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    base = f"http://127.0.0.1:{port}"
    daemon = start_daemon(env)
    try:
        wait_until(lambda: requests.get(f"{base}/healthz", timeout=2).status_code == 200)
        wait_until(lambda: requests.get(f"{base}/readyz", timeout=2).status_code == 200)
        assert_exact_archive(s3, bucket, simulator)

        # While the daemon runs, a CronJob-style sync either finds the lease free between
        # cycles (and has nothing to do) or exits 75.
        other = run_poller(["sync"], env)
        assert other.returncode in (0, 75)
        assert summary_of(other)["archived"] == 0

        later = utc_now()
        simulator.generate(30, later - timedelta(minutes=10), later - timedelta(minutes=2))
        wait_until(
            lambda: (
                metric(
                    requests.get(f"{base}/metrics", timeout=2).text,
                    'poller_alerts_total{result="archived"}',
                )
                >= 230
            )
        )
        assert_exact_archive(s3, bucket, simulator)
        text = requests.get(f"{base}/metrics", timeout=2).text
        assert metric(text, 'poller_cycles_total{outcome="ok"}') >= 2
        assert metric(text, "poller_api_requests_total") >= 4
        assert metric(text, "poller_watermark_timestamp_seconds") > later.timestamp() - 120
        assert metric(text, "poller_dismissals_archived_total") == 0  # nothing dismissed late
        assert 0 <= metric(text, "poller_revisit_lag_seconds") < 3600  # the first cycle's
        assert requests.get(f"{base}/nope", timeout=2).status_code == 404
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err[-2000:]
    assert '"event": "daemon.stopped"' in err
    assert lease_released(s3, bucket)
    assert simulator.credentials.api_key not in out + err


def test_sigterm_in_the_middle_of_a_cycle_unwinds_it(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    now = utc_now()
    simulator.generate(1500, now - timedelta(hours=20), now - timedelta(minutes=5))
    env = poller_env(simulator, moto_server, bucket, POLLER_HTTP__PORT="0")
    daemon = start_daemon(env)
    wait_until(lambda: s3.list_objects_v2(Bucket=bucket, Prefix="alerts/")["KeyCount"] > 0)
    daemon.send_signal(signal.SIGTERM)
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err[-2000:]
    assert '"event": "cycle.stopped"' in err  # it stopped mid-window, not after it
    archived = [k for k in bucket_listing(s3, bucket) if k.startswith("alerts/")]
    assert len(archived) < 1500
    assert lease_released(s3, bucket)
    result = run_poller(["sync"], env)  # the next run completes the window
    assert result.returncode == 0, result.stderr[-2000:]
    assert_exact_archive(s3, bucket, simulator)
