"""Break-it review of issue 20 (query tables), sixth round: each test reproduced a defect
found then and states what should happen, over the in-memory World of tests/test_tables.py."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_break20 import Clock, _dismiss
from test_tables import DAY1, World

from poller.tables.build import TablesBuilder


class Killed(Exception):
    pass


def _dismissed_ids(world: World) -> set[str]:
    closed = world.closed_ids()
    return {
        i
        for i, doc in world.docs.items()
        if i in closed and (doc.get("isDismissed") or doc.get("dismissedAt"))
    }


def _kill_between_parts(world: World, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    original = TablesBuilder.write_part

    def killed(self: TablesBuilder, table: str, day: Any, number: int, path: Path) -> Any:
        if table == "dismissals":
            raise Killed()
        return original(self, table, day, number, path)

    monkeypatch.setattr(TablesBuilder, "write_part", killed)
    with pytest.raises(Killed):
        world.build(clock=clock)
    monkeypatch.setattr(TablesBuilder, "write_part", original)
    assert world.part_keys("dismissals") == []


def test_a_ranged_pass_writes_a_dismissals_part_for_an_unbuilt_day_outside_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The brk3a fix (held_days) holds only the days of ``plan.due``; a day outside the
    pass's ``--since/--until`` range that lacks its dismissals part (a kill between the
    parts) is not in the plan, so ``poller tables --until 2026-11-01`` writes day 2's
    dismissals part with only the one dismissal sent to it from day 1: day 2 now looks
    finished (both parts exist, no marker) and its own alerts archived already dismissed
    never get dismissals rows (SPEC Query tables: one row per alert whose archive shows a
    dismissal; README How a day is built: a day's dismissals part is what makes it look
    finished)."""
    world = World(tmp_path, count=40, dismissed=0.5)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    day2_dismissed = {
        i for i in _dismissed_ids(world) if world.docs[i]["createdAt"].startswith("2026-11-02")
    }
    assert day2_dismissed
    _kill_between_parts(world, clock, monkeypatch)
    active_day1 = sorted(
        i
        for i, doc in world.docs.items()
        if doc["createdAt"].startswith("2026-11-01") and not doc.get("isDismissed")
    )
    clock.now += timedelta(minutes=10)
    _dismiss(world, active_day1[0], DAY1 + timedelta(days=1, hours=1))
    clock.now += timedelta(minutes=10)
    builder = world.builder(clock=clock)
    ranged = builder.run(builder.plan(world.watermark, until=date(2026, 11, 1)))
    assert ranged.days_built == ["2026-11-01"]
    for _ in range(3):  # later passes over everything
        clock.now += timedelta(hours=1)
        world.build(clock=clock)
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    missing = sorted(day2_dismissed - set(rows))
    assert not missing, f"day 2's dismissed alerts never in dismissals: {missing}"
    assert max(rows.values()) == 1


def test_passes_whose_deadline_allows_one_day_never_reach_the_day_a_dismissal_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass past its deadline still builds one day (README: the next cycle goes on). An
    alert of day 1 archived already dismissed, its dismissedAt on day 2, keeps day 1 due
    while day 2 is unbuilt (held_days); every later pass builds the oldest due day first,
    so day 1 again and again, and day 2 is never reached: it never gets its parts, and day
    1 never leaves due (SPEC Query tables: every closed day gets its parts)."""
    world = World(tmp_path, count=20, dismissed=0.0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    doc = dict(next(iter(world.docs.values())))
    doc["id"] = "abcd" + doc["id"][4:]
    doc["createdAt"] = "2026-11-01T23:00:00.000Z"
    doc.update(isDismissed=True, dismissedAt="2026-11-02T01:00:00.000Z")
    world.put(doc)
    for _ in range(4):
        clock.now += timedelta(hours=1)
        builder = world.builder(clock=clock)
        builder.run(builder.plan(world.watermark), time.monotonic() - 1)  # one day a pass
    assert world.part_keys("alerts") and any(
        "date=2026-11-02" in k for k in world.part_keys("alerts")
    ), f"day 2 never built: {world.part_keys('alerts')}"
