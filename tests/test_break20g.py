"""Break-it review of issues 17 and 20, seventh round: an odd last moment in the ledger, two
marked days whose dismissal waits across them, a dismissal before the archive's first day."""

from __future__ import annotations

import json

from test_shared_budget import LEDGER, T0, World


def test_a_last_moment_no_float_holds_does_not_fail_every_request():
    # _grants drops an entry whose date no float holds, but not one whose last moment (the
    # fourth field) is an integer below -1.8e308: `last <= at + 10` is true and
    # float(last) raises OverflowError, out of take() for every process of the prefix.
    world = World()
    body = {"version": 1, "per_minute": 100, "grants": [[T0 - 5, 1, "x", -(10**400), 100]]}
    world.store.put(LEDGER, json.dumps(body).encode())
    a = world.process("a")
    world.send(a)  # raises OverflowError
    assert world.sent == [T0]


def test_passes_with_time_for_one_day_reach_a_marked_day_a_dismissal_waits_for(
    tmp_path, monkeypatch
):
    # brk4a put days lacking a part before days only marked due, but both days of the same
    # cycle can be marked only (a backfill or verify --repair into two closed, built days):
    # day 1 (oldest marked) is rebuilt by every one-day pass, its dismissal dated day 2
    # waits because day 2 is marked and unbuilt (held_days), day 1 stays due, and day 2 is
    # never reached: the row never lands, both days stay due for ever.
    import time
    from datetime import UTC, date, datetime, timedelta

    from test_break20 import Clock
    from test_tables import World

    world = World(tmp_path, count=20, dismissed=0.0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    world.build(clock=clock)  # every closed day built, nothing due
    clock.now += timedelta(hours=1)
    doc = dict(next(iter(world.docs.values())))
    doc["id"] = "abcd" + doc["id"][4:]
    doc["createdAt"] = "2026-11-01T23:00:00.000Z"
    doc.update(isDismissed=True, dismissedAt="2026-11-02T01:00:00.000Z")
    world.put(doc)  # a backfill of day 1, and something archived into day 2: both marked
    builder = world.builder(clock=clock)
    builder.mark_due(date(2026, 11, 1), "backfill")
    builder.mark_due(date(2026, 11, 2), "backfill")
    for _ in range(4):
        clock.now += timedelta(hours=1)
        builder = world.builder(clock=clock)
        builder.run(builder.plan(world.watermark), time.monotonic() - 1)  # one day a pass
    assert doc["id"] in {r["id"] for r in world.rows("dismissals")}
    assert builder.plan(world.watermark).due == []


def test_a_dismissal_dated_before_the_archives_first_day_does_not_wait_for_ever(
    tmp_path, monkeypatch
):
    # A dismissal record whose alert and dismissedAt are before the archive's first webhooks
    # day (an alert the archive never had: a revisit, verify --repair). That day is never due
    # (plans start at the first day) so it never gets parts; since brk4a, a target day that
    # lacks a part is held (held_days) whether or not any pass can build it: the row waits
    # for ever and the dismissal mark stays before it, so every later pass lists and reads
    # again everything written since. Before brk4a the row got its part.
    from datetime import UTC, datetime, timedelta

    from test_break20 import Clock
    from test_tables import World

    from poller.archive.records import classify

    world = World(tmp_path, count=20, dismissed=0.0)
    clock = Clock(world, monkeypatch, datetime(2026, 11, 10, tzinfo=UTC))
    doc = dict(next(iter(world.docs.values())))
    doc["id"] = "abcd" + doc["id"][4:]
    doc.update(
        createdAt="2026-10-30T23:00:00.000Z",
        isDismissed=True,
        dismissedAt="2026-10-31T01:00:00.000Z",
    )
    assert world.archive.store_dismissal(classify(doc))
    for _ in range(3):
        clock.now += timedelta(hours=1)
        report = world.build(clock=clock)
    assert report.waiting_dismissals == 0
    assert world.builder(clock=clock).load_mark().at > datetime(2026, 11, 10, tzinfo=UTC)
