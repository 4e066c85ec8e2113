"""The backfill walk with in-memory fakes: resumable by recorded chunks, and the live
checkpoint moved only forward, only over ground covered without a gap."""

from __future__ import annotations

import itertools
import json
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


def with_statuses(world: World, *statuses: str) -> None:
    world.settings = world.settings.__class__(**{**world.settings.__dict__, "statuses": statuses})


def test_a_day_read_for_active_only_is_read_again_for_dismissed_and_then_never():
    world = World()
    world.source.add("act0000001", NOW - timedelta(days=3, hours=2))
    world.source.add("dis0000001", NOW - timedelta(days=3, hours=4), "dismissed")
    since, until = NOW - 4 * DAY, NOW - 2 * DAY
    with_statuses(world, "active")
    first = run_backfill(world, since, until, to_now=False)
    assert world.archived_ids() == {"act0000001"} and first.chunks_done == first.chunks_total
    records = sorted(k for k in world.store.snapshot() if k.startswith("_poller/backfill/"))
    assert records and all(k.endswith("Z_active") for k in records)

    with_statuses(world, "active", "dismissed")
    before = world.source.requests_sent
    second = run_backfill(world, since, until, to_now=False)
    # Only the dismissed list was read over the recorded days: one request a chunk.
    assert world.source.requests_sent - before == second.chunks_done == second.chunks_total
    assert world.archived_ids() == {"act0000001", "dis0000001"}
    widened = sorted(k for k in world.store.snapshot() if k.startswith("_poller/backfill/"))
    assert [k for k in widened if k.endswith("Z_active_dismissed")]
    body = json.loads(world.store.snapshot()[widened[-1]])
    assert body["statuses"] == ["active", "dismissed"] and body["read"] == ["dismissed"]

    before = world.source.requests_sent
    third = run_backfill(world, since, until, to_now=False)
    assert world.source.requests_sent == before  # everything covered: nothing listed
    assert third.chunks_skipped == third.chunks_total


def test_a_record_of_an_older_version_counts_as_read_for_both_default_statuses(world: World):
    """Before records named their statuses the key was ``<from>_<until>``: such a record is
    taken to cover the default lists (active and dismissed), so old ranges are not re-read."""
    since, until = NOW - 4 * DAY, NOW - 3 * DAY
    world.store.put(f"_poller/backfill/{since:%Y%m%dT%H%M%SZ}_{until:%Y%m%dT%H%M%SZ}", b"{}")
    records = ChunkRecords(world.store, LAYOUT).load()
    assert records.covered(since, until) == {"active", "dismissed"}
    assert records.covered(since, until + DAY) == frozenset()
    before = world.source.requests_sent
    summary = run_backfill(world, since, until, to_now=False)
    assert summary.chunks_skipped == summary.chunks_total and world.source.requests_sent == before


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
