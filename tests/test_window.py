"""Window arithmetic and the seen-set: table-driven and property-based."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.archive.state import Checkpoint
from poller.timeutil import api_format, parse_instant, parse_span
from poller.walks.sync import CycleSettings, chunks, cycle_window, prune_seen

NOW = datetime(2026, 11, 25, 12, 0, 30, 750000, tzinfo=UTC)
SETTINGS = CycleSettings(
    statuses=("active",),
    lookback=timedelta(seconds=900),
    settle=timedelta(seconds=60),
    first_run_since="24h",
    max_concurrency=4,
)


@pytest.mark.parametrize(
    ("watermark", "first", "since", "until"),
    [
        (None, "24h", "2026-11-24T12:00:30", "2026-11-25T11:59:30"),
        (None, "2026-11-01", "2026-11-01T00:00:00", "2026-11-25T11:59:30"),
        (None, "2026-11-25T11:00:00.9Z", "2026-11-25T11:00:00", "2026-11-25T11:59:30"),
        (
            datetime(2026, 11, 25, 11, 0, tzinfo=UTC),
            "24h",
            "2026-11-25T10:45:00",
            "2026-11-25T11:59:30",
        ),
        # a watermark ahead of now - settle (clock stepped back): empty window, nothing read
        (
            datetime(2026, 11, 25, 12, 30, tzinfo=UTC),
            "24h",
            "2026-11-25T12:15:00",
            "2026-11-25T11:59:30",
        ),
    ],
)
def test_cycle_window(watermark: datetime | None, first: str, since: str, until: str):
    settings = CycleSettings(**{**SETTINGS.__dict__, "first_run_since": first})
    got_since, got_until = cycle_window(Checkpoint(watermark=watermark), NOW, settings)
    assert (api_format(got_since), api_format(got_until)) == (since, until)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("2w", 1209600)],
)
def test_spans(text: str, expected: int):
    assert parse_span(text) == timedelta(seconds=expected)


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "1.5h", "soon"])
def test_bad_instants(text: str):
    with pytest.raises(ValueError):
        parse_instant(text, NOW)


def test_naive_iso_means_utc():
    assert parse_instant("2026-11-01T12:00:00", NOW) == datetime(2026, 11, 1, 12, tzinfo=UTC)
    assert parse_instant("2026-11-01T12:00:00+01:00", NOW) == datetime(2026, 11, 1, 11, tzinfo=UTC)


moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


@given(
    watermark=moments,
    elapsed=st.integers(min_value=0, max_value=10 * 86400),
    lookback=st.integers(min_value=0, max_value=86400),
    settle=st.integers(min_value=0, max_value=3600),
)
def test_consecutive_windows_leave_no_gap(
    watermark: datetime, elapsed: int, lookback: int, settle: int
):
    """The next window always starts at least a second before the previous one ended,
    even with no look-back: exclusive ends at both sides skip no alert."""
    settings = CycleSettings(
        ("active",), timedelta(seconds=lookback), timedelta(seconds=settle), "24h", 1
    )
    watermark = watermark.replace(microsecond=0)
    now = watermark + timedelta(seconds=settle + elapsed, microseconds=123)
    since, until = cycle_window(Checkpoint(watermark=watermark), now, settings)
    assert since <= watermark - timedelta(seconds=1)
    assert until >= watermark
    assert since.microsecond == until.microsecond == 0


@given(
    created=st.lists(st.integers(min_value=0, max_value=4000), max_size=50),
    lookback=st.integers(min_value=0, max_value=2000),
)
def test_prune_keeps_exactly_what_the_next_window_can_reread(created: list[int], lookback: int):
    base = datetime(2026, 1, 1, tzinfo=UTC)
    watermark = base + timedelta(seconds=3000)
    seen = {
        f"id{i:04d}": int((base + timedelta(seconds=s)).timestamp()) for i, s in enumerate(created)
    }
    kept = prune_seen(seen, watermark, timedelta(seconds=lookback))
    horizon = int((watermark - timedelta(seconds=max(lookback, 1))).timestamp())
    assert kept == {k: v for k, v in seen.items() if v >= horizon}


@given(
    start=moments,
    length=st.integers(min_value=-100, max_value=10 * 86400),
    size=st.integers(min_value=60, max_value=2 * 86400),
)
def test_chunks_cover_the_window_exactly_in_order(start: datetime, length: int, size: int):
    until = start + timedelta(seconds=length)
    pieces = list(chunks(start, until, timedelta(seconds=size)))
    assert pieces[0][0] == start
    if length <= 0:
        assert pieces == [(start, until)]  # one empty piece: nothing is read
    assert pieces[-1][1] == until
    for (_, end), (next_start, _) in itertools.pairwise(pieces):
        assert next_start == end - timedelta(seconds=1)  # overlap: a cut second is in both
    assert all(b - a <= timedelta(seconds=size) for a, b in pieces)
