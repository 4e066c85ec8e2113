"""The query tables end to end at their edges (poller processes over the simulator and moto):
each test reproduced a defect a break-it review of issue 20 found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, MotoServer, poller_env, run_poller, summary_of

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def _synced(simulator: Simulator, moto: MotoServer, bucket: str, tmp: Path, **extra: str) -> Any:
    now = utc_now()
    simulator.generate(40, now - timedelta(days=3), now - timedelta(minutes=5))
    env = poller_env(
        simulator,
        moto,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="4d",
        POLLER_TABLES__CACHE_DIR=str(tmp / "cache"),
        **extra,
    )
    assert run_poller(["sync"], env).returncode == 0
    return env


def test_query_edges_as_a_new_user_meets_them(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    env = _synced(simulator, moto_server, bucket, tmp_path)
    assert run_poller(["tables"], env).returncode == 0
    sql = "SELECT count(*) AS n FROM alerts_latest"
    # --since after --until: exit 2, named
    bad = run_poller(["query", sql, "--since", "1d", "--until", "3d"], env)
    assert bad.returncode == 2 and "--since" in bad.stderr, bad.stderr[-1500:]
    # a range of only open days: an answer (0) and a message about days not closed yet
    today = utc_now().date().isoformat()
    open_only = run_poller(["query", sql, "--since", today, "--json"], env)
    assert open_only.returncode == 0, open_only.stderr[-1500:]
    assert json.loads(open_only.stdout) == {"n": 0}
    assert "not closed yet" in open_only.stderr
    # piped: JSON lines only on stdout
    piped = run_poller(["query", "SELECT id, created_at, severity FROM alerts LIMIT 3"], env)
    assert piped.returncode == 0
    for line in piped.stdout.splitlines():
        json.loads(line)
    # hostile: writes refused end to end, nothing written
    target = tmp_path / "pwn.csv"
    hostile = run_poller(["query", f"COPY (SELECT 1) TO '{target}'"], env)
    assert hostile.returncode == 2 and not target.exists()
    passwd = run_poller(["query", "SELECT * FROM read_csv('/etc/passwd')"], env)
    assert passwd.returncode == 2 and passwd.stdout == ""


def test_an_unwritable_cache_folder_is_a_clear_error(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "cache"  # root ignores modes: a file where the folder should be
        env = _synced(simulator, moto_server, bucket, tmp_path)
        assert run_poller(["tables"], env).returncode == 0
        blocker.write_text("not a folder")
    else:
        env = _synced(simulator, moto_server, bucket, tmp_path)
        assert run_poller(["tables"], env).returncode == 0
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache").chmod(0o500)
    result = run_poller(["query", "SELECT count(*) FROM alerts", "--since", "5d"], env)
    assert result.returncode in (1, 2), result.stderr[-2000:]
    assert "crashed" not in result.stderr and "Traceback" not in result.stderr, result.stderr[
        -2000:
    ]
    assert "cache" in result.stderr


def test_two_tables_processes_at_once_write_no_row_twice(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    env = _synced(simulator, moto_server, bucket, tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "poller", "tables"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    sql = "SELECT id, count(*) AS n FROM alerts GROUP BY id HAVING count(*) > 1"
    dup = run_poller(["query", sql, "--since", "5d", "--json"], env)
    assert dup.returncode == 0 and dup.stdout == "", dup.stdout[:500]
    sql = "SELECT id, count(*) AS n FROM dismissals GROUP BY id HAVING count(*) > 1"
    dup = run_poller(["query", sql, "--since", "5d", "--json"], env)
    assert dup.returncode == 0 and dup.stdout == "", dup.stdout[:500]
    total = run_poller(["query", "SELECT count(*) AS n FROM alerts", "--since", "5d"], env)
    rows = sum(
        summary_of(subprocess.CompletedProcess([], 0, o[0], o[1]))["alert_rows"] for o in outs
    )
    assert json.loads(total.stdout)["n"] == rows


def test_a_damaged_part_is_named_with_exit_1_not_blamed_on_the_sql(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    env = _synced(simulator, moto_server, bucket, tmp_path)
    assert run_poller(["tables"], env).returncode == 0
    keys = sorted(
        item["Key"]
        for item in s3.list_objects_v2(Bucket=bucket, Prefix="tables/alerts/")["Contents"]
    )
    damaged = keys[-1]  # not the first file DuckDB opens: it fails while answering
    s3.put_object(Bucket=bucket, Key=damaged, Body=b"PAR1 truncated")
    result = run_poller(["query", "SELECT count(*) AS n FROM alerts", "--since", "5d"], env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"the table part {damaged} is damaged" in result.stderr, result.stderr[-2000:]
    assert "refused the SQL" not in result.stderr and result.stdout == ""
    assert "bucket's copy is the one damaged" in result.stderr  # moto's ETag is the MD5
    # poller tables over a due day with that part: exit 1 naming it, after the other days
    day = damaged.split("/")[2].removeprefix("date=")
    s3.put_object(Bucket=bucket, Key=f"_poller/tables/due/{day}", Body=b"{}")
    built = run_poller(["tables"], env)
    assert built.returncode == 1, built.stderr[-2000:]
    report = summary_of(built)
    assert report["damaged_parts"] == [damaged] and damaged in report["error"]
