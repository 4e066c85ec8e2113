"""One incremental cycle: read the window, archive what is new, then commit the checkpoint.

The cycle reads the clock once. Its window is ``[watermark - lookback, now - settle)`` (the
first cycle starts at ``sync.first_run_since``), read in chunks of at most ``max_window``.
The API says neither end of ``from``/``until`` is inclusive, so every window, chunk and
cycle starts at least ``OVERLAP`` before the previous one ended; the seen set absorbs the
overlap at no S3 cost.
Alerts whose id is in the checkpoint's ``seen`` set were archived by an earlier cycle and
cost no S3 request; the rest are written create-only, ``s3.max_concurrency`` at a time.
Only when every alert of a chunk is archived or quarantined, and the lease is still ours,
is the checkpoint moved forward.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from poller.archive.records import Alert, Rejected, classify
from poller.archive.state import Checkpoint, CheckpointStore, Lease, Owed, PendingRecords
from poller.archive.writer import Archive, Outcome
from poller.errors import (
    ApiAuthError,
    ApiRequestError,
    ConfigError,
    CycleTimeout,
    LeaseLost,
    NotFound,
    RetriableError,
    Stopped,
)
from poller.timeutil import Clock, floor_second, iso_z, parse_instant

log = logging.getLogger(__name__)

# The API documents ``from`` as "created after" and ``until`` as "created before", with
# whole seconds: consecutive reads overlap by a second so an alert at a cut is in one.
OVERLAP = timedelta(seconds=1)


class AlertSource(Protocol):
    """The API side as a walk sees it (requests are counted by the runner, not here)."""

    def list_alerts(self, status: str, since: datetime, until: datetime) -> Iterator[list[Any]]:
        """Pages of raw alert objects for one status, created in [since, until)."""

    def get_alert(self, alert_id: str) -> Any:
        """One alert's full record."""


class CycleObserver(Protocol):
    """Told how a cycle goes: for the daemon's liveness and the terminal's progress bar."""

    def started(self, summary: Summary, chunk_count: int) -> None:
        """The window is known: ``chunk_count`` chunks to read."""

    def page(self, summary: Summary) -> None:
        """A page was read and its alerts handed to the writer."""

    def committed(self, summary: Summary, chunks_done: int) -> None:
        """A chunk was committed; ``summary.watermark`` is the new watermark."""


class Unobserved:
    def started(self, summary: Summary, chunk_count: int) -> None:
        pass

    def page(self, summary: Summary) -> None:
        pass

    def committed(self, summary: Summary, chunks_done: int) -> None:
        pass


class CycleGuard(Protocol):
    """What a walk beside the live one (the revisit) needs from the cycle it runs in."""

    def fence(self) -> None:
        """Prove the lease is still ours; raises LeaseLost. Call right before writing state."""

    def stopping(self) -> bool:
        """True once the daemon was asked to stop."""

    def progress(self, summary: Summary) -> None:
        """A page was read: progress, for the daemon's liveness (a long revisit at a low
        budget must not look like a hung cycle). Raises LeaseLost when the lease is no
        longer ours, before the page's alerts are written (see ``Lease.confirm``)."""


class Revisitor(Protocol):
    """The revisit (see ``poller.walks.revisit``), run by a cycle after its live window."""

    @property
    def interval(self) -> timedelta:
        """``sync.revisit_interval_seconds``: how often the dismissed list is read again."""

    def run(
        self,
        now: datetime,
        until: datetime,
        summary: Summary,
        guard: CycleGuard,
        first_dismissed: dict[str, int],
        first_cycle: bool = False,
    ) -> None:
        """Revisit, if due, the dismissed list created before ``until`` (where the live
        window starts). ``first_dismissed``: ids whose full record was just written from
        the dismissed list (id -> creation second), handled already. ``first_cycle``: there
        was no checkpoint, so nothing lies behind the window yet but what an earlier
        backfill or receiver archived: the revisit waits for the next cycle."""

    def sweep(
        self,
        since: datetime,
        until: datetime,
        now: datetime,
        summary: Summary,
        guard: CycleGuard,
        first_dismissed: dict[str, int],
    ) -> None:
        """The dismissed list of [since, until), due or not (``backfill``)."""


class ChunkPlan(Protocol):
    """What a walk does around each chunk: ``sync`` commits the live checkpoint after each;
    ``backfill`` records the chunk as finished (and moves the live checkpoint only forward)."""

    @property
    def known(self) -> dict[str, int]:
        """Ids archived already (id -> creation second): their re-reads cost no S3 request."""

    def unread(self, since: datetime, until: datetime) -> tuple[str, ...]:
        """The statuses still to read over this chunk: all of the cycle's, or fewer when an
        earlier run read some of them over it; none when it finished the chunk."""

    def finish(
        self, since: datetime, until: datetime, seen_now: dict[str, int], summary: Summary
    ) -> None:
        """Every alert of the chunk is archived or quarantined: record it (the lease is ours)."""

    def skipped(self, since: datetime, until: datetime, summary: Summary) -> None:
        """A chunk an earlier run finished (``unread`` was empty), passed over."""


# A listing (one chunk, one status) is given time for this many pages at the request budget.
PAGES_PER_LISTING = 100
# A chunk shorter than this is never split further (a second of alerts is read whole).
MIN_SPLIT = timedelta(seconds=4)


class ChunkTooLong(Exception):
    """A listing needs more pages than the cycle gave it time for: split its chunk."""


@dataclass(frozen=True)
class CycleSettings:
    statuses: tuple[str, ...]
    lookback: timedelta
    settle: timedelta
    first_run_since: str
    max_concurrency: int
    max_window: timedelta = timedelta(days=1)
    # The cycle's deadline (see cycle_deadline): None derives it from the work.
    max_cycle: timedelta | None = None
    seconds_per_listing: float = 60.0  # PAGES_PER_LISTING requests at the budget
    deadline_floor_seconds: float = 780.0  # one whole retry span of a request, and margin
    owed_fetches: int = 10  # owed full records fetched per cycle at most (owed_fetches())
    # A listing that needs more pages than this is split (see Cycle.walk).
    pages_per_listing: int = PAGES_PER_LISTING


@dataclass
class Summary:
    """The JSON object ``sync`` prints last on stdout."""

    mode: str
    run_id: str
    listed: int = 0
    archived: int = 0
    already_archived: int = 0
    quarantined: int = 0
    api_requests: int = 0
    s3_requests: int = 0
    window: dict[str, str | None] = field(default_factory=lambda: {"from": None, "until": None})
    watermark: str | None = None
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0  # finished by an earlier run (backfill)
    # Dismissal records written now (SPEC "Dismissals"): not alerts, so not in ``archived``.
    dismissals_archived: int = 0
    revisit: dict[str, Any] | None = None  # what this run's revisit did (walks.revisit)
    duration_s: float = 0.0
    ok: bool = True
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def counts(self) -> dict[str, int]:
        return {
            "listed": self.listed,
            "archived": self.archived,
            "already_archived": self.already_archived,
            "quarantined": self.quarantined,
        }


# Pushed alerts older than the window, fetched one by one (see Cycle._fetch_owed): a 404
# is taken as "not visible yet" for this long after the alert was pushed, then as an answer;
# any other failure is retried by this many cycles, then given up on.
OWED_NOT_FOUND_GRACE = timedelta(minutes=30)
OWED_MAX_ATTEMPTS = 10
# The share of the request budget (per minute) a cycle spends on owed full records.
OWED_BUDGET_SHARE = 0.1


def owed_fetches(requests_per_minute: int) -> int:
    """Owed full records fetched per cycle at most: a tenth of a minute's budget, at least 1."""
    return max(1, int(requests_per_minute * OWED_BUDGET_SHARE))


def cycle_deadline(settings: CycleSettings, chunk_count: int) -> float:
    """Seconds a cycle may run: every listing of its chunks at the budget's pace
    (PAGES_PER_LISTING pages, 10,000 alerts, each), plus the floor, which covers one request
    retried for its whole ``max_retry_seconds``. ``sync.max_cycle_seconds`` overrides it."""
    if settings.max_cycle is not None:
        return settings.max_cycle.total_seconds()
    listings = chunk_count * len(settings.statuses)
    return settings.deadline_floor_seconds + listings * settings.seconds_per_listing


def poll_order(statuses: tuple[str, ...]) -> tuple[str, ...]:
    """``active`` before ``dismissed``, whatever the configured order: an alert dismissed
    between the two reads then moves into the list read second, and is seen there."""
    return tuple(sorted(statuses, key=lambda status: status != "active"))


def reread(lookback: timedelta) -> timedelta:
    """How far before the watermark the next cycle starts: the look-back, never under OVERLAP."""
    return max(lookback, OVERLAP)


def cycle_window(
    checkpoint: Checkpoint, now: datetime, settings: CycleSettings
) -> tuple[datetime, datetime]:
    """``[watermark - lookback, now - settle)`` in whole seconds; empty when from >= until."""
    until = floor_second(now - settings.settle)
    if checkpoint.watermark is None:
        since = floor_second(parse_instant(settings.first_run_since, now))
    else:
        since = floor_second(checkpoint.watermark - reread(settings.lookback))
    return since, until


def _next_cut(start: datetime, size: timedelta, aligned: bool) -> datetime:
    if not aligned:
        return start + size
    step = size.total_seconds()
    index = math.floor((start + OVERLAP).timestamp() / step) + 1
    return datetime.fromtimestamp(index * step, UTC)


def chunks(
    since: datetime, until: datetime, size: timedelta, aligned: bool = False
) -> Iterator[tuple[datetime, datetime]]:
    """[since, until) cut into pieces of at most ``size``, each starting OVERLAP before the
    previous one ended; an empty window gives one empty piece, so the checkpoint still moves
    with the clock. ``size`` must exceed OVERLAP (config keeps it at 60 s or more).

    ``aligned`` cuts at whole multiples of ``size`` since the epoch (UTC days, for a day), so
    two runs over overlapping ranges, ``--since 7d`` today and tomorrow, share their cuts and
    a finished chunk is recognised (the first piece may then be up to a second longer)."""
    if size <= OVERLAP:
        raise ValueError("a chunk must be longer than the overlap")
    start = since
    while True:
        end = min(until, _next_cut(start, size, aligned)) if start < until else until
        yield start, end
        if end >= until:
            return
        start = end - OVERLAP


def halves(
    since: datetime, until: datetime, at: datetime | None = None
) -> list[tuple[datetime, datetime]]:
    """A chunk whose listing is too long, in two pieces cut at the whole second ``at`` (the
    middle when None, or when ``at`` would leave a piece no shorter than the chunk), the
    second starting OVERLAP before the first ends, as ``chunks`` cuts them. For chunks of at
    least MIN_SPLIT."""
    middle = floor_second(since + (until - since) / 2)
    if at is not None and since + OVERLAP < floor_second(at) < until:
        middle = floor_second(at)
    return [(since, middle), (middle - OVERLAP, until)]


def prune_seen(seen: dict[str, int], watermark: datetime, lookback: timedelta) -> dict[str, int]:
    """Keep the ids the next read can see again: created at or after the start of the next
    chunk or cycle (``watermark - reread(lookback)``)."""
    horizon = int((watermark - reread(lookback)).timestamp())
    return {key: created for key, created in seen.items() if created >= horizon}


class Deadline:
    """One walk's deadline on a monotonic clock, set when its chunks are known."""

    def __init__(self, seconds: float, monotonic: Callable[[], float]) -> None:
        self.seconds = seconds
        self._monotonic = monotonic
        self._at = monotonic() + seconds

    def passed(self) -> bool:
        return self._monotonic() > self._at

    def extend(self, seconds: float) -> None:
        """More time, for work added while walking (a chunk split in two)."""
        self.seconds += seconds
        self._at += seconds

    def check(self) -> None:
        if self.passed():
            raise CycleTimeout(
                f"the cycle ran past its deadline of {self.seconds:.0f}s (derived from"
                " its chunks and the request budget); committed chunks are kept and the next"
                " run goes on from them. If the API is this slow, lower"
                " sync.max_window_seconds or raise sync.max_cycle_seconds"
            )


T = TypeVar("T")


class BoundedWriter(Generic[T]):
    """Runs archive writes on a thread pool with a bounded queue; the first error wins.
    ``outcomes`` counts what the tasks returned."""

    def __init__(self, concurrency: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-write")
        self._slots = threading.BoundedSemaphore(concurrency * 2)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.outcomes: Counter[T] = Counter()

    def submit(self, task: Callable[[], T]) -> None:
        self.raise_error()
        self._slots.acquire()
        future = self._pool.submit(task)
        future.add_done_callback(self._done)

    def _done(self, future: Future[T]) -> None:
        with self._lock:
            if future.cancelled():
                pass  # cancelled after an earlier failure; that failure is reported
            elif (error := future.exception()) is not None:
                self._error = self._error or error
            else:
                self.outcomes[future.result()] += 1
        self._slots.release()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=self._error is not None)
        self.raise_error()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def writing(concurrency: int, tally: Callable[[Counter[T]], None]) -> Iterator[BoundedWriter[T]]:
    """A BoundedWriter for one listing: finished when the block ends (every task done, the
    first error raised), aborted when it raises; ``tally`` gets the outcomes either way."""
    writer: BoundedWriter[T] = BoundedWriter(concurrency)
    try:
        yield writer
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        tally(writer.outcomes)


@dataclass(frozen=True)
class CycleHooks:
    """How the runner reaches into a running cycle: whether the lease was lost in the
    background, whether a stop was asked for (SIGTERM), who is told of progress, and the
    monotonic clock of the deadline (tests tick it by hand)."""

    lease_lost: Callable[[], LeaseLost | None] = lambda: None
    should_stop: Callable[[], bool] = lambda: False
    observer: CycleObserver = field(default_factory=Unobserved)
    monotonic: Callable[[], float] = time.monotonic


@dataclass(frozen=True, eq=False)
class Cycle:
    """Everything one cycle touches, given whole at construction (see ``poller.app``) and
    never replaced afterwards: frozen, so a late assignment fails at once (and in mypy).
    ``pending`` holds the pushed alerts still owed a full record (None: no push path)."""

    source: AlertSource
    archive: Archive
    checkpoints: CheckpointStore
    lease: Lease
    settings: CycleSettings
    clock: Clock
    run_id: str
    mode: str = "sync"
    hooks: CycleHooks = CycleHooks()
    pending: PendingRecords | None = None
    revisit: Revisitor | None = None  # None: this cycle archives no later dismissals
    # Ids whose full record this run wrote from the dismissed list (id -> creation second):
    # the revisit and backfill's sweep know them handled without a GET. Filled, never replaced.
    first_dismissed: dict[str, int] = field(default_factory=dict)

    def run(self, summary: Summary | None = None) -> Summary:
        """One cycle under a lease the caller holds, filling ``summary`` as it goes. Raises
        on failure; the chunk that failed, and any after it, are not committed. The run's
        request counts and duration are the caller's (``poller.app.run_cycle``)."""
        summary = summary or Summary(mode=self.mode, run_id=self.run_id)
        now = self.clock()
        checkpoint = self.checkpoints.load()
        self.check_statuses(checkpoint)
        since, until = cycle_window(checkpoint, now, self.settings)
        self.walk(since, until, now, summary, LiveCheckpoint(self, checkpoint, now))
        # New alerts first: the revisit runs once the live window is committed.
        if self.revisit is not None:
            first = checkpoint.watermark is None
            self.revisit.run(now, since, summary, self, self.first_dismissed, first)
        return summary

    def fence(self) -> None:
        self._fence()

    def stopping(self) -> bool:
        return self.hooks.should_stop()

    def progress(self, summary: Summary) -> None:
        self._keep_lease()
        self.hooks.observer.page(summary)

    def walk(
        self,
        since: datetime,
        until: datetime,
        now: datetime,
        summary: Summary,
        plan: ChunkPlan,
        aligned: bool = False,
    ) -> None:
        """The one walk over a window: chunks oldest first, each read, archived and handed to
        ``plan`` on its own, so a run killed halfway keeps the chunks it finished. ``sync``
        (a first run over days, a catch-up after an outage) and ``backfill`` both walk here."""
        summary.window = {"from": iso_z(since), "until": iso_z(until)}
        pieces = list(chunks(since, until, self.settings.max_window, aligned))
        summary.chunks_total = len(pieces)
        deadline = Deadline(cycle_deadline(self.settings, len(pieces)), self.hooks.monotonic)
        self.hooks.observer.started(summary, len(pieces))
        log.info(
            "cycle.start",
            extra={
                "fields": {
                    "mode": self.mode,
                    "window": summary.window,
                    "chunks": len(pieces),
                    "deadline_s": round(deadline.seconds),
                }
            },
        )
        owed = set(self.pending.ids()) if self.pending is not None else set()
        todo = deque(pieces)
        carried: dict[str, int] = {}  # archived by a listing that was split, not committed
        done = 0
        while todo:
            chunk_since, chunk_until = todo.popleft()
            unread = plan.unread(chunk_since, chunk_until)
            if not unread:
                plan.skipped(chunk_since, chunk_until, summary)
                done += 1
                summary.chunks_skipped += 1
                self.hooks.observer.committed(summary, done)
                continue
            if self.pending is not None and not todo and summary.chunks_total > 1:
                # Listed again before the last chunk, where fresh pushes land: an alert
                # pushed while a long walk ran is met as pushed, not as new (one LIST).
                owed |= set(self.pending.ids())
            seen_now: dict[str, int] = {}
            if chunk_since < chunk_until:  # the API wants from < until
                known = {**plan.known, **carried} if carried else plan.known
                splittable = chunk_until - chunk_since >= MIN_SPLIT
                try:
                    seen_now = self._archive_window(
                        known,
                        chunk_since,
                        chunk_until,
                        now,
                        summary,
                        deadline,
                        owed,
                        splittable,
                        unread,
                    )
                except ChunkTooLong as too_long:
                    halves = self._split(chunk_since, chunk_until, summary, deadline)
                    todo.extendleft(reversed(halves))
                    carried.update(too_long.args[0])
                    continue
            self._fence()
            plan.finish(chunk_since, chunk_until, seen_now, summary)
            self._settle_pending(seen_now, owed)
            done += 1
            summary.chunks_done += 1
            self.hooks.observer.committed(summary, done)
        self._fetch_owed(owed, now, summary, deadline)

    def _split(
        self, since: datetime, until: datetime, summary: Summary, deadline: Deadline
    ) -> list[tuple[datetime, datetime]]:
        """Two halves of a chunk whose listing is too long for the time it was given, each
        committed on its own: a long chunk makes progress that survives the deadline, which
        grows by the two new listings' time per status."""
        pieces = halves(since, until)
        middle = pieces[0][1]
        summary.chunks_total += 1
        extra = 2 * len(self.settings.statuses) * self.settings.seconds_per_listing
        if self.settings.max_cycle is None:
            deadline.extend(extra)
        log.info(
            "chunk.split",
            extra={"fields": {"from": iso_z(since), "until": iso_z(until), "at": iso_z(middle)}},
        )
        return pieces

    def _fetch_owed(
        self, owed: set[str], now: datetime, summary: Summary, deadline: Deadline
    ) -> None:
        """Pushed alerts the window did not list (created before it: a batch re-sent after
        an outage, say) are fetched one by one, so an accepted alert is never forgotten.

        No owed id can block the others or the cycle: at most ``settings.owed_fetches`` a
        cycle (a capped share of the budget), drawn in a random order so each id's turn
        comes; none starts past the cycle's deadline, and the first transient failure
        (5xx, timeouts after their retries) ends them for this cycle. An id the API answers
        404 for after OWED_NOT_FOUND_GRACE (another organisation's alert, one past
        retention, a typo), or that failed OWED_MAX_ATTEMPTS times, is given up on with the
        reason (``status`` lists it); one not visible yet waits for the next cycle. A 400,
        401 or 403 for an id counts as a failed fetch of that id, never fails the cycle."""
        if self.pending is None or not owed:
            return
        turn = sorted(owed)
        random.shuffle(turn)
        for alert_id in turn[: self.settings.owed_fetches]:
            if deadline.passed():
                log.info("pending.deadline", extra={"fields": {"left": len(owed)}})
                return
            record = self.pending.owed(alert_id)
            if record is None:
                continue  # fetched meanwhile by the push path's detail fetch
            try:
                raw = self.source.get_alert(alert_id)
            except NotFound as exc:
                if now - record.since >= OWED_NOT_FOUND_GRACE:
                    self._give_up(record, f"the API answers 404 for it: {exc}", now)
                else:
                    log.info("pending.not_yet", extra={"fields": {"id": alert_id}})
                continue
            except (ApiRequestError, ApiAuthError, RetriableError) as exc:
                # A 403 (or 401) here is about this id: the cycle's listings just worked with
                # the same credentials. Failing the cycle for it would fail every cycle.
                if record.attempts + 1 >= OWED_MAX_ATTEMPTS:
                    self._give_up(record, f"{record.attempts + 1} fetches failed: {exc}", now)
                else:
                    self.pending.failed(record, str(exc))
                if isinstance(exc, RetriableError):
                    log.info("pending.api_unwell", extra={"fields": {"error": str(exc)}})
                    return
                continue
            item = classify(raw)
            if not isinstance(item, Alert) or item.id != alert_id:
                self._give_up(record, "the API's answer is not this alert's record", now)
                continue
            status = "dismissed" if item.raw.get("isDismissed") else "active"
            outcome = self.archive.take(item, status, now, webhook=False)
            summary.listed += 1
            if outcome is Outcome.ARCHIVED:
                summary.archived += 1
            elif outcome is Outcome.QUARANTINED:
                summary.quarantined += 1
            else:
                summary.already_archived += 1
            self.pending.done(alert_id)

    def _give_up(self, record: Owed, reason: str, now: datetime) -> None:
        assert self.pending is not None
        log.warning("pending.given_up", extra={"fields": {"id": record.alert_id, "reason": reason}})
        self.pending.give_up(record, reason, now)

    def _settle_pending(self, seen_now: dict[str, int], owed: set[str]) -> None:
        """Pushed alerts this chunk read now have their full record (written, or there)."""
        if self.pending is None:
            return
        for alert_id in sorted(owed & set(seen_now)):
            self.pending.done(alert_id)
            owed.discard(alert_id)

    def commit_live(
        self,
        checkpoint: Checkpoint,
        watermark: datetime,
        seen_now: dict[str, int],
        now: datetime,
        summary: Summary,
    ) -> Checkpoint:
        """Move the live checkpoint to ``watermark`` (never backwards), keeping in ``seen``
        what the next read can meet again. The caller has just proved the lease is ours."""
        watermark = max(watermark, checkpoint.watermark or watermark)
        seen = prune_seen({**checkpoint.seen, **seen_now}, watermark, self.settings.lookback)
        committed = self.checkpoints.commit(
            checkpoint,
            watermark,
            seen,
            self.run_id,
            self.mode,
            now,
            self.settings.statuses,
            summary.counts(),
        )
        summary.watermark = iso_z(watermark)
        log.info("checkpoint.committed", extra={"fields": {"watermark": summary.watermark}})
        return committed

    def check_statuses(self, checkpoint: Checkpoint) -> None:
        """One watermark covers every status list: a run that polls fewer lists than the
        checkpoint covers would move it past alerts it never read."""
        covered = checkpoint.document.get("statuses")
        if not isinstance(covered, list):
            return
        missing = sorted(set(map(str, covered)) - set(self.settings.statuses))
        if missing:
            raise ConfigError(
                [
                    f"threatstack.statuses: this run polls {list(self.settings.statuses)} but"
                    f" the checkpoint also covers {missing}; polling fewer lists would skip"
                    " their alerts for good (poll them all, or use another prefix)"
                ]
            )
        added = sorted(set(self.settings.statuses) - set(map(str, covered)))
        if added:
            # The watermark says nothing of a list it never covered: from here on it is read,
            # what lies behind the watermark is a backfill's work (README, Configuration).
            log.warning(
                "checkpoint.statuses_widened",
                extra={
                    "fields": {
                        "added": added,
                        "watermark": checkpoint.document.get("watermark"),
                        "hint": "run `poller backfill --until WATERMARK` to read the added"
                        " lists behind the watermark",
                    }
                },
            )

    def _keep_lease(self) -> None:
        """Between pages: a run that lost its lease stops within a page, not at the end of
        its chunk (a day, in a catch-up). Free unless the last renewal is old (a pause)."""
        lost = self.hooks.lease_lost()
        if lost is not None:
            raise lost
        self.lease.confirm()

    def _fence(self) -> None:
        """Prove the lease is still ours right before writing state (a paused process that
        lost it must not commit)."""
        lost = self.hooks.lease_lost()
        if lost is not None:
            raise lost
        self.lease.renew()

    def _archive_window(
        self,
        known: dict[str, int],
        since: datetime,
        until: datetime,
        now: datetime,
        summary: Summary,
        deadline: Deadline,
        pushed: set[str],
        splittable: bool = False,
        statuses: tuple[str, ...] | None = None,
    ) -> dict[str, int]:
        """Read and archive one chunk; ``pushed``: ids with a pending marker, whose webhook
        record the push path wrote (only their full record is written here). ChunkTooLong
        (carrying what was taken) when a ``splittable`` chunk's listing needs more than
        ``pages_per_listing`` pages. ``statuses``: the lists to read (default: the cycle's)."""
        seen_now: dict[str, int] = {}

        def tally(outcomes: Counter[Outcome]) -> None:
            summary.archived += outcomes[Outcome.ARCHIVED]
            summary.already_archived += outcomes[Outcome.ALREADY_ARCHIVED]
            summary.quarantined += outcomes[Outcome.QUARANTINED]

        with writing(self.settings.max_concurrency, tally) as writer:
            for status in poll_order(statuses or self.settings.statuses):
                for pages, page in enumerate(self.source.list_alerts(status, since, until), 1):
                    if self.hooks.should_stop():
                        raise Stopped()
                    self._keep_lease()  # before this page's alerts are written
                    if splittable and pages > self.settings.pages_per_listing:
                        writer.finish()  # what was handed over is archived: carried, not lost
                        raise ChunkTooLong(dict(seen_now))
                    deadline.check()
                    for raw in page:
                        self._take(
                            raw, status, known, seen_now, writer, until, now, summary, pushed
                        )
                    self.hooks.observer.page(summary)
                    log.info(
                        "page.read",
                        extra={
                            "fields": {
                                "status": status,
                                "alerts": len(page),
                                "listed": summary.listed,
                            }
                        },
                    )
        return seen_now

    def _take(
        self,
        raw: Any,
        status: str,
        known: dict[str, int],
        seen_now: dict[str, int],
        writer: BoundedWriter[Outcome],
        until: datetime,
        now: datetime,
        summary: Summary,
        pushed: set[str],
    ) -> None:
        item = classify(raw)
        if isinstance(item, Alert):
            key, created = item.id, int(item.created.timestamp())
        else:
            key, created = item.seen_key, int(until.timestamp())
        if key in seen_now:
            return  # the same alert again: on another page, or in the other status list
        seen_now[key] = created
        summary.listed += 1
        if key in known:
            summary.already_archived += 1
            return
        if isinstance(item, Rejected):
            log.warning(
                "alert.quarantined",
                extra={"fields": {"reason": item.reason, "detail": item.detail, "status": status}},
            )
        webhook = not (isinstance(item, Alert) and item.id in pushed)
        if status != "dismissed" or not isinstance(item, Alert):
            writer.submit(lambda: self.archive.take(item, status, now, webhook))
            return
        alert = item

        def take_dismissed() -> Outcome:
            outcome, full_written = self.archive.take_detail(alert, status, now, webhook)
            if full_written:  # its full record is the dismissed version: no revisit needed
                self.first_dismissed[alert.id] = created
            return outcome

        writer.submit(take_dismissed)


class LiveCheckpoint:
    """``sync``'s plan: after each chunk, commit the live checkpoint to the chunk's end."""

    def __init__(self, cycle: Cycle, checkpoint: Checkpoint, now: datetime) -> None:
        self._cycle = cycle
        self._checkpoint = checkpoint
        self._now = now

    @property
    def known(self) -> dict[str, int]:
        return self._checkpoint.seen

    def unread(self, since: datetime, until: datetime) -> tuple[str, ...]:
        return self._cycle.settings.statuses

    def skipped(self, since: datetime, until: datetime, summary: Summary) -> None:
        raise AssertionError("sync reads every chunk")  # unread() is never empty

    def finish(
        self, since: datetime, until: datetime, seen_now: dict[str, int], summary: Summary
    ) -> None:
        self._checkpoint = self._cycle.commit_live(
            self._checkpoint, until, seen_now, self._now, summary
        )
