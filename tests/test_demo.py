"""`poller demo`: a real process, its own simulator and S3 server, a tour after Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from typing import Any

import boto3
import pytest
from conftest import ROOT

from poller import cli

pytestmark = pytest.mark.integration


def test_demo_archives_both_layouts_then_stops_on_sigint_with_a_tour_of_real_keys():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poller",
            "demo",
            *("--alerts", "60", "--interval", "3", "--port", "0"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        endpoint = ""
        for _ in range(20):
            line = process.stdout.readline()
            match = re.search(r"S3 endpoint: (http://127\.0\.0\.1:\d+)", line)
            if match:
                endpoint = match.group(1)
                break
        assert endpoint, "the demo did not print its S3 endpoint"
        s3: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="demo",
            aws_secret_access_key="demo",
        )
        deadline = time.monotonic() + 90
        keys: list[str] = []
        while time.monotonic() < deadline:
            listing = s3.list_objects_v2(Bucket="poller-demo")
            keys = [item["Key"] for item in listing.get("Contents", [])]
            # Once the first cycle committed, the day of alerts is in: the tour's first keys
            # (sorted, so the oldest) are among these. The simulator dismisses an archived
            # alert on its first tick (12 s); a revisit (every 3 cycles) archives it.
            if any(k.startswith("dismissals/") for k in keys):
                break
            time.sleep(0.5)
        assert any(k.startswith("alerts/") for k in keys), keys
        assert any(k.startswith("webhooks/") for k in keys), keys
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert "The archive" in out and "Quarantine" in out and "The checkpoint" in out
    shown = [k for k in keys if k in out]
    assert any(k.startswith("alerts/") for k in shown), out[-3000:]
    assert any(k.startswith("webhooks/") for k in shown), out[-3000:]
    assert "_poller/quarantine/missing_id/" in out  # the malformed ones it brought along
    dismissal = next(k for k in keys if k.startswith("dismissals/"))
    assert "A later dismissal" in out
    assert dismissal in out and "alerts/" + dismissal.split("/", 1)[1] in out
    # The tour ends with poller query over the demo's closed day (yesterday).
    assert "Query tables" in out and "$ poller query --since 2d" in out, out[-3000:]
    assert re.search(r"\d+ rows", out), out[-3000:]


def test_demo_without_moto_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setitem(sys.modules, "moto.server", None)  # the import fails, as uninstalled
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'poller[demo]'" in err
    assert len(err.strip().splitlines()) == 1
