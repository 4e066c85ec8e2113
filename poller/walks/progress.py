"""How far a walk has come and how long it still needs: for log events and progress bars.

The estimate accounts for the request budget: every chunk costs at least one list request per
status, so the rest of a walk can never take less than ``remaining chunks x statuses x 60 /
requests_per_minute`` seconds, however fast the first chunks went (a year at 100 requests a
minute is at least 7.3 hours with both statuses).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from poller.walks.sync import CycleObserver, Summary

log = logging.getLogger(__name__)


class Pace:
    """Rate and estimated time left of a walk, from its own progress and the budget."""

    def __init__(
        self, seconds_per_chunk_floor: float, monotonic: Callable[[], float] = time.monotonic
    ):
        self.floor = seconds_per_chunk_floor
        self._monotonic = monotonic
        self._started = monotonic()
        self.total = 0

    def start(self, total: int) -> None:
        self._started = self._monotonic()
        self.total = total

    def elapsed(self) -> float:
        return self._monotonic() - self._started

    def alerts_per_second(self, summary: Summary) -> float:
        return summary.listed / max(self.elapsed(), 1e-9)

    def eta_seconds(self, summary: Summary) -> float:
        worked = summary.chunks_done
        remaining = max(self.total - summary.chunks_done - summary.chunks_skipped, 0)
        observed = self.elapsed() / worked if worked else 0.0
        return remaining * max(observed, self.floor)


def minimum_seconds(chunks: int, statuses: int, requests_per_minute: int) -> float:
    """The least time ``chunks`` take at the budget: one list request per chunk and status."""
    return chunks * statuses * 60.0 / requests_per_minute


class ProgressLog:
    """A ``walk.progress`` log event at a steady cadence (not per page: a year is thousands)."""

    def __init__(self, pace: Pace, every_seconds: float) -> None:
        self._pace = pace
        self._every = every_seconds
        self._last = float("-inf")

    def started(self, summary: Summary, chunk_count: int) -> None:
        self._pace.start(chunk_count)
        self._last = self._pace.elapsed()

    def page(self, summary: Summary) -> None:
        self._maybe_log(summary)

    def committed(self, summary: Summary, chunks_done: int) -> None:
        self._maybe_log(summary, final=chunks_done == self._pace.total)

    def _maybe_log(self, summary: Summary, final: bool = False) -> None:
        now = self._pace.elapsed()
        if not final and now - self._last < self._every:
            return
        self._last = now
        log.info(
            "walk.progress",
            extra={
                "fields": {
                    "mode": summary.mode,
                    "chunks_total": self._pace.total,
                    "chunks_done": summary.chunks_done,
                    "chunks_skipped": summary.chunks_skipped,
                    "listed": summary.listed,
                    "archived": summary.archived,
                    "alerts_per_s": round(self._pace.alerts_per_second(summary), 1),
                    "eta_s": round(self._pace.eta_seconds(summary)),
                }
            },
        )


class Observers:
    """Several observers as one."""

    def __init__(self, *observers: CycleObserver) -> None:
        self._observers = observers

    def started(self, summary: Summary, chunk_count: int) -> None:
        for observer in self._observers:
            observer.started(summary, chunk_count)

    def page(self, summary: Summary) -> None:
        for observer in self._observers:
            observer.page(summary)

    def committed(self, summary: Summary, chunks_done: int) -> None:
        for observer in self._observers:
            observer.committed(summary, chunks_done)
