"""One retry policy for every Threat Stack request, built on tenacity.

Retries wrap a single request, never a whole cycle: the next cycle is the outer retry.
``sleep`` is injected, so tests record waits instead of waiting and the daemon can make
backoff interruptible.

A 429 is "wait", not a failed attempt: it does not count towards ``max_attempts``, only
towards the request's deadline (``max_delay_seconds``), and its waits have a floor that
doubles with each 429 in a row (a reset of a few milliseconds, or one given in seconds
where milliseconds are expected, must not burn the attempts in a fraction of a second).
The deadline is measured on what was waited as well as on the monotonic clock, so it
holds with an injected sleep too.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from poller.errors import RateLimited, RetriableError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A 429 without usable headers waits at least this long (threatstack-api.md §4.2).
MIN_RATE_LIMIT_WAIT = 5.0
# Any wait after a 429 is at least this, doubled for each 429 in a row (capped at the
# policy's max_backoff): whatever the reset header says, a storm of 429s slows us down.
RATE_LIMIT_FLOOR = 1.0

# tenacity 9.0-9.1 call the first wait ``initial``; 9.2 renamed it ``multiplier`` and
# deprecated the old name. Both are within our floor, so ask the installed version.
_FIRST_WAIT = (
    "multiplier"
    if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters
    else "initial"
)


class WaitForServer(tenacity.wait.wait_base):
    """A 429 waits as the response says; anything else uses the fallback backoff."""

    def __init__(self, fallback: tenacity.wait.wait_base, ceiling: float = 60.0) -> None:
        self.fallback = fallback
        self.ceiling = ceiling
        self.limited_in_a_row = 0

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = float(self.fallback(retry_state))
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if not isinstance(error, RateLimited):
            self.limited_in_a_row = 0
            return backoff
        self.limited_in_a_row += 1
        floor = min(RATE_LIMIT_FLOOR * 2.0 ** (self.limited_in_a_row - 1), self.ceiling)
        if error.retry_after is not None:
            return max(error.retry_after, floor) + min(backoff, 1.0) * 0.1  # tiny jitter
        return max(backoff, floor, MIN_RATE_LIMIT_WAIT)


class StopAtDeadline(tenacity.stop.stop_base):
    """Stop after ``max_attempts`` failed attempts (429s not counted) or when the request's
    deadline has passed, measured as the longer of the time elapsed and the time waited."""

    def __init__(self, max_attempts: int, deadline_seconds: float) -> None:
        self.max_attempts = max_attempts
        self.deadline_seconds = deadline_seconds
        self.failures = 0
        self.waited = 0.0

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if not isinstance(error, RateLimited):
            self.failures += 1
        elapsed = max(retry_state.seconds_since_start or 0.0, self.waited)
        return self.failures >= self.max_attempts or elapsed >= self.deadline_seconds


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    max_delay_seconds: float = 600.0
    initial_backoff: float = 1.0
    max_backoff: float = 60.0

    def call(self, fn: Callable[[], T], sleep: Callable[[float], None], what: str) -> T:
        """Run ``fn``, retrying RetriableError; the last error propagates as it is."""
        stop = StopAtDeadline(self.max_attempts, self.max_delay_seconds)

        def waited(state: tenacity.RetryCallState) -> None:
            stop.waited += state.next_action.sleep if state.next_action is not None else 0.0
            _log_retry(state, what)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetriableError),
            stop=stop,
            wait=WaitForServer(
                tenacity.wait_exponential_jitter(
                    **{_FIRST_WAIT: self.initial_backoff},
                    max=self.max_backoff,
                    jitter=self.initial_backoff,
                ),
                self.max_backoff,
            ),
            sleep=sleep,
            reraise=True,
            before_sleep=waited,
        )
        return retrying(fn)


def _log_retry(state: tenacity.RetryCallState, what: str) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning(
        "retrying",
        extra={
            "fields": {
                "what": what,
                "attempt": state.attempt_number,
                "wait_s": round(wait, 3),
                "error": str(error),
                "error_type": type(error).__name__,
            }
        },
    )
