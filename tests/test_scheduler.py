"""The daemon's readiness rule and its handling of each cycle outcome, with a fake cycle."""

from __future__ import annotations

import io
import itertools
import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from poller.archive.failures import FailureRecord
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.config import Settings
from poller.errors import ApiAuthError, CycleTimeout, LeaseHeld, Stopped, UnreadableState
from poller.serving import daemon as scheduler
from poller.serving.daemon import FAILURES_BEFORE_RED, Daemon
from poller.terminal import render_status
from poller.threatstack.budget import RequestBudget
from poller.walks.sync import Summary

T0 = datetime(2026, 11, 25, 12, tzinfo=UTC)


class Clocks:
    """The wall clock (which can step) and the monotonic clock (which only moves on)."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def pass_time(self, delta: timedelta) -> None:
        self.wall += delta
        self.mono += delta.total_seconds()

    def __getitem__(self, _: int) -> datetime:  # now[0]: the wall clock, as before
        return self.wall

    def __setitem__(self, _: int, value: datetime) -> None:  # real time passing
        self.pass_time(value - self.wall)


def render_text(table: Any) -> str:
    console = Console(file=io.StringIO(), width=400, highlight=False)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def make_daemon(
    monkeypatch: pytest.MonkeyPatch,
    outcome: BaseException | None,
    store: MemoryObjectStore | None = None,
) -> tuple[Daemon, Clocks]:
    """A daemon whose cycles end in ``outcome``, on ``store`` (a new one by default)."""
    now = Clocks()
    runtime: Any = SimpleNamespace(
        settings=Settings(),
        stop=threading.Event(),
        run_id="r",
        budget=RequestBudget(100),
        store=store or MemoryObjectStore(),
        layout=Layout(),
    )

    def fake_cycle(_runtime: Any, summary: Any, observer: Any) -> Any:
        observer.page(summary)
        if outcome is not None:
            raise outcome
        summary.archived, summary.watermark = 3, "2026-11-25T11:59:00Z"
        return summary

    monkeypatch.setattr(scheduler, "run_cycle", fake_cycle)
    return Daemon(runtime, lambda: now.wall, lambda: now.mono), now


@pytest.mark.parametrize(
    ("outcome", "label", "ready"),
    [
        (None, "ok", True),
        (LeaseHeld("another run holds the lease"), "lease_held", True),
        (ApiAuthError("401"), "failed", False),
        (Stopped(), "stopped", False),
        (RuntimeError("bug"), "crashed", False),
    ],
)
def test_each_outcome_is_counted_and_never_raised(
    monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None, label: str, ready: bool
):
    daemon, _ = make_daemon(monkeypatch, outcome)
    assert daemon.ready()[0] is False  # not ready before the first cycle
    daemon.cycle()
    assert daemon.last_outcome == label
    assert daemon.ready()[0] is ready
    value = daemon.metrics.registry.get_sample_value("poller_cycles_total", {"outcome": label})
    assert value == 1


def test_readiness_expires_after_three_intervals(monkeypatch: pytest.MonkeyPatch):
    daemon, now = make_daemon(monkeypatch, None)
    daemon.cycle()
    now[0] = T0 + timedelta(seconds=3 * 300 + 60)
    assert daemon.ready()[0] is True
    now[0] += timedelta(seconds=1)
    ok, state = daemon.ready()
    assert ok is False and state["last_outcome"] == "ok"


def test_a_stopped_daemon_runs_no_more_cycles(monkeypatch: pytest.MonkeyPatch):
    daemon, _ = make_daemon(monkeypatch, None)
    daemon.runtime.stop.set()
    daemon.cycle()
    assert daemon.last_outcome is None


def test_healthz_fails_when_nothing_progresses_for_the_stall_bound(
    monkeypatch: pytest.MonkeyPatch,
):
    """interval 300 + longest request (600 retry span + 120 deadline + 61 budget) + 60."""
    daemon, now = make_daemon(monkeypatch, None)
    assert daemon.stall_after == timedelta(seconds=300 + 600 + 120 + 61 + 60)
    assert daemon.alive()[0] is True
    daemon.cycle()
    now[0] = T0 + daemon.stall_after
    assert daemon.alive()[0] is True
    now[0] += timedelta(seconds=1)  # a cycle hung, or the scheduler stopped scheduling
    ok, state = daemon.alive()
    assert ok is False and state["stall_after_s"] == 1141
    daemon.page(Summary(mode="run", run_id="r"))  # any page read or commit brings it back
    assert daemon.alive()[0] is True


def test_healthz_turns_red_after_five_failed_cycles_in_a_row_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
):
    """Failing cycles are not progress, even if each reads a page before it fails."""
    daemon, now = make_daemon(monkeypatch, ApiAuthError("Threat Stack rejected (401)"))
    for n in range(1, FAILURES_BEFORE_RED):
        daemon.cycle()
        now.pass_time(timedelta(seconds=300))
        assert daemon.alive()[0] is True, n
    daemon.cycle()
    ok, state = daemon.alive()
    assert ok is False
    assert state["reason"] == "5 cycles in a row failed; the last: Threat Stack rejected (401)"
    ready, why = daemon.ready()
    assert ready is False and why["last_error"] == "Threat Stack rejected (401)"
    failures = daemon.metrics.registry.get_sample_value("poller_failed_cycles_in_a_row")
    assert failures == FAILURES_BEFORE_RED
    # poller status (another process) reads why from the bucket.
    record = FailureRecord(daemon.runtime.store, Layout()).read()
    assert record is not None
    assert record["failed_cycles_in_a_row"] == FAILURES_BEFORE_RED == record["red_after"]
    assert record["last_error"] == "Threat Stack rejected (401)"
    assert record["last_outcome"] == "failed" and record["run_id"] == "r"
    text = render_text(render_status({"bucket": "b", "daemon": record}, now.wall))
    assert "5 cycles in a row failed" in text and "Threat Stack rejected (401)" in text


def test_cycles_that_commit_chunks_before_their_deadline_are_progress_not_failures(
    monkeypatch: pytest.MonkeyPatch,
):
    """A catch-up that commits chunks and then runs past its deadline, cycle after cycle,
    moves the watermark each time: /healthz stays green; the error is still shown."""
    daemon, now = make_daemon(monkeypatch, None)
    deadline = CycleTimeout("the cycle ran past its deadline of 270s")

    def committing_then_late(_runtime: Any, summary: Any, observer: Any) -> Any:
        summary.chunks_total, summary.chunks_done = 5, 2  # two of a catch-up's five days
        observer.committed(summary, 2)
        raise deadline

    monkeypatch.setattr(scheduler, "run_cycle", committing_then_late)
    for _ in range(2 * FAILURES_BEFORE_RED):
        daemon.cycle()
        now.pass_time(timedelta(seconds=300))
    assert daemon.alive()[0] is True
    assert daemon.failures_in_a_row == 0 and daemon.last_error == str(deadline)
    assert daemon.last_outcome == "failed"


def test_cycles_that_fail_after_their_whole_walk_count_as_failures(
    monkeypatch: pytest.MonkeyPatch,
):
    """A cycle that commits its whole live window and then fails (its revisit, on an
    unreadable revisit.json, say), again and again, is not progress enough: the failures
    count and /healthz turns red after the documented number (brk19d)."""
    daemon, now = make_daemon(monkeypatch, None)

    def whole_walk_then_failing(_runtime: Any, summary: Any, observer: Any) -> Any:
        summary.chunks_total = summary.chunks_done = 1
        observer.committed(summary, 1)
        raise UnreadableState("revisit.json is unreadable")

    monkeypatch.setattr(scheduler, "run_cycle", whole_walk_then_failing)
    for _ in range(FAILURES_BEFORE_RED):
        daemon.cycle()
        now.pass_time(timedelta(seconds=300))
    assert daemon.failures_in_a_row == FAILURES_BEFORE_RED
    alive, why = daemon.alive()
    assert alive is False and "revisit.json is unreadable" in str(why)


def test_a_good_cycle_after_failures_clears_the_record_and_a_healthy_daemon_writes_none(
    monkeypatch: pytest.MonkeyPatch,
):
    daemon, _ = make_daemon(monkeypatch, None)
    for _ in range(3):
        daemon.cycle()
    assert FailureRecord(daemon.runtime.store, Layout()).read() is None  # nothing written
    failing, _ = make_daemon(monkeypatch, ApiAuthError("Threat Stack rejected (401)"))
    failing.cycle()
    monkeypatch.setattr(scheduler, "run_cycle", lambda _r, summary, _o: summary)
    failing.cycle()
    record = FailureRecord(failing.runtime.store, Layout()).read()
    assert record is not None
    assert record["failed_cycles_in_a_row"] == 0 and record["last_outcome"] == "ok"


@pytest.mark.parametrize("step", [timedelta(hours=-1), timedelta(hours=1)])
def test_the_daemon_keeps_its_cadence_and_health_when_the_wall_clock_steps(
    monkeypatch: pytest.MonkeyPatch, step: timedelta
):
    """The wall clock steps an hour back (or forward) after the second cycle: cycles go on
    every interval of monotonic time, and /healthz stays green (progress is real)."""
    daemon, now = make_daemon(monkeypatch, None)
    starts: list[float] = []
    health: list[bool] = []
    original = daemon.cycle

    def cycle() -> None:
        starts.append(now.mono)
        health.append(daemon.alive()[0])
        original()
        now.pass_time(timedelta(seconds=20))  # the cycle's own work
        if len(starts) == 2:
            now.wall += step  # NTP, a resumed VM, a manual fix
        if len(starts) == 6:
            daemon.runtime.stop.set()

    def wait(seconds: float) -> bool:
        now.pass_time(timedelta(seconds=seconds))
        health.append(daemon.alive()[0])
        return daemon.runtime.stop.is_set()

    daemon.cycle = cycle  # type: ignore[method-assign]
    daemon.loop(wait)
    assert [b - a for a, b in itertools.pairwise(starts)] == [300.0] * 5
    assert all(health)
    assert daemon.ready()[0] is True
