"""The request budget and the retry decisions, with an injected clock and sleep."""

from __future__ import annotations

import contextlib
import time

import pytest

from poller.errors import (
    ApiAuthError,
    ApiUnavailable,
    MalformedResponse,
    RateLimited,
)
from poller.threatstack.budget import (
    MARGIN_SECONDS,
    WINDOW_SECONDS,
    RequestBudget,
    retry_after_seconds,
)
from poller.threatstack.retrying import MIN_RATE_LIMIT_WAIT, RetryPolicy


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def test_budget_never_starts_more_than_n_in_any_window():
    fake = FakeTime()
    budget = RequestBudget(5, clock=fake.clock, sleep=fake.sleep)
    starts = []
    for _ in range(23):
        budget.acquire()
        starts.append(fake.now)
        fake.now += 0.01
    for i, start in enumerate(starts):
        in_window = [s for s in starts[i:] if s < start + WINDOW_SECONDS]
        assert len(in_window) <= 5
    assert len(fake.sleeps) == 4  # one wait per exhausted window, no busy loop


@pytest.mark.parametrize(
    ("headers", "expected_wait"),
    [
        ({"x-rate-limit-remaining": "100", "x-rate-limit-reset": "30000"}, 0.0),
        ({"x-rate-limit-remaining": "2", "x-rate-limit-reset": "4500"}, 4.5),
        ({"x-rate-limit-remaining": "0", "x-rate-limit-reset": "-500"}, 0.0),  # never negative
        (
            {"x-rate-limit-remaining": "0", "x-rate-limit-reset": "9999999999"},
            WINDOW_SECONDS + MARGIN_SECONDS,
        ),  # never unbounded
        ({"x-rate-limit-remaining": "0", "x-rate-limit-reset": "nan"}, 0.0),
        ({"x-rate-limit-remaining": "zero", "x-rate-limit-reset": "1000"}, 0.0),
        ({}, 0.0),
    ],
)
def test_budget_slows_down_when_the_server_says_little_remains(
    headers: dict[str, str], expected_wait: float
):
    fake = FakeTime()
    budget = RequestBudget(100, clock=fake.clock, sleep=fake.sleep)
    budget.observe(headers)
    assert budget.next_wait() == pytest.approx(expected_wait)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "7", "x-rate-limit-reset": "2000"}, 7.0),  # Retry-After wins
        ({"x-rate-limit-reset": "2500"}, 2.5),
        ({"x-rate-limit-reset": "-1"}, 0.0),
        ({"x-rate-limit-reset": "99999999"}, WINDOW_SECONDS + MARGIN_SECONDS),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # unusable date: backoff
        ({}, None),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None):
    assert retry_after_seconds(headers) == (None if expected is None else pytest.approx(expected))


def failing(errors: list[Exception], result: str = "ok"):
    calls = []

    def call() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return call, calls


@pytest.mark.parametrize(
    ("errors", "calls_expected", "raises"),
    [
        ([ApiUnavailable("503"), ApiUnavailable("timeout")], 3, None),
        ([MalformedResponse("cut short")], 2, None),
        ([ApiAuthError("401")], 1, ApiAuthError),  # never retried
        ([ApiUnavailable("503")] * 8, 8, ApiUnavailable),  # gives up after max_attempts
    ],
)
def test_retry_decisions(errors: list[Exception], calls_expected: int, raises: type | None):
    fake = FakeTime()
    call, calls = failing(list(errors))
    policy = RetryPolicy(max_attempts=8)
    if raises:
        with pytest.raises(raises):
            policy.call(call, fake.sleep, "GET /x")
    else:
        assert policy.call(call, fake.sleep, "GET /x") == "ok"
    assert len(calls) == calls_expected
    assert len(fake.sleeps) == calls_expected - 1


def test_backoff_is_exponential_with_jitter_and_capped():
    fake = FakeTime()
    call, _ = failing([ApiUnavailable("503")] * 7)
    RetryPolicy(max_attempts=8, initial_backoff=1, max_backoff=20).call(call, fake.sleep, "x")
    assert len(fake.sleeps) == 7
    for attempt, wait in enumerate(fake.sleeps):
        base = min(2**attempt, 20)
        assert min(base, 20) <= wait <= min(base + 1, 20) + 1e-9
    assert fake.sleeps[-1] <= 20


def test_429_waits_as_the_response_says():
    fake = FakeTime()
    call, _ = failing([RateLimited("429", retry_after=12.5), RateLimited("429", None)])
    RetryPolicy().call(call, fake.sleep, "x")
    assert 12.5 <= fake.sleeps[0] < 12.7
    assert fake.sleeps[1] >= MIN_RATE_LIMIT_WAIT


def test_a_process_taking_its_turn_counts_the_last_ones_requests():
    """Two processes, their monotonic clocks unrelated, one wall clock: the second inherits
    the first's request times and together they never exceed the budget in any window."""
    wall = [5_000_000.0]
    first_time, second_time = FakeTime(), FakeTime()
    second_time.now = 77.0  # another process: another monotonic origin

    def first_wall() -> float:
        return wall[0] + (first_time.now - 1000.0)

    first = RequestBudget(5, clock=first_time.clock, sleep=first_time.sleep, wall=first_wall)
    starts = []
    for _ in range(4):
        first.acquire()
        starts.append(first_wall())
        first_time.now += 1.0
    carried = first.recent()
    assert carried == [round(s, 3) for s in starts]

    handover = first_wall() + 2.0  # the next run starts two seconds later
    second = RequestBudget(
        5,
        clock=second_time.clock,
        sleep=second_time.sleep,
        wall=lambda: handover + (second_time.now - 77.0),
    )
    second.inherit(carried)
    for _ in range(3):
        second.acquire()
        starts.append(handover + (second_time.now - 77.0))
    for i, start in enumerate(starts):
        assert len([s for s in starts[i:] if s < start + WINDOW_SECONDS]) <= 5
    # The 6th request overall waited for the first one to leave the window.
    assert second_time.sleeps and starts[-1] >= starts[1] + WINDOW_SECONDS
    # Each process counts the requests it sent itself, not the ones it inherited.
    assert (first.sent, second.sent) == (4, 3)


def test_inherit_ignores_what_is_not_a_time():
    budget = RequestBudget(5)
    budget.inherit(["x", None, True, 1.5e9])  # type: ignore[list-item]
    assert budget.next_wait() == 0


def test_threads_never_pass_the_local_window_together_when_the_ledger_is_refused():
    """The bucket refused the shared ledger (a read-only role): the process keeps to its own
    budget. Twenty threads asking at once at a budget of 5: exactly five start, the rest
    wait; the check and the count were apart, so all twenty went out (brk19d)."""
    import threading

    class Refused:
        unavailable = "AccessDenied on _poller/budget.json"

        def take(self) -> None:
            time.sleep(0.01)  # the other threads run between the check and the count

    class Waits(Exception):
        pass

    def sleep(_seconds: float) -> None:
        raise Waits()

    budget = RequestBudget(5, clock=lambda: 100.0, sleep=sleep, shared=Refused())
    started: list[int] = []
    together = threading.Barrier(20)

    def ask(n: int) -> None:
        together.wait()
        with contextlib.suppress(Waits):
            budget.acquire()
            started.append(n)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(started) == 5
