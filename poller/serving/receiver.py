"""The push path's work: take a webhook batch into the archive at once, fetch full records
later, and never forget an accepted alert.

For each pushed alert the webhook record is written create-only before the answer (so the
200 means "durably taken"), and a pending marker ``P/_poller/pending/ID`` says its full record
is still owed. A bounded queue feeds one worker that fetches ``GET /v2/alerts/{id}`` and
writes the full record, create-only, then drops the marker, unless the API's createdAt falls
in another minute than the push's created_at: then the marker stays until a sync cycle meets
the alert and writes no second webhook record (one webhook key per alert). It fetches only
while the shared request budget has headroom (under half of it used in the last minute):
the polling cycle comes first. When pushes outpace that, or the queue is full, the alert
simply stays pending: the next sync cycle lists it (one request per hundred alerts), writes
its full record, and clears the marker. ``poller status`` shows what is pending.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from poller.archive.records import (
    Alert,
    Layout,
    Rejected,
    as_integer,
    as_text,
    classify,
    json_body,
)
from poller.archive.state import PendingRecords
from poller.archive.store import ObjectStore, PreconditionFailed
from poller.archive.writer import Archive
from poller.errors import PollerError
from poller.serving.pushes import PushedAlert

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
QUEUE_SIZE = 256
# Fetch a full record only while less than this share of the budget was used in 60 s.
DETAIL_SHARE = 0.5


def webhook_document(
    alert_id: str, created: datetime, raw: dict[str, Any], org: str
) -> dict[str, Any]:
    """The webhook record in SPEC's format, from what the push said: numbers normalised."""

    return {
        "id": alert_id,
        "title": as_text(raw.get("title")),
        "created_at": (created - EPOCH) // timedelta(milliseconds=1),
        "severity": as_integer(raw.get("severity")),
        "organization_id": as_text(raw.get("organization_id")) or org,
        "server_or_region": as_text(raw.get("server_or_region")),
        "source": as_text(raw.get("source")) or "Host",
    }


def same_minute(one: datetime, other: datetime) -> bool:
    """Whether two times name the same webhook key minute (``YYYY/MM/DD/HH/MM``, UTC)."""
    return one.astimezone(UTC).replace(second=0, microsecond=0) == other.astimezone(UTC).replace(
        second=0, microsecond=0
    )


class DetailFetcher:
    """One worker that turns pending ids into full records, within the budget's headroom."""

    def __init__(
        self,
        fetch: Callable[[str], Any],
        write_full: Callable[[Alert], bool],
        pending: PendingRecords,
        headroom: Callable[[], bool],
        stop: threading.Event,
    ) -> None:
        self._fetch = fetch
        self._write_full = write_full
        self._pending = pending
        self._headroom = headroom
        self._stop = stop
        # (id, the push's created_at): the minute of the webhook key the push wrote
        self._queue: queue.Queue[tuple[str, datetime]] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="detail-fetch", daemon=True)
        self.fetched = 0
        self.left_to_sync = 0

    def start(self) -> DetailFetcher:
        self._thread.start()
        return self

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def offer(self, alert_id: str, pushed_created: datetime) -> bool:
        """Queue a fetch; False (it stays pending for the next sync) when the queue is full.
        ``pushed_created``: the push's created_at, whose minute names its webhook key."""
        try:
            self._queue.put_nowait((alert_id, pushed_created))
        except queue.Full:
            self.left_to_sync += 1
            return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alert_id, pushed_created = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if not self._headroom():
                self.left_to_sync += 1  # the polling cycle needs the budget: sync will do it
                continue
            self.fetch_one(alert_id, pushed_created)

    def fetch_one(self, alert_id: str, pushed_created: datetime) -> None:
        """Fetch and write one full record; the marker is dropped only when the API's
        createdAt names the push's webhook minute: otherwise it stays until a sync meets
        the alert, so the poll path writes no second webhook record (README, *One webhook
        key per alert*). Failures are logged; the alert stays pending."""
        try:
            item = classify(self._fetch(alert_id))
            if isinstance(item, Alert) and item.id == alert_id:
                self._write_full(item)
                self.fetched += 1
                if same_minute(item.created, pushed_created):
                    self._pending.done(alert_id)
        except PollerError as exc:  # it stays pending; the next sync covers it
            log.warning("push.detail_failed", extra={"fields": {"id": alert_id, "error": str(exc)}})
        except Exception:
            log.exception("push.detail_crashed", extra={"fields": {"id": alert_id}})


class Receiver:
    """Takes a pushed batch into the archive: the answer for each alert, written first."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        organization_id: str,
        fetcher: DetailFetcher | None,
        after_write: Callable[[set[str]], None] | None = None,
    ) -> None:
        self._store = store
        self._layout = layout
        self._org = organization_id
        self._fetcher = fetcher
        self.pending = PendingRecords(store, layout)
        self._archive = Archive(store, layout, organization_id)
        # Told webhook keys: a late push into a day whose query tables are built makes that
        # day due again (the composition root decides which days that is). Before the first
        # write into each day of a batch (a batch failing half way, never re-sent, still
        # leaves its written days due), and once the batch is written, the keys that stand
        # for its alerts (written now, or there from a delivery whose answer was lost,
        # perhaps in another minute): a pass that cleared the first marker between the two
        # finds the second.
        self._after_write = after_write

    @property
    def queued(self) -> int:
        """Detail fetches waiting in this process (the rest of the owed are in the bucket)."""
        return self._fetcher.queued if self._fetcher is not None else 0

    def take(self, alerts: list[PushedAlert | Rejected], seen_at: datetime) -> list[dict[str, Any]]:
        """Each alert archived, or quarantined with its reason: nothing of an accepted batch
        is dropped. Raises PollerError when the bucket fails (the sender then re-sends)."""
        results: list[dict[str, Any]] = []
        taken: set[str] = set()
        standing: set[str] = set()  # the webhook key of each alert of the batch
        ahead: set[date] = set()  # days told before the batch's first write into them
        try:
            for item in alerts:
                if isinstance(item, Rejected):
                    self._archive.quarantine(item, "push", seen_at)
                    shown = item.raw.get("id") if isinstance(item.raw, dict) else None
                    results.append(
                        {
                            "id": shown if isinstance(shown, str) and len(shown) <= 128 else None,
                            "result": "quarantined",
                            "reason": item.reason,
                        }
                    )
                    continue
                if item.id in taken:
                    # The same id twice in one batch: the first copy's record stands, as for any
                    # re-delivery; a second copy in another minute must not name a second key.
                    results.append({"id": item.id, "result": "already_archived"})
                    continue
                taken.add(item.id)
                if self._store.get(self._layout.alert_key(item.id)) is not None:
                    # Polled first: the poll path wrote both records, the webhook record under
                    # the API's createdAt. A second webhook key (the push's created_at may fall
                    # in another minute) would be a duplicate: first record of either kind wins.
                    results.append({"id": item.id, "result": "already_archived"})
                    continue
                document = webhook_document(item.id, item.created, item.raw, self._org)
                key = self._layout.webhook_key(item.id, item.created)
                earlier = self.pending.add(item.id, key)  # before the record: never forgotten
                if earlier and earlier != key and self._store.get(earlier) is not None:
                    # Pushed before, in another minute, full record still owed: that push's
                    # key stands (one webhook key per alert); this copy only re-offers the fetch.
                    written, key = False, earlier
                    standing.add(key)
                else:
                    if self._after_write is not None and item.created.date() not in ahead:
                        ahead.add(item.created.date())  # the day ``key`` is filed under
                        self._after_write({key})
                    written = self._create(key, json_body(document))
                    standing.add(key)
                    if written and earlier:
                        self.pending.name_webhook_key(item.id, key)  # the earlier push left none
                if self._fetcher is not None:
                    self._fetcher.offer(item.id, item.created)
                results.append(
                    {"id": item.id, "result": "archived" if written else "already_archived"}
                )
        finally:
            # Also when the batch fails half way (its sender may never re-send): the days
            # written into so far are marked again, after their writes.
            if standing and self._after_write is not None:
                self._after_write(standing)  # before the answer: a failure fails the batch
        return results

    def _create(self, key: str, body: bytes) -> bool:
        try:
            self._store.put(key, body, if_none_match=True, retain=True)
        except PreconditionFailed:
            return False
        return True
