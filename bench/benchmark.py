"""Prints request counts, timings and memory of `poller sync` against the simulator and a
moto S3 server process. Figures only: nothing here asserts a time (machines are noisy).

    python bench/benchmark.py [--alerts 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.simulator import Simulator  # noqa: E402
from poller.timeutil import utc_now  # noqa: E402


def start_moto() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
        if match:
            # Keep draining its request log, or the pipe fills and the server stalls.
            threading.Thread(
                target=lambda: process.stdout and process.stdout.read(), daemon=True
            ).start()
            return process, match.group(1)
    raise RuntimeError("moto server did not start")


def run_sync(env: dict[str, str]) -> tuple[dict[str, object], float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "poller", "sync"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise SystemExit(f"sync failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1]), elapsed, max(peak_kib, before)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=3000)
    args = parser.parse_args()
    moto, url = start_moto()
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="bench")
        with Simulator(seed=11) as sim:
            now = utc_now()
            sim.generate(args.alerts, now - timedelta(days=2), now - timedelta(minutes=2))
            env = {
                **os.environ,
                **sim.environment(),
                "TS_AWS_S3_BUCKET": "bench",
                "AWS_ENDPOINT_URL_S3": url,
                "AWS_ACCESS_KEY_ID": "x",
                "AWS_SECRET_ACCESS_KEY": "x",
                "AWS_DEFAULT_REGION": "us-east-1",
                "POLLER_SYNC__FIRST_RUN_SINCE": "3d",
                "POLLER_LOG__LEVEL": "warning",
            }
            full, full_s, full_rss = run_sync(env)
            idle, idle_s, _ = run_sync(env)
        n = args.alerts
        print(f"alerts in simulator            {n}")
        print(f"first sync: archived           {full['archived']}")
        print(
            f"first sync: API requests       {full['api_requests']}"
            f"  ({full['api_requests'] / max(n, 1) * 100:.2f} per 100 alerts)"
        )
        print(
            f"first sync: S3 requests        {full['s3_requests']}"
            f"  ({full['s3_requests'] / max(n, 1):.3f} per alert)"
        )
        print(
            f"first sync: wall time          {full_s:.2f} s"
            f"  ({n / full_s:.0f} alerts/s; moto's server is the ceiling)"
        )
        print(f"first sync: peak RSS           {full_rss / 1024:.1f} MiB")
        print(f"idle sync: API / S3 requests   {idle['api_requests']} / {idle['s3_requests']}")
        print(f"idle sync: wall time           {idle_s:.2f} s (interpreter start included)")
    finally:
        moto.terminate()


if __name__ == "__main__":
    main()
