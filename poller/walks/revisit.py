"""The revisit: archive the dismissals of alerts that were first archived while active.

The API lists alerts by creation time, and an analyst dismisses an alert hours or days after
it fired, so the live window never reads it again. When due (every
``sync.revisit_interval_seconds``; 0: every cycle), a cycle therefore also re-reads the
dismissed list over creation times ``[now - sync.revisit_days, where the live window starts)``
and, for each alert not handled yet, reads its archived full record (one GET): if that record
is the active version, the alert as the dismissed list returned it is written create-only to
``P/dismissals/ID[0:2]/ID[2:4]/ID`` (SPEC "Dismissals"). An alert first archived dismissed
needs none; an alert the archive does not hold is left to ``verify`` and ``backfill``.

Every alert decided is kept in ``handled`` (``P/_poller/revisit.json``, see
``poller.archive.revisits``), so the next revisit costs one list request per 100 dismissed
alerts and no S3 request for them (SPEC "Performance").

Resumable: the range is cut in aligned chunks (``sync.max_window_seconds``) and the state is
saved after every chunk that decided something, with the chunk's end as ``cursor``. A run
killed or stopped in the middle is resumed by the next cycle, due or not, from its cursor;
re-reading the unfinished chunk costs list requests only, and a record written just before a
kill meets a 412, never a second write. A revisit spends at most ``pages_per_cycle`` list
requests per cycle (checked between chunks), then yields to the next cycle's live window.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from poller.archive.records import UNENCODABLE, Alert, classify
from poller.archive.revisits import RevisitState, RevisitStore
from poller.archive.writer import Archive
from poller.errors import Stopped
from poller.timeutil import Clock, floor_second, iso_z, parse_instant
from poller.walks.sync import AlertSource, BoundedWriter, CycleGuard, Summary, chunks

log = logging.getLogger(__name__)

# What the revisit decided for one dismissed alert.
ARCHIVED = "archived"  # its dismissal record was written now
ALREADY = "already_archived"  # its dismissal record was there (a 412)
FIRST_DISMISSED = "first_dismissed"  # its full record is the dismissed version: none needed
NOT_ARCHIVED = "not_archived"  # the archive has no full record (verify reports it)
UNENCODABLE_ALERT = "unencodable"  # no faithful JSON form (logged)
API_KEEPS = timedelta(days=366)  # the API's year of alerts (config caps revisit_days there)
RESULTS = (ARCHIVED, ALREADY, FIRST_DISMISSED, NOT_ARCHIVED, UNENCODABLE_ALERT)


@dataclass(frozen=True)
class RevisitSettings:
    days: int  # 0: no revisit
    interval: timedelta  # 0: every cycle
    chunk: timedelta = timedelta(days=1)
    max_concurrency: int = 16
    pages_per_cycle: int = 100  # list requests a cycle gives the revisit before yielding


def revisit_due(state: RevisitState, now: datetime, interval: timedelta) -> bool:
    """An unfinished revisit is always due (it resumes); else one ``interval`` after the
    last one started."""
    if state.current is not None or state.last is None:
        return True
    try:
        started = parse_instant(str(state.last["started_at"]), now)
    except (KeyError, ValueError):
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
        end = parse_instant(current["until"], now)
        cursor = parse_instant(current["cursor"], now)
        report = summary.revisit = {
            "due": True,
            "from": current["from"],
            "until": current["until"],
            "last_started_at": _last_started(state),
        }
        report.update(resumed=current["run_id"] != self.run_id or cursor > since)
        finished = self._walk(state, since, end, cursor, now, summary, guard)
        report.update({k: current[k] for k in ("listed", *RESULTS)}, finished=finished)
        if finished:
            state.last = {
                **{k: v for k, v in current.items() if k != "cursor"},
                "finished_at": iso_z(self.clock()),
            }
            state.current = None
            state.handled = prune_handled(state.handled, since)
            report["last_started_at"] = current["started_at"]
            guard.fence()
            self.states.save(state, self.run_id, now)
        log.info("revisit.done" if finished else "revisit.yielded", extra={"fields": report})

    def _walk(
        self,
        state: RevisitState,
        since: datetime,
        until: datetime,
        cursor: datetime,
        now: datetime,
        summary: Summary,
        guard: CycleGuard,
    ) -> bool:
        """Chunks from ``cursor`` on; True when the range is done, False when it yielded."""
        assert state.current is not None
        pages = 0
        for chunk_since, chunk_until in chunks(since, until, self.settings.chunk, aligned=True):
            last = chunk_until >= until  # its state is saved with the finished revisit
            if chunk_until <= cursor:
                continue  # finished by an earlier run
            if pages >= self.settings.pages_per_cycle:
                guard.fence()
                saved = self.states.save(state, self.run_id, now)
                state.etag = saved.etag
                return False
            counts, handled_now, used = self._chunk(
                chunk_since, chunk_until, state.handled, summary, guard
            )
            pages += used
            for name, value in counts.items():
                state.current[name] = state.current.get(name, 0) + value
            state.current["cursor"] = iso_z(chunk_until)
            state.handled.update(handled_now)
            if handled_now and not last:
                guard.fence()
                state.etag = self.states.save(state, self.run_id, now).etag
        return True

    # ------------------------------------------------------------------ one chunk
    def _chunk(
        self,
        since: datetime,
        until: datetime,
        handled: Mapping[str, int],
        summary: Summary,
        guard: CycleGuard,
    ) -> tuple[dict[str, int], dict[str, int], int]:
        """Decide every dismissed alert created in [since, until) not handled yet. Returns
        the counts, the ids decided now (id -> creation second), and the pages read."""
        handled_now: dict[str, int] = {}
        counts = dict.fromkeys(("listed", *RESULTS), 0)
        writer: BoundedWriter[str] = BoundedWriter(self.settings.max_concurrency)
        pages = 0
        seen: set[str] = set()
        try:
            if since < until:
                for page in self.source.list_alerts("dismissed", since, until):
                    pages += 1
                    guard.progress(summary)
                    if guard.stopping():
                        raise Stopped()
                    for raw in page:
                        item = classify(raw)
                        # Quarantine is the live path's job; the revisit needs a safe id.
                        if not isinstance(item, Alert) or item.id in seen:
                            continue
                        seen.add(item.id)
                        counts["listed"] += 1
                        if item.id in handled:
                            continue
                        writer.submit(self._task(item, handled_now))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            for name in RESULTS:
                counts[name] += writer.outcomes[name]
            summary.dismissals_archived += writer.outcomes[ARCHIVED]
        return counts, handled_now, pages

    def _task(self, alert: Alert, handled_now: dict[str, int]) -> Callable[[], str]:
        def decide() -> str:
            result = self.decide(alert)
            with self._lock:
                handled_now[alert.id] = int(alert.created.timestamp())
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
        try:
            written = self.archive.store_dismissal(alert)
        except UNENCODABLE as exc:
            log.warning(
                "dismissal.unencodable",
                extra={"fields": {"id": alert.id, "error": type(exc).__name__}},
            )
            return UNENCODABLE_ALERT
        if written:
            log.info("dismissal.archived", extra={"fields": {"id": alert.id}})
        return ARCHIVED if written else ALREADY

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
        for chunk_since, chunk_until in chunks(since, until, self.settings.chunk, aligned=True):
            known = {**state.handled, **(first_dismissed or {})}
            counts, handled_now, _ = self._chunk(chunk_since, chunk_until, known, summary, guard)
            for name, value in counts.items():
                counts_total[name] += value
            handled_now = prune_handled(handled_now, reach)
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
