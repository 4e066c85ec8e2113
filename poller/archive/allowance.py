"""The prefix's request budget, shared by every process through one object in the bucket.

``P/_poller/budget.json`` (version 1)::

    {"version": 1, "per_minute": 100,
     "grants": [[1764072000.123, 10, "<run id>"], ...]}   # wall time, slots, taker

Every process that sends Threat Stack requests for this bucket and prefix (``run``,
``sync``, ``backfill``, ``verify``, ``serve`` and its detail fetches, a standby daemon)
takes its requests from here in grants: a grant of ``n`` slots is written with a
compare-and-swap on the object's ETag, and only when the grants of the last
``HORIZON_SECONDS`` plus the new one come to at most ``per_minute``. A grant's slots are
used within ``GRANT_SECONDS`` of it or not at all, so every request a grant allows starts
within [t, t + GRANT_SECONDS], and the grants counted (t + 60 s + GRANT_SECONDS + margins)
cover every 60-second window those requests can fall in: by construction, no 60-second
window holds more than ``per_minute`` requests of all processes together.

The cost: one GET and one PUT per grant (a grant is a tenth of the budget, at least 1);
slots a process does not use in time are lost for a minute. Times are wall-clock: hosts
sharing a prefix must keep their clocks in step (Hawk already needs that to within a
minute; ``SKEW_SECONDS`` absorbs small differences).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from poller.archive.records import Layout
from poller.archive.store import ObjectStore, PreconditionFailed
from poller.errors import ArchiveAccessError, PollerError

log = logging.getLogger(__name__)

VERSION = 1
GRANT_SECONDS = 10.0  # a grant's slots are used within this long, or lost
SKEW_SECONDS = 1.0  # clock differences between hosts absorbed
# How long a grant counts: the window, the time its slots may be used, the client's margin
# (budget.MARGIN_SECONDS) and the skew.
HORIZON_SECONDS = 60.0 + GRANT_SECONDS + 0.5 + SKEW_SECONDS
GRANT_SHARE = 0.1  # a grant is this share of the budget (at least one request)


def grant_size(per_minute: int) -> int:
    return max(1, int(per_minute * GRANT_SHARE))


class PrefixAllowance:
    """``take()`` blocks until the prefix's budget has room, then counts one request."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        per_minute: int,
        taker: str,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        before_first_write: Callable[[], object] | None = None,
    ) -> None:
        # The store proof (SPEC: prove the bucket before the first write): the ledger is a
        # write like any other, and must not land on a store that mangles or lacks conditions.
        self._before_first_write = before_first_write
        self._store = store
        self._key = layout.key("_poller", "budget.json")
        self.per_minute = per_minute
        self._taker = taker
        self._wall = wall
        self._sleep = sleep
        self._lock = threading.Lock()
        self._slots = 0
        self._usable_until = 0.0
        self.grants = 0  # grants this process took (each one GET and one PUT)
        self.unavailable: str | None = None  # why sharing is off (the bucket refused it)

    def take(self) -> None:
        with self._lock:  # one thread asks the bucket at a time; the others wait here
            while self.unavailable is None:
                now = self._wall()
                if self._slots > 0 and now <= self._usable_until:
                    self._slots -= 1
                    return
                if self._before_first_write is not None:
                    gate, self._before_first_write = self._before_first_write, None
                    try:
                        gate()
                    except PollerError as exc:
                        self._off(exc)
                        return
                try:
                    wait = self._grant(now)
                except ArchiveAccessError as exc:
                    self._off(exc)
                    return
                if wait > 0:
                    log.info("budget.shared_wait", extra={"fields": {"wait_s": round(wait, 3)}})
                    self._sleep(wait)

    def _off(self, exc: PollerError) -> None:
        # A bucket this process may not write (a read-only role, no bucket, a store that
        # failed its proof): the API call must not fail for it; the process keeps to its own
        # budget, and the command itself reports what is wrong with the store.
        self.unavailable = str(exc)
        log.warning("budget.not_shared", extra={"fields": {"error": str(exc), "key": self._key}})

    def _grant(self, now: float) -> float:
        """Take a grant (0.0), or say how long to wait before the next try."""
        found = self._store.get(self._key)
        grants = _grants(found.body) if found is not None else []
        live = [g for g in grants if g[0] > now - HORIZON_SECONDS]
        used = sum(g[1] for g in live)
        free = self.per_minute - used
        if free <= 0:
            oldest = min(g[0] for g in live)
            return max(float(oldest) + HORIZON_SECONDS - now, 0.05)
        size = min(free, grant_size(self.per_minute))
        document = {
            "version": VERSION,
            "per_minute": self.per_minute,
            "grants": [*live, [round(now, 3), size, self._taker]],
        }
        body = json.dumps(document).encode()
        try:
            if found is None:
                self._store.put(self._key, body, if_none_match=True)
            else:
                self._store.put(self._key, body, if_match=found.etag)
        except PreconditionFailed:
            return 0.0  # another process took a grant meanwhile: read again
        self.grants += 1
        self._slots = size
        self._usable_until = now + GRANT_SECONDS
        return 0.0


def _grants(body: bytes) -> list[list[Any]]:
    """The grants of the document, malformed entries dropped (never raises)."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    raw = document.get("grants") if isinstance(document, dict) else None
    good: list[list[Any]] = []
    for entry in raw if isinstance(raw, list) else []:
        if (
            isinstance(entry, list)
            and len(entry) >= 2
            and isinstance(entry[0], (int, float))
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
        ):
            good.append([float(entry[0]), entry[1], str(entry[2]) if len(entry) > 2 else ""])
    return good
