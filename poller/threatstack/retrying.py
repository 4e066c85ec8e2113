"""One retry policy for every Threat Stack request, built on tenacity.

Retries wrap a single request, never a whole cycle: the next cycle is the outer retry.
``sleep`` is injected, so tests record waits instead of waiting and the daemon can make
backoff interruptible.
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

# tenacity 9.0-9.1 call the first wait ``initial``; 9.2 renamed it ``multiplier`` and
# deprecated the old name. Both are within our floor, so ask the installed version.
_FIRST_WAIT = (
    "multiplier"
    if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters
    else "initial"
)


class WaitForServer(tenacity.wait.wait_base):
    """A 429 waits as the response says; anything else uses the fallback backoff."""

    def __init__(self, fallback: tenacity.wait.wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = self.fallback(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, RateLimited):
            if error.retry_after is not None:
                return error.retry_after + min(backoff, 1.0) * 0.1  # tiny jitter
            return max(backoff, MIN_RATE_LIMIT_WAIT)
        return backoff


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    max_delay_seconds: float = 600.0
    initial_backoff: float = 1.0
    max_backoff: float = 60.0

    def call(self, fn: Callable[[], T], sleep: Callable[[float], None], what: str) -> T:
        """Run ``fn``, retrying RetriableError; the last error propagates as it is."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetriableError),
            stop=tenacity.stop_after_attempt(self.max_attempts)
            | tenacity.stop_after_delay(self.max_delay_seconds),
            wait=WaitForServer(
                tenacity.wait_exponential_jitter(
                    **{_FIRST_WAIT: self.initial_backoff},
                    max=self.max_backoff,
                    jitter=self.initial_backoff,
                )
            ),
            sleep=sleep,
            reraise=True,
            before_sleep=lambda state: _log_retry(state, what),
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
