"""Break-it review of issue 17 (one budget per prefix), sixth round: odd ledger content never
crashes a request, and a wall clock stepped back does not let two budgets out in a minute."""

from __future__ import annotations

from test_shared_budget import LEDGER, T0, most_in_any_minute

from poller.archive.allowance import PrefixAllowance
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.threatstack.budget import RequestBudget


def test_a_ledger_with_an_integer_too_large_for_a_float_does_not_crash_every_request():
    """``_grants`` says it never raises (malformed entries are dropped), and SPEC *Bad input*:
    nothing odd crashes a run. A hand-edited (or corrupted) ledger whose grant is dated with a
    400-digit integer (valid JSON; ``isinstance(x, int)`` passes) raises OverflowError in
    ``float(entry[0])``: every Threat Stack request of every process on the prefix fails
    until someone deletes the ledger."""
    store = MemoryObjectStore()
    store.put(LEDGER, b'{"version": 1, "grants": [[' + b"1" * 400 + b', 1, "x"]]}')
    run = PrefixAllowance(store, Layout("p"), 20, "run", lambda: T0, lambda _: None)
    run.take()  # OverflowError: int too large to convert to float


def test_a_deeply_nested_ledger_does_not_crash_every_request():
    """Same promise: a ledger of nested arrays (valid JSON) makes ``json.loads`` raise
    RecursionError, which ``_grants`` does not catch (it catches ValueError only)."""
    store = MemoryObjectStore()
    store.put(LEDGER, b'{"version": 1, "grants": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    run = PrefixAllowance(store, Layout("p"), 20, "run", lambda: T0, lambda _: None)
    run.take()  # RecursionError


def _two_processes_on_one_host_across_a_step(behind: float, step: float) -> list[float]:
    """Process A sends its whole budget (20) and exits cleanly; the host's wall clock (``behind``
    seconds off the real time) then steps by ``step``; process B on the same host sends 20.
    Returns the real (monotonic) send times of both."""
    real = [0.0]
    offset = [behind]

    def wall() -> float:
        return T0 + real[0] + offset[0]

    def mono() -> float:
        return real[0]

    def sleep(seconds: float) -> None:
        real[0] += seconds

    store = MemoryObjectStore()
    sent: list[float] = []

    def process(name: str) -> tuple[RequestBudget, PrefixAllowance]:
        shared = PrefixAllowance(store, Layout("p"), 20, name, wall, sleep, clock=mono)
        return RequestBudget(20, clock=mono, sleep=sleep, wall=wall, shared=shared), shared

    a_budget, a_shared = process("A")
    for _ in range(20):
        a_budget.acquire()
        sent.append(real[0])
        real[0] += 0.1
    a_shared.give_back()
    offset[0] += step
    b_budget, _ = process("B")
    for _ in range(20):
        b_budget.acquire()
        sent.append(real[0])
        real[0] += 0.1
    return sent


def test_a_wall_clock_stepped_back_past_70_s_does_not_let_two_processes_send_two_budgets():
    """Same promise, the other way: the host's clock steps back 90 s (a manual fix, a VM
    resumed with a stale clock). The first process's grants are now dated more than
    FUTURE_SECONDS ahead and the second process *drops* them from the ledger
    (``budget.grant_from_the_future``) instead of counting them for at most their horizon:
    40 requests within 4 s at a budget of 20. Counting such a grant as if dated now (at most
    HORIZON_SECONDS) would keep both the budget and the no-hour-stall promise of
    test_break17."""
    sent = _two_processes_on_one_host_across_a_step(behind=0.0, step=-90.0)
    assert most_in_any_minute(sent) <= 20
