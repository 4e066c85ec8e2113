"""The push path: `poller serve` as a real process, webhooks posted over HTTP, the simulator
for detail fetches and a moto server for the archive."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, MotoServer, bucket_listing, poller_env, run_poller, summary_of

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration

TOKEN = "push-token-0123456789abcdef0123"
READ_TOKEN = "read-token-0123456789abcdef0123"
FIELD_CASES = Path(__file__).parent / "field_cases"  # copies of shared/field-cases
# The old receiver's README example, as Threat Stack would post it.
README_PAYLOAD = {
    "alerts": [
        {
            "id": "587c0159a907346eccb84004",
            "title": "Suspicious Process Activity: nc run by root",
            "created_at": 1484521817000,
            "severity": 1,
            "organization_id": "5f1e000000000000000000aa",
            "server_or_region": "ip-10-0-0-1.ec2.internal",
            "source": "Host",
        }
    ]
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """``poller serve`` (or ``poller run`` with the receiver on) as a process. ``push_port``:
    the push routes' own listener (``receiver.port``); else they share ``port``."""

    def __init__(
        self, env: dict[str, str], port: int, command: str = "serve", push_port: int = 0
    ) -> None:
        self.health_url = f"http://127.0.0.1:{port}"
        self.port = push_port or port
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poller", command],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Drain its log as it goes, or a full pipe blocks the server mid-burst.
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 60  # a start, not a claim: generous on a loaded machine
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.health_url}/healthz", timeout=1)
                if self.port != port:  # the push listener is up too
                    requests.get(f"{self.url}/api/v1/s3/status", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise AssertionError(f"poller {command} did not start")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        self.log.extend(self.process.stderr)

    def push(self, document: Any, path_token: str | None = TOKEN, **kwargs: Any) -> Any:
        url = f"{self.url}/api/v1/s3/alert" + (f"/{path_token}" if path_token else "")
        return requests.post(url, json=document, **{"timeout": 10, **kwargs})

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=30)
        time.sleep(0.2)  # the drain thread reads what is left
        return "".join(self.log)


@pytest.fixture
def served(simulator: Simulator, moto_server: MotoServer, bucket: str) -> Iterator[Served]:
    port = free_port()
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_RECEIVER__TOKEN=TOKEN,
        POLLER_RECEIVER__READ_TOKEN=READ_TOKEN,
        POLLER_RECEIVER__TIMEOUT_SECONDS="2",
        POLLER_RECEIVER__THREADS="4",
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    server = Served(env, port)
    yield server
    err = server.stop()
    assert TOKEN not in err and READ_TOKEN not in err  # never logged, not even in access logs
    assert "Traceback" not in "".join(line for line in err.splitlines() if line[:1] != "{")


def written(s3: Any, bucket: str) -> set[str]:
    """Every key but the store proof's, which `poller serve` records when it starts."""
    return {k for k in bucket_listing(s3, bucket) if not k.startswith("_poller/probe/")}


def wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_the_old_receivers_readme_payload_lands_in_its_layout(
    simulator: Simulator, served: Served, s3: Any, bucket: str
):
    doc = simulator.factory.alert(datetime(2017, 1, 15, 23, 10, 17, tzinfo=UTC))
    doc["id"] = README_PAYLOAD["alerts"][0]["id"]
    simulator.add(doc, datetime(2017, 1, 15, 23, 10, 17, tzinfo=UTC))
    answer = served.push(README_PAYLOAD)
    assert answer.status_code == 200
    assert answer.json()["results"] == [{"id": doc["id"], "result": "archived"}]
    webhook_key = "webhooks/2017/01/15/23/10/587c0159a907346eccb84004"
    assert webhook_key in bucket_listing(s3, bucket)  # before the answer: durably taken
    webhook = json.loads(s3.get_object(Bucket=bucket, Key=webhook_key)["Body"].read())
    assert webhook["created_at"] == 1484521817000 and webhook["severity"] == 1
    full_key = "alerts/58/7c/587c0159a907346eccb84004"
    wait_for(lambda: full_key in bucket_listing(s3, bucket))  # the detail fetch
    assert json.loads(s3.get_object(Bucket=bucket, Key=full_key)["Body"].read()) == doc
    wait_for(lambda: not [k for k in bucket_listing(s3, bucket) if "pending" in k])
    # The read-back routes need the read token (also under the Lambda-era prefix); the
    # push token, which sits in a URL in the vendor's settings, never reads.
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    got = requests.get(f"{served.url}/api/v1/s3/alert/{doc['id']}", headers=read, timeout=5)
    assert got.status_code == 200 and got.json()["alert"] == doc
    for wrong in ({"Authorization": f"Bearer {TOKEN}"}, {}):
        refused = requests.get(
            f"{served.url}/api/v1/s3/alert/{doc['id']}", headers=wrong, timeout=5
        )
        assert refused.status_code == 401
    assert (
        requests.get(f"{served.url}/api/v1/s3/alert/{TOKEN}/{doc['id']}", timeout=5).status_code
        == 404
    )
    ranged = requests.get(
        f"{served.url}/threatstack-to-s3/api/v1/s3/alert",
        params={"start": "2017-01-15T23:00:00Z", "end": "2017-01-16T00:00:00Z"},
        headers=read,
        timeout=5,
    )
    assert ranged.status_code == 200 and [a["id"] for a in ranged.json()["alerts"]] == [doc["id"]]
    thirty_years = requests.get(
        f"{served.url}/api/v1/s3/alert",
        params={"start": "1996-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
        headers=read,
        timeout=5,
    )
    assert thirty_years.status_code == 400 and "at most 7 days" in thirty_years.json()["error"]
    metrics = requests.get(f"{served.url}/metrics", timeout=5).text
    assert 'poller_push_alerts_total{outcome="archived"} 1.0' in metrics
    assert "poller_push_detail_fetches_queued 0.0" in metrics
    before = len(simulator.requests)
    for _ in range(30):  # unauthenticated, and costs at most one API request a minute
        status = requests.get(f"{served.url}/api/v1/s3/status", timeout=10).json()
        assert status == {
            "success": True,
            "s3": {"success": True},
            "threatstack": {"success": True},
        }
    assert len(simulator.requests) - before <= 1


def test_pushed_then_polled_is_stored_once_and_polled_then_pushed_is_already_archived(
    simulator: Simulator, served: Served, moto_server: MotoServer, s3: Any, bucket: str
):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    now = utc_now()
    pushed = simulator.add(
        simulator.factory.alert(now - timedelta(minutes=4)), now - timedelta(minutes=4)
    )
    polled = simulator.add(
        simulator.factory.alert(now - timedelta(minutes=5)), now - timedelta(minutes=5)
    )
    webhook = {
        "id": pushed.id,
        "title": pushed.doc["title"],
        "created_at": str(int(pushed.created.timestamp() * 1000)),  # quoted, as the vendor does
        "severity": str(pushed.doc["severity"]),
        "organization_id": simulator.credentials.org_id,
    }
    assert served.push(
        webhook, path_token=None, headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()["results"] == [{"id": pushed.id, "result": "archived"}]
    env = poller_env(simulator, moto_server, bucket)
    assert run_poller(["sync"], env).returncode == 0  # polls both
    late_push = {**webhook, "id": polled.id, "created_at": int(polled.created.timestamp() * 1000)}
    answer = served.push({"alerts": [late_push]}).json()
    assert answer["results"] == [{"id": polled.id, "result": "already_archived"}]
    versions: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", []):
            versions[version["Key"]] = versions.get(version["Key"], 0) + 1
    records = {k: n for k, n in versions.items() if k.startswith(("alerts/", "webhooks/"))}
    assert len(records) == 4 and set(records.values()) == {1}  # each record written once
    wait_for(lambda: not [k for k in bucket_listing(s3, bucket) if "pending" in k])


def test_refused_requests_write_nothing(served: Served, s3: Any, bucket: str):
    alert = dict(README_PAYLOAD["alerts"][0])
    assert served.push({"alerts": [alert]}, path_token="wrong").status_code == 401
    assert served.push({"alerts": [alert]}, path_token=None).status_code == 401
    url = f"{served.url}/api/v1/s3/alert/{TOKEN}"
    assert (
        requests.post(
            url, data=b"not json", timeout=5, headers={"Content-Type": "application/json"}
        ).status_code
        == 400
    )
    assert (
        requests.post(
            url, data=b"<xml/>", timeout=5, headers={"Content-Type": "text/xml"}
        ).status_code
        == 415
    )
    assert served.push({"something": "else"}).status_code == 400
    huge = {"alerts": [alert], "padding": "x" * (2 * 1024 * 1024)}
    assert served.push(huge).status_code == 413
    assert written(s3, bucket) == set()


def test_a_mixed_batch_archives_the_good_and_quarantines_the_rest_with_reasons(
    simulator: Simulator, served: Served, s3: Any, bucket: str
):
    good = dict(README_PAYLOAD["alerts"][0], organization_id=simulator.credentials.org_id)
    at = datetime(2026, 11, 30, 12, 20, 27, tzinfo=UTC)
    batch = [
        good,
        {**good, "id": "in_seconds_0001", "created_at": int(at.timestamp())},
        {**good, "id": "iso_time_0001", "created_at": "2026-11-30T12:20:27Z"},
        {**good, "id": "../../etc"},
        {**good, "id": "bad_time_0001", "created_at": "yesterday"},
        {**good, "id": "digits_0001", "created_at": "9" * 5000},
        {**good, "id": "superscript_1", "severity": "\u00b2"},
        {**good, "id": "other_org_0001", "organization_id": "5f00000000000000000000b2"},
    ]
    answer = served.push({"alerts": batch})
    assert answer.status_code == 200
    results = {r["id"]: (r["result"], r.get("reason")) for r in answer.json()["results"]}
    assert results == {
        good["id"]: ("archived", None),
        "in_seconds_0001": ("archived", None),
        "iso_time_0001": ("archived", None),
        "../../etc": ("quarantined", "unsafe_id"),
        "bad_time_0001": ("quarantined", "bad_created_at"),
        "digits_0001": ("quarantined", "bad_created_at"),
        "superscript_1": ("quarantined", "bad_severity"),
        "other_org_0001": ("quarantined", "other_organization"),
    }
    keys = bucket_listing(s3, bucket)
    assert "webhooks/2026/11/30/12/20/in_seconds_0001" in keys  # seconds told apart from ms
    assert "webhooks/2026/11/30/12/20/iso_time_0001" in keys
    assert not [k for k in keys if k.startswith("webhooks/1970/")]
    quarantined = {}
    for key in (k for k in keys if k.startswith("_poller/quarantine/")):
        record = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        quarantined[record["raw"]["id"]] = (key.split("/")[2], record["status"])
    assert quarantined == {
        "../../etc": ("unsafe_id", "push"),
        "bad_time_0001": ("bad_created_at", "push"),
        "digits_0001": ("bad_created_at", "push"),
        "superscript_1": ("bad_severity", "push"),
        "other_org_0001": ("other_organization", "push"),
    }
    pending = {k.rsplit("/", 1)[1] for k in keys if k.startswith("_poller/pending/")}
    assert "other_org_0001" not in pending  # never owed: our API cannot return it


def _field_case(name: str, org_id: str) -> bytes:
    """A field case as sent, its organisation made ours (except the other-org case)."""
    body = (FIELD_CASES / name).read_bytes()
    if name == "other-organisation-batch.json":
        return body
    for theirs in (b"5f00000000000000000000a1", b"b53b877629c2ee64d217de14"):
        body = body.replace(theirs, org_id.encode())
    return body


@pytest.mark.parametrize(
    ("name", "headers", "webhook_keys", "quarantined"),
    [
        (
            "vendor-single-quoted.json",
            {},
            ["webhooks/2025/11/30/12/20/692c3b888c1e0c173af5a3de"],
            [],
        ),
        ("webhook-with-bom.json", {}, ["webhooks/2026/11/30/06/26/6b0d1706f19931bc5ae46add"], []),
        (
            "created-at-in-seconds.json",
            {},
            ["webhooks/2025/11/30/12/20/692c3b8b40b2d002cc92d33d"],
            [],
        ),
        ("other-organisation-batch.json", {}, [], ["other_organization"] * 2),
        (
            "sns-notification.json",
            {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "Notification"},
            ["webhooks/2026/11/30/11/13/6b0d5a5e303b445aacd58fe1"],
            [],
        ),
    ],
)
def test_each_field_case_through_the_real_server(
    simulator: Simulator,
    served: Served,
    s3: Any,
    bucket: str,
    name: str,
    headers: dict[str, str],
    webhook_keys: list[str],
    quarantined: list[str],
):
    answer = requests.post(
        f"{served.url}/api/v1/s3/alert/{TOKEN}",
        data=_field_case(name, simulator.credentials.org_id),
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    keys = bucket_listing(s3, bucket)
    assert sorted(k for k in keys if k.startswith("webhooks/")) == webhook_keys
    assert sorted(k.split("/")[2] for k in keys if "/quarantine/" in k) == quarantined


def test_an_sns_subscription_confirmation_is_logged_with_its_url_when_not_allowed(
    simulator: Simulator, served: Served, s3: Any, bucket: str
):
    answer = requests.post(
        f"{served.url}/api/v1/s3/alert/{TOKEN}",
        data=(FIELD_CASES / "sns-subscription-confirmation.json").read_bytes(),
        headers={
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": "SubscriptionConfirmation",
        },
        timeout=10,
    )
    assert answer.status_code == 200 and answer.json()["sns"] == "logged, not confirmed"
    assert written(s3, bucket) == set()
    log = served.stop()
    confirm = [json.loads(x) for x in log.splitlines() if "push.sns_confirmation_pending" in x]
    assert confirm[0]["subscribe_url"].startswith("https://sns.us-east-1.amazonaws.com/")


def test_chunked_and_gzip_bodies_are_read_within_the_size_limit(
    simulator: Simulator, served: Served, s3: Any, bucket: str
):
    import gzip

    alert = dict(README_PAYLOAD["alerts"][0], organization_id=simulator.credentials.org_id)
    body = json.dumps({"alerts": [alert]}).encode()
    url = f"{served.url}/api/v1/s3/alert/{TOKEN}"
    json_type = {"Content-Type": "application/json"}
    chunked = requests.post(url, data=iter([body[:10], body[10:]]), headers=json_type, timeout=10)
    assert chunked.status_code == 200  # Transfer-Encoding: chunked, no Content-Length
    zipped = requests.post(
        url,
        data=gzip.compress(json.dumps({"alerts": [{**alert, "id": "gzipped_0001"}]}).encode()),
        headers={**json_type, "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert zipped.status_code == 200 and zipped.json()["results"][0]["result"] == "archived"
    bomb = gzip.compress(b'{"alerts": [' + b" " * (3 * 1024 * 1024) + b"]}")  # 3 KB -> 3 MB
    over = requests.post(
        url, data=bomb, headers={**json_type, "Content-Encoding": "gzip"}, timeout=10
    )
    assert over.status_code == 413 and "decompressed" in over.json()["error"]
    brotli = requests.post(
        url, data=body, headers={**json_type, "Content-Encoding": "br"}, timeout=10
    )
    assert brotli.status_code == 415 and "'br'" in brotli.json()["error"]
    big_chunks = iter([b'{"alerts": [', b" " * (2 * 1024 * 1024), b"]}"])
    assert requests.post(url, data=big_chunks, headers=json_type, timeout=10).status_code == 413
    webhooks = [k for k in bucket_listing(s3, bucket) if k.startswith("webhooks/")]
    assert len(webhooks) == 2


def test_a_5_mb_body_gets_a_413_the_sender_reads(served: Served):
    answer = requests.post(
        f"{served.url}/api/v1/s3/alert/{TOKEN}",
        data=b"x" * (5 * 1024 * 1024),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 413 and b"max_body" in answer.content


def test_a_chunk_declared_over_the_limit_gets_a_413_before_its_data(served: Served):
    """A chunk of 16 MiB declared (the limit is 1 MiB) and none of it sent: the sender reads
    a 413 (before, it read nothing and was closed at its request deadline)."""
    with socket.create_connection(("127.0.0.1", served.port)) as sender:
        sender.sendall(
            f"POST /api/v1/s3/alert/{TOKEN} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            "1000000\r\n".encode()
        )
        sender.settimeout(10)  # a bound on the wait, not a claim
        answer = b""
        while chunk := sender.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"max_body" in answer


def _hold_40_slow_senders(served: Served, org_id: str) -> None:
    """40 connections to the push port, each sending a header line every second and never
    finishing: /healthz and a real push answer within 2 s throughout (requests' timeout), and
    the server cuts each slow one off at its request deadline (``timeout_seconds``, 2 s)."""
    senders = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(40)]
    for sender in senders:
        sender.sendall(f"POST /api/v1/s3/alert/{TOKEN} HTTP/1.1\r\n".encode())
    alert = dict(README_PAYLOAD["alerts"][0], organization_id=org_id)
    cut_off = set()
    for second in range(3):
        for n, sender in enumerate(senders):
            try:
                sender.sendall(f"X-Slow-{second}: {n}\r\n".encode())
            except OSError:
                cut_off.add(n)
        assert requests.get(f"{served.health_url}/healthz", timeout=2).status_code == 200
        pushed = served.push({"alerts": [{**alert, "id": f"while_slow_{second}"}]}, timeout=2)
        assert pushed.status_code == 200
        time.sleep(1)
    for n, sender in enumerate(senders):
        sender.settimeout(5)
        try:
            if sender.recv(100) == b"":
                cut_off.add(n)
        except OSError:
            cut_off.add(n)
        sender.close()
    assert cut_off == set(range(40))  # none kept a connection past the request deadline


def test_40_slow_senders_hold_no_worker(simulator: Simulator, served: Served):
    _hold_40_slow_senders(served, simulator.credentials.org_id)


@pytest.mark.parametrize("own_port", [False, True], ids=["shared-port", "receiver-port"])
def test_40_slow_senders_hold_no_worker_of_the_daemon(
    simulator: Simulator, moto_server: MotoServer, bucket: str, own_port: bool
):
    """The same attack on `poller run` with the receiver on, where /healthz is what the
    kubelet restarts the pod on: with the push routes on the daemon's one listener (the
    default) and on their own (``receiver.port``, as the Kubernetes overlay runs it)."""
    port, push_port = free_port(), (free_port() if own_port else 0)
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_RECEIVER__TOKEN=TOKEN,
        POLLER_RECEIVER__TIMEOUT_SECONDS="2",
        POLLER_RECEIVER__THREADS="4",
        POLLER_RECEIVER__PORT=str(push_port),
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    daemon = Served(env, port, "run", push_port)
    try:
        _hold_40_slow_senders(daemon, simulator.credentials.org_id)
    finally:
        err = daemon.stop()
    assert TOKEN not in err
    assert "Traceback" not in "".join(line for line in err.splitlines() if line[:1] != "{")


def _silent_socket(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))  # Linux answers on all of 127/8: one peer address per source
    sock.connect(("127.0.0.1", port))
    return sock


def test_silent_sockets_over_the_limits_leave_healthz_and_pushes_answering(
    simulator: Simulator, moto_server: MotoServer, bucket: str
):
    """Sockets that never send a byte, on the daemon's one listener (the default: health and
    pushes share ``http.port``), with the limits scaled down: 8 from one source (its cap is
    5), then 20 from four more (the listener's limit is 12). /healthz and a real push still
    answer within 2 s (requests' timeout), and every silent socket is closed by the server
    (at the latest at its 2 s deadline from being accepted)."""
    port = free_port()
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_RECEIVER__TOKEN=TOKEN,
        POLLER_RECEIVER__TIMEOUT_SECONDS="2",
        POLLER_RECEIVER__THREADS="4",
        POLLER_RECEIVER__CONNECTION_LIMIT="12",
        POLLER_RECEIVER__CONNECTIONS_PER_SOURCE="5",
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    daemon = Served(env, port, "run")
    try:
        sources = ["127.0.0.2"] * 8 + [f"127.0.0.{n}" for n in range(3, 7) for _ in range(5)]
        silent = [_silent_socket(source, port) for source in sources]
        assert requests.get(f"{daemon.health_url}/healthz", timeout=2).status_code == 200
        alert = dict(README_PAYLOAD["alerts"][0], organization_id=simulator.credentials.org_id)
        assert daemon.push({"alerts": [{**alert, "id": "past_silence"}]}, timeout=2).ok
        closed = 0
        for sock in silent:
            sock.settimeout(10)  # a bound on the wait, not a claim: the deadline is 2 s
            try:
                closed += sock.recv(100) == b""
            except ConnectionResetError:
                closed += 1
            sock.close()
        assert closed == len(silent)
    finally:
        err = daemon.stop()
    assert "Traceback" not in "".join(line for line in err.splitlines() if line[:1] != "{")


BURST = 400


@pytest.mark.faults
def test_a_burst_of_webhooks_is_all_answered_200_and_archived_after_the_next_sync(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """BURST one-alert webhooks from 16 senders: every answer 200, memory bounded, detail
    fetches within half the budget, and the next sync writes what they left at one request
    per hundred. 400 is the smallest burst that proves it: more than the detail queue (256)
    plus the fetches half of a 100/min budget allows, so the queue overflows and alerts are
    left to the sync, as in a real flood. 2,000 proved the same in 248 s on a loaded machine
    (load 30+ on 2 cores; 17 pushes/s); 400 takes a fifth of that."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from conftest import assert_exact_archive

    from poller.simulator import Faults

    with Simulator(seed=61, faults=Faults(org_limit_per_minute=200)) as sim:
        now = utc_now()
        alerts = sim.generate(BURST, now - timedelta(minutes=12), now - timedelta(minutes=2))
        port = free_port()
        env = poller_env(
            sim,
            moto_server,
            bucket,
            POLLER_RECEIVER__TOKEN=TOKEN,
            POLLER_RECEIVER__THREADS="16",
            POLLER_HTTP__HOST="127.0.0.1",
            POLLER_HTTP__PORT=str(port),
        )
        server = Served(env, port)
        try:

            def push(sim_alert: Any) -> int:
                webhook = {
                    "id": sim_alert.id,
                    "title": sim_alert.doc["title"],
                    "created_at": int(sim_alert.created.timestamp() * 1000),
                    "severity": sim_alert.doc["severity"],
                    "organization_id": sim.credentials.org_id,
                }
                return int(server.push({"alerts": [webhook]}).status_code)

            started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(push, alerts))
            rate = len(codes) / (time.monotonic() - started)
            assert codes == [200] * BURST, {c for c in codes if c != 200}
            print(f"{BURST} webhooks at {rate:.0f}/s")
            peak_kib = int(
                next(
                    line.split()[1]
                    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM")
                )
            )
            assert peak_kib < 200 * 1024  # bounded: no queue grows with the burst
            keys = bucket_listing(s3, bucket)
            assert len([k for k in keys if k.startswith("webhooks/")]) == BURST
        finally:
            server.stop()
        detail_requests = [r for r in sim.requests if r.path.startswith("/v2/alerts/")]
        fetched_at = sorted(r.at for r in detail_requests)
        # The detail fetches took at most half of the 100/min budget in any minute.
        assert all(
            len([t for t in fetched_at if start <= t < start + 60]) <= 50 for start in fetched_at
        )
        owed = [k for k in bucket_listing(s3, bucket) if k.startswith("_poller/pending/")]
        assert owed  # the burst outran the detail fetches: the sync has work to prove
        result = run_poller(["sync"], env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        summary = summary_of(result)
        assert summary["api_requests"] <= 2 + BURST // 100 + 2  # one request per hundred
        assert_exact_archive(s3, bucket, sim, bodies=False)
        assert not [k for k in bucket_listing(s3, bucket) if k.startswith("_poller/pending/")]
        assert sim.org_limited == 0 and sim.max_requests_in_any_window(60.0) <= 200


def test_the_push_path_serves_https_with_its_own_certificate(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Any
):
    """For users without an ingress: receiver.tls_cert_file and tls_key_file."""
    from s3proxy import self_signed_certificate

    cert_file, key_file = self_signed_certificate(tmp_path)
    port = free_port()
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_RECEIVER__TOKEN_FILE=str(_token_file(tmp_path)),
        POLLER_RECEIVER__TLS_CERT_FILE=str(cert_file),
        POLLER_RECEIVER__TLS_KEY_FILE=str(key_file),
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"https://127.0.0.1:{port}/api/v1/s3/alert/{TOKEN}"
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = requests.post(url, json=README_PAYLOAD, timeout=5, verify=str(cert_file))
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "poller serve did not start"
                time.sleep(0.2)
        assert answer.status_code == 200
        assert "webhooks/2017/01/15/23/10/587c0159a907346eccb84004" in bucket_listing(s3, bucket)
        with pytest.raises(requests.ConnectionError):  # plain HTTP is not served
            requests.post(url.replace("https", "http"), json=README_PAYLOAD, timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _token_file(directory: Any) -> Any:
    path = directory / "token"
    path.write_text(TOKEN + "\n")
    return path
