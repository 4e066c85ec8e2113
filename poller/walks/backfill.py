"""``poller backfill``: catch up a past range with the same walk as ``sync``, resumably.

The range is cut at whole multiples of ``sync.max_window_seconds`` (UTC days by default),
oldest first, and each finished chunk is recorded under ``P/_poller/backfill/`` with the
alert lists (statuses) it was read for: a rerun after a kill skips the recorded chunks and
re-reads only the unfinished one, whose archived alerts cost a 412 each and are never
rewritten. A chunk recorded for fewer statuses than this run polls (an earlier backfill with
``threatstack.statuses: [active]``) is not finished for this run: the lists no record covers
are read over it, and only then is it recorded for all of them and may the live checkpoint
pass it.

Oldest first, because then what is done is always a prefix of the range: the live checkpoint
can be moved forward over it as soon as the walk passes the watermark (a newest-first walk
could never move it until the very end), and a killed run leaves no holes to reason about.

Before a chunk is recorded, its dismissed list is read once more (``Revisit.sweep``) and
the dismissal records missing there are written, create-only, as the revisit writes them:
alerts archived earlier while active and dismissed since, which the walk met as already
archived. A skipped chunk's alert lists are not read again, but its dismissed list is, once
``sync.revisit_interval_seconds`` have passed since its record was written (or last swept):
a backfill rerun over an old range writes the dismissals made since, while a rerun right
after a kill costs nothing for the chunks it finished.

The live checkpoint is never moved backwards, and forward only over ground the walk has
covered without a gap from at or before the watermark. With no checkpoint at all, a backfill
that runs up to now (no ``--until``) creates it as it goes, as a first ``sync`` would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from poller.archive.state import Checkpoint, ChunkRecords
from poller.timeutil import iso_z
from poller.walks.sync import Cycle, Summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackfillRange:
    since: datetime
    until: datetime
    to_now: bool  # no --until: the range ends at the live edge (now - settle)


class BackfillPlan:
    """A ChunkPlan: read what no record covers, record finished chunks with the statuses
    they are covered for, carry the live checkpoint."""

    def __init__(
        self,
        cycle: Cycle,
        records: ChunkRecords,
        live: Checkpoint,
        span: BackfillRange,
        now: datetime,
    ) -> None:
        self._cycle = cycle
        self._records = records
        self._live = live
        self._span = span
        self._now = now

    @property
    def known(self) -> dict[str, int]:
        return self._live.seen

    def unread(self, since: datetime, until: datetime) -> tuple[str, ...]:
        covered = self._records.covered(since, until)
        return tuple(s for s in self._cycle.settings.statuses if s not in covered)

    def skipped(self, since: datetime, until: datetime, summary: Summary) -> None:
        revisit = self._cycle.revisit
        record = self._records.last_written(since, until)
        if revisit is None or not since < until or record is None or record.written is None:
            return
        if self._now - record.written < revisit.interval:
            return  # swept (or finished) lately: a rerun after a kill, say
        fresh = self._cycle.first_dismissed
        revisit.sweep(since, until, self._now, summary, self._cycle, fresh)
        self._cycle.fence()
        self._records.swept(record, self._cycle.clock())
        log.info(
            "backfill.dismissals_swept",
            extra={"fields": {"from": iso_z(since), "until": iso_z(until)}},
        )

    def finish(
        self, since: datetime, until: datetime, seen_now: dict[str, int], summary: Summary
    ) -> None:
        if self._cycle.revisit is not None and since < until:
            fresh = self._cycle.first_dismissed
            self._cycle.revisit.sweep(since, until, self._now, summary, self._cycle, fresh)
        self._cycle.archive.settle()  # the days it wrote into: due again, before the record
        earlier = self._records.covered(since, until)
        read = sorted(set(self._cycle.settings.statuses) - earlier)
        self._records.record(
            since,
            until,
            earlier | set(self._cycle.settings.statuses),
            {
                "run_id": self._cycle.run_id,
                "finished_at": iso_z(self._cycle.clock()),
                "read": read,  # the statuses this run listed; the rest earlier records had
            }
            | summary.counts(),
        )
        if self._may_advance(until):
            self._live = self._cycle.commit_live(self._live, until, seen_now, self._now, summary)

    def _may_advance(self, until: datetime) -> bool:
        """Everything from the range's start to ``until`` is archived (oldest first, and a
        skipped chunk was finished earlier); that may carry the watermark only if the range
        started at or before it, so no gap is jumped."""
        watermark = self._live.watermark
        if watermark is None:
            return self._span.to_now
        return self._span.since <= watermark < until


def backfill(cycle: Cycle, records: ChunkRecords, span: BackfillRange, summary: Summary) -> None:
    """Walk ``span`` under the lease the caller holds."""
    now = cycle.clock()
    live = cycle.checkpoints.load()
    cycle.check_statuses(live)
    plan = BackfillPlan(cycle, records.load(), live, span, now)
    cycle.walk(span.since, span.until, now, summary, plan, aligned=True)
