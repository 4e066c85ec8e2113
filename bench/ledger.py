"""What the prefix's budget ledger costs and books (README, The request budget).

``python bench/ledger.py`` runs one process's patterns against the ledger in an in-memory
bucket on a virtual clock (seconds): the API requests sent, the S3 requests the ledger took
(every GET and PUT, give-backs included) and the slots the ledger counted meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

from poller.archive.allowance import COUNTED_SECONDS, GRANT_SECONDS, PrefixAllowance
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.threatstack.budget import RequestBudget

T0 = 1_764_000_000.0
PER_MINUTE = 100


class World:
    def __init__(self) -> None:
        self.now = T0
        self.store = MemoryObjectStore()

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def process(self, name: str) -> tuple[PrefixAllowance, RequestBudget]:
        def wall() -> float:
            return self.now

        allowance = PrefixAllowance(self.store, Layout("p"), PER_MINUTE, name, wall, self.sleep)
        budget = RequestBudget(PER_MINUTE, wall, self.sleep, wall, shared=allowance)
        return allowance, budget

    def booked(self) -> int:
        found = self.store.snapshot().get("p/_poller/budget.json")
        grants = json.loads(found)["grants"] if found is not None else []
        cutoff = self.now - COUNTED_SECONDS
        return sum(g[1] for g in grants if (g[3] if len(g) > 3 else g[0] + GRANT_SECONDS) > cutoff)


def steady(every: float, minutes: int = 10) -> dict[str, Any]:
    """One process sending a request every ``every`` seconds (0.01: as fast as allowed)."""
    world = World()
    allowance, budget = world.process("steady")
    booked: list[int] = []
    while world.now < T0 + minutes * 60:
        budget.acquire()
        if world.now > T0 + 120:
            booked.append(world.booked())
        world.now += every
    allowance.give_back()
    return {
        "api": budget.sent,
        "s3": world.store.requests,
        "s3_per_api": round(world.store.requests / budget.sent, 3),
        "booked_avg": round(sum(booked) / len(booked), 1),
    }


def runs(requests: int, count: int = 12) -> dict[str, Any]:
    """``count`` runs five minutes apart, each sending ``requests`` then exiting cleanly."""
    world = World()
    sent = 0
    for n in range(count):
        allowance, budget = world.process(f"run{n}")
        for _ in range(requests):
            budget.acquire()
            world.now += 0.2
        allowance.give_back()
        sent += budget.sent
        world.now += 300
    return {
        "api": sent,
        "s3": world.store.requests,
        "s3_per_api": round(world.store.requests / sent, 3),
    }


def main() -> None:
    for name, every in (("as fast as allowed", 0.01), ("one every 3 s", 3.0)):
        print(f"{name}, 10 min:", steady(every))
    for name, every in (("one every 5 s", 5.0), ("one every 10 s", 10.0)):
        print(f"{name}, 10 min:", steady(every))
    for requests in (2, 17, 60):
        print(f"runs of {requests} requests:", runs(requests))


if __name__ == "__main__":
    main()
