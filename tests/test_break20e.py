"""Break-it review of issue 20 (query tables), fifth and sixth rounds: each test reproduced a defect
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


def _killed_between_parts_then_a_day2_dismissal(
    world: World, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> set[str]:
    """A first pass killed after the alerts parts, before the dismissals parts (both closed
    days lack their dismissals part: due); then the revisit archives a dismissal dated day
    2 of an alert of day 1. Returns day 2's alerts archived already dismissed."""
    day2_dismissed = {
        i for i in _dismissed_ids(world) if world.docs[i]["createdAt"].startswith("2026-11-02")
    }
    assert day2_dismissed
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
    active_day1 = sorted(
        i
        for i, doc in world.docs.items()
        if doc["createdAt"].startswith("2026-11-01") and not doc.get("isDismissed")
    )
    clock.now += timedelta(minutes=10)
    _dismiss(world, active_day1[0], DAY1 + timedelta(days=1, hours=1))
    clock.now += timedelta(minutes=10)
    return day2_dismissed


def _every_dismissal_once_after_three_passes(
    world: World, clock: Clock, day2_dismissed: set[str]
) -> None:
    for _ in range(3):  # later passes over everything, no deadline
        clock.now += timedelta(hours=1)
        world.build(clock=clock)
    rows = Counter(r["id"] for r in world.rows("dismissals"))
    missing = sorted(day2_dismissed - set(rows))
    assert not missing, f"day 2's dismissed alerts never in dismissals: {missing}"
    assert max(rows.values()) == 1


def test_a_deadline_pass_after_a_kill_between_parts_loses_a_days_dismissals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (How a day is built): "a day's dismissals part is what makes it look finished
    ... a kill between the two leaves the day to be built again". After such a kill, the
    daemon's next pass (its deadline already spent after one day) built day 1 only but wrote
    day 2's dismissals part anyway (a dismissal of day 2 came in): day 2 looked finished and
    its alerts archived already dismissed never got their dismissals rows (brk3a)."""
    world = World(tmp_path, count=40, dismissed=0.5)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    day2_dismissed = _killed_between_parts_then_a_day2_dismissal(world, clock, monkeypatch)
    builder = world.builder(clock=clock)
    first = builder.run(builder.plan(world.watermark), time.monotonic() - 1)  # deadline spent
    assert first.days_built == ["2026-11-01"]
    _every_dismissal_once_after_three_passes(world, clock, day2_dismissed)


def test_a_ranged_pass_writes_no_dismissals_part_for_an_unbuilt_day_outside_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same loss by another way: ``poller tables --until 2026-11-01`` after such a kill
    wrote day 2's dismissals part (day 2 outside its range, not in its plan) with only the
    dismissal sent to it from day 1 (brk4a)."""
    world = World(tmp_path, count=40, dismissed=0.5)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    day2_dismissed = _killed_between_parts_then_a_day2_dismissal(world, clock, monkeypatch)
    builder = world.builder(clock=clock)
    ranged = builder.run(builder.plan(world.watermark, until=date(2026, 11, 1)))
    assert ranged.days_built == ["2026-11-01"]
    _every_dismissal_once_after_three_passes(world, clock, day2_dismissed)


def test_with_no_lookback_a_day_is_closed_while_the_next_cycle_still_rereads_into_it() -> None:
    """SPEC (Query tables): a day is closed once the live watermark is past its end by
    ``sync.lookback_seconds`` (README: only closed days get parts, and the sync cycle's
    archive marks nothing due). ``lookback_seconds`` may be 0, but every cycle still re-reads
    at least one second (SPEC, Windows overlap): with the watermark at midnight the day
    before is closed, and the next cycle's window starts at 23:59:59 of that closed day, so
    an alert it archives there (created in that second, returned late or only by the
    re-read) goes into a day whose parts exist, with no due marker: never in a table.
    A day should be closed only once no cycle can archive into it any more."""
    from poller.tables.keys import last_closed_day
    from poller.timeutil import floor_second
    from poller.walks.sync import reread

    lookback = timedelta(0)
    watermark = datetime(2026, 11, 2, tzinfo=UTC)
    closed = last_closed_day(watermark, lookback)
    next_window_from = floor_second(watermark - reread(lookback))
    assert closed is not None
    assert next_window_from.date() > closed, (
        f"day {closed} is closed, yet the next cycle reads from {next_window_from}"
    )


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
