"""The client-side request budget: one per process, shared by every Threat Stack call.

A sliding window: never more than ``per_minute`` requests start in any 60-second window
(plus a small margin, so the server, which counts arrivals, sees the same). The server's
own hints (``x-rate-limit-remaining`` / ``x-rate-limit-reset`` in ms, ``Retry-After``) can
only make it slower, and every wait is clamped to [0, window + margin].

The budget belongs to the prefix, not the process (SPEC, *A good API citizen*): when
``shared`` is given, every request also takes a slot from it, and that allowance is what
every process on the same bucket and prefix shares (``poller.app`` builds it on the bucket
side; this side knows only the ``SharedAllowance`` protocol).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

WINDOW_SECONDS = 60.0
# Requests are timed when they leave; the server times them when they arrive. A margin
# covers the difference in network delay between two requests 60 s apart.
MARGIN_SECONDS = 0.5
# When the server says this few requests remain, honour its reset time before going on.
LOW_REMAINING = 2


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def clamp_wait(seconds: float | None, ceiling: float = WINDOW_SECONDS + MARGIN_SECONDS) -> float:
    """Any wait derived from the server is bounded: never negative, never unbounded."""
    if seconds is None:
        return 0.0
    return min(max(seconds, 0.0), ceiling)


class SharedAllowance(Protocol):
    """Request slots shared with the other processes working on the same prefix."""

    def take(self) -> None:
        """Block until one more request may start, by every process's count, and count it."""

    @property
    def unavailable(self) -> str | None:
        """Why sharing is off (the bucket refused the ledger), or None while it works."""


class RequestBudget:
    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
        shared: SharedAllowance | None = None,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._started: deque[float] = deque()
        self._not_before = 0.0
        self._lock = threading.Lock()
        self.shared = shared
        self._sent = 0

    @property
    def sent(self) -> int:
        """Requests this process has let through so far (every attempt, retries included);
        requests inherited from an earlier process are not counted here."""
        return self._sent

    def next_wait(self) -> float:
        """Seconds to wait before the next request may start (0 when it may start now)."""
        now = self._clock()
        horizon = WINDOW_SECONDS + MARGIN_SECONDS
        while self._started and self._started[0] <= now - horizon:
            self._started.popleft()
        wait = 0.0
        if len(self._started) >= self.per_minute:
            wait = self._started[0] + horizon - now
        return clamp_wait(max(wait, self._not_before - now))

    def acquire(self) -> None:
        """Block until a request may start, then count it (here, and in ``shared``)."""
        while True:
            with self._lock:
                wait = self.next_wait()
                # Without a shared ledger (none, or the bucket refused it) the local window
                # decides alone: checked and counted under one lock, so threads cannot
                # all pass the check before any is counted.
                alone = self.shared is None or self.shared.unavailable is not None
                if wait <= 0 and alone:
                    self._started.append(self._clock())
                    self._sent += 1
                    return
            if wait > 0:
                self._sleep(wait)
                continue
            # The prefix's slot is taken last, so the request leaves right after it is
            # granted; it is counted here from then on.
            assert self.shared is not None
            self.shared.take()
            with self._lock:
                if self.shared.unavailable is not None and self.next_wait() > 0:
                    continue  # sharing was just turned off: the local window decides
                self._started.append(self._clock())
                self._sent += 1
                return

    def recent(self) -> list[float]:
        """Wall-clock (epoch) start times of the requests still inside the window, for the
        next process that takes its turn (carried in the lease document)."""
        with self._lock:
            now, wall = self._clock(), self._wall()
            horizon = now - WINDOW_SECONDS - MARGIN_SECONDS
            starts = [t for t in self._started if t > horizon][-self.per_minute :]
        return [round(wall - (now - t), 3) for t in starts]

    def inherit(self, starts: list[float]) -> None:
        """Count requests an earlier process started (epoch times): a process that takes its
        turn right after another must not send a second budget within the same minute."""
        with self._lock:
            now, wall = self._clock(), self._wall()
            carried = [
                now - max(wall - float(t), 0.0)
                for t in starts
                if isinstance(t, (int, float)) and not isinstance(t, bool)
            ]
            self._started = deque(sorted([*carried, *self._started]))

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from the server's rate-limit headers (any response, 429 or not)."""
        remaining = _number(headers.get("x-rate-limit-remaining"))
        reset_ms = _number(headers.get("x-rate-limit-reset"))
        if remaining is not None and remaining <= LOW_REMAINING and reset_ms is not None:
            self.pause(reset_ms / 1000.0)

    def pause(self, seconds: float) -> None:
        """Hold every request back for ``seconds`` (bounded), e.g. after a 429."""
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + clamp_wait(seconds))


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """How long a 429 asks us to wait: ``Retry-After`` (seconds) wins over ``x-rate-limit-reset``
    (milliseconds until the window resets). None when the response says nothing usable."""
    retry_after = _number(headers.get("Retry-After"))
    if retry_after is not None:
        return clamp_wait(retry_after)
    reset_ms = _number(headers.get("x-rate-limit-reset"))
    if reset_ms is not None:
        return clamp_wait(reset_ms / 1000.0)
    return None
