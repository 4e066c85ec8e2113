"""No Docker engine here: the image's entry point is run directly, as the image would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, MotoServer, assert_exact_archive, poller_env

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def instruction(name: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(rf"^{name}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, f"Dockerfile has no exec-form {name}"
    return list(json.loads(match.group(1)))


def image_environment() -> dict[str, str]:
    """The final stage's ENV (the last ENV block of the Dockerfile), PATH aside."""
    text = (ROOT / "Dockerfile").read_text()
    block = re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.MULTILINE)[-1]
    pairs = re.findall(r"([A-Z_]+)=(\S+)", block)
    return {name: value for name, value in pairs if name != "PATH"}


def test_entrypoint_and_default_command_run_a_sync_unprivileged_in_a_read_only_directory(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
):
    """The image runs with a read-only root filesystem: the exact ENTRYPOINT + CMD, in a
    working directory mounted read-only (a private mount namespace, so even root cannot
    write there), archive exactly and leave nothing behind."""
    now = utc_now()
    simulator.generate(30, now - timedelta(hours=5), now - timedelta(hours=1))
    command = instruction("ENTRYPOINT") + instruction("CMD")
    assert command == ["python", "-m", "poller", "sync"]
    command[0] = sys.executable
    workdir = tmp_path / "app"
    workdir.mkdir()
    env = {**poller_env(simulator, moto_server, bucket), **image_environment()}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == "/tmp"
    read_only = (
        'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && cd "$0"'
        ' && ! touch .write-probe 2>/dev/null && exec "$@"'
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", read_only, str(workdir), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # not the repo: the installed package must do
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(workdir.iterdir()) == []
    assert_exact_archive(s3, bucket, simulator)
