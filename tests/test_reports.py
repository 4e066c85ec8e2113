"""`poller status` and `poller check` as people and programs read them: text with --text
(the default on a terminal), JSON with --json (the default otherwise)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import MotoServer, poller_env, run_poller

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def test_check_on_a_good_setup(simulator: Simulator, moto_server: MotoServer, bucket: str):
    env = poller_env(simulator, moto_server, bucket, COLUMNS="200")
    text = run_poller(["check", "--text"], env)
    assert text.returncode == 0, text.stderr[-2000:]
    got = lines(text.stdout)
    assert got[:7] == [
        "✓ configuration ok",
        "✓ Threat Stack ok",
        "✓ bucket ok: reachable",
        "✓ probe write ok",
        "✓ read back ok",
        "✓ create-only ok",
        "✓ compare+swap ok",
    ]
    assert got[7].startswith("! evidence versioning off, object lock off")
    assert got[-1] == "all checks passed"
    piped = run_poller(["check"], env)  # stdout is a pipe: JSON, the rule for programs
    assert json.loads(piped.stdout)["ok"] is True
    assert json.loads(run_poller(["check", "--json"], env).stdout) == json.loads(piped.stdout)


def test_check_with_a_wrong_key_and_a_missing_bucket_says_what_to_fix(
    simulator: Simulator, moto_server: MotoServer
):
    env = poller_env(
        simulator, moto_server, "no-such-bucket", THREATSTACK_API_KEY="wrong-key", COLUMNS="200"
    )
    text = run_poller(["check", "--text"], env)
    assert text.returncode == 1
    got = lines(text.stdout)
    assert got[0] == "✓ configuration ok"
    assert got[1].startswith("✗ Threat Stack failed: Threat Stack rejected the Hawk credentials")
    assert got[2] == (
        "fix: check THREATSTACK_USER_ID, THREATSTACK_ORG_ID and THREATSTACK_API_KEY (or their"
        " _FILE forms), and this machine's clock"
    )
    assert got[3].startswith("✗ bucket failed: S3 refused") and "NoSuchBucket" in got[3]
    assert got[4] == "fix: create the bucket, or set TS_AWS_S3_BUCKET to an existing one"
    assert got[-1] == "some checks failed"
    assert "wrong-key" not in text.stdout + text.stderr
    report = json.loads(run_poller(["check", "--json"], env).stdout)
    assert report["ok"] is False
    assert set(report["fix"]) == {"threatstack", "bucket"}


def test_status_before_and_after_a_run(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    env = poller_env(simulator, moto_server, bucket, COLUMNS="200")
    before = lines(run_poller(["status", "--text"], env).stdout)
    assert before == [
        f"archive s3://{bucket}/",
        "checkpoint none yet: the first run starts at sync.first_run_since",
        "lease free (never taken)",
        "store not proved today (the next writing run proves it; poller check now)",
    ]
    from datetime import timedelta

    now = utc_now()
    simulator.generate(12, now - timedelta(hours=2), now - timedelta(minutes=5))
    assert run_poller(["sync"], env).returncode == 0
    report = json.loads(run_poller(["status", "--json"], env).stdout)
    checkpoint = report["checkpoint"]
    assert checkpoint["run"] == {
        "listed": 12,
        "archived": 12,
        "already_archived": 0,
        "quarantined": 0,
    }
    after = lines(run_poller(["status", "--text"], env).stdout)
    assert after[0] == f"archive s3://{bucket}/"
    assert after[1].startswith(f"watermark {checkpoint['watermark']} (lag 1m ")
    assert after[2] == (
        f"last commit {checkpoint['updated_at']} by run {checkpoint['updated_by']} (sync):"
        " 12 listed, 12 archived, 0 already archived, 0 quarantined"
    )
    assert after[4].startswith(f"lease free: released by run {checkpoint['updated_by']} (sync)")
    assert after[5].startswith("store proved ") and after[5].endswith(
        ": bodies kept, conditional writes"
    )
    assert report["store"]["conditional_writes"] is True


def test_a_long_sync_on_a_terminal_shows_progress_and_keeps_the_summary_last(
    simulator: Simulator, moto_server: MotoServer, bucket: str
):
    """stderr is a terminal (a pty): a bar over the chunks; stdout (a pipe) is the summary."""
    import os
    import pty
    import subprocess
    import sys
    from datetime import timedelta

    from conftest import ROOT

    now = utc_now()
    simulator.generate(40, now - timedelta(days=3), now - timedelta(minutes=5))
    env = poller_env(
        simulator, moto_server, bucket, POLLER_SYNC__FIRST_RUN_SINCE="4d", COLUMNS="120"
    )
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "poller", "sync"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=secondary,
        text=True,
    )
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    out, _ = process.communicate(timeout=120)
    os.close(primary)
    assert process.returncode == 0
    terminal = shown.decode(errors="replace")
    assert "4/4" in terminal and "chunks" in terminal  # four days less the settle time
    assert "40 archived" in terminal
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["archived"] == 40
