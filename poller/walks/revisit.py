"""The revisit: archive the dismissals of alerts that were first archived while active.

The API lists alerts by creation time, and an analyst dismisses an alert hours or days after
it fired, so the live window never reads it again. When due (every
``sync.revisit_interval_seconds``; 0: every cycle), a cycle therefore also re-reads the
dismissed list over creation times ``[reach, where the live window starts)`` (see ``reach``)
and, for each alert not handled yet, reads its archived full record (one GET): if that record
is the active version, the alert as the dismissed list returned it is written create-only to
``P/dismissals/ID[0:2]/ID[2:4]/ID`` (SPEC "Dismissals"). An alert first archived dismissed
needs none; an alert the archive does not hold is left to ``verify`` and ``backfill``; an
object that cannot be archived as it is (an unsafe id, say) is quarantined, as ``sync`` does.

Every alert decided is kept in ``handled`` (``P/_poller/revisit.json``, see
``poller.archive.revisits``), so the next revisit costs one list request per 100 dismissed
alerts and no S3 request for them (SPEC "Performance").

Cost and resuming: the range is read in aligned UTC days (``RevisitSettings.chunk``), one
list request per quiet day whatever ``sync.max_window_seconds`` is. A revisit spends at most
``pages_per_cycle`` list requests per cycle, then yields to the next cycle's live window; a
day whose listing needs more than what is left is cut there and split in two (at the median
creation time of what it listed, with ``sync.halves``), and the pieces still to read are the
revisit's position (``pieces``, beside ``cursor``, the end of the last finished day). The API
documents no order of a listing (threatstack-api.md §2.11), so the position is in creation
times, never "the rest of this listing": a split piece is read again whole, what it listed
before costs its list requests only (those ids are handled). A piece shorter than
``sync.MIN_SPLIT`` is read whole. The state is saved after every piece that decided something
and at every yield; a run killed in the middle is resumed by the next cycle, due or not, and a
record written just before a kill meets a 412, never a second write.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from poller.archive.records import Alert, Rejected, classify
from poller.archive.revisits import RevisitState, RevisitStore
from poller.archive.writer import Archive, Outcome
from poller.errors import Stopped
from poller.timeutil import Clock, floor_second, iso_z, parse_instant
from poller.walks.sync import (
    MIN_SPLIT,
    OVERLAP,
    AlertSource,
    CycleGuard,
    Summary,
    chunks,
    halves,
    writing,
)

log = logging.getLogger(__name__)

# What the revisit decided for one dismissed alert.
ARCHIVED = "archived"  # its dismissal record was written now
ALREADY = "already_archived"  # its dismissal record was there (a 412)
FIRST_DISMISSED = "first_dismissed"  # its full record is the dismissed version: none needed
NOT_ARCHIVED = "not_archived"  # the archive has no full record (verify reports it)
# The dismissed version has no faithful JSON form: quarantined (Archive.take_dismissal).
UNENCODABLE_ALERT = "unencodable"
QUARANTINED = "quarantined"  # not archivable as it is (an unsafe id...): quarantined, as sync
# How far hosts sharing a prefix may disagree on the time (Hawk allows about 60 s each way).
CLOCKS_DISAGREE = timedelta(minutes=5)
API_KEEPS = timedelta(days=366)  # the API's year of alerts (config caps revisit_days there)
RESULTS = (ARCHIVED, ALREADY, FIRST_DISMISSED, NOT_ARCHIVED, UNENCODABLE_ALERT, QUARANTINED)
Piece = tuple[datetime, datetime]


@dataclass(frozen=True)
class RevisitSettings:
    days: int  # 0: no revisit
    interval: timedelta  # 0: every cycle
    chunk: timedelta = timedelta(days=1)  # the revisit's own size, not sync.max_window_seconds
    max_concurrency: int = 16
    pages_per_cycle: int = 100  # list requests a cycle gives the revisit before yielding


@dataclass
class PieceRead:
    """What reading one piece of the range did. ``cut_at``: the listing was stopped at the
    cycle's share of pages before its end (None: read to its end); split the piece there."""

    counts: dict[str, int]
    handled_now: dict[str, int] = field(default_factory=dict)
    listed: int = 0  # distinct objects the piece listed, but for its overlap (see _piece)
    pages: int = 0
    cut: bool = False
    cut_at: datetime | None = None


def revisit_due(state: RevisitState, now: datetime, interval: timedelta) -> bool:
    """An unfinished revisit is always due (it resumes); else one ``interval`` after the
    last one started. A start later than now by more than ``CLOCKS_DISAGREE`` is not
    believed (a hand edit, a clock once far ahead): it would keep every revisit off until
    that date, so the revisit is due."""
    if state.current is not None or state.last is None:
        return True
    try:
        started = parse_instant(str(state.last["started_at"]), now)
    except (KeyError, ValueError):
        return True
    if started - now > CLOCKS_DISAGREE:
        log.warning(
            "revisit.started_in_future",
            extra={"fields": {"started_at": state.last["started_at"], "now": iso_z(now)}},
        )
        return True
    return now - started >= interval


def _last_started(state: RevisitState) -> str | None:
    """When the last finished revisit started: every dismissal before it, of an alert
    created in its range, is archived (the metrics' revisit lag counts from it)."""
    return None if state.last is None else state.last.get("started_at")


def reach(state: RevisitState, now: datetime, days: int) -> datetime:
    """Where a new revisit's range starts: ``days`` before the last finished revisit started
    (before now, if none did). An alert dismissed since that start, at most ``days`` after
    its creation, was created at or after that start minus ``days``. With ``now - days``
    alone, an alert dismissed in the last ``revisit_interval_seconds`` before it turned
    ``days`` old was already out of range when the next revisit came, and never archived
    (SPEC "Dismissals": covered within ``revisit_interval_seconds`` plus one cycle). A gap
    longer than the API's year of alerts (a long outage, say) adds a year at most."""
    start = now
    if state.last is not None:  # its started_at is checked when the state is read
        start = min(now, parse_instant(str(state.last["started_at"]), now))
    return max(start, now - API_KEEPS) - timedelta(days=days)


def _remember(state: RevisitState, first_dismissed: dict[str, int] | None) -> bool:
    """Add ids whose full record was just written from the dismissed list; True if new."""
    fresh = {k: v for k, v in (first_dismissed or {}).items() if k not in state.handled}
    state.handled.update(fresh)
    return bool(fresh)


def prune_handled(handled: dict[str, int], horizon: datetime) -> dict[str, int]:
    """Keep the ids a revisit can still meet: created at or after ``horizon``."""
    limit = int(horizon.timestamp())
    return {key: created for key, created in handled.items() if created >= limit}


def _stored(pieces: list[Piece]) -> list[list[str]]:
    return [[iso_z(since), iso_z(until)] for since, until in pieces]


def _cut_at(listed: list[int]) -> datetime | None:
    """Where to split a piece cut short, from the creation seconds it listed, in the order
    listed: where the listing reached when it came in creation order (newest first: just
    after the oldest second read; oldest first: at the newest), so what was read lands in one
    piece, read again once at the cost of its list requests; else at the median. The API
    documents no order (threatstack-api.md §2.11): the order only places the cut, and every
    piece is read whole, so a wrong guess costs list requests, never an alert."""
    if not listed:
        return None
    pairs = list(pairwise(listed))
    if all(newer >= older for newer, older in pairs):
        second = min(listed) + 1
    elif all(older <= newer for older, newer in pairs):
        second = max(listed)
    else:
        second = int(statistics.median_low(listed)) + 1
    return datetime.fromtimestamp(second, UTC)


class Revisit:
    """A ``Revisitor`` for ``Cycle`` (sync and the daemon), and the sweep of ``backfill``."""

    def __init__(
        self,
        source: AlertSource,
        archive: Archive,
        states: RevisitStore,
        settings: RevisitSettings,
        clock: Clock,
        run_id: str,
    ) -> None:
        self.source = source
        self.archive = archive
        self.states = states
        self.settings = settings
        self.clock = clock
        self.run_id = run_id
        self._lock = threading.Lock()

    @property
    def interval(self) -> timedelta:
        return self.settings.interval

    # ------------------------------------------------------------------ the cycle's revisit
    def run(
        self,
        now: datetime,
        until: datetime,
        summary: Summary,
        guard: CycleGuard,
        first_dismissed: dict[str, int] | None = None,
        first_cycle: bool = False,
    ) -> None:
        if self.settings.days <= 0:
            return
        state = self.states.load()
        fresh = _remember(state, first_dismissed)
        if first_cycle or not revisit_due(state, now, self.settings.interval):
            summary.revisit = {"due": False, "last_started_at": _last_started(state)}
            if fresh:  # one PUT, so the next revisit needs no GET for them
                guard.fence()
                self.states.save(state, self.run_id, now)
            return
        current = state.current
        if current is None:
            since = floor_second(reach(state, now, self.settings.days))
            if since >= until:
                # The live window reaches back further than the revisit would.
                summary.revisit = {"due": False, "last_started_at": _last_started(state)}
                if fresh:
                    guard.fence()
                    self.states.save(state, self.run_id, now)
                return
            current = {
                "from": iso_z(since),
                "until": iso_z(until),
                "cursor": iso_z(since),
                "started_at": iso_z(now),
                "run_id": self.run_id,
                **dict.fromkeys(("listed", *RESULTS), 0),
            }
        state.current = current
        since = parse_instant(current["from"], now)
        cursor = parse_instant(current["cursor"], now)
        report = summary.revisit = {
            "due": True,
            "from": current["from"],
            "until": current["until"],
            "last_started_at": _last_started(state),
        }
        resumed = current["run_id"] != self.run_id or cursor > since or bool(current.get("pieces"))
        report.update(resumed=resumed)
        finished = self._walk(state, now, summary, guard)
        report.update({k: current.get(k, 0) for k in ("listed", *RESULTS)}, finished=finished)
        if finished:
            state.last = {
                **{k: v for k, v in current.items() if k not in ("cursor", "pieces")},
                "finished_at": iso_z(self.clock()),
            }
            state.current = None
            state.handled = prune_handled(state.handled, since)
            report["last_started_at"] = current["started_at"]
            guard.fence()
            self.states.save(state, self.run_id, now)
        log.info("revisit.done" if finished else "revisit.yielded", extra={"fields": report})

    def _walk(
        self, state: RevisitState, now: datetime, summary: Summary, guard: CycleGuard
    ) -> bool:
        """The range's pieces from where it stands; True when the range is done, False when
        it yielded (the cycle's share of list requests is spent; the position is saved)."""
        current = state.current
        assert current is not None
        since = parse_instant(current["from"], now)
        until = parse_instant(current["until"], now)
        # The pieces of a day cut short by an earlier cycle come first, then the days after.
        todo: deque[Piece] = deque(
            (parse_instant(a, now), parse_instant(b, now)) for a, b in current.get("pieces", [])
        )
        after = todo[-1][1] if todo else parse_instant(current["cursor"], now)
        days = deque(
            day for day in chunks(since, until, self.settings.chunk, aligned=True) if day[1] > after
        )
        spent = 0
        while todo or days:
            if not todo:
                todo.append(days.popleft())
            allowance = self.settings.pages_per_cycle - spent
            if allowance <= 0:
                current["pieces"] = _stored(list(todo))
                guard.fence()
                state.etag = self.states.save(state, self.run_id, now).etag
                return False
            piece = todo.popleft()
            counted = since if piece[0] == since else piece[0] + OVERLAP
            read = self._piece(piece, counted, state.handled, now, summary, guard, allowance)
            spent += read.pages
            for name in RESULTS:
                current[name] = current.get(name, 0) + read.counts[name]
            state.handled.update(read.handled_now)
            if read.cut:
                todo.extendleft(reversed(halves(*piece, read.cut_at)))
                log.info(
                    "revisit.split",
                    extra={"fields": {"from": iso_z(piece[0]), "until": iso_z(piece[1])}},
                )
            else:
                current["listed"] = current.get("listed", 0) + read.listed
                if not todo:
                    current["cursor"] = iso_z(piece[1])
            if todo:
                current["pieces"] = _stored(list(todo))
            else:
                current.pop("pieces", None)
            if read.handled_now and (todo or days):  # the last is saved with the finished revisit
                guard.fence()
                state.etag = self.states.save(state, self.run_id, now).etag
        return True

    # ------------------------------------------------------------------ one piece
    def _piece(
        self,
        piece: Piece,
        counted: datetime,
        handled: Mapping[str, int],
        now: datetime,
        summary: Summary,
        guard: CycleGuard,
        allowance: int | None = None,
    ) -> PieceRead:
        """Decide every dismissed object created in the piece not handled yet, reading at
        most ``allowance`` pages of its listing (None: all) unless it is shorter than
        MIN_SPLIT. Returns what it decided, the ids decided now (id -> creation second),
        the pages read, whether it was cut short, and how many objects it listed created
        from ``counted`` on (a piece's first second is the previous piece's last, counted
        there)."""
        since, until = piece
        read = PieceRead(dict.fromkeys(RESULTS, 0))
        if allowance is not None and until - since < MIN_SPLIT:
            allowance = None  # a few seconds of alerts are read whole, as sync does
        seen: dict[str, int] = {}
        order: list[int] = []  # creation seconds as listed, for where to cut

        def tally(outcomes: Mapping[str, int]) -> None:
            for name in RESULTS:
                read.counts[name] += outcomes.get(name, 0)
            summary.dismissals_archived += outcomes.get(ARCHIVED, 0)
            summary.quarantined += outcomes.get(QUARANTINED, 0)

        with writing(self.settings.max_concurrency, tally) as writer:
            if since < until:
                for page in self.source.list_alerts("dismissed", since, until):
                    read.pages += 1
                    guard.progress(summary)
                    if guard.stopping():
                        raise Stopped()
                    for raw in page:
                        task = self._take(raw, until, handled, seen, order, read.handled_now, now)
                        if task is not None:
                            writer.submit(task)
                    # A client's page says when it is the last; one that does not may have more.
                    last = getattr(page, "last", False) is True
                    if allowance is not None and read.pages >= allowance and not last:
                        read.cut, read.cut_at = True, _cut_at(order)
                        break
        read.listed = sum(created >= counted.timestamp() for created in seen.values())
        return read

    def _take(
        self,
        raw: Any,
        until: datetime,
        handled: Mapping[str, int],
        seen: dict[str, int],
        order: list[int],
        handled_now: dict[str, int],
        now: datetime,
    ) -> Callable[[], str] | None:
        """The task for one object of the dismissed list, or None when it needs none.
        ``order`` gets the creation second of each alert new to ``seen``."""
        item = classify(raw)
        if isinstance(item, Alert):
            key, created = item.id, int(item.created.timestamp())
        else:  # keyed by content, and kept as long as the piece's end, as sync does
            key, created = item.seen_key, int(until.timestamp())
        if key in seen:
            return None
        seen[key] = created
        if isinstance(item, Alert):
            order.append(created)
        if key in handled:
            return None
        if isinstance(item, Rejected):
            log.warning(
                "alert.quarantined",
                extra={
                    "fields": {"reason": item.reason, "detail": item.detail, "status": "dismissed"}
                },
            )
            rejected = item
            return self._task(lambda: self._quarantine(rejected, now), key, created, handled_now)
        alert = item
        return self._task(lambda: self.decide(alert), key, created, handled_now)

    def _quarantine(self, item: Rejected, now: datetime) -> str:
        self.archive.take(item, "dismissed", now, webhook=False)
        return QUARANTINED

    def _task(
        self, work: Callable[[], str], key: str, created: int, handled_now: dict[str, int]
    ) -> Callable[[], str]:
        def decide() -> str:
            result = work()
            with self._lock:
                handled_now[key] = created
            return result

        return decide

    def decide(self, alert: Alert) -> str:
        """One dismissed alert: a GET of its full record, and a create-only PUT of its
        dismissal record when that record is the active version."""
        record: Any = self.archive.archived_full(alert.id)
        if record is None:
            return NOT_ARCHIVED
        if isinstance(record, dict) and record.get("isDismissed") is True:
            return FIRST_DISMISSED
        outcome = self.archive.take_dismissal(alert, self.clock())
        if outcome is Outcome.QUARANTINED:
            return UNENCODABLE_ALERT
        if outcome is Outcome.ARCHIVED:
            log.info("dismissal.archived", extra={"fields": {"id": alert.id}})
        return ARCHIVED if outcome is Outcome.ARCHIVED else ALREADY

    # ------------------------------------------------------------------ backfill's sweep
    def sweep(
        self,
        since: datetime,
        until: datetime,
        now: datetime,
        summary: Summary,
        guard: CycleGuard,
        first_dismissed: dict[str, int] | None = None,
    ) -> None:
        """The dismissed list of [since, until) at once, whatever is due (``backfill``):
        writes the dismissal records missing there, and remembers what it decided."""
        state = self.states.load()
        # Only what a revisit can still meet is worth a PUT: a backfill of a month would
        # otherwise carry every old dismissed id in the state.
        reach = floor_second(now - timedelta(days=self.settings.days))
        dirty = _remember(state, prune_handled(first_dismissed or {}, reach))
        counts_total = dict.fromkeys(("listed", *RESULTS), 0)
        for piece in chunks(since, until, self.settings.chunk, aligned=True):
            known = {**state.handled, **(first_dismissed or {})}
            counted = since if piece[0] == since else piece[0] + OVERLAP
            read = self._piece(piece, counted, known, now, summary, guard)
            counts_total["listed"] += read.listed
            for name, value in read.counts.items():
                counts_total[name] += value
            handled_now = prune_handled(read.handled_now, reach)
            if handled_now or dirty:
                dirty = False
                state.handled.update(handled_now)
                guard.fence()
                state.etag = self.states.save(state, self.run_id, now).etag
        previous = summary.revisit or {}
        summary.revisit = {
            "from": previous.get("from", iso_z(since)),
            "until": iso_z(until),
            **{k: previous.get(k, 0) + v for k, v in counts_total.items()},
        }
