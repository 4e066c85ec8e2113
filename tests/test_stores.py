"""The bucket as it really is: S3 over TLS (boto3 streams every PUT as aws-chunked with a
checksum trailer there), and S3-compatible stores with the quirks found in the field
(tests/s3proxy.py switches them on). Each quirk is named by ``check``, refused by every
command that writes before it writes anything, or worked around by the documented setting,
and then the archive is exact, byte for byte."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import (
    ROOT,
    assert_exact_archive,
    bucket_objects,
    expected_archive,
    run_poller,
    tls_env,
)
from s3proxy import S3Proxy
from test_push import README_PAYLOAD, TOKEN, Served, free_port, wait_for

from poller import cli
from poller.archive.records import Layout, json_body
from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def poller(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> tuple[int, str, str]:
    """``poller ARGS`` in this process, with ``env`` as its environment: the same code path
    as the command line without an interpreter start each time (exit code, stdout, stderr)."""
    for name in list(os.environ):
        if name.startswith(("POLLER_", "THREATSTACK_")) and name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers = root.handlers[:]
    capsys.readouterr()
    try:
        code = cli.main(args)
    finally:
        root.handlers[:] = handlers
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(text: str) -> Any:
    return json.loads(text.strip().splitlines()[-1])


def assert_byte_exact(s3: Any, bucket: str, sim: Simulator) -> None:
    """Every record holds exactly the bytes poller renders for it, and nothing else."""
    assert_exact_archive(s3, bucket, sim, bodies=False)
    actual = bucket_objects(s3, bucket)
    for key, document in expected_archive(sim, sim.credentials.org_id).items():
        assert actual[key] == json_body(document), f"bytes differ at {key}"


def test_sync_backfill_and_verify_over_tls_with_botos_defaults_are_byte_exact(
    simulator: Simulator,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    now = utc_now()
    simulator.generate(30, now - timedelta(days=2), now - timedelta(minutes=5))
    env = tls_env(simulator, tls_s3, bucket, POLLER_SYNC__FIRST_RUN_SINCE="1d")
    code, first, err = poller(["sync"], env, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    code, backfilled, err = poller(["backfill", "--since", "3d"], env, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert last_json(first)["archived"] + last_json(backfilled)["archived"] == 30
    assert tls_s3.streamed > 0  # the production transport was exercised, not plain PUTs
    assert_byte_exact(s3, bucket, simulator)

    gone = Layout().alert_key(simulator.alerts[3].id)
    s3.delete_object(Bucket=bucket, Key=gone)
    args = ["verify", "--since", "3d", "--repair", "--checksums", "--json"]
    code, out, err = poller(args, env, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert last_json(out)["archived"] == 1
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


# quirk -> (the finding that names it, what check says, the setting that works around it)
QUIRKS = {
    "keep_framing": ("read_back", "kept boto3's aws-chunked framing", "POLLER_S3__CHECKSUMS"),
    "reject_streaming": ("write", "rejected boto3's upload", "POLLER_S3__CHECKSUMS"),
    "ignore_if_none_match": (
        "create_only",
        "ignores If-None-Match",
        "POLLER_S3__REQUIRE_CONDITIONAL_WRITES",
    ),
    "if_match_501": (
        "compare_and_swap",
        "does not implement If-Match (501",
        "POLLER_S3__REQUIRE_CONDITIONAL_WRITES",
    ),
}
SETTING_NAMES = {
    "POLLER_S3__CHECKSUMS": "s3.checksums=false",
    "POLLER_S3__REQUIRE_CONDITIONAL_WRITES": "s3.require_conditional_writes=false",
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_each_quirk_is_named_by_check_refused_before_any_write_and_its_setting_works(
    quirk: str,
    simulator: Simulator,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    finding, said, variable = QUIRKS[quirk]
    now = utc_now()
    simulator.generate(12, now - timedelta(hours=5), now - timedelta(minutes=5))
    setattr(tls_s3.quirks, quirk, True)
    env = tls_env(simulator, tls_s3, bucket)

    code, out, _ = poller(["check", "--json"], env, monkeypatch, capsys)
    report = last_json(out)
    assert code == 1
    assert report[finding].startswith("failed: the store") and said in report[finding]
    assert SETTING_NAMES[variable] in report["fix"][finding]

    code, out, _ = poller(["sync"], env, monkeypatch, capsys)
    assert code == 1
    error = last_json(out)["error"]
    assert said in error and SETTING_NAMES[variable] in error
    assert tls_s3.writes() == []  # nothing but the probe was written: no lease, no record

    fixed = {**env, variable: "false"}
    code, out, err = poller(["sync"], fixed, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert last_json(out)["archived"] == 12
    assert_byte_exact(s3, bucket, simulator)
    if variable == "POLLER_S3__REQUIRE_CONDITIONAL_WRITES":
        assert "store.unguarded" in err  # what is lost is said on every run
        code, out, _ = poller(["status", "--json"], fixed, monkeypatch, capsys)
        store = last_json(out)["store"]
        assert store["conditional_writes"] is False and "lease" in store["unguarded"]


def test_every_writing_command_refuses_a_store_that_ignores_create_only_writes(
    simulator: Simulator,
    tls_s3: S3Proxy,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    """The field case: `poller serve` ran on such a store and overwrote a record."""
    tls_s3.quirks.ignore_if_none_match = True
    env = tls_env(
        simulator,
        tls_s3,
        bucket,
        POLLER_RECEIVER__TOKEN=TOKEN,
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(free_port()),
    )
    for command in (["run"], ["serve"]):  # processes: they would serve on if not refused
        result = run_poller(command, env, timeout=60)
        assert result.returncode == 1, (command, result.stderr[-2000:])
        assert "ignores If-None-Match" in result.stderr, command
    for command in (["backfill", "--since", "2d"], ["verify", "--since", "2d", "--repair"]):
        code, out, err = poller(command, env, monkeypatch, capsys)
        assert code == 1, (command, err[-2000:])
        assert "ignores If-None-Match" in out + err, command
    assert tls_s3.writes() == []


def _credentials(path: Path, key_id: str) -> None:
    path.write_text(f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = s3cret\n")


def test_rotated_credentials_are_picked_up_by_the_daemon_and_expired_ones_fail_healthz(
    simulator: Simulator, tls_s3: S3Proxy, s3: Any, bucket: str, tmp_path: Path
):
    """A static key rotated in its file under a running daemon: S3 answers ExpiredToken for
    the old one, the daemon rebuilds its client from a fresh session and goes on. When no
    credentials work any more, /healthz turns red after five failed cycles, saying why."""
    credentials = tmp_path / "credentials"
    _credentials(credentials, "old-key")
    port = free_port()
    env = tls_env(
        simulator,
        tls_s3,
        bucket,
        AWS_SHARED_CREDENTIALS_FILE=str(credentials),
        POLLER_SYNC__INTERVAL_SECONDS="1",
        POLLER_HTTP__HOST="127.0.0.1",
        POLLER_HTTP__PORT=str(port),
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name)
    now = utc_now()
    simulator.generate(4, now - timedelta(hours=3), now - timedelta(hours=2))
    first_ids = {a.id for a in simulator.alerts}

    def archived() -> set[str]:
        """Ids with both records: a cycle writes the full record, then the webhook record,
        so waiting on alerts/ alone let the credentials expire between the two."""

        def ids(prefix: str) -> set[str]:
            listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
            return {item["Key"].rsplit("/", 1)[-1] for item in listing}

        return ids("alerts/") & ids("webhooks/")

    daemon = subprocess.Popen(
        [sys.executable, "-m", "poller", "run"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(daemon.stderr or []), daemon=True).start()
    try:
        wait_for(lambda: archived() >= first_ids)
        tls_s3.quirks.expired_keys = {"old-key"}
        _credentials(credentials, "new-key")
        simulator.generate(3, now - timedelta(minutes=8), now - timedelta(minutes=3))
        wait_for(lambda: archived() == {a.id for a in simulator.alerts})

        tls_s3.quirks.expired_keys = {"old-key", "new-key"}  # nothing works any more

        def red() -> bool:
            answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            return answer.status_code == 503 and "ExpiredToken" in answer.text

        wait_for(red)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert "s3.credentials_renewed" in "".join(log)
    assert_byte_exact(s3, bucket, simulator)


def test_a_lease_and_a_checkpoint_poller_did_not_write_are_named_and_left_alone(
    simulator: Simulator,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    layout = Layout()
    framed = b'8\r\n{"x": 1}\r\n0\r\nx-amz-checksum-crc32:33jdxA==\r\n\r\n'
    s3.put_object(Bucket=bucket, Key=layout.lease_key, Body=b"<html>not a lease</html>")
    s3.put_object(Bucket=bucket, Key=layout.checkpoint_key, Body=framed)
    env = tls_env(simulator, tls_s3, bucket)

    code, out, _ = poller(["sync"], env, monkeypatch, capsys)
    error = last_json(out)["error"]
    assert code == 1
    assert f"the lease {layout.lease_key} is unreadable (not JSON)" in error
    assert "delete it" in error and "None" not in error

    code, out, _ = poller(["status", "--json"], env, monkeypatch, capsys)
    report = last_json(out)
    assert code == 0
    assert report["lease"]["unreadable"] == "not JSON"
    assert "aws-chunked framing" in report["checkpoint"]["unreadable"]
    assert "s3.checksums=false" in report["checkpoint"]["unreadable"]

    s3.delete_object(Bucket=bucket, Key=layout.lease_key)  # what the message says to do
    code, out, _ = poller(["sync"], env, monkeypatch, capsys)
    assert code == 1 and f"the checkpoint {layout.checkpoint_key} is unreadable" in out
    assert s3.get_object(Bucket=bucket, Key=layout.checkpoint_key)["Body"].read() == framed
    lease = json.loads(s3.get_object(Bucket=bucket, Key=layout.lease_key)["Body"].read())
    assert lease["released"] is True  # the failed run let go of the lease it took


def test_manifests_find_a_record_and_a_manifest_changed_after_their_day_closed(
    simulator: Simulator,
    tls_s3: S3Proxy,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
):
    """An overwrite carries its own matching checksum: only the day's manifest sees it."""
    midnight = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
    for back in (3, 2, 1):
        day = midnight - timedelta(days=back)
        simulator.generate(2, day + timedelta(hours=1), day + timedelta(hours=20))
    env = tls_env(simulator, tls_s3, bucket, POLLER_SYNC__FIRST_RUN_SINCE="4d")
    code, _, err = poller(["sync"], env, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    prefix = "_poller/manifests/"
    keys = sorted(
        item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    )
    assert len(keys) == 3  # the closed days, oldest first, chained
    manifests = [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys]
    assert manifests[0]["previous"] is None
    assert manifests[1]["previous"]["day"] == manifests[0]["day"]
    target = next(m for m in manifests if m["records"])
    record = sorted(target["records"])[0]

    # Same key, a new body with its own (matching) checksum.
    s3.put_object(Bucket=bucket, Key=record, Body=b'{"id": "x"}', ChecksumAlgorithm="SHA256")
    code, out, _ = poller(
        ["verify", "--since", "4d", "--checksums", "--json"], env, monkeypatch, capsys
    )
    report = last_json(out)
    assert code == 1 and report["complete"] is False
    assert report["checksum_mismatch_count"] == 0  # the stored checksum cannot see it
    assert report["manifest_mismatch"] == [record]
    assert report["manifest_chain_broken"] == []

    # A manifest rewritten to match: the next day's manifest recorded another SHA-256.
    first = dict(manifests[0], records={})
    s3.put_object(Bucket=bucket, Key=keys[0], Body=json.dumps(first).encode())
    code, out, _ = poller(
        ["verify", "--since", "4d", "--checksums", "--json"], env, monkeypatch, capsys
    )
    assert last_json(out)["manifest_chain_broken"] == [manifests[0]["day"]]
