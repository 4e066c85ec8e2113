"""Break-it review of issue 17 (one budget per prefix), fifth round: a slow ledger write or
store proof must not move a grant's slots past what the ledger records, and a process held to a
smaller budget must still send."""

from __future__ import annotations

from typing import Any

from test_shared_budget import World, most_in_any_minute

from poller.archive.allowance import PrefixAllowance
from poller.archive.records import Layout


class SlowPut:
    """The shared bucket, seen by one process whose PUTs take ``seconds`` (S3 retries)."""

    def __init__(self, world: World, seconds: float) -> None:
        self._world, self._seconds = world, seconds

    def get(self, key: str) -> Any:
        return self._world.store.get(key)

    def put(self, key: str, body: bytes, **kwargs: Any) -> Any:
        self._world.now += self._seconds  # the write lands this much later
        return self._world.store.put(key, body, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._world.store, name)


def test_a_slow_ledger_write_lets_two_processes_send_over_the_budget_in_a_minute():
    """README/allowance: no 60 s window holds more than the budget of all processes. A
    grant is dated by the wall time read before its GET and PUT, but its 10 s are counted on
    the monotonic clock from after the PUT: with a PUT that takes 3 s, its slots go out up
    to 3 s after the moment the ledger records, beyond the 1.5 s of margin and skew."""
    world = World()
    slow = PrefixAllowance(
        SlowPut(world, 3.0), Layout("p"), 100, "slow", lambda: world.now, world.sleep
    )
    fast = world.process("fast", 100)
    for _ in range(100):
        world.send(slow)
    slow.give_back()
    for _ in range(100):
        world.send(fast)
    assert most_in_any_minute(world.sent) <= 100


def test_a_larger_process_held_to_a_smaller_budget_is_not_starved_by_its_own_grant_size():
    """README: a process with a larger budget 'is held to' the smaller one while it is
    active. A busy process at 100 (grants grown to 10) waits for room for half its next
    grant (5); beside a process at 8 that sends 4 a minute (4 or 5 slots counted), the room is
    never more than 4: it sends nothing at all for ten minutes, though the minute has room."""
    world = World()
    big = world.process("big", 100)
    for _ in range(40):
        world.send(big)  # grants of 2, 8, 10, 10, 10: its next one is of 10
    world.now += 70.0  # its grants have aged out
    small = world.process("small", 8)
    for _ in range(4):  # 4 a minute: 4 or 5 slots counted, at most 4 of its 8 free
        world.send(small)
        world.now += 15.0
    world.now -= 14.5
    next_small = [world.now + 14.5]

    def sleep(seconds: float) -> None:  # the small process keeps sending meanwhile
        assert world.now - start < 600.0, "no request in ten minutes"
        end = world.now + seconds
        while next_small[0] <= end:
            world.now = max(world.now, next_small[0])
            world.send(small)
            next_small[0] += 15.0
        world.now = max(world.now, end)

    start = world.now
    big._sleep = sleep
    world.send(big)  # one request
    assert world.now - start < 115.0, f"waited {world.now - start:.0f} s"


def test_a_store_proof_before_the_first_grant_dates_that_grant_too_early():
    """The same clock read serves the store proof (``before_first_write``, S3 requests of its
    own) and the first grant: a proof that takes 20 s dates the grant 20 s before its slots
    go out, and another process finds the budget free 20 s too early."""
    world = World()

    def proof() -> None:
        world.now += 20.0

    first = PrefixAllowance(
        world.store, Layout("p"), 4, "first", lambda: world.now, world.sleep, proof
    )
    other = world.process("other", 4)
    world.send(first)  # its first grant: 1 slot (a tenth of 4)
    for _ in range(3):
        world.send(first)
    for _ in range(4):
        world.send(other)
    assert most_in_any_minute(world.sent) <= 4
