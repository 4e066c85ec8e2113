"""Break-it review of issue 20 (query tables): reproducers over the in-memory World of
tests/test_tables.py."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_tables import DAY1, World

from poller.errors import QueryError
from poller.tables.query import connect, run_sql


def _query(world: World, sql: str) -> list[tuple[Any, ...]]:
    from datetime import date

    from poller.tables.query import PartCache

    fetched = PartCache(world.store, world.layout, world.tmp / "cache").fetch(
        date(2026, 1, 1), date(2027, 1, 1)
    )
    return run_sql(connect(fetched.files), sql).rows


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 42 AS x) TO '{tmp}/written.csv'",
        "COPY alerts TO '{tmp}/written.parquet' (FORMAT parquet)",
        "ATTACH '{tmp}/written.duckdb' AS x",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/etc/*')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "EXPORT DATABASE '{tmp}/written'",
    ],
)
def test_query_is_read_only_and_confined_to_the_cached_parts(tmp_path: Path, sql: str) -> None:
    (tmp_path / "w").mkdir()
    world = World(tmp_path / "w")
    world.build()
    with pytest.raises(QueryError):
        _query(world, sql.format(tmp=tmp_path))
    assert not list(tmp_path.glob("written*"))
    # ...while the tables themselves still answer
    assert _query(world, "SELECT count(*) FROM alerts_latest")[0][0] > 0


@pytest.mark.parametrize(
    "odd",
    [
        {"severity": "2"},
        {"severity": "high"},
        {"severity": 2**40},
        {"severity": "9999999999999999999"},
        {"severity": 1.5},
        {"title": "\U0001f600 \u202e NUL\u0000 " + "x" * 300_000},
        {"title": {"nested": [1, 2]}},
        {"agentId": 12345},
        {"dismissedAt": "not a time", "isDismissed": "true"},
        {"dismissReason": None, "dataSource": ""},
    ],
)
def test_odd_alerts_never_break_a_pass(tmp_path: Path, odd: dict[str, Any]) -> None:
    world = World(tmp_path, count=4, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(hours=5))
    doc.update(odd)
    world.put(doc)
    report = world.build()
    assert report.ok
    rows = _query(world, f"SELECT record FROM alerts WHERE id = '{doc['id']}'")
    assert len(rows) == 1 and json.loads(rows[0][0]) == doc


def test_an_alert_missing_optional_fields_gets_a_row(tmp_path: Path) -> None:
    world = World(tmp_path, count=2, dismissed=0)
    doc = {"id": "bare0001abcd", "createdAt": (DAY1 + timedelta(hours=3)).isoformat()}
    world.put(doc)
    world.build()
    assert _query(world, "SELECT severity, title FROM alerts WHERE id = 'bare0001abcd'") == [
        (None, None)
    ]


def test_a_lone_surrogate_in_a_field_never_breaks_a_pass(tmp_path: Path) -> None:
    world = World(tmp_path, count=4, dismissed=0)
    doc = world.factory.alert(DAY1 + timedelta(hours=5))
    doc["title"] = "half an emoji \ud83d here"
    world.put(doc)
    report = world.build()
    assert report.ok
    rows = _query(world, f"SELECT record FROM alerts WHERE id = '{doc['id']}'")
    assert len(rows) == 1 and json.loads(rows[0][0]) == doc


def test_a_corrupt_part_in_the_bucket_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    from poller.errors import PollerError

    world = World(tmp_path)
    world.build()
    key = next(k for k in world.part_keys("alerts") if "2026-11-01" in k)
    body = world.store.get(key)
    assert body is not None
    world.store.delete(key)
    world.store.put(key, body.body[: len(body.body) // 2])  # truncated
    with pytest.raises(PollerError):  # QueryError or FatalError: a message, not a traceback
        _query(world, "SELECT count(*) FROM alerts")


def test_a_corrupt_part_does_not_crash_the_builder(tmp_path: Path) -> None:
    from poller.errors import PollerError

    world = World(tmp_path)
    world.build()
    key = next(k for k in world.part_keys("alerts") if "2026-11-01" in k)
    world.store.delete(key)
    world.store.put(key, b"PAR1 not really")
    late = world.factory.alert(DAY1 + timedelta(hours=9))
    world.put(late)
    builder = world.builder()
    builder.mark_due(DAY1.date(), "test")
    with pytest.raises(PollerError, match="cannot be read"):  # not a raw duckdb exception
        builder.run(builder.plan(world.watermark))
    # The remedy the message gives: delete the day's parts; the next pass rebuilds the day.
    world.store.delete(key)
    assert world.build().ok
    ids = [r[0] for r in _query(world, "SELECT id FROM alerts")]
    assert sorted(ids) == sorted(world.closed_ids())


def test_a_stale_cache_is_fetched_again_when_the_etag_moves(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.build()
    assert _query(world, "SELECT count(*) FROM alerts WHERE title = 'swapped'") == [(0,)]
    key = next(k for k in world.part_keys("alerts") if "2026-11-01" in k)
    import duckdb

    swapped = tmp_path / "swapped.parquet"
    con = duckdb.connect()
    cached = next((tmp_path / "cache" / "alerts").rglob("date=2026-11-01/*.parquet"))
    con.execute(
        f"COPY (SELECT * REPLACE ('swapped' AS title) FROM read_parquet('{cached}'))"
        f" TO '{swapped}' (FORMAT parquet)"
    )
    world.store.delete(key)
    world.store.put(key, swapped.read_bytes())
    assert _query(world, "SELECT count(*) FROM alerts WHERE title = 'swapped'")[0][0] > 0


def test_every_pass_lists_every_dismissal_record_ever_archived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not fixed: the dismissal records are keyed by id, so each pass (every daemon cycle)
    lists all of them and holds the listing in memory: O(archive), not O(batch)."""
    world = World(tmp_path, count=40, dismissed=0)
    world.build()
    from poller.archive.store import MemoryObjectStore

    listed: list[int] = []
    original = MemoryObjectStore.list_objects

    def counting(self: MemoryObjectStore, prefix: str) -> Any:
        found = original(self, prefix)
        if prefix == world.layout.key("dismissals") + "/":
            listed.append(len(list(found)))
        return found

    for n in range(5):  # dismissal records, as the revisit writes them
        doc = dict(world.docs[sorted(world.docs)[n]])
        doc.update(isDismissed=True, dismissedAt=(DAY1 + timedelta(hours=20)).isoformat())
        world.store.put(
            world.layout.key("dismissals", doc["id"][:2], doc["id"][2:4], doc["id"]),
            json.dumps(doc).encode(),
            if_none_match=True,
        )
    monkeypatch.setattr(MemoryObjectStore, "list_objects", counting)
    world.build()
    world.build()  # nothing new: still the whole listing
    assert listed == [5, 5]
