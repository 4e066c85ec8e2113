"""poller tables and poller query end to end: processes over loopback to the Threat Stack
simulator and a moto S3 server (SPEC "Query tables")."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import MotoServer, bucket_objects, poller_env, run_poller, summary_of

from poller.simulator import Simulator
from poller.timeutil import utc_now

pytestmark = pytest.mark.integration


def _closed_through(s3: Any, bucket: str) -> date:
    """The last closed day: the watermark past its end by sync.lookback_seconds (900)."""
    checkpoint = json.loads(
        s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")["Body"].read()
    )
    watermark = datetime.fromisoformat(checkpoint["watermark"].replace("Z", "+00:00"))
    return (watermark - timedelta(seconds=900)).date() - timedelta(days=1)


def _logged(stderr: str, event: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            return dict(json.loads(line))
    raise AssertionError(f"no {event} in {stderr[-2000:]}")


def _created(doc: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(doc["createdAt"].replace("Z", "+00:00")).astimezone(UTC)


def test_tables_then_query_then_a_repair_makes_a_new_part_with_exactly_the_late_alerts(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    now = utc_now()
    simulator.generate(60, now - timedelta(days=3), now - timedelta(minutes=5))
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="4d",
        POLLER_TABLES__CACHE_DIR=str(tmp_path / "cache"),
    )
    assert run_poller(["sync"], env).returncode == 0
    closed = _closed_through(s3, bucket)
    built = run_poller(["tables"], env)
    assert built.returncode == 0, built.stderr[-3000:]
    report = summary_of(built)
    in_closed = [a.doc for a in simulator.alerts if _created(a.doc).date() <= closed]
    assert report["alert_rows"] == len(in_closed) and report["ok"] is True
    objects = bucket_objects(s3, bucket)
    parts = sorted(k for k in objects if k.startswith("tables/"))
    days = sorted(
        {_created(a.doc).date() for a in simulator.alerts if _created(a.doc).date() <= closed}
    )
    first = min(_created(a.doc).date() for a in simulator.alerts)
    every = [first + timedelta(days=n) for n in range((closed - first).days + 1)]
    assert set(days) <= set(every)
    assert parts == sorted(
        f"tables/{t}/date={d.isoformat()}/part-0001.parquet"
        for t in ("alerts", "dismissals")
        for d in every
    )  # one part per closed day and table; the open day has none

    status = run_poller(["status", "--json"], env)
    tables = json.loads(status.stdout)["tables"]
    assert tables["last_day_with_tables"] == closed.isoformat()
    # Nothing pending; waiting: only days with an alert whose dismissal falls on a day not
    # closed yet (built, kept due until that day closes).
    waiting = {
        _created(d).date().isoformat()
        for d in in_closed
        if d.get("dismissedAt") and _created({"createdAt": d["dismissedAt"]}).date() > closed
    }
    assert tables["pending_days"] == [] and set(tables["waiting_days"]) == waiting

    # A count by severity, as JSON lines, equal to the archive's.
    sql = "SELECT severity, count(*) AS n FROM alerts GROUP BY severity ORDER BY severity"
    answer = run_poller(["query", sql, "--since", first.isoformat(), "--json"], env)
    assert answer.returncode == 0, answer.stderr[-3000:]
    rows = [json.loads(line) for line in answer.stdout.splitlines()]
    assert {r["severity"]: r["n"] for r in rows} == dict(Counter(d["severity"] for d in in_closed))
    text = run_poller(["query", sql, "--since", first.isoformat(), "--text"], env)
    assert text.returncode == 0 and "severity" in text.stdout and f"{len(rows)} rows" in text.stdout
    # The second query fetched nothing: the cached parts' ETags still match.
    assert _logged(text.stderr, "query.parts")["downloaded"] == 0
    assert _logged(text.stderr, "query.parts")["reused"] == len(parts)
    assert any((tmp_path / "cache" / "alerts").rglob("*.parquet"))
    bad = run_poller(["query", "SELEC nonsense", "--json"], env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "DuckDB refused the SQL" in bad.stderr and "syntax error" in bad.stderr.lower()

    # Late alerts into a closed day, archived by verify --repair: a new part with them only.
    day = days[-1]
    late = [
        simulator.add(simulator.factory.alert(moment), moment).doc
        for moment in (
            datetime(day.year, day.month, day.day, 7, tzinfo=UTC),
            datetime(day.year, day.month, day.day, 8, tzinfo=UTC),
        )
    ]
    repair = run_poller(["verify", "--since", day.isoformat(), "--repair", "--json"], env)
    assert repair.returncode == 0, repair.stderr[-3000:]
    after = summary_of(run_poller(["tables"], env))
    assert after["days_built"] == [day.isoformat()] and after["alert_rows"] == 2
    key = f"tables/alerts/date={day.isoformat()}/part-0002.parquet"
    path = tmp_path / "part.parquet"
    path.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    ids = {
        r[0] for r in duckdb.connect().execute(f"SELECT id FROM read_parquet('{path}')").fetchall()
    }
    assert ids == {doc["id"] for doc in late}
