"""Shared fixtures: a real moto S3 server process, the Threat Stack simulator, env builders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import hypothesis
import pytest
import requests
from s3proxy import S3Proxy, self_signed_certificate

from poller.archive.records import Alert, Layout, classify, webhook_record
from poller.simulator import Simulator

# No per-example deadline: it is a timed assertion, and on two shared cores running four
# xdist workers an example can wait for the CPU far longer than it computes.
hypothesis.settings.register_profile("poller", deadline=None)
hypothesis.settings.load_profile("poller")

ROOT = Path(__file__).resolve().parent.parent
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: crash and fault suites, then integration, then unit tests.

    With ``make test``'s ``-n 4 --maxschedchunk 1`` each xdist worker takes the next test
    when it is free, so starting the few long suites first keeps one of them from being the
    last thing running while the other workers sit idle."""

    def weight(item: pytest.Item) -> int:
        for rank, marker in enumerate(("crash", "faults", "integration")):
            if item.get_closest_marker(marker) is not None:
                return rank
        return 3

    items.sort(key=weight)


@pytest.fixture(autouse=True)
def _aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never reach real AWS from a test, whatever the machine's environment holds."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in list(os.environ):
        if name.startswith(("POLLER_", "THREATSTACK_", "TS_AWS_")) or name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        ):
            monkeypatch.delenv(name, raising=False)


class MotoServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("moto_s3.py")),
                "-H",
                "127.0.0.1",
                "-p",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        self.url = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                self.url = match.group(1)
                break
        if not self.url:
            self.process.kill()
            raise RuntimeError("moto server did not start")
        # Keep draining its log so the pipe never fills up and blocks the server.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    def reset(self) -> None:
        requests.post(f"{self.url}/moto-api/reset", timeout=10)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server: MotoServer) -> Any:
    moto_server.reset()
    client = boto3.client(
        "s3",
        endpoint_url=moto_server.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    return client


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"archive-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_proxy(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Proxy]:
    """moto behind TLS (a self-signed certificate), with switchable quirks: started once."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    proxy = S3Proxy(moto_server.url, cert, key).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def tls_s3(s3_proxy: S3Proxy, s3: Any) -> S3Proxy:
    """The TLS endpoint with no quirk on and no request recorded (moto reset by ``s3``)."""
    s3_proxy.reset()
    return s3_proxy


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(seed=7) as sim:
        yield sim


def poller_env(sim: Simulator, moto: MotoServer, bucket: str, **extra: str) -> dict[str, str]:
    """An environment for a `poller` process, using only SPEC's names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLER_", "THREATSTACK_"))}
    env.update(AWS_ENV)
    env.update(sim.environment())
    env.update({"TS_AWS_S3_BUCKET": bucket, "AWS_ENDPOINT_URL_S3": moto.url})
    env.update(extra)
    return env


def tls_env(sim: Simulator, proxy: S3Proxy, bucket: str, **extra: str) -> dict[str, str]:
    """``poller_env`` with S3 over TLS through ``proxy``, trusted through AWS_CA_BUNDLE: boto3
    then streams PUTs as aws-chunked with checksum trailers, as it does against AWS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLER_", "THREATSTACK_"))}
    env.update(AWS_ENV)
    env.update(sim.environment())
    env.update(
        {
            "TS_AWS_S3_BUCKET": bucket,
            "AWS_ENDPOINT_URL_S3": proxy.url,
            "AWS_CA_BUNDLE": str(proxy.ca_bundle),
        }
    )
    env.update(extra)
    return env


def run_poller(
    args: list[str], env: dict[str, str], timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"no summary on stdout; stderr:\n{result.stderr[-3000:]}"
    return json.loads(lines[-1])


def bucket_listing(s3: Any, bucket: str) -> dict[str, tuple[str, Any]]:
    """Key -> (ETag, LastModified): enough to prove nothing was rewritten, without GETs."""
    out: dict[str, tuple[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = (item["ETag"], item["LastModified"])
    return out


def bucket_objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """Key -> body of every object (read in parallel: the bucket may hold thousands)."""
    keys = list(bucket_listing(s3, bucket))

    def read(key: str) -> bytes:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(keys, pool.map(read, keys), strict=True))


def expected_archive(
    sim: Simulator, org_id: str, layout: Layout | None = None, only_valid: bool = True
) -> dict[str, Any]:
    """Key -> parsed body that an exact archive of the simulator's alerts holds."""
    layout = layout or Layout()
    out: dict[str, Any] = {}
    for sim_alert in sim.alerts:
        item = classify(sim_alert.doc)
        if not isinstance(item, Alert):
            continue
        out.setdefault(layout.alert_key(item.id), sim_alert.doc)
        out.setdefault(layout.webhook_key(item.id, item.created), webhook_record(item, org_id))
    return out


def assert_exact_archive(
    s3: Any, bucket: str, sim: Simulator, prefix: str = "", bodies: bool = True
) -> dict[str, Any]:
    """Every alert key present with the right body, and no other alert or webhook key.
    ``bodies=False`` compares the keys only (cheap, for checks repeated within a test).
    Returns what the bucket holds (key -> body, or key -> (ETag, LastModified))."""
    layout = Layout(prefix)
    expected = expected_archive(sim, sim.credentials.org_id, layout)
    actual: dict[str, Any] = bucket_objects(s3, bucket) if bodies else bucket_listing(s3, bucket)
    record_keys = {
        k
        for k in actual
        if k.startswith((layout.key("alerts") + "/", layout.key("webhooks") + "/"))
    }
    missing = sorted(set(expected) - record_keys)
    extra = sorted(record_keys - set(expected))
    assert not missing, f"{len(missing)} keys missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} unexpected keys, e.g. {extra[:5]}"
    if bodies:
        for key, body in expected.items():
            assert json.loads(actual[key]) == body, f"body differs at {key}"
    return actual


def lease_released(s3: Any, bucket: str, prefix: str = "") -> bool:
    """The lease is free for the next run at once: its holder marked it released."""
    key = Layout(prefix).lease_key
    try:
        document = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return True
    return document.get("released") is True
