"""deploy/athena/: the DDL parses as Athena SQL (sqlglot), its columns and types are the
ones of the Parquet parts poller writes, the view is poller query's, and the analyst's IAM
policy reads the archive bucket only under P/tables/."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import sqlglot
from conftest import ROOT
from sqlglot import exp

from poller.archive.records import Alert, Layout, classify
from poller.archive.state import CheckpointStore
from poller.archive.store import MemoryObjectStore
from poller.archive.writer import Archive
from poller.simulator.alerts import AlertFactory
from poller.tables.build import TablesBuilder
from poller.tables.query import ALERTS_LATEST

ATHENA = ROOT / "deploy" / "athena"
# DuckDB's type of a Parquet column -> the Hive/Athena DDL type that reads it.
ATHENA_TYPE = {
    "VARCHAR": "STRING",
    "TIMESTAMP": "TIMESTAMP",
    "INTEGER": "INT",
    "BOOLEAN": "BOOLEAN",
}


def _ddl(name: str) -> exp.Create:
    text = (ATHENA / f"{name}.sql").read_text().replace("@LOCATION@", "s3://b/p/tables")
    parsed = sqlglot.parse_one(text, read="athena")
    assert isinstance(parsed, exp.Create)
    return parsed


def _written_schemas(tmp: Path) -> dict[str, list[tuple[str, str]]]:
    """Build one closed day's parts (with a dismissal) and read their Parquet schemas."""
    store, layout = MemoryObjectStore(), Layout("p")
    archive = Archive(store, layout, "org")
    day = datetime(2026, 11, 1, tzinfo=UTC)
    for doc, _, _ in AlertFactory(seed=1).spread(4, day, day + timedelta(hours=20), 0.5):
        alert = classify(doc)
        assert isinstance(alert, Alert)
        archive.store_alert(alert, "active", day)
    watermark = day + timedelta(days=3)
    checkpoints = CheckpointStore(store, layout)
    checkpoints.commit(checkpoints.load(), watermark, {}, "t", "sync", watermark)
    builder = TablesBuilder(store, layout, lookback=timedelta(minutes=15), workdir=tmp)
    builder.run(builder.plan(watermark))
    schemas = {}
    con = duckdb.connect()
    for table in ("alerts", "dismissals"):
        key = next(k for k in store.snapshot() if k.startswith(f"p/tables/{table}/"))
        path = tmp / f"{table}.parquet"
        path.write_bytes(store.snapshot()[key])
        described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()
        schemas[table] = [(row[0], row[1]) for row in described]
    return schemas


def test_the_ddl_parses_and_matches_the_parquet_the_product_writes(tmp_path: Path) -> None:
    schemas = _written_schemas(tmp_path)
    for table in ("alerts", "dismissals"):
        create = _ddl(table)
        assert create.this.this.name == table
        schema = create.this
        columns = [
            (c.name, c.args["kind"].sql("hive").upper())
            for c in schema.expressions
            if isinstance(c, exp.ColumnDef)
        ]
        assert columns == [(name, ATHENA_TYPE[kind]) for name, kind in schemas[table]]
        text = create.sql("athena")
        assert "'projection.date.type'='date'" in text.replace(" ", "")
        assert f"s3://b/p/tables/{table}/date=${{date}}/" in text
        partitioned = create.find(exp.PartitionedByProperty)
        assert partitioned is not None and "date" in partitioned.sql("athena")


def test_the_view_is_the_one_poller_query_defines() -> None:
    text = (ATHENA / "alerts_latest.sql").read_text()
    view = sqlglot.parse_one(text, read="athena")
    assert isinstance(view, exp.Create) and view.kind == "VIEW"
    assert ALERTS_LATEST in text
    selected = view.expression
    assert sqlglot.parse_one(ALERTS_LATEST, read="duckdb") == selected


@pytest.mark.parametrize("path", ["analyst-policy.json"])
def test_the_analyst_reads_the_archive_bucket_only_under_tables(path: str) -> None:
    policy = json.loads((ATHENA / path).read_text())
    archive = "arn:aws:s3:::my-threatstack-archive"
    for statement in policy["Statement"]:
        resources = statement["Resource"]
        resources = [resources] if isinstance(resources, str) else resources
        actions = statement["Action"]
        actions = {actions} if isinstance(actions, str) else set(actions)
        for resource in resources:
            if resource.startswith(archive + "/"):
                assert resource == archive + "/threatstack/tables/*"
                assert actions == {"s3:GetObject"}
            elif resource == archive:
                assert actions == {"s3:ListBucket"}
                prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
                assert prefixes == ["threatstack/tables/*"]
