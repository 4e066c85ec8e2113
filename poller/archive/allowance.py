"""The prefix's request budget, shared by every process through one object in the bucket.

``P/_poller/budget.json`` (version 1)::

    {"version": 1, "per_minute": 100,
     "grants": [[1764072000.123, 10, "<run id>", 1764072010.123, 100], ...]}
     # written at (wall time), slots, taker, last moment a slot may start (optional),
     # the taker's requests_per_minute (optional), slots reserved (a reservation: 0 slots)

Every process that sends Threat Stack requests for this bucket and prefix (``run``,
``sync``, ``backfill``, ``verify``, ``serve`` and its detail fetches, a standby daemon)
takes its requests from here in grants: a grant of ``n`` slots is written with a
compare-and-swap on the object's ETag, and only when the grants still counted plus the new
one come to at most ``per_minute``. A grant's slots start within ``GRANT_SECONDS`` of it or
not at all; a grant counts until ``COUNTED_SECONDS`` after its last moment (the fourth
field, ``GRANT_SECONDS`` after it was written when absent). Why that is enough: take any
60-second window and, of the grants with a request in it, the last one written. Every
other one was in the ledger when it was written (the compare-and-swap orders them), and
had its last moment at or after the window's start, less than 60 s before that write:
still counted. So the window holds at most ``per_minute`` requests of all processes.

Processes configured with different budgets: each grant carries its taker's
``requests_per_minute``, and a grant is written only when the counted grants plus it come to
at most the smallest budget among them and the writer's own. By the same argument, a window
holds at most the smallest budget of the processes sending in it (a process with a larger
one is held to it while a smaller one is active, and logs ``budget.smaller_elsewhere``).
A smaller one that finds no room beside a busy larger one first writes a reservation (a
grant of no slots that carries its budget and the slots it wants, sixth field): the larger
counts those slots as taken, so the room its ageing grants leave waits for the smaller
instead of going back to it (``_reserve``).

Grants are sized by use: the first is ``FIRST_GRANT``; a grant used up is followed by one
of what ``GRANT_SECONDS`` take at the pace it was used (at most ``GROWTH`` times its size
and a tenth of the budget, ``grant_size``), one that ran out of time by one of the size it
used. The owner alone rewrites its grant, down to
what it used and its last use (still a bound on its requests, so the argument above holds):
in the write of its next grant (free), and on a clean exit or at a cycle's end
(``give_back``: one GET and one PUT, only when slots are left). So a slow process books
about what it sends, and only a killed process leaves unused slots counted, for
``HORIZON_SECONDS`` at most. A process of the earlier version that rewrites the ledger drops
the fourth field, which only makes a grant count longer.

Times in the ledger are wall-clock: hosts sharing a prefix must keep their clocks in step
(Hawk already needs that to within a minute; ``SKEW_SECONDS`` absorbs small differences).
How long a process has held its grant is measured on its monotonic clock, so a wall clock
that steps neither stretches a grant's 10 s nor dates its last use before it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from poller.archive.records import Layout
from poller.archive.store import ObjectStore, PreconditionFailed
from poller.errors import ArchiveAccessError, PollerError

log = logging.getLogger(__name__)

VERSION = 1
GRANT_SECONDS = 10.0  # a grant's slots start within this long, or never
SKEW_SECONDS = 1.0  # clock differences between hosts absorbed
# How long a grant counts after its last moment: the window, the client's margin
# (budget.MARGIN_SECONDS) and the skew.
COUNTED_SECONDS = 60.0 + 0.5 + SKEW_SECONDS
# The longest a grant counts (one never given back: a killed process's).
HORIZON_SECONDS = GRANT_SECONDS + COUNTED_SECONDS
GRANT_SHARE = 0.1  # the largest grant is this share of the budget (at least one request)
FIRST_GRANT = 2  # a process's first grant: an idle sync's two lists
GROWTH = 4  # a grant used up is followed by one this many times its size
# A grant dated further ahead than this cannot be believed: hosts sharing a prefix are in
# step (Hawk refuses more than about 60 s of skew). It is the trace of a wall clock that was
# ahead and stepped back, or of a hand edit: counting it as dated would hold every process
# back until that date (an hour, or for ever), dropping it would forget requests that may
# have just gone out, so it counts as if written now (HORIZON_SECONDS at most).
FUTURE_SECONDS = 60.0 + GRANT_SECONDS
GIVE_BACK_TRIES = 5  # compare-and-swap conflicts tolerated when giving slots back


def grant_size(per_minute: int) -> int:
    """The largest grant at this budget."""
    return max(1, int(per_minute * GRANT_SHARE))


def ledger_requests(api_requests: int, per_minute: int) -> int:
    """S3 requests the ledger costs a process alone that sends ``api_requests`` in quick
    succession at a budget of ``per_minute``, then exits cleanly: a GET and a PUT per grant
    (``FIRST_GRANT``, growing by ``GROWTH`` to ``grant_size``) and for the give-back of what
    is left. (On a store without conditional writes, add a HEAD per PUT.)"""
    cap = grant_size(per_minute)
    size, granted, writes = min(FIRST_GRANT, cap), 0, 0
    while granted < api_requests:
        granted, writes = granted + size, writes + 1
        size = min(cap, size * GROWTH)
    return 2 * (writes + (granted > api_requests))


@dataclass
class _Grant:
    """This process's latest grant, as written (``at`` identifies it in the ledger)."""

    at: float
    size: int
    until: float
    started: float  # on the process's monotonic clock: a wall clock that steps moves no slot
    used: int = 0
    last_use: float = 0.0  # ``at`` plus the monotonic time to the last slot taken
    following: int | None = None  # the next grant's size, judged when this one ended

    def settled(self, taker: str, per_minute: int) -> list[Any] | None:
        """Its entry cut down to what was used (None: nothing used, drop it); the last use
        rounded up to the millisecond, so it never counts shorter."""
        if self.used == 0:
            return None
        return [self.at, self.used, taker, math.ceil(self.last_use * 1000) / 1000, per_minute]


class PrefixAllowance:
    """``take()`` blocks until the prefix's budget has room, then counts one request;
    ``give_back()`` returns the slots of the current grant not used yet."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        per_minute: int,
        taker: str,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        before_first_write: Callable[[], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        # The store proof (SPEC: prove the bucket before the first write): the ledger is a
        # write like any other, and must not land on a store that mangles or lacks conditions.
        self._before_first_write = before_first_write
        self._store = store
        self._key = layout.key("_poller", "budget.json")
        self.per_minute = per_minute
        self._taker = taker
        self._wall = wall
        # How long a grant has been held is measured on the monotonic clock (``clock``; a
        # wall clock given instead of time.time is a test's virtual clock, and serves both).
        self._clock = clock or (time.monotonic if wall is time.time else wall)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._current: _Grant | None = None  # not yet settled in the ledger
        self._next = min(FIRST_GRANT, grant_size(per_minute))
        self.grants = 0  # grants this process took (each one GET and one PUT)
        self.given_back = 0  # slots this process returned unused
        self.unavailable: str | None = None  # why sharing is off (the bucket refused it)
        self._told_smaller = False  # budget.smaller_elsewhere is logged once

    def take(self) -> None:
        with self._lock:  # one thread asks the bucket at a time; the others wait here
            while self.unavailable is None:
                grant = self._current
                held = 0.0 if grant is None else max(self._clock() - grant.started, 0.0)
                if grant is not None and grant.used < grant.size and held <= GRANT_SECONDS:
                    grant.used += 1
                    grant.last_use = grant.at + held
                    return
                if self._before_first_write is not None:
                    gate, self._before_first_write = self._before_first_write, None
                    try:
                        gate()
                    except PollerError as exc:
                        self._off(exc)
                        return
                # Read after the store proof, and once for both clocks: a grant's ten seconds
                # start when it is dated, so a slow GET and PUT of the ledger (or a slow
                # proof) eat into them instead of moving its slots past what it records.
                now, started = self._wall(), self._clock()
                try:
                    wait = self._grant(now, started)
                except ArchiveAccessError as exc:
                    self._off(exc)
                    return
                if wait > 0:
                    log.info("budget.shared_wait", extra={"fields": {"wait_s": round(wait, 3)}})
                    self._sleep(wait)

    def give_back(self, wait_seconds: float = 1.0) -> int:
        """Return the current grant's unused slots (a clean exit, a cycle's end): its entry is
        cut to what it used. Never raises; skipped when another thread holds the allowance
        for longer than ``wait_seconds`` (it is waiting for room). Returns the slots given."""
        if not self._lock.acquire(timeout=wait_seconds):
            return 0
        try:
            grant = self._current
            if self.unavailable is not None or grant is None or grant.used >= grant.size:
                return 0
            unused = grant.size - grant.used
            for _ in range(GIVE_BACK_TRIES):
                found = self._store.get(self._key)
                if found is None:
                    break  # nothing to give back to (deleted by hand): nothing counts it
                entries = self._settle(_grants(found.body))
                try:
                    self._store.put(self._key, self._document(entries), if_match=found.etag)
                except PreconditionFailed:
                    continue  # another process wrote meanwhile: read again
                break
            else:
                return 0
            self._next = self._size_after(grant)
            self._current = None
            self.given_back += unused
            log.info("budget.given_back", extra={"fields": {"slots": unused}})
            return unused
        except PollerError as exc:  # the exit must not fail for it: the slots count a minute
            log.warning("budget.give_back_failed", extra={"fields": {"error": str(exc)}})
            return 0
        finally:
            self._lock.release()

    def _off(self, exc: PollerError) -> None:
        # A bucket this process may not write (a read-only role, no bucket, a store that
        # failed its proof): the API call must not fail for it; the process keeps to its own
        # budget, and the command itself reports what is wrong with the store.
        self.unavailable = str(exc)
        log.warning("budget.not_shared", extra={"fields": {"error": str(exc), "key": self._key}})

    def _settle(self, entries: list[list[Any]]) -> list[list[Any]]:
        """The ledger's entries with this process's current grant cut to what it used."""
        grant = self._current
        if grant is None:
            return entries
        mine = [
            e
            for e in entries
            if (e[0], e[1], e[2]) == (grant.at, grant.size, self._taker)
            and (len(e) < 4 or e[3] == grant.until)  # the earlier version drops the last
        ]
        if not mine:
            return entries  # pruned, or lost by a rewrite: nothing of it counts any more
        settled = grant.settled(self._taker, self.per_minute)
        return [e for e in entries if e is not mine[0]] + ([settled] if settled else [])

    def _size_after(self, grant: _Grant) -> int:
        """The size of the grant that follows ``grant``: what ``GRANT_SECONDS`` take at the
        pace it was used up (at most ``GROWTH`` times it), or what it used when its time ran
        out or it was given back."""
        cap = grant_size(self.per_minute)
        if grant.used >= grant.size:
            # This request included; a pause after the grant's time is no slower pace.
            held = min(self._clock() - grant.started, GRANT_SECONDS)
            pace = (grant.used + 1) / max(held, 0.001)
            return min(cap, grant.size * GROWTH, max(1, math.ceil(pace * GRANT_SECONDS)))
        return min(cap, max(1, grant.used))

    def _document(self, entries: list[list[Any]]) -> bytes:
        document = {"version": VERSION, "per_minute": self.per_minute, "grants": entries}
        return json.dumps(document).encode()

    def _grant(self, now: float, started: float) -> float:
        """Take a grant (0.0), or say how long to wait before the next try."""
        grant = self._current
        if grant is not None:  # used up or run out: the next one is sized by it (once:
            if grant.following is None:  # not counting the time spent waiting for room)
                grant.following = self._size_after(grant)
            self._next = grant.following
        found = self._store.get(self._key)
        entries = self._settle(_grants(found.body) if found is not None else [])
        ahead = [e for e in entries if e[0] > now + FUTURE_SECONDS]
        if ahead:
            # Left by a wall clock that was ahead and stepped back (this host's, or
            # another's), or a hand edit: counted as if dated now, so it holds slots for
            # HORIZON_SECONDS at most (its requests may have just gone out), never until
            # its date (an hour, or for ever).
            log.warning(
                "budget.grant_from_the_future",
                extra={"fields": {"grants": len(ahead), "ahead_s": ahead[0][0] - now}},
            )
            entries = [
                [round(now, 3), e[1], e[2], round(now, 3) + GRANT_SECONDS, *e[4:]]
                if e[0] > now + FUTURE_SECONDS
                else e
                for e in entries
            ]
        live = [e for e in entries if _last_moment(e) > now - COUNTED_SECONDS]
        limit = min([self.per_minute, *(e[4] for e in live if len(e) > 4)])
        if limit < self.per_minute and not self._told_smaller:
            self._told_smaller = True
            log.warning(
                "budget.smaller_elsewhere",
                extra={"fields": {"per_minute": self.per_minute, "held_to": limit}},
            )
        # Its own reservation is not counted against it; another's only when that process's
        # budget is smaller than this one's (see _reserve).
        mine = [e for e in live if e[2] == self._taker and len(e) > 5]
        others = [e for e in live if e not in mine]
        free = limit - sum(self._booked(e) for e in others)
        # Room for half the grant it wants, or wait for it: grants cut to slivers by a full
        # budget would each cost a GET and a PUT. Never more than the largest grant at the
        # budget it is held to: a smaller one elsewhere may never leave more free.
        wanted = max(1, min(-(-self._next // 2), grant_size(limit)))
        if free < wanted:
            freed, wait = free, 0.0
            for entry in sorted(others, key=_last_moment):
                freed += self._booked(entry)
                wait = _last_moment(entry) + COUNTED_SECONDS - now
                if freed >= wanted:
                    break
            # Slots of its own grant left unused are written back now, for the others' sake
            # (a conflict: another process wrote meanwhile, read again).
            returning = grant is not None and grant.used < grant.size and found is not None
            reserving = not mine and any(len(e) < 5 or e[4] > self.per_minute for e in others)
            written = [*live, self._reserve(now, wanted)] if reserving else live
            # Grants from the future are written back as counted, so the wait ends.
            if (returning or reserving or ahead) and not self._write(
                found.etag if found is not None else None, written
            ):
                return 0.0
            if reserving:
                log.info(
                    "budget.reserved",
                    extra={"fields": {"per_minute": self.per_minute, "slots": wanted}},
                )
            return max(wait, 0.05)
        size = min(free, self._next)
        at = round(now, 3)
        until = at + GRANT_SECONDS
        etag = None if found is None else found.etag
        if not self._write(etag, [*others, [at, size, self._taker, until, self.per_minute]]):
            return 0.0  # another process wrote meanwhile: read again
        self.grants += 1
        self._current = _Grant(at, size, until, started)
        return 0.0

    def _booked(self, entry: list[Any]) -> int:
        """Slots an entry holds against this process: its own, plus the slots reserved by a
        process whose budget is smaller than this one's."""
        reserved = entry[5] if len(entry) > 5 and entry[4] < self.per_minute else 0
        return int(entry[1]) + int(reserved)

    def _reserve(self, now: float, wanted: int) -> list[Any]:
        """An entry of no slots that reserves ``wanted`` for this process, carrying its
        budget. Beside a busy process with a larger budget, the room left when that one's
        grants age out would go to whichever asks first, the busy one every time: it counts
        the reservation as taken (``_booked``), so the room waits for the smaller one. Equal
        or larger budgets ignore it, so reservations never hold each other up."""
        at = round(now, 3)
        return [at, 0, self._taker, at + GRANT_SECONDS, self.per_minute, wanted]

    def _write(self, etag: str | None, entries: list[list[Any]]) -> bool:
        """Write the ledger over the version read (``etag``; None: create it). False when
        another process wrote first. The current grant is settled once written."""
        try:
            if etag is None:
                self._store.put(self._key, self._document(entries), if_none_match=True)
            else:
                self._store.put(self._key, self._document(entries), if_match=etag)
        except PreconditionFailed:
            return False
        self._current = None  # settled
        return True


def _last_moment(entry: list[Any]) -> float:
    """The last moment a slot of the grant may start (or did start, once settled)."""
    return float(entry[3]) if len(entry) > 3 else float(entry[0]) + GRANT_SECONDS


def _moment(value: Any) -> bool:
    """A number a time can be: finite as a float (JSON allows integers of any size)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _grants(body: bytes) -> list[list[Any]]:
    """The grants of the document, malformed entries dropped (never raises)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        return []
    raw = document.get("grants") if isinstance(document, dict) else None
    good: list[list[Any]] = []
    for entry in raw if isinstance(raw, list) else []:
        if (
            isinstance(entry, list)
            and len(entry) >= 2
            and _moment(entry[0])
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
            and entry[1] >= 0
        ):
            good.append([float(entry[0]), entry[1], str(entry[2]) if len(entry) > 2 else ""])
            last: Any = entry[3] if len(entry) > 3 else None
            # A last moment past the grant's own is not believed: the grant's counts instead.
            if _moment(last) and float(last) <= good[-1][0] + GRANT_SECONDS + 0.001:
                good[-1].append(float(last))
                budget = entry[4] if len(entry) > 4 else None
                if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
                    good[-1].append(budget)
                    reserved = entry[5] if len(entry) > 5 else None
                    if (
                        entry[1] == 0
                        and isinstance(reserved, int)
                        and not isinstance(reserved, bool)
                        and 0 < reserved <= budget
                    ):
                        good[-1].append(reserved)
    # A grant of no slots is only a reservation (its budget and slots): else it says nothing.
    return [e for e in good if e[1] > 0 or len(e) > 4]
