"""The daemon's readiness rule and its handling of each cycle outcome, with a fake cycle."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from poller.config import Settings
from poller.errors import ApiAuthError, LeaseHeld, Stopped
from poller.serving import daemon as scheduler
from poller.serving.daemon import Daemon
from poller.threatstack.budget import RequestBudget
from poller.walks.sync import Summary

T0 = datetime(2026, 11, 25, 12, tzinfo=UTC)


def make_daemon(
    monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None
) -> tuple[Daemon, list[datetime]]:
    now = [T0]
    runtime: Any = SimpleNamespace(
        settings=Settings(), stop=threading.Event(), run_id="r", budget=RequestBudget(100)
    )

    def fake_cycle(_runtime: Any, summary: Any, observer: Any) -> Any:
        observer.page(summary)
        if outcome is not None:
            raise outcome
        summary.archived, summary.watermark = 3, "2026-11-25T11:59:00Z"
        return summary

    monkeypatch.setattr(scheduler, "run_cycle", fake_cycle)
    return Daemon(runtime, lambda: now[0]), now


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
