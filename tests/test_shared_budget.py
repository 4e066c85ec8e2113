"""One request budget per prefix (SPEC, A good API citizen): every process on the same
bucket and prefix takes its requests from one ledger, so together they never send more than
``threatstack.requests_per_minute`` in any 60 s. Counted at the simulator."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import boto3
import pytest
from conftest import ROOT, MotoServer, poller_env, run_poller, summary_of
from moto import mock_aws

from poller.archive.allowance import (
    COUNTED_SECONDS,
    GRANT_SECONDS,
    HORIZON_SECONDS,
    PrefixAllowance,
    grant_size,
)
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore, ObjectStore, S3ObjectStore
from poller.errors import ArchiveAccessError
from poller.simulator import Simulator
from poller.timeutil import utc_now


def most_in_any_minute(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 60.0:
            start += 1
        best = max(best, end - start + 1)
    return best


T0 = 1_764_000_000.0
LEDGER = "p/_poller/budget.json"


class World:
    """A virtual wall clock shared by every process (a wait moves it for all), one bucket."""

    def __init__(self, store: ObjectStore | None = None) -> None:
        self.now = T0
        self.store = store if store is not None else MemoryObjectStore()
        self.sent: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def process(self, name: str, per_minute: int = 100) -> PrefixAllowance:
        return PrefixAllowance(
            self.store, Layout("p"), per_minute, name, lambda: self.now, self.sleep
        )

    def send(self, allowance: PrefixAllowance) -> None:
        allowance.take()
        self.sent.append(self.now)

    def booked(self) -> int:
        """Slots the ledger counts now, every process's."""
        found = self.store.get(LEDGER)
        grants = json.loads(found.body)["grants"] if found is not None else []
        return sum(
            g[1]
            for g in grants
            if (g[3] if len(g) > 3 else g[0] + GRANT_SECONDS) > self.now - COUNTED_SECONDS
        )


def backfill_and_verify(env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """``poller backfill`` and ``poller verify`` over the last 3 days, started together."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "poller", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for args in (["backfill", "--since", "3d"], ["verify", "--since", "3d"])
    ]


def test_a_process_sending_every_few_seconds_books_about_what_it_uses():
    """One request every 5 s at a budget of 100 (12 a minute): the ledger counts about those
    12 (at most 16), not a tenth of the budget per 10 s (50 when grants were fixed), so the
    rest of the budget stays for the other processes."""
    world = World()
    slow = world.process("slow")
    booked = []
    for n in range(120):  # ten minutes
        world.send(slow)
        if n >= 24:  # past the first two minutes
            booked.append(world.booked())
        world.now += 5.0
    in_a_minute = most_in_any_minute(world.sent)
    assert in_a_minute == 12
    # What it sent in the last 61.5 s (13), and the unused slots of its current grant (at
    # most 3: a grant sized to its pace).
    assert max(booked) <= 13 + 3
    # Another process finds the rest free: 80 requests at once, no wait (grants of 2, 8,
    # then 10; a process waits for room for half a grant rather than take slivers).
    other = world.process("other")
    before = world.now
    for _ in range(80):
        world.send(other)
    assert world.now == before
    assert most_in_any_minute(world.sent) <= 100


def test_a_clean_exit_gives_back_its_unused_slots_a_killed_process_does_not():
    """A run that sent 3 requests (grants of 2, then 8) gives back the 7 it did not use: the
    next process has 97 of the minute's 100 at once. A killed one leaves its grant counted
    until it runs out (HORIZON_SECONDS at most), and no more than that."""
    world = World()
    run = world.process("run")
    for _ in range(3):
        world.send(run)
    assert world.booked() == 2 + 8
    assert run.give_back() == 7 and run.given_back == 7
    assert world.booked() == 3
    assert run.give_back() == 0  # nothing left: no second write
    next_run = world.process("next")
    start = world.now
    for _ in range(97):
        world.send(next_run)
    assert world.now == start  # no wait: the 7 came back

    killed_world = World()
    killed = killed_world.process("killed")
    for _ in range(3):
        killed_world.send(killed)
    # Killed here: the 7 stay counted, then the whole budget is free again.
    survivor = killed_world.process("survivor")
    for _ in range(90):
        killed_world.send(survivor)
    assert killed_world.now == T0
    killed_world.send(survivor)  # the 91st waits for the dead grant to run out
    assert T0 < killed_world.now <= T0 + HORIZON_SECONDS + 0.1
    assert most_in_any_minute(killed_world.sent) <= 100


def test_a_wall_clock_step_neither_stretches_a_grant_nor_dates_its_use_back():
    """A grant is held 10 s by the monotonic clock; its last use is recorded as its start plus
    the monotonic time since, whatever the wall clock did meanwhile (stepped back a minute)."""
    wall, mono = [T0], [0.0]

    def sleep(seconds: float) -> None:
        wall[0] += seconds
        mono[0] += seconds

    store = MemoryObjectStore()
    run = PrefixAllowance(
        store, Layout("p"), 100, "run", lambda: wall[0], sleep, clock=lambda: mono[0]
    )
    run.take()  # a grant of 2 at T0
    wall[0] -= 60.0  # (a step past the skew hosts may have: test_api_budget_edges)
    mono[0] += 5.0
    run.take()  # its second slot, 5 s in
    run.take()  # a new grant, written at the stepped wall time; the first one settled
    found = store.get(LEDGER)
    assert found is not None
    first = json.loads(found.body)["grants"][0]
    assert first[:2] == [T0, 2] and first[3] == T0 + 5.0
    mono[0] += GRANT_SECONDS + 1  # the wall clock stands still: the grant ran out anyway
    run.take()
    assert run.grants == 3


def test_processes_coming_and_going_at_any_pace_never_exceed_the_budget_together():
    """Random processes at a budget of 30: bursts, slow senders, pauses, clean exits (they
    give back) and kills (they do not), for 20 virtual minutes. No 60-second window holds
    more than 30 requests, and the budget is used."""
    rng = random.Random(17)
    world = World()
    live = [world.process(f"p{n}", 30) for n in range(3)]
    born = 3
    while world.now < T0 + 1200:
        n = rng.randrange(len(live))
        action = rng.random()
        if action < 0.6:
            for _ in range(rng.choice((1, 1, 2, 5, 12))):
                world.send(live[n])
                world.now += 0.05
        elif action < 0.8:
            world.now += rng.choice((0.5, 3.0, 9.0, 15.0))
        else:
            if action < 0.9:
                live[n].give_back()  # a clean exit; else killed: its grant just stays
            live[n] = world.process(f"p{born}", 30)
            born += 1
    assert most_in_any_minute(world.sent) <= 30
    assert len(world.sent) >= 20 * 30 * 0.7


def test_processes_with_different_budgets_keep_to_the_smallest_while_it_is_active(
    caplog: pytest.LogCaptureFixture,
):
    """A backfill run with requests_per_minute 20 beside a daemon configured with 100 (one
    config edited, not the other): while both send, no 60 s holds more than 20 of them
    together; once the small one has been gone a minute, the daemon has its 100 again."""
    world = World()
    daemon, backfill = world.process("daemon", 100), world.process("backfill", 20)
    while world.now < T0 + 300:  # both busy for five virtual minutes
        for allowance in (daemon, backfill):
            world.send(allowance)
            world.now += 0.2
    together = list(world.sent)
    assert most_in_any_minute(together) <= 20
    assert "budget.smaller_elsewhere" in caplog.text
    backfill.give_back()  # a clean exit
    world.now += HORIZON_SECONDS
    world.sent.clear()
    while world.now < T0 + 600:
        world.send(daemon)
        world.now += 0.2
    assert 20 < most_in_any_minute(world.sent) <= 100


def test_a_smaller_budget_process_gets_its_turn_beside_a_busy_larger_one():
    """A backfill at 100/min is going; a verify set to 20/min starts beside it. It waits,
    but first announces its budget (a grant of no slots): the backfill is then held to 20,
    the ledger drains, and the verify gets its slot within about a minute and a quarter,
    instead of never while the backfill runs (brk19d)."""
    world = World()
    busy = world.process("backfill", 100)
    for _ in range(100):  # the backfill is going at its budget
        world.send(busy)
        world.now += 0.6
    waiting_since = world.now

    def sleep_while_backfill_runs(seconds: float) -> None:
        end = world.now + seconds  # meanwhile the backfill goes on at its pace
        while world.now < end:
            world.send(busy)
            world.now += 0.6
        assert world.now - waiting_since < 300, "the smaller budget never got a slot"

    small = PrefixAllowance(
        world.store, Layout("p"), 20, "verify", lambda: world.now, sleep_while_backfill_runs
    )
    small.take()
    assert world.now - waiting_since <= HORIZON_SECONDS + 5
    after = [t for t in world.sent if t >= waiting_since + HORIZON_SECONDS]
    assert most_in_any_minute(after) <= 20  # the backfill held to 20 once it knew


def test_what_the_ledger_costs_in_s3_requests():
    """Counted at the store: a process sending as fast as a budget of 100 allows for ten
    minutes pays about one GET and one PUT per 8 API requests (0.24 S3 requests per API
    request with fixed grants of 10; README, The request budget); an idle sync (two lists)
    pays one GET and one PUT, and nothing to give back."""
    world = World()
    busy = world.process("busy")
    while world.now < T0 + 600:
        world.send(busy)
        world.now += 0.01
    busy.give_back()
    assert most_in_any_minute(world.sent) <= 100
    assert len(world.sent) >= 900
    assert isinstance(world.store, MemoryObjectStore)
    assert world.store.requests / len(world.sent) <= 0.27
    assert grant_size(100) == 10

    idle = World()
    sync = idle.process("sync")
    idle.send(sync)
    idle.send(sync)
    assert sync.give_back() == 0
    assert isinstance(idle.store, MemoryObjectStore)
    assert idle.store.requests == 2


@mock_aws
def test_a_store_without_conditional_writes_shares_through_checked_writes():
    """s3.require_conditional_writes=false: the ledger is written as every other object is
    on such a store, its condition checked by a HEAD just before the PUT (not atomic; README,
    Stores without conditional writes); grants and give-backs work the same."""
    client: Any = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket="ledger")
    store = S3ObjectStore(client, "ledger", conditional_writes=False)
    world = World(store)
    run = world.process("run")
    for _ in range(3):
        world.send(run)
    assert run.grants == 2 and run.unavailable is None
    assert run.give_back() == 7
    assert world.booked() == 3
    other = world.process("other")
    for _ in range(97):
        world.send(other)
    assert world.now == T0 and most_in_any_minute(world.sent) <= 100


def test_processes_sharing_a_prefix_never_exceed_the_budget_together():
    """Three processes (their own allowance each, one bucket) take requests in turn for ten
    virtual minutes: never more than 20 in any 60 s, and the budget is used (no starvation)."""
    wall = [1_764_000_000.0]

    def sleep(seconds: float) -> None:
        wall[0] += seconds

    store = MemoryObjectStore()
    takers = [
        PrefixAllowance(store, Layout("p"), 20, f"run{n}", lambda: wall[0], sleep) for n in range(3)
    ]
    sent: list[float] = []
    per_taker = [0, 0, 0]
    while wall[0] < 1_764_000_600.0:
        for n, taker in enumerate(takers):
            taker.take()
            sent.append(wall[0])
            per_taker[n] += 1
            wall[0] += 0.2  # the request itself
    assert most_in_any_minute(sent) <= 20
    assert len(sent) >= 20 * 600 / HORIZON_SECONDS - 20
    assert min(per_taker) >= len(sent) // 4  # each process gets its turn
    grants = sum(t.grants for t in takers)
    # A grant is at most 2 at a budget of 20; three processes contending for what frees up
    # take some of one.
    assert len(sent) / 2 <= grants <= 0.6 * len(sent)


@pytest.mark.integration
def test_backfill_and_verify_together_stay_within_one_budget(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """Started together with a budget of 20, each with far more than 20 pages to read (they
    sent 38 in their first minute when each process had its own budget): the simulator sees
    at most 20 before the first minute is over."""
    with Simulator(seed=11, page_size=2) as sim:
        now = utc_now()
        sim.generate(120, now - timedelta(days=2), now - timedelta(hours=1))
        env = poller_env(sim, moto_server, bucket, POLLER_THREATSTACK__REQUESTS_PER_MINUTE="20")
        processes = backfill_and_verify(env)
        try:
            started = time.monotonic()
            last, stable_since = -1, time.monotonic()
            # Until the count has not moved for 4 s (both wait for the next minute), at most 40 s.
            while time.monotonic() - stable_since < 4 and time.monotonic() - started < 40:
                count = sim.request_count()
                if count != last or count == 0:
                    last, stable_since = count, time.monotonic()
                time.sleep(0.25)
            assert time.monotonic() - started < 55, "too slow to prove the first minute"
            assert 10 <= sim.request_count() <= 20
        finally:
            for process in processes:
                process.kill()
                process.wait(timeout=10)


@pytest.mark.integration
def test_a_sync_that_exits_cleanly_leaves_counted_only_what_it_sent(
    simulator: Simulator, moto_server: MotoServer, s3: Any, bucket: str
):
    """A real `poller sync` over a few chunks: when it has exited, the ledger counts for its
    run exactly the requests the simulator received, nothing it took and did not use."""
    now = utc_now()
    simulator.generate(30, now - timedelta(hours=5), now - timedelta(minutes=5))
    env = poller_env(
        simulator,
        moto_server,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="6h",
        POLLER_SYNC__MAX_WINDOW_SECONDS="3600",
    )
    result = run_poller(["sync"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = summary_of(result)
    ledger = json.loads(s3.get_object(Bucket=bucket, Key="_poller/budget.json")["Body"].read())
    mine = [g for g in ledger["grants"] if g[2] == summary["run_id"]]
    assert sum(g[1] for g in mine) == summary["api_requests"] == simulator.request_count()
    assert "budget.given_back" in result.stderr


def test_a_bucket_that_refuses_the_ledger_leaves_the_process_its_own_budget():
    """A read-only role (verify without --repair) or a missing bucket: the API request is not
    failed for it; sharing is off, with the reason, and the process's own budget holds."""

    class ReadOnly(MemoryObjectStore):
        def put(self, key: str, body: bytes, **conditions: Any) -> str:
            raise ArchiveAccessError(f"S3 refused writing {key}: AccessDenied")

    allowance = PrefixAllowance(ReadOnly(), Layout(), 20, "run", lambda: 0.0, lambda _: None)
    allowance.take()
    allowance.take()
    assert allowance.unavailable is not None and "AccessDenied" in allowance.unavailable


@pytest.mark.faults
def test_backfill_verify_and_serve_detail_fetches_stay_within_one_budget(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """``poller serve`` with 30 webhooks pushed to it (each owed a detail fetch), a
    ``backfill`` and a ``verify`` with far more than 20 pages each, all on one prefix at a
    budget of 20: over 75 s, by the simulator's clock, never more than 20 requests in any
    60 s, and each kind of work took part (listings and detail fetches). A minute and a
    quarter is the least that proves a sliding minute beyond the first: hence ``faults``."""
    from test_push import TOKEN, Served, free_port

    with Simulator(seed=13, page_size=2) as sim:
        now = utc_now()
        sim.generate(120, now - timedelta(days=2), now - timedelta(hours=1))
        pushed = sim.generate(30, now - timedelta(minutes=50), now - timedelta(minutes=10), 0.0)
        env = poller_env(sim, moto_server, bucket, POLLER_THREATSTACK__REQUESTS_PER_MINUTE="20")
        port = free_port()
        server = Served(
            {
                **env,
                "POLLER_RECEIVER__TOKEN": TOKEN,
                "POLLER_HTTP__HOST": "127.0.0.1",
                "POLLER_HTTP__PORT": str(port),
            },
            port,
        )
        processes = []
        try:
            processes = backfill_and_verify(env)
            started = time.monotonic()
            for start in range(0, len(pushed), 5):
                batch = [
                    {
                        "id": alert.id,
                        "title": alert.doc["title"],
                        "created_at": int(alert.created.timestamp() * 1000),
                        "severity": alert.doc["severity"],
                        "organization_id": sim.credentials.org_id,
                    }
                    for alert in pushed[start : start + 5]
                ]
                assert server.push({"alerts": batch}).status_code == 200
            while time.monotonic() - started < 75:
                time.sleep(0.5)
        finally:
            for process in processes:
                process.kill()
                process.wait(timeout=10)
            server.stop()
        assert sim.max_requests_in_any_window(60.0) <= 20
        listings = sim.request_count("/v2/alerts") - sim.request_count("/v2/alerts/")
        details = sim.request_count("/v2/alerts/")
        most = sim.max_requests_in_any_window(60.0)
        print(f"{listings} listings, {details} detail fetches, at most {most} in any 60 s")
        assert details >= 1 and listings >= 10, (listings, details)
        assert sim.request_count() >= 21  # the budget was used past its first minute
