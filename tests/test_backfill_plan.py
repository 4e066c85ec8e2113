"""The backfill walk with in-memory fakes: resumable by recorded chunks, and the live
checkpoint moved only forward, only over ground covered without a gap."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_sync import LAYOUT, NOW, World, ago

from poller.archive.state import ChunkRecords
from poller.errors import ApiUnavailable
from poller.walks.backfill import BackfillRange, backfill
from poller.walks.sync import Summary, chunks

DAY = timedelta(days=1)


def run_backfill(world: World, since: datetime, until: datetime, to_now: bool) -> Summary:
    world.lease.acquire()
    try:
        cycle = world.make_cycle(mode="backfill")
        summary = Summary(mode="backfill", run_id=cycle.run_id)
        backfill(
            cycle, ChunkRecords(world.store, LAYOUT), BackfillRange(since, until, to_now), summary
        )
        return summary
    finally:
        world.lease.release()


@pytest.fixture
def world() -> World:
    w = World()
    for day in range(10):
        for n in range(3):
            w.source.add(f"d{day:02d}n{n}xxxx", NOW - timedelta(days=day, hours=3 + n))
    return w


def test_a_backfill_into_an_empty_bucket_that_runs_to_now_creates_the_checkpoint(world: World):
    summary = run_backfill(world, NOW - 11 * DAY, NOW - timedelta(minutes=1), to_now=True)
    assert summary.archived == 30 and summary.chunks_done == summary.chunks_total == 12
    assert world.checkpoint()["watermark"] == "2026-11-25T11:59:00Z"
    keys = [k for k in world.store.snapshot() if k.startswith("_poller/backfill/")]
    assert len(keys) == 12  # one record per finished chunk, the key naming its span


def test_a_rerun_skips_recorded_chunks_and_reads_only_the_unfinished_one(world: World):
    world.source.fail_after = 9  # the API breaks on the 10th list request: mid-way
    with pytest.raises(ApiUnavailable):
        run_backfill(world, NOW - 11 * DAY, NOW - 2 * DAY, to_now=False)
    world.source.fail_after = None
    requests_before = world.source.requests_sent
    summary = run_backfill(world, NOW - 11 * DAY, NOW - 2 * DAY, to_now=False)
    assert summary.chunks_skipped == 4  # two list requests (statuses) per chunk: 4 chunks done
    assert summary.chunks_done == summary.chunks_total - 4
    assert world.source.requests_sent - requests_before == 2 * summary.chunks_done
    in_range = {
        doc["id"]
        for _, doc, _ in world.source.alerts
        if NOW - 11 * DAY <= datetime.fromisoformat(doc["createdAt"]) < NOW - 2 * DAY
    }
    assert world.archived_ids() == in_range


def test_the_live_checkpoint_never_moves_back_and_jumps_no_gap(world: World):
    world.cycle()  # the live checkpoint: now - settle
    live = world.checkpoint()["watermark"]
    # A range entirely behind the watermark: archived, the checkpoint untouched.
    run_backfill(world, NOW - 9 * DAY, NOW - 5 * DAY, to_now=False)
    assert world.checkpoint()["watermark"] == live
    # A range that starts after a gap in front of nothing: no checkpoint move either.
    world2 = World()
    world2.source.add("lonely0001", ago(60))
    run_backfill(world2, NOW - 2 * DAY, NOW - DAY, to_now=False)
    assert LAYOUT.checkpoint_key not in world2.store.snapshot()  # --until given: not created


def test_a_range_across_the_watermark_carries_it_forward():
    world = World()
    world.source.add("early00001", NOW - timedelta(hours=30))
    world.lease.acquire()
    world.lease.release()
    # A live checkpoint a day and a half ago, then a backfill from before it to now.
    world.now = NOW - timedelta(hours=36)
    world.settings = world.settings.__class__(
        **{**world.settings.__dict__, "first_run_since": "1h"}
    )
    world.cycle()
    world.now = NOW
    run_backfill(world, NOW - 2 * DAY, NOW - timedelta(minutes=1), to_now=True)
    assert world.checkpoint()["watermark"] == "2026-11-25T11:59:00Z"
    assert "early00001" in world.archived_ids()


moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


@given(
    start=moments,
    length=st.integers(min_value=1, max_value=40 * 86400),
    size=st.sampled_from([3600, 86400, 7 * 86400]),
)
def test_aligned_chunks_cut_at_whole_multiples_and_overlap(start: datetime, length: int, size: int):
    start = start.replace(microsecond=0)
    until = start + timedelta(seconds=length)
    pieces = list(chunks(start, until, timedelta(seconds=size), aligned=True))
    assert pieces[0][0] == start and pieces[-1][1] == until
    for (_, end), (next_start, _) in itertools.pairwise(pieces):
        assert end.timestamp() % size == 0  # every inner cut on the grid
        assert next_start == end - timedelta(seconds=1)
    assert all(b - a <= timedelta(seconds=size + 1) for a, b in pieces)
