"""No Docker engine here: the image's entry point is run directly, as the image would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
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


def test_entrypoint_and_default_command_run_a_sync(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Any
):
    now = utc_now()
    simulator.generate(30, now - timedelta(hours=5), now - timedelta(hours=1))
    command = instruction("ENTRYPOINT") + instruction("CMD")
    assert command == ["python", "-m", "poller", "sync"]
    command[0] = sys.executable
    env = poller_env(simulator, moto_server, bucket)
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )  # not the repo: the installed package must do
    assert result.returncode == 0, result.stderr[-2000:]
    assert_exact_archive(s3, bucket, simulator)
