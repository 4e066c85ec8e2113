"""The archive: create-only writes of the two records of an alert, and of quarantined objects.

First sight wins: every write carries ``If-None-Match: *``, so a 412 simply means "already
archived" and re-reads, retries, restarts and concurrent runs never overwrite anything.
Only poller errors leave ``take``: storage failures as they are (they fail the run), and a
bug met by one alert quarantines that alert (``internal_error``) instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from datetime import date, datetime
from enum import Enum
from typing import Any

from poller.archive.records import (
    UNENCODABLE,
    Alert,
    Layout,
    Rejected,
    json_body,
    quarantine_body,
    webhook_record,
)
from poller.archive.store import ObjectStore, PreconditionFailed
from poller.errors import FatalError, PollerError
from poller.timeutil import utc_now

log = logging.getLogger(__name__)


class Outcome(Enum):
    ARCHIVED = "archived"  # at least one of the two records was written now
    ALREADY_ARCHIVED = "already_archived"  # both records were there before
    QUARANTINED = "quarantined"


class Archive:
    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        organization_id: str,
        touched: set[date] | None = None,
        before_write: Callable[[date], None] | None = None,
        after_writes: Callable[[set[date]], None] | None = None,
    ) -> None:
        self._store = store
        self.layout = layout
        self._organization_id = organization_id
        # The UTC creation days archived into: a backfill or a repair makes them due again
        # for the query tables (poller.tables).
        self.touched = touched if touched is not None else set()
        # Called with an alert's creation day before its records are written (a backfill's
        # and a repair's write-ahead due marker: a kill after the write still leaves the day
        # to be tabled again, and the rerun's 412 would not).
        self._before_write = before_write
        # Called by ``settle`` with the days written into since the last settle: their due
        # markers again, after the writes (see settle).
        self._after_writes = after_writes
        self._unsettled: set[date] = set()
        self._unsettled_lock = threading.Lock()

    def _create(self, key: str, body: bytes) -> bool:
        try:
            self._store.put(key, body, if_none_match=True, retain=True)
        except PreconditionFailed:
            return False
        return True

    def take(
        self, item: Alert | Rejected, status: str, seen_at: datetime, webhook: bool = True
    ) -> Outcome:
        """Archive an alert or quarantine a rejected object. Raises only PollerError.
        ``webhook=False``: a pushed alert, whose webhook record the push path wrote."""
        return self.take_detail(item, status, seen_at, webhook)[0]

    def take_detail(
        self, item: Alert | Rejected, status: str, seen_at: datetime, webhook: bool = True
    ) -> tuple[Outcome, bool]:
        """``take``, also saying whether the full record was written now (from ``status``'s
        list: the revisit needs no GET to know a full record written from the dismissed list
        is the dismissed version)."""
        try:
            if isinstance(item, Rejected):
                return self.quarantine(item, status, seen_at), False
            return self._store_alert(item, status, seen_at, webhook)
        except PollerError:
            raise
        except Exception as exc:
            alert_id = item.id if isinstance(item, Alert) else None
            log.exception("alert.failed", extra={"fields": {"id": alert_id, "status": status}})
            try:
                detail = f"{type(exc).__name__} while archiving"
                return self.quarantine(
                    Rejected("internal_error", detail, item.raw), status, seen_at
                ), False
            except PollerError:
                raise
            except Exception as again:
                raise FatalError(f"cannot quarantine an object ({type(again).__name__})") from again

    def store_alert(
        self, alert: Alert, status: str, seen_at: datetime, webhook: bool = True
    ) -> Outcome:
        """Write the full record, then the webhook record; each only if it is not there yet.
        Both bodies are rendered first: an alert with no faithful JSON form is quarantined
        whole (``unencodable``), never half archived. ``webhook=False`` writes the full
        record only: the push path wrote the webhook record, under the push's minute, and a
        second one under the API's minute would be a duplicate (README, *One webhook key*)."""
        return self._store_alert(alert, status, seen_at, webhook)[0]

    def _store_alert(
        self, alert: Alert, status: str, seen_at: datetime, webhook: bool = True
    ) -> tuple[Outcome, bool]:
        bodies = self._bodies(alert)
        if isinstance(bodies, Rejected):
            log.warning("alert.quarantined", extra={"fields": {"reason": bodies.reason}})
            return self.quarantine(bodies, status, seen_at), False
        full_body, webhook_body = bodies
        if self._before_write is not None:
            self._before_write(alert.created.date())
        full = self._create(self.layout.alert_key(alert.id), full_body)
        wrote_webhook = webhook and self._create(
            self.layout.webhook_key(alert.id, alert.created), webhook_body
        )
        if full or wrote_webhook:
            self.touched.add(alert.created.date())
            with self._unsettled_lock:
                self._unsettled.add(alert.created.date())
        outcome = Outcome.ARCHIVED if (full or wrote_webhook) else Outcome.ALREADY_ARCHIVED
        return outcome, full

    def _bodies(self, alert: Alert) -> tuple[bytes, bytes] | Rejected:
        """The full record's and the webhook record's bodies, or why the alert has none."""
        try:
            return json_body(alert.raw), json_body(webhook_record(alert, self._organization_id))
        except UNENCODABLE as exc:
            return _unencodable(alert, exc)

    def into_day(self, day: date) -> None:
        """Before a write whose alert's row is built from ``day``, not from its creation day
        (a pushed alert's webhook record filed across midnight): ``day`` gets the
        write-ahead due marker now, and its marker again at the next ``settle`` and at the
        run's end, as a day written into."""
        if self._before_write is not None:
            self._before_write(day)
        self.touched.add(day)
        with self._unsettled_lock:
            self._unsettled.add(day)

    def settle(self) -> None:
        """Before a walk commits what it wrote (a backfill's chunk record, the end of a day
        verify repaired): the days written into since the last settle get their due markers
        again. A tables pass that listed such a day before a write, and would clear the
        marker written ahead of the first one, finds its ETag moved and leaves the day due;
        so a kill after the commit (the rerun skips the chunk) loses no alert of the tables."""
        with self._unsettled_lock:
            days, self._unsettled = self._unsettled, set()
        if days and self._after_writes is not None:
            self._after_writes(days)

    def quarantine_key_of(self, alert: Alert) -> str:
        """Where ``take`` keeps ``alert`` when it quarantines it: under ``unencodable`` when
        it has no faithful JSON form, else (a bug met while archiving) ``internal_error``."""
        bodies = self._bodies(alert)
        reason = bodies.reason if isinstance(bodies, Rejected) else "internal_error"
        return self.layout.quarantine_key(reason, Rejected(reason, "", alert.raw).digest)

    def store_full(self, alert: Alert) -> bool:
        """Only the full record (the push path has written the webhook record); True when
        written now, False when it was there."""
        return self._create(self.layout.alert_key(alert.id), json_body(alert.raw))

    def store_dismissal(self, alert: Alert) -> bool:
        """The dismissal record (SPEC "Dismissals"): the alert as the dismissed list returned
        it, written once, create-only and under retention like the first record. True when
        written now, False when it was there. Raises UNENCODABLE for an object JSON cannot
        carry faithfully.

        Then its entry in the time-keyed index ``P/_poller/index/dismissals/YYYY/MM/DD/HH/ID``
        (README, *Query the archive*), also when the record was there already: a run stopped
        between the two writes leaves a record the retry's 412 brings here again."""
        key = self.layout.dismissal_key(alert.id)
        written = self._create(key, json_body(alert.raw))
        with contextlib.suppress(PreconditionFailed):  # this hour's entry is there already
            self._store.put(
                self.layout.dismissal_index_key(alert.id, utc_now()),
                json_body({"key": key}),
                if_none_match=True,
            )
        return written

    def take_dismissal(self, alert: Alert, seen_at: datetime) -> Outcome:
        """``store_dismissal``, or for a dismissed version with no faithful JSON form (a NaN
        the API's parser accepted), its quarantine (``unencodable``, status ``dismissed``):
        the dismissal is kept, as an alert would be, never only logged. Then ``verify``
        finds it there and ``--repair`` does not try it again."""
        try:
            written = self.store_dismissal(alert)
        except UNENCODABLE as exc:
            rejected = _unencodable(alert, exc)
            log.warning(
                "dismissal.quarantined",
                extra={"fields": {"id": alert.id, "reason": rejected.reason}},
            )
            return self.quarantine(rejected, "dismissed", seen_at)
        return Outcome.ARCHIVED if written else Outcome.ALREADY_ARCHIVED

    def archived_full(self, alert_id: str) -> Any:
        """The full record as archived (parsed JSON), or None when there is none."""
        stored = self._store.get(self.layout.alert_key(alert_id))
        if stored is None:
            return None
        try:
            return json.loads(stored.body)
        except ValueError:
            return {}  # not ours to judge here: verify --checksums reports altered bodies

    def quarantine(self, rejected: Rejected, status: str, seen_at: datetime) -> Outcome:
        """Keep what cannot be archived, with its reason, under ``_poller/quarantine/``."""
        key = self.layout.quarantine_key(rejected.reason, rejected.digest)
        self._create(key, quarantine_body(rejected, status, seen_at))
        return Outcome.QUARANTINED


def _unencodable(alert: Alert, exc: Exception) -> Rejected:
    """Why ``alert`` has no record: no faithful JSON form (quarantined under that reason)."""
    detail = f"no faithful JSON form ({type(exc).__name__}: {str(exc)[:120]})"
    return Rejected("unencodable", detail, alert.raw)
